"""argon2id password hashing, off the event loop and bounded. Unknown emails still cost one
verify (against a fixed dummy hash) so response time does not tell whether an account exists.

Each hash costs ~0.2 s of several cores: a queue of them (40 logins from one address) used
to saturate the machine for every other request. At most `limit` hashes run at once per
worker (ExtSettings.password_hash_concurrency); one more is refused at once with 503 and
Retry-After instead of waiting (PasswordsBusy), so a burst costs a bounded share of the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from starlette.concurrency import run_in_threadpool

from ext.errors import ApiError

_hasher = PasswordHasher()  # argon2id, RFC 9106 low-memory profile defaults
_DUMMY_HASH = _hasher.hash("tracepipe-dummy-password-for-timing")

# Hashes running in this worker. Only the event loop's thread reads and changes it, and
# never across an await between the check and the change, so no lock is needed.
_running = 0
T = TypeVar("T")


def busy(retry_after_s: int) -> ApiError:
    return ApiError(503, "TP503", "password hashing is busy", "password_hash_concurrency",
                    "Retry after the number of seconds in Retry-After.", headers={"Retry-After": str(retry_after_s)})


async def _bounded(work: Callable[[], T], limit: int, retry_after_s: int) -> T:
    global _running
    if _running >= limit:
        raise busy(retry_after_s)
    _running += 1
    try:
        # run_in_threadpool is not cancellable: a client gone mid-hash keeps its slot until
        # the thread is done, so the bound counts every hash actually running.
        return await run_in_threadpool(work)
    finally:
        _running -= 1


async def hash_password(password: str, limit: int, retry_after_s: int) -> str:
    return await _bounded(lambda: _hasher.hash(password), limit, retry_after_s)


async def verify_password(stored_hash: str | None, password: str, limit: int, retry_after_s: int) -> bool:
    def check() -> bool:
        try:
            return _hasher.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    return await _bounded(check, limit, retry_after_s)
