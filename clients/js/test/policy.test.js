// Close-code policy, backoff and de-duplication, against a scripted ws
// server: codes the real service only sends on misbehaviour (1003, 1009) or
// that belong to later issues (4004) are easiest to produce here. The real
// service is in client.test.js.
import { after, test } from "node:test";
import assert from "node:assert/strict";
import WebSocket, { WebSocketServer } from "ws";
import { NotificationClient, backoffDelay, historyId, tokenExpiry } from "../src/index.js";
import { mint, waitFor } from "./helpers.js";

const servers = [];
after(async () => {
  for (const s of servers) {
    for (const c of s.clients) c.terminate();
    await new Promise((r) => s.close(r));
  }
});

/** A server that runs onConnection for each accepted socket; its url and the connections it saw. */
async function scripted(onConnection) {
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  servers.push(wss);
  await new Promise((r) => wss.on("listening", r));
  const seen = [];
  wss.on("connection", (ws, req) => {
    const u = new URL(req.url, "http://x");
    u.protocols = req.headers["sec-websocket-protocol"];
    seen.push(u);
    onConnection(ws, seen.length);
  });
  return { url: `ws://127.0.0.1:${wss.address().port}`, seen };
}

const reason = (code, error_code) => JSON.stringify({ error_code, message: "m" });

for (const [code, errorCode] of [[4000, "QUOTA_EXCEEDED"], [4004, "REVOKED"], [1003, "UNSUPPORTED_DATA"], [1009, "MESSAGE_TOO_BIG"], [1008, "AUTHORIZATION_ERROR"]]) {
  test(`${code} ${errorCode} is terminal: closed, one error, no reconnect`, async () => {
    const srv = await scripted((ws) => ws.close(code, reason(code, errorCode)));
    const c = new NotificationClient({ url: srv.url, WebSocket, userId: "u", getToken: () => mint("u"), minDelayMs: 1, maxDelayMs: 1 });
    const errors = [];
    c.on("error", (e) => errors.push(e));
    c.connect();
    await waitFor(() => c.state === "closed", "closed");
    assert.deepEqual(errors, [{ code, errorCode, message: "m" }]);
    assert.equal(srv.seen.length, 1);
    c.dispose();
  });
}

for (const [code, errorCode] of [[1001, "SERVER_SHUTDOWN"], [1011, "INTERNAL_ERROR"], [1013, "SERVER_BUSY"], [4002, "SLOW_CONSUMER"], [4003, "RATE_LIMITED"]]) {
  test(`${code} ${errorCode}: reconnects after a backoff`, async () => {
    const srv = await scripted((ws, n) => n === 1 && ws.close(code, reason(code, errorCode)));
    const delays = [];
    const c = new NotificationClient({
      url: srv.url, WebSocket, userId: "u", getToken: () => mint("u"), minDelayMs: 10, maxDelayMs: 1000, random: () => 1,
      logger: { debug: (...a) => a[1] === "reconnecting in" && delays.push(a[2]) },
    });
    c.connect();
    await waitFor(() => srv.seen.length === 2 && c.state === "open", "second connection open");
    // 1013 and 4003 start three doublings later (80 ms), the others at the floor (10 ms).
    assert.deepEqual(delays, [code === 1013 || code === 4003 ? 80 : 10]);
    c.dispose();
  });
}

test("a server that accepts then closes at once: delays keep growing to the cap, no tight loop", async () => {
  const srv = await scripted((ws) => ws.close(1011, reason(1011, "INTERNAL_ERROR")));
  const delays = [];
  const c = new NotificationClient({
    url: srv.url, WebSocket, userId: "u", getToken: () => mint("u"), minDelayMs: 5, maxDelayMs: 40, random: () => 1,
    logger: { debug: (...a) => a[1] === "reconnecting in" && delays.push(a[2]) },
  });
  c.connect();
  await waitFor(() => delays.length >= 6, "six reconnects");
  c.dispose();
  assert.deepEqual(delays.slice(0, 6), [5, 10, 20, 40, 40, 40]);
});

