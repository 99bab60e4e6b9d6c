// Calls the document forbids: each line must be a type error under --strict (tsc fails on
// an unused @ts-expect-error), so the generated types are not `any` or all-optional.
import createClient from "openapi-fetch";
import type { components, paths } from "./api.js";

const api = createClient<paths>({ baseUrl: "http://127.0.0.1:9" });

export async function forbidden(row: components["schemas"]["suites"]): Promise<void> {
  // @ts-expect-error name is required in a new suite
  await api.POST("/suites", { body: { description: "no name" } });
  // @ts-expect-error id is server-assigned: not in suites_insert
  const insert: components["schemas"]["suites_insert"] = { name: "x", id: "00000000-0000-0000-0000-000000000000" };
  await api.POST("/suites", { body: insert });
  // @ts-expect-error Prefer on a list is one of count=exact|planned|estimated
  await api.GET("/suites", { params: { header: { Prefer: "count=bogus" } } });
  // @ts-expect-error a path parameter is required
  await api.GET("/suites/{suite_id}", {});
  // @ts-expect-error created_at is read-only: not in suites_update
  const update: components["schemas"]["suites_update"] = { created_at: "2026-01-01T00:00:00Z" };
  await api.PATCH("/suites/{suite_id}", { params: { path: { suite_id: row.id } }, body: update });
  // @ts-expect-error description may be null: not assignable to string
  const description: string = row.description;
  void description;
}
