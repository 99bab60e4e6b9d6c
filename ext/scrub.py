"""Data integrity: every row's object exists with the recorded size and sha256, and every
object has a row. Run by `tracepipe scrub`; reads every object once (streaming).

Memory holds the object listing (key and size), never the rows: they come in pages of
PAGE_ROWS (auth.object_manifest, keyset-paged). The listing is taken first, so a row
committed after it began (an upload finishing meanwhile) may have an object the listing
missed: such a row's object is looked up on its own before it is reported missing. (An
upload writes its object before its row's transaction starts, so an older row's object,
if it exists, is in the listing.)"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool

from ext.db import as_identity_service
from ext.storage import ObjectStore

OBJECT_NAMES = {"sessions": "bundle.zip", "examples": "messages.jsonl"}
PAGE_ROWS = 5000


@dataclass
class ScrubReport:
    checked: int = 0
    rows_without_object: list[str] = field(default_factory=list)
    size_mismatch: list[str] = field(default_factory=list)
    digest_mismatch: list[str] = field(default_factory=list)
    objects_without_row: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.rows_without_object or self.size_mismatch or self.digest_mismatch
                    or self.objects_without_row)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checked": self.checked, "rows_without_object": self.rows_without_object,
                "size_mismatch": self.size_mismatch, "digest_mismatch": self.digest_mismatch,
                "objects_without_row": self.objects_without_row}


async def _pages(pool: AsyncConnectionPool, kind: str) -> AsyncIterator[list[tuple[str, int, str, datetime]]]:
    """Every row of a kind as (id, size_bytes, sha256, created_at), in id order, a page per
    short transaction (tuples, not dicts: a million rows take seconds, not tens)."""
    after = None
    while True:
        async with as_identity_service(pool) as conn:
            cur = conn.cursor(row_factory=tuple_row)
            await cur.execute("select id::text, size_bytes, sha256, created_at from auth.object_manifest(%s, %s, %s)",
                              [kind, after, PAGE_ROWS])
            page = await cur.fetchall()
        yield page
        if len(page) < PAGE_ROWS:
            return
        after = page[-1][0]


async def _digest(store: ObjectStore, key: str) -> str:
    digest = hashlib.sha256()
    async for chunk in store.stream(key):
        digest.update(chunk)
    return digest.hexdigest()


async def scrub(pool: AsyncConnectionPool, store: ObjectStore, verify_digests: bool = True) -> ScrubReport:
    report = ScrubReport()
    async with as_identity_service(pool) as conn:
        listed_at = (await (await conn.execute("select clock_timestamp() as t")).fetchone() or {})["t"]
    stored: dict[str, int] = {}
    for prefix in (f"{kind}/" for kind in OBJECT_NAMES):
        async for obj in store.list_objects(prefix):
            stored[obj["Key"]] = int(obj["Size"])
    for kind, name in OBJECT_NAMES.items():
        async for page in _pages(pool, kind):
            report.checked += len(page)
            for row_id, expected_size, sha256, created_at in page:
                key = f"{kind}/{row_id}/{name}"
                size = stored.pop(key, None)
                if size is None and created_at >= listed_at:  # newer than the listing: look
                    head = await store.head(key)
                    size = None if head is None else int(head["ContentLength"])
                if size is None:
                    report.rows_without_object.append(key)
                elif size != expected_size:
                    report.size_mismatch.append(key)
                elif verify_digests and await _digest(store, key) != sha256:
                    report.digest_mismatch.append(key)
    report.objects_without_row = sorted(stored)
    return report