test("the server unreachable (1006): reconnect attempts back off", async () => {
  const srv = await scripted(() => {});
  const url = srv.url;
  const wss = servers.pop();
  await new Promise((r) => wss.close(r));
  const delays = [];
  const c = new NotificationClient({
    url, WebSocket, userId: "u", getToken: () => mint("u"), minDelayMs: 5, maxDelayMs: 20, random: () => 1,
    logger: { debug: (...a) => a[1] === "reconnecting in" && delays.push(a[2]) },
  });
  const states = [];
  c.on("state", (s) => states.push(s));
  c.connect();
  await waitFor(() => delays.length >= 4, "four attempts");
  c.dispose();
  assert.deepEqual(delays.slice(0, 4), [5, 10, 20, 20]);
  assert.deepEqual(states.slice(0, 2), ["connecting", "reconnecting"]);
  assert.equal(states.at(-1), "closed");
});

test("backoffDelay: full jitter under a ceiling that doubles and is capped before the jitter", () => {
  assert.equal(backoffDelay(0, 500, 30000, () => 1), 500);
  assert.equal(backoffDelay(3, 500, 30000, () => 1), 4000);
  assert.equal(backoffDelay(20, 500, 30000, () => 1), 30000);
  assert.equal(backoffDelay(1000, 500, 30000, () => 0.5), 15000); // capped clients still spread
  assert.equal(backoffDelay(20, 500, 30000, () => 0), 0);
  for (let i = 0; i < 1000; i++) {
    const d = backoffDelay(i % 40, 500, 30000);
    assert.ok(d >= 0 && d <= 30000, `delay ${d}`);
  }
});

test("tokenExpiry reads exp without verifying; anything else is undefined", () => {
  const t = mint("u", 100);
  const exp = tokenExpiry(t);
  assert.ok(Math.abs(exp - (Date.now() + 100000)) < 2000);
  assert.equal(tokenExpiry("nope"), undefined);
  assert.equal(tokenExpiry("a.e30.b"), undefined); // {} has no exp
});

test("a notification id seen before is not emitted twice, even across reconnects", async () => {
  const frames = [
    { id: "hond0eonrd-1-hond0eonrd", event: "n", data: 1 },
    { id: "hond0eonrd-2-hond0f1x2a", event: "n", data: 2 },
  ];
  const srv = await scripted((ws, n) => {
    if (n === 1) {
      for (const f of frames) ws.send(JSON.stringify(f));
      ws.send(JSON.stringify(frames[1]));
      ws.close(1001, reason(1001, "SERVER_SHUTDOWN"));
    } else {
      for (const f of frames) ws.send(JSON.stringify(f)); // a server that replays too much
      ws.send(JSON.stringify({ id: "hond0eonrd-3-hond0f1x2b", event: "n", data: 3 }));
    }
  });
  const c = new NotificationClient({ url: srv.url, WebSocket, userId: "u", getToken: () => mint("u"), minDelayMs: 1, maxDelayMs: 1 });
  const got = [];
  c.on("notification", (n) => got.push(n.data));
  c.connect();
  await waitFor(() => got.includes(3), "third notification");
  c.dispose();
  assert.deepEqual(got, [1, 2, 3]);
  assert.equal(srv.seen[1].searchParams.get("since"), "hond0eonrd-2-hond0f1x2a");
  assert.equal(srv.seen[0].searchParams.get("since"), "");
});

