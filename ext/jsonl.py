"""Validation of training-example JSONL (DESIGN.md §6), line by line as bytes stream in.

Each line is a UTF-8 JSON object with a non-empty `messages` array of {role, content}
(role system/user/assistant/tool). OpenAI chat format is accepted: content as a string,
an array of content parts, or null on an assistant turn that carries `tool_calls`; tool
turns may carry `tool_call_id`; a line may carry `tools` and other metadata keys. The
first bad line is reported with its number and the reason.

`JsonBounds` is the byte-wise guard every parser of client JSON here runs first (example
lines, and in ext/bundles.py the manifest, JSONL members and network.har): it counts
nesting depth and token lengths without building anything, so a document nested 200,000
deep or one 2 GB string is refused after at most `max_depth` brackets or `max_token_bytes`
bytes, before json.loads (recursion) or yajl (token buffers) could be asked to hold it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ext.errors import ApiError

ROLES = frozenset({"system", "user", "assistant", "tool"})

_STRING_BODY = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*', re.DOTALL)  # a string's content up to `"` or a final `\`
_STRUCTURE = re.compile(rb'["\[\]{}]')
_BARE = re.compile(rb'[^"\[\]{},:\s]+')  # numbers, true/false/null (or garbage the parser refuses)
_OPEN = frozenset(b"[{")


class JsonLimitError(ValueError):
    """JSON over a bound: `setting` names the ExtSettings field (TP_EXT_<SETTING>) and
    `limit` its value; 422 for depth, 413 for size."""

    def __init__(self, reason: str, setting: str, limit: int, status: int) -> None:
        super().__init__(reason)
        self.reason, self.setting, self.limit, self.status = reason, setting, limit, status

    def details(self, **where: Any) -> dict[str, Any]:
        return {**where, "reason": self.reason, "limit": self.setting, "max": self.limit}

    def hint(self) -> str:
        return f"The limit is TP_EXT_{self.setting.upper()}={self.limit}."


class JsonBounds:
    """Scans JSON text as it streams (`feed` chunk by chunk, any split) and raises
    JsonLimitError as soon as nesting exceeds `max_depth` or a string, number or literal
    exceeds `max_token_bytes`. It tracks only strings (with escapes) and brackets: it does
    not validate; the parser that reads the same bytes does. Its state is a few integers."""

    def __init__(self, max_depth: int, max_token_bytes: int, depth_setting: str = "max_json_depth",
                 token_setting: str = "max_json_token_bytes") -> None:
        self.max_depth, self.max_token = max_depth, max_token_bytes
        self._settings = (depth_setting, token_setting)
        self.depth = 0
        self._in_string = False
        self._escape = False  # the chunk ended with a backslash inside a string
        self._token = 0  # bytes of the current string or bare token

    def _grow(self, n: int) -> None:
        self._token += n
        if self._token > self.max_token:
            raise JsonLimitError(f"a JSON string or number is longer than {self.max_token} bytes",
                                 self._settings[1], self.max_token, 413)

    def feed(self, data: bytes) -> None:
        pos, n = 0, len(data)
        if self._escape and n:
            self._escape = False
            self._grow(1)
            pos = 1
        while pos < n:
            if self._in_string:
                end = _STRING_BODY.match(data, pos).end()  # type: ignore[union-attr]  # matches the empty string
                self._grow(end - pos)
                if end == n:
                    return
                if data[end] == 0x22:  # the closing quote
                    self._in_string = False
                    self._token = 0
                    pos = end + 1
                    continue
                self._escape = True  # a backslash as the last byte: what it escapes is in the next chunk
                self._grow(1)
                return
            found = _STRUCTURE.search(data, pos)
            stop = found.start() if found else n
            for bare in _BARE.finditer(data, pos, stop):
                if bare.start() != pos:
                    self._token = 0  # whitespace, comma or colon ended the previous one
                self._grow(bare.end() - bare.start())
                pos = bare.end()
            if stop != pos:
                self._token = 0
            if found is None:
                return
            self._token = 0
            byte = data[stop]
            pos = stop + 1
            if byte == 0x22:
                self._in_string = True
            elif byte in _OPEN:
                self.depth += 1
                if self.depth > self.max_depth:
                    raise JsonLimitError(f"JSON nested deeper than {self.max_depth} levels", self._settings[0],
                                         self.max_depth, 422)
            else:
                self.depth -= 1


def check_depth(raw: bytes, max_depth: int) -> None:
    """Refuses a complete document (a JSONL line, a manifest, a cursor: small, size-checked
    by the caller) nested deeper than `max_depth`, before json.loads recurses into it."""
    if raw.count(b"[") + raw.count(b"{") <= max_depth:  # cannot be deeper: the common case, at C speed
        return
    JsonBounds(max_depth, len(raw)).feed(raw)


def bad_line(number: int, reason: str) -> ApiError:
    return ApiError(422, "TP422", f"line {number}: {reason}", {"line": number, "reason": reason},
                    "Each line must be a JSON object with a non-empty messages array of {role, content}.")


def check_record(number: int, raw: bytes, max_depth: int) -> int:
    """Validates one line; returns how many messages it holds."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_line(number, f"not UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise bad_line(number, "empty line")
    try:
        check_depth(raw, max_depth)
    except JsonLimitError as e:
        raise ApiError(e.status, f"TP{e.status}", f"line {number}: {e.reason}", e.details(line=number),
                       e.hint()) from None
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

    def __init__(self, max_line_bytes: int, max_depth: int) -> None:
        self.max_line_bytes = max_line_bytes
        self.max_depth = max_depth
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
        self.messages += check_record(self.lines, raw.rstrip(b"\r"), self.max_depth)

    def finish(self) -> None:
        if self._pending:
            self._line(bytes(self._pending))
            self._pending.clear()
        if self.lines == 0:
            raise ApiError(422, "TP422", "no lines: the JSONL body is empty", {"line": 0})
