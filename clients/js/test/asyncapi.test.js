// docs/asyncapi.yaml is a valid AsyncAPI 3.0 document (@asyncapi/parser,
// errors and warnings both fail) and describes what the client relies on.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { Parser } from "@asyncapi/parser";

const source = readFileSync(new URL("../../../docs/asyncapi.yaml", import.meta.url), "utf8");

test("docs/asyncapi.yaml parses and validates without diagnostics", async () => {
  const { document, diagnostics } = await new Parser().parse(source);
  const problems = diagnostics.map((d) => `${["error", "warning", "info", "hint"][d.severity]} ${d.code} at ${d.path.join(".")}: ${d.message}`);
  assert.ok(document, `not a valid document:\n${problems.join("\n")}`);
  assert.deepEqual(problems.filter((p) => p.startsWith("error") || p.startsWith("warning")), []);
  assert.equal(document.version(), "3.0.0");
  const addresses = document.channels().all().map((c) => c.address()).sort();
  assert.deepEqual(addresses, ["/sse/v1/status/{client_id}", "/ws", "/ws/v1/status/{client_id}"]);
  const names = document.components().messages().all().map((m) => m.name()).sort();
  assert.deepEqual(names, ["connection.closed", "connection.degraded", "connection.restored", "notification", "ping", "pong", "refresh", "resume.incomplete", "resume.position", "token.refreshed"]);
});
