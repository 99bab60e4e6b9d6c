// Drives the API with openapi-fetch and the types openapi-typescript generated from the live
// /openapi.json (api.ts, written by tests/test_openapi_clients.py next to this file). The same
// calls as the Python client's test: list, create (only the required fields where the database
// derives the rest), update, filter and delete suites, actions, MCP servers, tools and
// bindings. Prints one JSON line of what it saw; any unexpected answer throws.
import createClient from "openapi-fetch";
import type { components, paths } from "./api.js";

type Suite = components["schemas"]["suites"];

const baseUrl = process.env.TP_BASE_URL ?? "";
const token = process.env.TP_TOKEN ?? "";
const tag = process.env.TP_TAG ?? "ts";
const api = createClient<paths>({ baseUrl, headers: { Authorization: `Bearer ${token}` } });

function must<T>(what: string, r: { data?: T; error?: unknown; response: Response }): T {
  if (r.data === undefined) {
    throw new Error(`${what}: ${r.response.status} ${JSON.stringify(r.error)}`);
  }
  return r.data;
}

function first<T>(what: string, rows: T[]): T {
  const row = rows[0];
  if (row === undefined) throw new Error(`${what}: no row`);
  return row;
}

async function main(): Promise<void> {
  const seen: Record<string, unknown> = {};
  // Suites: the row type says id and name are always there (string, not string | null | undefined).
  const created: Suite[] = must("create suite", await api.POST("/suites", {
    body: { name: `TS suite ${tag}`, slug: `ts-suite-${tag}` },
    params: { header: { Prefer: "return=representation" } },
  }));
  const suite = first("create suite", created);
  const suiteId: string = suite.id;
  const suiteName: string = suite.name;
  seen.suite = { id: suiteId, name: suiteName };

  const listed = must("list suites", await api.GET("/suites", {
    params: { query: { id: `eq.${suiteId}`, order: "created_at.desc", limit: 10 }, header: { Prefer: "count=exact" } },
  }));
  seen.listed = listed.map((s) => s.id);

  const renamed = must("update suite", await api.PATCH("/suites/{suite_id}", {
    params: { path: { suite_id: suiteId } }, body: { description: "changed by openapi-fetch" },
  }));
  seen.description = renamed.description;

  // An action under the suite: only its name (the suite comes from the path).
  const action = first("create action", must("create action", await api.POST("/suites/{suite_id}/actions", {
    params: { path: { suite_id: suiteId } }, body: { name: "lookup" },
  })));
  const actions = must("list actions", await api.GET("/suites/{suite_id}/actions", {
    params: { path: { suite_id: suiteId }, query: { name: "eq.lookup" } },
  }));
  seen.actions = actions.map((a) => a.id);

  const server = first("create server", must("create server", await api.POST("/mcp-servers", {
    body: { name: `ts-server-${tag}`, url: "https://mcp.example.test/ts", transport: "streamable-http" },
  })));
  const tool = first("create tool", must("create tool", await api.POST("/mcp-servers/{mcp_server_id}/tools", {
    params: { path: { mcp_server_id: server.id } }, body: { name: "search" },
  })));
  const binding = first("create binding", must("create binding", await api.POST("/action-tool-maps", {
    body: { suite_id: suiteId, action_id: action.id, tool_id: tool.id, mcp_server_id: server.id },
  })));
  const bindings = must("list bindings", await api.GET("/action-tool-maps", {
    params: { query: { suite_id: `eq.${suiteId}` } },
  }));
  seen.bindings = bindings.map((b) => b.id);
  const changed = must("update binding", await api.PATCH("/action-tool-maps/{map_id}", {
    params: { path: { map_id: binding.id } }, body: { argument_mapping: { q: "$.query" } },
  }));
  seen.argument_mapping = changed.argument_mapping;

  must("delete binding", await api.DELETE("/action-tool-maps/{map_id}", { params: { path: { map_id: binding.id } } }));
  must("delete tool", await api.DELETE("/mcp-servers/{mcp_server_id}/tools/{tool_id}",
    { params: { path: { mcp_server_id: server.id, tool_id: tool.id } } }));
  must("delete server", await api.DELETE("/mcp-servers/{mcp_server_id}", { params: { path: { mcp_server_id: server.id } } }));
  must("delete action", await api.DELETE("/suites/{suite_id}/actions/{action_id}",
    { params: { path: { suite_id: suiteId, action_id: action.id } } }));
  must("delete suite", await api.DELETE("/suites/{suite_id}", { params: { path: { suite_id: suiteId } } }));
  const gone = await api.GET("/suites/{suite_id}", { params: { path: { suite_id: suiteId } } });
  seen.after_delete = gone.response.status;
  const me = must("me", await api.GET("/users/me", {}));
  const email: string = me.email;
  seen.me = email;
  console.log(JSON.stringify(seen));
}

main().catch((e: unknown) => {
  console.error(e instanceof Error ? e.message : e);
  process.exit(1);
});
