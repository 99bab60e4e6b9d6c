"""The SDK: a typed Python client for Tracepipe's HTTP API (DESIGN.md §3), for external consumers.

    from tracepipe.client import Client

    with Client("http://127.0.0.1:8080", api_key="tp_…") as tp:
        suite = tp.create_suite("Checkout", "checkout")
        session = tp.upload_session("trace.zip", progress=lambda sent, total: print(sent, total))
        for line in tp.iter_messages(example_id):
            ...

Why it exists rather than raw httpx: the parts every consumer gets subtly wrong are done
once here — an access token that is renewed shortly *before* it expires (so a long export
never fails half way on a 401), uploads that are retried on connection errors and 5xx
with one `Idempotency-Key` (so a retry can never create a second session), downloads that
resume with `Range` and are checked against the stored sha256, JSONL streamed line by line
in constant memory, and one exception type (`TracepipeError`) carrying the API's
`{code, message, details, hint}` body whatever component answered.

Rows are TypedDicts: they are the JSON the API returns, so columns added later still
arrive (at run time) without a client release, while type checkers know the documented
fields. Only httpx is needed.
"""

from __future__ import annotations

from tracepipe.client.account import Account
from tracepipe.client.base import CHUNK_BYTES, TUS_CHUNK_BYTES, TUS_THRESHOLD_BYTES, default_resume_dir
from tracepipe.client.capability import Capability
from tracepipe.client.errors import TracepipeError
from tracepipe.client.examples import Examples
from tracepipe.client.pipeline import Pipeline
from tracepipe.client.rows import (
    Action,
    ActionToolMap,
    ApiKey,
    CreatedApiKey,
    Example,
    ExportResult,
    McpServer,
    Progress,
    Session,
    Suite,
    SuiteMember,
    Tool,
)
from tracepipe.client.sessions import Sessions

__all__ = [
    "CHUNK_BYTES",
    "TUS_CHUNK_BYTES",
    "TUS_THRESHOLD_BYTES",
    "Action",
    "ActionToolMap",
    "ApiKey",
    "Client",
    "CreatedApiKey",
    "Example",
    "ExportResult",
    "McpServer",
    "Progress",
    "Session",
    "Suite",
    "SuiteMember",
    "Tool",
    "TracepipeError",
    "default_resume_dir",
]


class Client(Capability, Account, Sessions, Examples, Pipeline):
    """One Tracepipe origin and one identity.

    Credentials, by preference: `api_key` (exchanged at POST /auth/token for a short-lived
    JWT, re-exchanged shortly before it expires), or `login(email, password)` (storefront
    session: the refresh token is rotated at POST /auth/refresh shortly before the access
    token expires), or a fixed `token` (used as is, never renewed).

    `clock` is a monotonic clock in seconds; token expiry is tracked on it rather than on
    the JWT's `exp`, so a machine whose wall clock is off still renews in time. Tests pass
    their own to make expiry happen without waiting. `refresh_margin_s` is how long before
    expiry a token is renewed (capped at a third of its lifetime for very short tokens).
    """