test("the resume id is read as the gateway reads it: the history id opening the frame, never a payload's own id", async () => {
  const hid = "hond0eonrd-4-hond0f1x2c";
  const srv = await scripted((ws, n) => {
    if (n === 1) {
      // Two "id" keys (a publisher that bypassed the checks): JSON.parse keeps the last one.
      ws.send(`{"id":"${hid}","event":"n","data":1,"id":"order-7"}`);
      // Plain PUBLISH notifications with ids of their own, one looking like a history id's shape.
      ws.send(JSON.stringify({ id: "job-7-done", event: "n", data: 2 }));
      ws.send(JSON.stringify({ id: "job-3-done", event: "n", data: 3 }));
      ws.send(JSON.stringify({ id: "job-3-done", event: "n", data: 4 }));
      ws.close(1001, reason(1001, "SERVER_SHUTDOWN"));
    } else {
      ws.send(JSON.stringify({ event: "n", data: 5 }));
    }
  });
  const c = new NotificationClient({ url: srv.url, WebSocket, userId: "u", getToken: () => mint("u"), minDelayMs: 1, maxDelayMs: 1 });
  const got = [];
  c.on("notification", (n) => got.push([n.data, n.id]));
  c.connect();
  await waitFor(() => got.some(([d]) => d === 5), "the notification after the reconnect");
  c.dispose();
  assert.deepEqual(got, [[1, hid], [2, "job-7-done"], [3, "job-3-done"], [4, "job-3-done"], [5, undefined]]);
  assert.equal(srv.seen[1].searchParams.get("since"), hid);
  assert.equal(historyId(`{"id":"${hid}"}`), hid);
  for (const t of [`{"id":"job-7-done"}`, `{"event":"n","id":"${hid}"}`, `{"id":"hond0eonrd-4-"}`, `{"id":"hoqukq2ylv-4-hnqukq2ylv"}`, ` {"id":"${hid}"}`]) {
    assert.equal(historyId(t), undefined, t);
  }
});

test("connects to /ws/v1/status/{userId} with since and the token after bearer in Sec-WebSocket-Protocol; http(s) URLs become ws(s)", async () => {
  const srv = await scripted(() => {});
  const c = new NotificationClient({ url: srv.url.replace("ws:", "http:") + "/", WebSocket, userId: "user/é", getToken: () => "tok", since: "s-1" });
  c.connect();
  await waitFor(() => c.state === "open", "open");
  c.dispose();
  const u = srv.seen[0];
  assert.equal(u.pathname, "/ws/v1/status/user%2F%C3%A9");
  assert.deepEqual(u.protocols.split(",").map((p) => p.trim()), ["bearer", "tok"]);
  assert.equal(u.searchParams.get("token"), null);
  assert.equal(u.searchParams.get("since"), "s-1");
});

test("tokenIn: query sends ?token= and no subprotocol", async () => {
  const srv = await scripted(() => {});
  const c = new NotificationClient({ url: srv.url, WebSocket, userId: "u", getToken: () => "tok", tokenIn: "query" });
  c.connect();
  await waitFor(() => c.state === "open", "open");
  c.dispose();
  assert.equal(srv.seen[0].searchParams.get("token"), "tok");
  assert.equal(srv.seen[0].protocols, undefined);
});

test("degraded and restored map to states; restored incomplete and resume.incomplete become resync", async () => {
  const srv = await scripted((ws) => {
    ws.send(JSON.stringify({ event: "connection.degraded", data: { reason: "redis_unavailable" } }));
    ws.on("message", (m) => {
      if (JSON.parse(m).type === "ping") {
        ws.send(JSON.stringify({ event: "connection.restored", data: { complete: false } }));
        ws.send(JSON.stringify({ event: "resume.incomplete", data: { since: "x", reason: "trimmed" } }));
        ws.send(JSON.stringify({ event: "resume.position", data: { id: "p-9-z" } }));
      }
    });
  });
  const c = new NotificationClient({ url: srv.url, WebSocket, userId: "u", getToken: () => mint("u") });
  const states = [];
  const resyncs = [];
  const notes = [];
  c.on("state", (s) => states.push(s));
  c.on("resync", (r) => resyncs.push(r));
  c.on("notification", (n) => notes.push(n));
  c.connect();
  await waitFor(() => c.state === "degraded", "degraded");
  c.checkLiveness(); // sends a ping
  await waitFor(() => resyncs.length === 2, "two resyncs");
  c.dispose();
  assert.deepEqual(states, ["connecting", "open", "degraded", "open", "closed"]);
  assert.deepEqual(resyncs, [{ reason: "restored_incomplete" }, { reason: "trimmed", since: "x" }]);
  assert.equal(c.lastEventId, "p-9-z");
  assert.equal(notes.length, 0);
});

