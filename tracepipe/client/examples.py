"""Examples: registration (validated line by line server side), JSONL streamed in constant
memory, and the paged fine-tuning export."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, cast

import httpx

from tracepipe.client.base import CHUNK_BYTES, RETRY_STATUSES, ClientBase
from tracepipe.client.errors import _network_error, _raise_for
from tracepipe.client.rows import (
    Example,
    ExportResult,
    Progress,
)


class Examples(ClientBase):
    def register_example(self, suite_id: str, model: str, jsonl: str | os.PathLike[str] | bytes, *,
                         session_id: str | None = None, metadata: Mapping[str, Any] | None = None,
                         idempotency_key: str | None = None, progress: Progress | None = None,
                         job_id: str | None = None) -> Example:
        """Registers an example: `jsonl` is a file path (streamed) or the bytes themselves.
        The server validates every line and names the first bad one (TracepipeError 422 with
        the line number in `details`); nothing is stored then. Retried like uploads."""
        params = {"suite_id": suite_id, "model": model, "session_id": session_id, "job_id": job_id,
                  "metadata": json.dumps(dict(metadata)) if metadata is not None else None}
        key = idempotency_key or str(uuid.uuid4())
        source = jsonl if isinstance(jsonl, bytes) else Path(jsonl)
        r = self._upload("/examples", source, "application/jsonl", params, key, progress)
        return cast(Example, r.json())

    def get_example(self, example_id: str) -> Example:
        return cast(Example, self._json("GET", f"/examples/{example_id}"))

    def list_examples(self, filters: Mapping[str, str] | None = None) -> list[Example]:
        """`filters` are PostgREST's: {"suite_id": "eq.<id>", "model": "eq.gpt-x", "order": "created_at"}."""
        return cast(list[Example], self._json("GET", "/examples", params=filters))

    def iter_message_lines(self, example_id: str) -> Iterator[bytes]:
        """The example's JSONL as stored, one line at a time (with its b"\\n"), in constant
        memory: only the current chunk and a partial line are held. Close the generator (or
        let it finish) to release the connection."""
        with self._stream("GET", f"/examples/{example_id}/messages") as r:
            _raise_for(r)
            partial: list[bytes] = []  # pieces of a line that spans chunks (joined once: linear)
            for chunk in r.iter_bytes():
                start = 0
                while (end := chunk.find(b"\n", start)) >= 0:
                    if partial:
                        partial.append(chunk[start:end + 1])
                        yield b"".join(partial)
                        partial = []
                    else:
                        yield chunk[start:end + 1]
                    start = end + 1
                if start < len(chunk):
                    partial.append(chunk[start:])
            if partial:
                yield b"".join(partial)

    def iter_messages(self, example_id: str) -> Iterator[dict[str, Any]]:
        """The example's records ({"messages": [...], ...}), parsed line by line."""
        for line in self.iter_message_lines(example_id):
            if line.strip():
                yield cast(dict[str, Any], json.loads(line))

    def export_examples(self, dest: str | os.PathLike[str], *, suite_id: str | None = None,
                        model: str | None = None, session_id: str | None = None,
                        split: Literal["train", "validation"] | None = None,
                        validation_percent: int | None = None, page_size: int | None = None,
                        progress: Progress | None = None) -> ExportResult:
        """Writes every visible example matching the filters to `dest` as one fine-tuning
        JSONL file, following X-Next-Cursor page by page (stable order, so nothing is missed
        or repeated while others register examples). `split` picks the deterministic
        train/validation part. Written to a .part file, moved into place when complete."""
        target = Path(dest)
        part = target.with_name(target.name + ".part")
        params: dict[str, Any] = {"suite_id": suite_id, "model": model, "session_id": session_id,
                                  "split": split, "validation_percent": validation_percent, "limit": page_size}
        cursor: str | None = None
        examples = written = pages = 0
        try:
            with open(part, "wb") as out:
                while True:
                    page_params = {**params, "cursor": cursor}
                    start = out.tell()
                    count = 0
                    for attempt in range(self.retries + 1):
                        out.seek(start)
                        out.truncate()
                        try:
                            with self._stream("GET", "/examples/export", params=page_params) as r:
                                if r.status_code in RETRY_STATUSES and attempt < self.retries:
                                    self._sleep(attempt, r.headers.get("retry-after"))
                                    continue
                                _raise_for(r)
                                for chunk in r.iter_bytes(CHUNK_BYTES):
                                    out.write(chunk)
                                    if progress:
                                        progress(written + out.tell() - start, -1)
                                count = int(r.headers.get("x-export-count", 0))
                                cursor = r.headers.get("x-next-cursor")
                            break
                        except httpx.TransportError as e:  # a page is retried whole
                            if attempt == self.retries:
                                raise _network_error(e, "GET /examples/export") from e
                            self._sleep(attempt, None)
                    pages += 1
                    examples += count
                    written = out.tell()
                    if not cursor:
                        break
            part.replace(target)
        finally:
            part.unlink(missing_ok=True)
        return ExportResult(target, examples, written, pages)
