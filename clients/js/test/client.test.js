// The client library against the real service binary and a real redis-server.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import WebSocket from "ws";
import { NotificationClient } from "../src/index.js";
import { BIN, mint, publish, record, startRedis, startService, waitFor } from "./helpers.js";

const execFileP = promisify(execFile);

let redis, svc;
const clients = [];
let users = 0;
const newUser = () => `js-user-${process.pid}-${++users}`;

before(async () => {
  redis = await startRedis();
  svc = await startService(redis);
});

after(async () => {
  for (const c of clients) c.dispose();
  await svc?.stop();
  await redis?.stop();
});

function client(opts) {
  const c = new NotificationClient({ url: svc.url, WebSocket, minDelayMs: 50, maxDelayMs: 500, ...opts });
  clients.push(c);
  return c;
}

test("connects, receives notifications with ids, and tracks the last id", async () => {
  const user = newUser();
  const c = client({ userId: user, getToken: () => mint(user) });
  const r = record(c);
  c.connect();
  await waitFor(() => c.state === "open", "open");
  await waitFor(() => c.lastEventId !== undefined, "resume.position");
  const id = await publish(redis, user, "essay_status_updated", { essay_id: "e-1" });
  await waitFor(() => r.notifications.length === 1, "notification");
  assert.deepEqual(r.notifications[0], { id, event: "essay_status_updated", data: { essay_id: "e-1" } });
  assert.equal(c.lastEventId, id);
  assert.deepEqual(r.states, ["connecting", "open"]);
  c.close();
  assert.equal(c.state, "closed");
});

test("a server SIGKILL and restart: reconnects and receives what was published meanwhile, once, in order", async () => {
  const user = newUser();
  const c = client({ userId: user, getToken: () => mint(user) });
  const r = record(c);
  c.connect();
  await waitFor(() => c.state === "open" && c.lastEventId !== undefined, "open");
  const ids = [await publish(redis, user, "n", { i: 0 })];
  await waitFor(() => r.notifications.length === 1, "first notification");
  const restarted = svc.restart();
  await waitFor(() => c.state === "reconnecting", "reconnecting");
  for (let i = 1; i <= 5; i++) ids.push(await publish(redis, user, "n", { i }));
  await restarted;
  await waitFor(() => c.state === "open" && r.notifications.length === 6, "open again with the missed notifications");
  ids.push(await publish(redis, user, "n", { i: 6 }));
  await waitFor(() => r.notifications.length === 7, "live after restart");
  assert.deepEqual(r.notifications.map((n) => n.id), ids);
  assert.deepEqual(r.notifications.map((n) => n.data.i), [0, 1, 2, 3, 4, 5, 6]);
  assert.equal(r.errors.length, 0);
});

test("4001: the server ends an expired token; the client gets a new token and reconnects at once", async () => {
  const user = newUser();
  let tokens = 0;
  // checkMs so large that in-band refresh never runs: the server must close with 4001.
  const c = client({ userId: user, getToken: () => (tokens++, mint(user, tokens === 1 ? 2 : 3600)), checkMs: 3_600_000, minDelayMs: 60_000 });
  const r = record(c);
  c.connect();
  await waitFor(() => c.state === "open", "open");
  await waitFor(() => tokens === 2 && c.state === "open", "reconnected with a second token", 20000);
  assert.deepEqual(r.states, ["connecting", "open", "reconnecting", "open"]);
  assert.equal(r.errors.length, 0);
  const id = await publish(redis, user, "after", {});
  await waitFor(() => r.notifications.some((n) => n.id === id), "notification after the reconnect");
});

test("refreshes the token in-band before it expires: the socket is never closed", async () => {
  const user = newUser();
  let tokens = 0;
  // 5 s tokens: each is refreshed 2.5 s before it expires, room enough on a loaded machine.
  const c = client({ userId: user, getToken: () => (tokens++, mint(user, 5)), checkMs: 100 });
  const r = record(c);
  c.connect();
  await waitFor(() => tokens >= 3, "two in-band refreshes", 30000);
  assert.deepEqual(r.states, ["connecting", "open"]);
  const id = await publish(redis, user, "still", {});
  await waitFor(() => r.notifications.some((n) => n.id === id), "notification on the same socket");
  assert.deepEqual(r.states, ["connecting", "open"]);
});

test("1008 AUTHENTICATION_ERROR: one retry with a fresh token, then closed with the error", async () => {
  const user = newUser();
  let tokens = 0;
  const c = client({ userId: user, getToken: () => (tokens++, mint(user, 3600, "not-the-secret-at-least-32-bytes-long!!")) });
  const r = record(c);
  c.connect();
  await waitFor(() => c.state === "closed", "closed");
  assert.equal(tokens, 2);
  assert.equal(r.errors.length, 1);
  assert.equal(r.errors[0].code, 1008);
  assert.equal(r.errors[0].errorCode, "AUTHENTICATION_ERROR");
});

