"""One exception for every failure, whatever component answered: the API's
{code, message, details, hint} body plus the HTTP status."""

from __future__ import annotations

from typing import Any

import httpx


class TracepipeError(Exception):
    """Every failure the client reports: the API's error body plus the HTTP status.

    `status` is 0 when no HTTP answer arrived (connection refused or cut, after the retries
    the call allows); `code` is then "TPNET". `request_id` is the proxy's X-Request-Id, the
    key to the request in every component's log.
    """

    def __init__(self, status: int, code: str, message: str, details: Any = None, hint: str | None = None,
                 request_id: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" ({details})" if details else ""))
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.hint = hint
        self.request_id = request_id

    @classmethod
    def from_response(cls, r: httpx.Response) -> TracepipeError:
        """Reads the body of a failed response (which must have been read)."""
        rid = r.headers.get("x-request-id")
        try:
            body = r.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and "message" in body:
            return cls(r.status_code, str(body.get("code") or f"HTTP{r.status_code}"), str(body["message"]),
                       body.get("details"), body.get("hint"), rid)
        return cls(r.status_code, f"HTTP{r.status_code}", r.reason_phrase or "error", r.text[:500] or None,
                   None, rid)


def _raise_for(r: httpx.Response) -> None:
    if r.is_success:
        return
    r.read()
    raise TracepipeError.from_response(r)


def _network_error(e: httpx.TransportError, what: str) -> TracepipeError:
    err = TracepipeError(0, "TPNET", f"{what}: {type(e).__name__}: {e}", None,
                         "Check that the Tracepipe URL is right and the stack is up.")
    err.__cause__ = e
    return err
