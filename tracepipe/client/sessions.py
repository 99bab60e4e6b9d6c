"""Sessions: bundle uploads (one streamed POST, or tus above a threshold, resumable across
processes), reads, deletes and resumable, checked downloads."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import cast

import httpx

from tracepipe.client.base import CHUNK_BYTES, RETRY_STATUSES, TUS, ClientBase
from tracepipe.client.errors import TracepipeError, _network_error, _raise_for
from tracepipe.client.rows import (
    Progress,
    Session,
)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _file_range(path: Path, offset: int, size: int) -> Iterator[bytes]:
    """`size` bytes of the file from `offset`, streamed in CHUNK_BYTES pieces."""
    with path.open("rb") as f:
        f.seek(offset)
        left = size
        while left > 0 and (chunk := f.read(min(CHUNK_BYTES, left))):
            left -= len(chunk)
            yield chunk



class Sessions(ClientBase):
    def upload_session(self, path: str | os.PathLike[str], *, idempotency_key: str | None = None,
                       progress: Progress | None = None) -> Session:
        """Uploads a bundle file, streamed from disk (never whole in memory).

        Connection errors and 5xx are retried (up to `retries` times) with the same
        Idempotency-Key — a fresh uuid unless you pass one, e.g. to make a retry across
        process restarts safe — so the server answers a retry with the first upload's
        session instead of creating another. `progress(sent, total)` is called as bytes
        leave; a retried attempt counts again from 0. Files of `tus_threshold` bytes and
        more go through `upload_session_resumable` instead (the upload's URL, not a key,
        makes its retries safe).
        """
        if Path(path).stat().st_size >= self.tus_threshold:
            return self.upload_session_resumable(path, progress=progress)
        key = idempotency_key or str(uuid.uuid4())
        r = self._upload("/sessions", Path(path), "application/zip", {}, key, progress)
        return cast(Session, r.json())

    def upload_session_resumable(self, path: str | os.PathLike[str], *,
                                 progress: Progress | None = None) -> Session:
        """Uploads a bundle through tus (POST /uploads, then PATCHes of `tus_chunk` bytes),
        what `upload_session` does for files of `tus_threshold` bytes and more.

        The upload's URL is kept in a small resume file in `resume_dir` (a user cache dir),
        keyed by the file's sha256 and size: after a crash, Ctrl-C or a lost connection, the
        next call for the same file asks the server for its offset (HEAD) and sends only the
        rest. An upload the server has already committed answers with its session. The
        session's sha256 is checked against the file's."""
        source = Path(path)
        total = source.stat().st_size
        digest = _file_sha256(source)
        resume = self.resume_dir / f"{digest}-{total}.json"
        url, offset = self._tus_resume(resume)
        if url is None:
            url = self._tus_create(source.name, total)
            self.resume_dir.mkdir(parents=True, exist_ok=True)
            resume.write_text(json.dumps({"origin": self.base_url, "url": url, "file": str(source.resolve())}))
            offset = 0
        session_id = self._tus_send(url, source, offset, total, progress)
        resume.unlink(missing_ok=True)
        session = self.get_session(session_id)
        if session["sha256"] != digest:
            raise TracepipeError(0, "TPINTEGRITY", "the stored bundle's sha256 differs from the file's",
                                 {"session_id": session_id, "stored": session["sha256"], "file": digest})
        return session

    def _tus_resume(self, resume: Path) -> tuple[str | None, int]:
        """The URL and server offset of an upload a resume file remembers, or (None, 0)."""
        try:
            record = json.loads(resume.read_text())
        except (OSError, ValueError):
            return None, 0
        if record.get("origin") != self.base_url:
            return None, 0
        r = self._send("HEAD", record["url"], headers=TUS, retry=True)
        if r.status_code in (404, 410):  # expired, terminated or failed: start again
            resume.unlink(missing_ok=True)
            return None, 0
        _raise_for(r)
        return record["url"], int(r.headers["upload-offset"])

    def _tus_create(self, filename: str, total: int) -> str:
        name = base64.b64encode(filename.encode()).decode()
        r = self._send("POST", "/uploads", headers={**TUS, "Upload-Length": str(total),
                                                   "Upload-Metadata": f"filename {name}"}, retry=True)
        _raise_for(r)
        return str(r.headers["location"])

    def _tus_send(self, url: str, source: Path, offset: int, total: int, progress: Progress | None) -> str:
        """PATCHes from `offset` to the end; a failed PATCH (connection, 5xx, 409) is followed
        by a HEAD for the server's offset and sent again from there. The session id."""
        failures = 0
        if progress:
            progress(offset, total)
        while True:
            size = min(self.tus_chunk, total - offset)
            headers = {**TUS, "Content-Type": "application/offset+octet-stream", "Upload-Offset": str(offset),
                       "Content-Length": str(size)}
            try:
                r = self._http.patch(url, content=_file_range(source, offset, size),
                                     headers=self._headers(headers))
            except httpx.TransportError as e:
                r = None
                error: TracepipeError = _network_error(e, f"PATCH {url}")
            if r is not None and r.status_code == 204:
                failures = 0
                offset = int(r.headers["upload-offset"])
                if progress:
                    progress(offset, total)
                if offset >= total:
                    return str(r.headers["upload-session-id"])
                continue
            if r is not None and r.status_code not in (*RETRY_STATUSES, 401, 409):
                _raise_for(r)
            if r is not None:
                error = TracepipeError.from_response(r)
                if r.status_code == 401 and (self._api_key or self._refresh_token):
                    with self._lock:
                        self._expires_at = float("-inf")
            if failures >= self.retries:
                raise error
            self._sleep(failures, r.headers.get("retry-after") if r is not None else None)
            failures += 1
            head = self._send("HEAD", url, headers=TUS, retry=True)
            _raise_for(head)
            offset = int(head.headers["upload-offset"])

    def get_session(self, session_id: str) -> Session:
        return cast(Session, self._json("GET", f"/sessions/{session_id}"))

    def list_sessions(self, filters: Mapping[str, str] | None = None) -> list[Session]:
        return cast(list[Session], self._json("GET", "/sessions", params=filters))

    def delete_session(self, session_id: str) -> Session:
        """Deletes the session row, its bundle and its examples' objects (the uploader only)."""
        return cast(Session, self._json("DELETE", f"/sessions/{session_id}"))

    def download_session(self, session_id: str, dest: str | os.PathLike[str], *,
                         progress: Progress | None = None) -> Path:
        """Streams the stored bundle to `dest`, byte-identical.

        The bytes go to `dest.part`, and the bundle's ETag (its sha256) to `dest.part.etag`
        as soon as the first answer names it. A dropped connection resumes where it stopped,
        and so does the next call after an interrupted one (Ctrl-C, a crash): it asks for the
        rest with `Range` and `If-Range: <that ETag>`, so a bundle that changed meanwhile is
        sent whole (200) and the part is started over. The whole file is checked against the
        sha256 before it is moved into place: `dest` never holds a partial or corrupt bundle.
        A part that fails the check, or a refusal (404, 403), removes the part.
        """
        target = Path(dest)
        part = target.with_name(target.name + ".part")
        etag_file = target.with_name(target.name + ".part.etag")
        digest = hashlib.sha256()
        written = 0
        etag: str | None = None
        if part.exists() and etag_file.exists():  # an earlier call was interrupted: go on from its part
            etag = etag_file.read_text().strip() or None
            with open(part, "rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    digest.update(chunk)
                    written += len(chunk)
        total = -1
        keep = True  # an interruption keeps the part for the next call
        try:
            with open(part, "ab" if etag and written else "wb") as out:
                if not (etag and written):
                    digest, written = hashlib.sha256(), 0
                for attempt in range(self.retries + 1):
                    headers = {"Range": f"bytes={written}-", "If-Range": etag} if etag and written else {}
                    try:
                        with self._stream("GET", f"/sessions/{session_id}/bundle",
                                          headers={"Accept-Encoding": "identity", **headers}) as r:
                            if r.status_code == 416 and written:  # the part holds every byte already
                                total = written
                                break
                            if r.status_code == 200 and written:  # the object changed or Range was ignored
                                out.seek(0)
                                out.truncate()
                                digest, written = hashlib.sha256(), 0
                            if r.status_code in RETRY_STATUSES and attempt < self.retries:
                                self._sleep(attempt, r.headers.get("retry-after"))
                                continue
                            try:
                                _raise_for(r)
                            except TracepipeError:
                                keep = False
                                raise
                            if r.status_code == 200 or etag is None:
                                etag = r.headers.get("etag")
                                etag_file.write_text(etag or "")
                            length = int(r.headers.get("content-length", -1))
                            if total < 0 and length >= 0:
                                total = written + length
                            if progress:
                                progress(written, total)
                            for chunk in r.iter_bytes(CHUNK_BYTES):
                                out.write(chunk)
                                digest.update(chunk)
                                written += len(chunk)
                                if progress:
                                    progress(written, total)
                        break
                    except httpx.TransportError as e:
                        if attempt == self.retries:
                            raise _network_error(e, f"GET /sessions/{session_id}/bundle") from e
                        self._sleep(attempt, None)
            expected = (etag or "").strip('"')
            if expected and len(expected) == 64 and digest.hexdigest() != expected:
                keep = False
                raise TracepipeError(0, "TPCHECKSUM", "downloaded bundle does not match its sha256",
                                     {"expected": expected, "got": digest.hexdigest()}, "Download it again.")
            part.replace(target)
            keep = False
        finally:
            if not keep:
                part.unlink(missing_ok=True)
                etag_file.unlink(missing_ok=True)
        return target