test("on() returns a function that removes the listener", async () => {
  const srv = await scripted((ws) => ws.send(JSON.stringify({ event: "n", data: 1 })));
  const c = new NotificationClient({ url: srv.url, WebSocket, userId: "u", getToken: () => mint("u") });
  let a = 0;
  let b = 0;
  const offA = c.on("notification", () => a++);
  c.on("notification", () => b++);
  offA();
  c.connect();
  await waitFor(() => b === 1, "notification");
  c.dispose();
  assert.equal(a, 0);
});

test("only a pong answers the ping: other frames arriving meanwhile do not keep a dead connection", async () => {
  const pings = [0, 0, 0];
  const srv = await scripted((ws, n) => {
    ws.on("message", (m) => {
      if (JSON.parse(String(m)).type !== "ping") return;
      pings[n]++;
      // The first connection answers with something else (as if frames sent
      // before it died were read only now); the second answers properly.
      ws.send(n === 1 ? JSON.stringify({ event: "late", data: {} }) : JSON.stringify({ event: "pong", data: {} }));
    });
  });
  const late = [];
  const c = new NotificationClient({ url: srv.url, WebSocket, userId: "u", getToken: () => mint("u"), idleMs: 100, pongTimeoutMs: 150, checkMs: 20, minDelayMs: 1, maxDelayMs: 1 });
  c.on("notification", (n) => late.push(n.event));
  c.connect();
  try {
    await waitFor(() => srv.seen.length === 2, "a reconnect after the unanswered ping");
    assert.equal(pings[1], 1, "one ping on the first connection, then the verdict");
    assert.ok(late.includes("late"), "the frame still reaches the app");
    // A second ping on one connection means the first was answered: a pong counts.
    await waitFor(() => pings[2] >= 2, "a second ping on the answered connection");
    assert.equal(srv.seen.length, 2);
  } finally {
    c.dispose();
  }
});

test("4000 right after the client closed a connection itself is retried with backoff: the server may still count the old one", async () => {
  // Connection 1 never answers the ping: the client drops it and reconnects.
  // Connection 2 finds the quota still holding connection 1 (the server has
  // not processed its close yet): 4000. Connection 3 is let in.
  const srv = await scripted((ws, n) => {
    if (n === 2) ws.close(4000, reason(4000, "QUOTA_EXCEEDED"));
    if (n >= 3) ws.on("message", (m) => JSON.parse(String(m)).type === "ping" && ws.send(JSON.stringify({ event: "pong", data: {} })));
  });
  const errors = [];
  const c = new NotificationClient({ url: srv.url, WebSocket, userId: "u", getToken: () => mint("u"), idleMs: 100, pongTimeoutMs: 150, checkMs: 20, minDelayMs: 1, maxDelayMs: 1 });
  c.on("error", (e) => errors.push(e));
  c.connect();
  try {
    await waitFor(() => srv.seen.length >= 3 && c.state === "open", "open on the third connection");
    assert.deepEqual(errors, []);
  } finally {
    c.dispose();
  }
});

test("4000 long after the client's own close (quotaGraceMs) is terminal again", async () => {
  const srv = await scripted((ws, n) => n === 2 && ws.close(4000, reason(4000, "QUOTA_EXCEEDED")));
  const errors = [];
  const c = new NotificationClient({ url: srv.url, WebSocket, userId: "u", getToken: () => mint("u"), idleMs: 100, pongTimeoutMs: 150, checkMs: 20, minDelayMs: 1, maxDelayMs: 1, quotaGraceMs: 0 });
  c.on("error", (e) => errors.push(e));
  c.connect();
  try {
    await waitFor(() => c.state === "closed", "closed by the 4000");
    assert.deepEqual(errors.map((e) => [e.code, e.errorCode]), [[4000, "QUOTA_EXCEEDED"]]);
    assert.equal(srv.seen.length, 2);
  } finally {
    c.dispose();
  }
});
