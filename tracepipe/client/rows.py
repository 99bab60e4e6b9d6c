"""What the API answers, as TypedDicts: the JSON itself, so columns added later still arrive
(at run time) without a client release, while type checkers know the documented fields."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

Progress = Callable[[int, int], None]
"""Called with (bytes transferred so far, total bytes or -1 when unknown)."""


# --- rows -------------------------------------------------------------------------------------
# Timestamps stay RFC 3339 strings and ids uuid strings: what the API sends, lossless.

class Suite(TypedDict):
    id: str
    name: str
    slug: str
    description: str | None
    created_by: str | None
    created_at: str
    updated_at: str


class SuiteMember(TypedDict):
    id: str
    suite_id: str
    user_id: str
    role: Literal["viewer", "editor", "owner"]
    created_at: str
    updated_at: str


class Action(TypedDict):
    id: str
    suite_id: str
    name: str
    description: str | None
    input_schema: dict[str, Any]
    created_at: str
    updated_at: str


class McpServer(TypedDict):
    id: str
    name: str
    url: str
    transport: Literal["stdio", "sse", "streamable-http"]
    description: str | None
    created_by: str | None
    created_at: str
    updated_at: str


class Tool(TypedDict):
    id: str
    mcp_server_id: str
    name: str
    description: str | None
    input_schema: dict[str, Any]
    created_at: str
    updated_at: str


class ActionToolMap(TypedDict):
    id: str
    suite_id: str
    action_id: str
    mcp_server_id: str
    tool_id: str
    argument_mapping: dict[str, Any]
    created_at: str
    updated_at: str


class Session(TypedDict):
    id: str
    user_id: str
    suite_id: str | None
    size_bytes: int
    sha256: str
    started_at: str | None
    ended_at: str | None
    event_count: int
    network_count: int
    screenshot_count: int
    files: list[dict[str, Any]]
    metadata: dict[str, Any]
    created_at: str
    updated_at: str


class Example(TypedDict):
    id: str
    session_id: str | None
    suite_id: str
    model: str
    message_count: int
    size_bytes: int
    sha256: str
    metadata: dict[str, Any]
    created_at: str
    job_id: str | None  # the pipeline job that registered it


class ApiKey(TypedDict):
    id: str
    name: str
    prefix: str
    suites: list[str] | None
    access: Literal["read", "write"]
    expires_at: str | None
    last_used_at: str | None
    revoked_at: str | None
    created_at: str


class CreatedApiKey(ApiKey):
    key: str
    """The secret, shown this once."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    examples: int
    bytes: int
    pages: int
