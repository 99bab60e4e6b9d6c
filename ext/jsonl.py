"""Validation of training-example JSONL (DESIGN.md §6), line by line as bytes stream in.

Each line is a UTF-8 JSON object with a non-empty `messages` array of {role, content}
(role system/user/assistant/tool). OpenAI chat format is accepted: content as a string,
an array of content parts, or null on an assistant turn that carries `tool_calls`; tool
turns may carry `tool_call_id`; a line may carry `tools` and other metadata keys. The
first bad line is reported with its number and the reason.
"""

from __future__ import annotations

import json
from typing import Any

from ext.errors import ApiError

ROLES = frozenset({"system", "user", "assistant", "tool"})


def bad_line(number: int, reason: str) -> ApiError:
    return ApiError(422, "TP422", f"line {number}: {reason}", {"line": number, "reason": reason},
                    "Each line must be a JSON object with a non-empty messages array of {role, content}.")


def check_record(number: int, raw: bytes) -> int:
    """Validates one line; returns how many messages it holds."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_line(number, f"not UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise bad_line(number, "empty line")
    try:
        record = json.loads(text)
    except ValueError as e:
        raise bad_line(number, f"not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise bad_line(number, "not a JSON object")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_line(number, "messages must be a non-empty array")
    for i, message in enumerate(messages):
        _check_message(number, i, message)
    tools = record.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise bad_line(number, "tools must be an array")
    return len(messages)


def _check_message(number: int, index: int, message: Any) -> None:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad_line(number, f"{where} is not an object")
    role = message.get("role")
    if role not in ROLES:
        raise bad_line(number, f"{where}.role must be one of system, user, assistant, tool (got {role!r})")
    content = message.get("content")
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if role != "assistant":
            raise bad_line(number, f"{where}.tool_calls is only allowed on assistant messages")
        if not isinstance(tool_calls, list) or not tool_calls:
            raise bad_line(number, f"{where}.tool_calls must be a non-empty array")
        for j, call in enumerate(tool_calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                    or not isinstance(function.get("arguments", ""), str):
                raise bad_line(number, f"{where}.tool_calls[{j}] must have function.name and function.arguments "
                                       "(a string)")
    if content is None:
        if not (role == "assistant" and tool_calls):
            raise bad_line(number, f"{where}.content is required")
    elif isinstance(content, list):
        if not all(isinstance(part, dict) and isinstance(part.get("type"), str) for part in content):
            raise bad_line(number, f"{where}.content parts must be objects with a type")
    elif not isinstance(content, str):
        raise bad_line(number, f"{where}.content must be a string, an array of parts, or null")


class LineValidator:
    """Feed bytes as they arrive; complete lines are validated at once. `finish()` checks the
    last line. Counts lines (records) and the messages in them."""

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self.lines = 0
        self.messages = 0
        self._pending = bytearray()

    def feed(self, data: bytes) -> None:
        self._pending += data
        start = 0
        while (end := self._pending.find(b"\n", start)) != -1:
            self._line(bytes(self._pending[start:end]))
            start = end + 1
        del self._pending[:start]
        if len(self._pending) > self.max_line_bytes:
            raise bad_line(self.lines + 1, f"longer than {self.max_line_bytes} bytes")

    def _line(self, raw: bytes) -> None:
        if len(raw) > self.max_line_bytes:
            raise bad_line(self.lines + 1, f"longer than {self.max_line_bytes} bytes")
        self.lines += 1
        self.messages += check_record(self.lines, raw.rstrip(b"\r"))

    def finish(self) -> None:
        if self._pending:
            self._line(bytes(self._pending))
            self._pending.clear()
        if self.lines == 0:
            raise ApiError(422, "TP422", "no lines: the JSONL body is empty", {"line": 0})
