"""Data integrity: every row's object exists with the recorded size and sha256, and every
object has a row. Run by `tracepipe scrub`; reads every object once (streaming)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from psycopg_pool import AsyncConnectionPool

from ext.db import as_identity_service
from ext.storage import ObjectStore

OBJECT_NAMES = {"sessions": "bundle.zip", "examples": "messages.jsonl"}


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


async def scrub(pool: AsyncConnectionPool, store: ObjectStore, verify_digests: bool = True,
                limit: int | None = None) -> ScrubReport:
    report = ScrubReport()
    async with as_identity_service(pool) as conn:
        cur = await conn.execute("select kind, id, size_bytes, sha256 from auth.object_manifest()")
        rows = await cur.fetchall()
    expected = {f"{r['kind']}/{r['id']}/{OBJECT_NAMES[r['kind']]}": r for r in rows}
    stored: dict[str, int] = {}
    for prefix in ("sessions/", "examples/"):
        async for obj in store.list_objects(prefix):
            stored[obj["Key"]] = int(obj["Size"])
    for key, row in list(expected.items())[:limit]:
        report.checked += 1
        if key not in stored:
            report.rows_without_object.append(key)
            continue
        if stored[key] != row["size_bytes"]:
            report.size_mismatch.append(key)
            continue
        if verify_digests:
            digest = hashlib.sha256()
            async for chunk in store.stream(key):
                digest.update(chunk)
            if digest.hexdigest() != row["sha256"]:
                report.digest_mismatch.append(key)
    report.objects_without_row = sorted(k for k in stored if k not in expected)
    return report
