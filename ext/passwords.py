"""argon2id password hashing, off the event loop and bounded. Unknown emails still cost one
verify (against a fixed dummy hash) so response time does not tell whether an account exists.

Each hash costs ~0.2 s of several cores: a queue of them (40 logins from one address) used
to saturate the machine for every other request. At most `limit` hashes run at once per
worker (ExtSettings.password_hash_concurrency), and at most `per_source` for one address
(password_hash_per_source); one more is refused at once with 503 (or 429 for the address)
and Retry-After instead of waiting, so a burst costs a bounded share of the CPU and one
address cannot hold every slot.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from starlette.concurrency import run_in_threadpool

from ext.errors import ApiError

_hasher = PasswordHasher()  # argon2id, RFC 9106 low-memory profile defaults
_DUMMY_HASH = _hasher.hash("tracepipe-dummy-password-for-timing")

# Hashes running in this worker, in all and per source. Only the event loop's thread reads
# and changes them, never across an await between the check and the change: no lock needed.
_running = 0
_running_by_source: dict[str, int] = {}


@dataclass(frozen=True)
class HashBound:
    """How many hashes may run at once in this worker (`limit`) and for one source
    (`per_source`: a single address cannot take every slot and so refuse everyone else's
    logins), and the Retry-After of a refusal."""
    limit: int
    per_source: int
    retry_after_s: int
    source: str


def _refused(status: int, message: str, setting: str, retry_after_s: int) -> ApiError:
    return ApiError(status, f"TP{status}", message, setting, "Retry after the number of seconds in Retry-After.",
                    headers={"Retry-After": str(retry_after_s)})


@contextmanager
def hashing_slot(bound: HashBound) -> Iterator[None]:
    """Holds one of the worker's hashing slots for the block, or refuses at once (before any
    other work: a refused login costs no database round trip)."""
    global _running
    mine = _running_by_source.get(bound.source, 0)
    if mine >= bound.per_source:
        raise _refused(429, "too many sign-ins at once from this address", "password_hash_per_source",
                       bound.retry_after_s)
    if _running >= bound.limit:
        raise _refused(503, "password hashing is busy", "password_hash_concurrency", bound.retry_after_s)
    _running += 1
    _running_by_source[bound.source] = mine + 1
    try:
        yield
    finally:
        _running -= 1
        left = _running_by_source[bound.source] - 1
        if left:
            _running_by_source[bound.source] = left
        else:
            del _running_by_source[bound.source]


# run_in_threadpool is not cancellable: a client gone mid-hash keeps its slot until the
# thread is done, so the bound counts every hash actually running.

async def hash_password(password: str, bound: HashBound) -> str:
    with hashing_slot(bound):
        return await run_in_threadpool(_hasher.hash, password)


async def verify_password(stored_hash: str | None, password: str) -> bool:
    """The caller holds a hashing_slot around it (and the lookup before it)."""
    def check() -> bool:
        try:
            return _hasher.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    return await run_in_threadpool(check)
