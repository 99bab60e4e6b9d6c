"""The Capability Surface: suites and their members, actions, the MCP catalog (servers and
tools) and the bindings between actions and tools."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, cast

from tracepipe.client.account import Account
from tracepipe.client.errors import TracepipeError
from tracepipe.client.rows import (
    Action,
    ActionToolMap,
    McpServer,
    Suite,
    SuiteMember,
    Tool,
)


class Capability(Account):  # invitations read the caller's memberships (me)
    def list_suites(self, filters: Mapping[str, str] | None = None) -> list[Suite]:
        """`filters` are PostgREST's: {"slug": "eq.checkout", "order": "name", "limit": "10"}."""
        return cast(list[Suite], self._json("GET", "/suites", params=filters))

    def get_suite(self, suite_id: str) -> Suite:
        return cast(Suite, self._json("GET", f"/suites/{suite_id}"))

    def create_suite(self, name: str, slug: str, description: str | None = None) -> Suite:
        """The caller becomes the suite's owner."""
        return cast(Suite, self._create("/suites", {"name": name, "slug": slug, "description": description}))

    def update_suite(self, suite_id: str, **changes: Any) -> Suite:
        return cast(Suite, self._json("PATCH", f"/suites/{suite_id}", json=changes))

    def delete_suite(self, suite_id: str) -> Suite:
        return cast(Suite, self._json("DELETE", f"/suites/{suite_id}"))

    # -- members
    def list_members(self, suite_id: str) -> list[SuiteMember]:
        return cast(list[SuiteMember], self._json("GET", f"/suites/{suite_id}/members"))

    def add_member(self, suite_id: str, user_id: str, role: Literal["viewer", "editor", "owner"]) -> SuiteMember:
        """Invites a user by id: the membership counts once they accept it."""
        return cast(SuiteMember, self._create(f"/suites/{suite_id}/members", {"user_id": user_id, "role": role}))

    def invite(self, suite_id: str, *, email: str, role: Literal["viewer", "editor", "owner"]) -> SuiteMember:
        """Invites an email: it reaches the account that has verified that address."""
        return cast(SuiteMember, self._create(f"/suites/{suite_id}/members", {"email": email, "role": role}))

    def invitations(self) -> list[dict[str, Any]]:
        """The caller's pending invitations (from GET /users/me)."""
        return [m for m in self.me().get("memberships", []) if not m.get("accepted", True)]

    def accept_invitation(self, suite_id: str) -> SuiteMember:
        me = self.me()
        rows = self._json("PATCH", f"/suites/{suite_id}/members", params={"user_id": f"eq.{me['id']}"},
                          json={"accepted": True}, headers={"Prefer": "return=representation"})
        if not rows:
            raise TracepipeError(404, "TP404", "no invitation to this suite", None, None)
        return cast(SuiteMember, rows[0])

    def update_member(self, suite_id: str, user_id: str, role: Literal["viewer", "editor", "owner"]) -> SuiteMember:
        return cast(SuiteMember, self._json("PATCH", f"/suites/{suite_id}/members/{user_id}", json={"role": role}))

    def remove_member(self, suite_id: str, user_id: str) -> SuiteMember:
        return cast(SuiteMember, self._json("DELETE", f"/suites/{suite_id}/members/{user_id}"))

    # -- actions
    def list_actions(self, suite_id: str, filters: Mapping[str, str] | None = None) -> list[Action]:
        return cast(list[Action], self._json("GET", f"/suites/{suite_id}/actions", params=filters))

    def get_action(self, suite_id: str, action_id: str) -> Action:
        return cast(Action, self._json("GET", f"/suites/{suite_id}/actions/{action_id}"))

    def create_action(self, suite_id: str, name: str, *, description: str | None = None,
                      input_schema: Mapping[str, Any] | None = None) -> Action:
        return cast(Action, self._create(f"/suites/{suite_id}/actions", {
            "name": name, "description": description,
            "input_schema": dict(input_schema) if input_schema is not None else None}))

    def update_action(self, suite_id: str, action_id: str, **changes: Any) -> Action:
        return cast(Action, self._json("PATCH", f"/suites/{suite_id}/actions/{action_id}", json=changes))

    def delete_action(self, suite_id: str, action_id: str) -> Action:
        return cast(Action, self._json("DELETE", f"/suites/{suite_id}/actions/{action_id}"))

    # -- MCP servers and tools
    def list_mcp_servers(self, filters: Mapping[str, str] | None = None) -> list[McpServer]:
        return cast(list[McpServer], self._json("GET", "/mcp-servers", params=filters))

    def get_mcp_server(self, server_id: str) -> McpServer:
        return cast(McpServer, self._json("GET", f"/mcp-servers/{server_id}"))

    def create_mcp_server(self, name: str, url: str, transport: Literal["stdio", "sse", "streamable-http"],
                          description: str | None = None) -> McpServer:
        return cast(McpServer, self._create("/mcp-servers", {"name": name, "url": url, "transport": transport,
                                                             "description": description}))

    def update_mcp_server(self, server_id: str, **changes: Any) -> McpServer:
        return cast(McpServer, self._json("PATCH", f"/mcp-servers/{server_id}", json=changes))

    def delete_mcp_server(self, server_id: str) -> McpServer:
        return cast(McpServer, self._json("DELETE", f"/mcp-servers/{server_id}"))

    def list_tools(self, server_id: str, filters: Mapping[str, str] | None = None) -> list[Tool]:
        return cast(list[Tool], self._json("GET", f"/mcp-servers/{server_id}/tools", params=filters))

    def get_tool(self, server_id: str, tool_id: str) -> Tool:
        return cast(Tool, self._json("GET", f"/mcp-servers/{server_id}/tools/{tool_id}"))

    def create_tool(self, server_id: str, name: str, *, description: str | None = None,
                    input_schema: Mapping[str, Any] | None = None) -> Tool:
        return cast(Tool, self._create(f"/mcp-servers/{server_id}/tools", {
            "name": name, "description": description,
            "input_schema": dict(input_schema) if input_schema is not None else None}))

    def update_tool(self, server_id: str, tool_id: str, **changes: Any) -> Tool:
        return cast(Tool, self._json("PATCH", f"/mcp-servers/{server_id}/tools/{tool_id}", json=changes))

    def delete_tool(self, server_id: str, tool_id: str) -> Tool:
        return cast(Tool, self._json("DELETE", f"/mcp-servers/{server_id}/tools/{tool_id}"))

    # -- action-tool maps
    def list_action_tool_maps(self, suite_id: str | None = None,
                              filters: Mapping[str, str] | None = None) -> list[ActionToolMap]:
        params = {**(filters or {}), **({"suite_id": f"eq.{suite_id}"} if suite_id else {})}
        return cast(list[ActionToolMap], self._json("GET", "/action-tool-maps", params=params))

    def get_action_tool_map(self, map_id: str) -> ActionToolMap:
        return cast(ActionToolMap, self._json("GET", f"/action-tool-maps/{map_id}"))

    def create_action_tool_map(self, suite_id: str, action_id: str, mcp_server_id: str, tool_id: str,
                               argument_mapping: Mapping[str, Any] | None = None) -> ActionToolMap:
        """Binds a suite's action to an MCP server's tool (the action must belong to the suite)."""
        return cast(ActionToolMap, self._create("/action-tool-maps", {
            "suite_id": suite_id, "action_id": action_id, "mcp_server_id": mcp_server_id, "tool_id": tool_id,
            "argument_mapping": dict(argument_mapping) if argument_mapping is not None else None}))

    def update_action_tool_map(self, map_id: str, **changes: Any) -> ActionToolMap:
        return cast(ActionToolMap, self._json("PATCH", f"/action-tool-maps/{map_id}", json=changes))

    def delete_action_tool_map(self, map_id: str) -> ActionToolMap:
        return cast(ActionToolMap, self._json("DELETE", f"/action-tool-maps/{map_id}"))