test("1008 AUTHENTICATION_ERROR once, then a good token: connects", async () => {
  const user = newUser();
  let tokens = 0;
  const c = client({ userId: user, getToken: () => (tokens++ === 0 ? "garbage" : mint(user)) });
  const r = record(c);
  c.connect();
  await waitFor(() => c.state === "open", "open");
  assert.equal(r.errors.length, 0);
});

test("1008 AUTHORIZATION_ERROR is terminal", async () => {
  const user = newUser();
  const c = client({ userId: user, getToken: () => mint("someone-else") });
  const r = record(c);
  c.connect();
  await waitFor(() => c.state === "closed", "closed");
  assert.deepEqual(r.errors.map((e) => [e.code, e.errorCode]), [[1008, "AUTHORIZATION_ERROR"]]);
});

test("4000 QUOTA_EXCEEDED is terminal", async () => {
  const quota = await startService(redis, { WEBSOCKET_MAX_CONNECTIONS_PER_USER: "1" });
  try {
    const user = newUser();
    const first = new NotificationClient({ url: quota.url, WebSocket, userId: user, getToken: () => mint(user) });
    clients.push(first);
    first.connect();
    await waitFor(() => first.state === "open", "first open");
    const c = new NotificationClient({ url: quota.url, WebSocket, userId: user, getToken: () => mint(user) });
    clients.push(c);
    const r = record(c);
    c.connect();
    await waitFor(() => c.state === "closed", "closed");
    assert.deepEqual(r.errors.map((e) => [e.code, e.errorCode]), [[4000, "QUOTA_EXCEEDED"]]);
    assert.equal(first.state, "open");
  } finally {
    await quota.stop();
  }
});

test("a frozen server (SIGSTOP): the app-level ping goes unanswered and the client reconnects", async () => {
  const frozen = await startService(redis);
  try {
    const user = newUser();
    const c = new NotificationClient({ url: frozen.url, WebSocket, userId: user, getToken: () => mint(user), idleMs: 200, pongTimeoutMs: 300, checkMs: 50, minDelayMs: 50, maxDelayMs: 200 });
    clients.push(c);
    const r = record(c);
    c.connect();
    await waitFor(() => c.state === "open", "open");
    frozen.proc.signal("SIGSTOP");
    await waitFor(() => c.state === "reconnecting", "reconnecting after the missing pong");
    frozen.proc.signal("SIGCONT");
    await waitFor(() => c.state === "open", "open again");
    const id = await publish(redis, user, "thawed", {});
    await waitFor(() => r.notifications.some((n) => n.id === id), "notification");
  } finally {
    await frozen.stop();
  }
});

test("Redis lost and back without its data: degraded, then open, and resync", async () => {
  const own = await startRedis();
  const s = await startService(own, { REDIS_PUBSUB_PROBE_INTERVAL: "200ms" });
  try {
    const user = newUser();
    const c = new NotificationClient({ url: s.url, WebSocket, userId: user, getToken: () => mint(user) });
    clients.push(c);
    const r = record(c);
    c.connect();
    await waitFor(() => c.state === "open", "open");
    await publish(own, user, "before", {});
    await waitFor(() => r.notifications.length === 1, "notification");
    await own.kill();
    await waitFor(() => c.state === "degraded", "degraded");
    await waitFor(() => own.start(), "redis restarted");
    await waitFor(() => c.state === "open", "open again", 30000);
    await waitFor(() => r.resyncs.length === 1, "resync");
    assert.equal(r.resyncs[0].reason, "restored_incomplete");
    const id = await publish(own, user, "after", {});
    await waitFor(() => r.notifications.some((n) => n.id === id), "live again");
  } finally {
    await s.stop();
    await own.stop();
  }
});

test("a since the history cannot cover: resync with the server's reason", async () => {
  const user = newUser();
  const c = client({ userId: user, getToken: () => mint(user), since: "not-an-id" });
  const r = record(c);
  c.connect();
  await waitFor(() => r.resyncs.length === 1, "resync");
  assert.equal(r.resyncs[0].reason, "invalid");
  assert.notEqual(c.lastEventId, "not-an-id");
});

test("4004 from an operator's disconnect is terminal; the reason reaches the app", async () => {
  const user = newUser();
  const c = client({ userId: user, getToken: () => mint(user) });
  const r = record(c);
  c.connect();
  await waitFor(() => c.state === "open", "open");
  await execFileP(BIN, ["disconnect", "--user", user, "--reason", "account disabled"], { env: { ...process.env, REDIS_URL: redis.url } });
  await waitFor(() => c.state === "closed", "closed");
  assert.deepEqual(r.errors, [{ code: 4004, errorCode: "REVOKED", message: "disconnected: account disabled" }]);
});

test("tokenIn: query still works against the service", async () => {
  const user = newUser();
  const c = client({ userId: user, getToken: () => mint(user), tokenIn: "query" });
  c.connect();
  await waitFor(() => c.state === "open", "open");
});
