"""The local stack's SMTP sink: a real SMTP server (aiosmtpd) that delivers every message
it accepts to a file, <state>/mail/<id>.eml, instead of onwards. `tracepipe mail list|show`
reads them; tests read them to follow a verification mail.

Each file is the message as received, with the envelope prepended the way a delivery agent
records it (Return-Path, X-Original-To). Bounded: messages above `max_bytes` are refused
(552), and only the newest `keep` files are kept.

    python -m tracepipe.mailsink --host 127.0.0.1 --port 11025 --dir <state>/mail
"""

from __future__ import annotations

import argparse
import email
import email.policy
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUFFIX = ".eml"


class Sink:
    """aiosmtpd handler: each accepted message becomes one file, written atomically."""

    def __init__(self, directory: Path, keep: int) -> None:
        self.dir = directory
        self.keep = keep

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        now = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
        message_id = f"{stamp}.{int(now % 1 * 1e6):06d}-{uuid.uuid4().hex[:6]}"  # sorts by arrival
        head = f"Return-Path: <{envelope.mail_from}>\r\nX-Original-To: {', '.join(envelope.rcpt_tos)}\r\n"
        content = envelope.original_content or envelope.content or b""
        tmp = self.dir / f".{message_id}.tmp"
        tmp.write_bytes(head.encode() + content)
        tmp.replace(self.dir / f"{message_id}{SUFFIX}")
        self._prune()
        return "250 Message accepted for delivery"

    def _prune(self) -> None:
        files = sorted(self.dir.glob(f"*{SUFFIX}"))
        for old in files[:max(0, len(files) - self.keep)]:
            old.unlink(missing_ok=True)


@dataclass(frozen=True)
class StoredMail:
    id: str
    path: Path
    mail_from: str
    to: str
    subject: str
    date: str

    def text(self) -> str:
        """The message's text body (the first text/plain part)."""
        msg = email.message_from_bytes(self.path.read_bytes(), policy=email.policy.default)
        part = msg.get_body(preferencelist=("plain",))
        return part.get_content() if part is not None else ""  # type: ignore[attr-defined]


def messages(directory: Path) -> list[StoredMail]:
    """Every stored message, oldest first."""
    out = []
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        with open(path, "rb") as f:
            msg = email.message_from_binary_file(f, policy=email.policy.default)
        out.append(StoredMail(path.stem, path, str(msg.get("Return-Path", "")).strip("<>"),
                              str(msg.get("X-Original-To", "")), str(msg.get("Subject", "")),
                              str(msg.get("Date", ""))))
    return out


def find(directory: Path, message_id: str) -> StoredMail:
    for m in messages(directory):
        if m.id == message_id:
            return m
    raise KeyError(message_id)


def main(argv: list[str] | None = None) -> int:
    from aiosmtpd.controller import Controller

    parser = argparse.ArgumentParser(prog="python -m tracepipe.mailsink", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--max-bytes", type=int, default=1024 * 1024, help="largest message accepted")
    parser.add_argument("--keep", type=int, default=1000, help="messages kept (oldest removed first)")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    os.chmod(args.dir, 0o700)  # codes in the mail are secrets of their recipients
    controller = Controller(Sink(args.dir, args.keep), hostname=args.host, port=args.port,
                            data_size_limit=args.max_bytes, enable_SMTPUTF8=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    controller.start()
    print(f"mail sink listening on {args.host}:{args.port}, storing in {args.dir}", flush=True)
    stop.wait()
    controller.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
