// The library and the demo page in real Chromium (Debian's, through
// playwright-core): headless, the flags of internal/browsertest, a fresh
// profile per launch (playwright's own temporary one). The Go harness runs
// this inside a PID namespace, so Chromium's crash handlers die with it.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import path from "node:path";
import { chromium } from "playwright-core";
import { metric, mint, publish, revoke, startFilteringProxy, startPageServer, startRedis, startService, waitFor } from "./helpers.js";

const executablePath = process.env.CHROMIUM;
const skip = executablePath ? false : "chromium not installed (scripts/test.sh installs it)";
const artifacts = process.env.TEST_ARTIFACTS_DIR || path.resolve("test-artifacts");
const flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"];

let redis, svc, browser;

before(async () => {
  if (skip) return;
  redis = await startRedis();
  // JWT_SECRET_KEY unset: development secret, so the demo page mints tokens.
  svc = await startService(redis, { JWT_SECRET_KEY: "" });
  browser = await chromium.launch({ executablePath, headless: true, args: flags, timeout: 60000 });
});

after(async () => {
  await browser?.close();
  await svc?.stop();
  await redis?.stop();
});

async function demoPage(user) {
  const context = await browser.newContext({ viewport: { width: 1000, height: 720 } });
  const page = await context.newPage();
  page.setDefaultTimeout(20000);
  await page.goto(`${svc.http}/demo`);
  await page.fill("#user", user);
  await page.click("#connect");
  await page.waitForSelector('#state[data-state="open"]');
  return { context, page };
}

const items = (page) => page.$$eval("#list li", (lis) => lis.map((li) => ({ id: li.dataset.id, event: li.dataset.event })).reverse());

test("demo page: connects, shows notifications from the form and from the CLI, survives a service restart", { skip }, async () => {
  const user = `demo-${process.pid}`;
  const { context, page } = await demoPage(user);
  try {
    await page.fill("#event", "batch_phase_concluded");
    await page.fill("#data", '{"batch_id":"b-1"}');
    await page.click("#publish");
    await waitFor(async () => (await items(page)).length === 1, "the form's notification");
    const cli = await publish(redis, user, "essay_status_updated", { essay_id: "e-1", status: "graded" });
    await waitFor(async () => (await items(page)).length === 2, "the CLI's notification");

    await svc.proc.kill();
    await page.waitForSelector('#state:not([data-state="open"])');
    const whileDown = await publish(redis, user, "published_while_down", {});
    await waitFor(() => svc.start(), "service restarted", 20000);
    await page.waitForSelector('#state[data-state="open"]', { timeout: 30000 });
    const afterRestart = await publish(redis, user, "after_restart", {});
    await waitFor(async () => (await items(page)).length === 4, "every notification");
    const got = await items(page);
    assert.deepEqual(got.map((i) => i.event), ["batch_phase_concluded", "essay_status_updated", "published_while_down", "after_restart"]);
    assert.deepEqual(got.slice(1).map((i) => i.id), [cli, whileDown, afterRestart]);
    mkdirSync(artifacts, { recursive: true });
    await page.screenshot({ path: path.join(artifacts, "demo.png"), fullPage: true });
  } finally {
    await context.close();
  }
});

test("the tab loses its network and gets it back: what was published meanwhile arrives once", { skip }, async () => {
  const user = `offline-${process.pid}`;
  const { context, page } = await demoPage(user);
  try {
    const first = await publish(redis, user, "before", {});
    await waitFor(async () => (await items(page)).length === 1, "first notification");
    await context.setOffline(true);
    // Chromium's offline emulation fails new connections; the open socket may
    // live on. Either way the app must end with everything, once.
    const during = [await publish(redis, user, "offline_1", {}), await publish(redis, user, "offline_2", {})];
    await page.evaluate(() => window.demoClient.checkLiveness());
    await context.setOffline(false);
    const back = await publish(redis, user, "back", {});
    await waitFor(async () => (await items(page)).length === 4, "every notification", 30000);
    assert.deepEqual((await items(page)).map((i) => i.id), [first, ...during, back]);
    await page.waitForSelector('#state[data-state="open"]');
  } finally {
    await context.close();
  }
});

test("a dead socket in a page whose timers run late: the wall-clock check reconnects; online checks at once", { skip }, async () => {
  const frozen = await startService(redis, { JWT_SECRET_KEY: "" });
  const context = await browser.newContext();
  const page = await context.newPage();
  try {
    await page.clock.install();
    await page.goto(`${frozen.http}/demo`);
    await page.evaluate(async () => {
      const { NotificationClient } = await import("/demo/client.js");
      const token = async () => (await (await fetch("/demo/token", { method: "POST", body: JSON.stringify({ user: "sleeper" }) })).json()).token;
      window.states = [];
      window.c = new NotificationClient({ url: location.origin, userId: "sleeper", getToken: token });
      window.c.on("state", (s) => window.states.push(s));
      window.c.connect();
    });
    await waitFor(() => page.evaluate(() => window.c.state === "open"), "open");
    frozen.proc.signal("SIGSTOP");
    // A throttled hidden tab runs the check about once a minute: jump a minute.
    await page.clock.runFor(60_000);
    await page.clock.runFor(60_000);
    await waitFor(() => page.evaluate(() => window.c.state === "reconnecting"), "reconnecting after the unanswered ping");
    frozen.proc.signal("SIGCONT");
    await page.clock.runFor(60_000);
    await waitFor(() => page.evaluate(() => window.c.state === "open"), "open again");

    // Coming back online checks at once: a ping now, the verdict pongTimeout later.
    frozen.proc.signal("SIGSTOP");
    await page.evaluate(() => window.dispatchEvent(new Event("online")));
    await page.clock.runFor(10_000);
    await waitFor(() => page.evaluate(() => window.c.state === "reconnecting"), "reconnecting after online");
    frozen.proc.signal("SIGCONT");
    await page.clock.runFor(60_000);
    await waitFor(() => page.evaluate(() => window.c.state === "open"), "open again");
  } finally {
    frozen.proc.signal("SIGCONT");
    await context.close();
    await frozen.stop();
  }
});

test("dispose() removes every listener the client added to the page", { skip }, async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  try {
    await page.addInitScript(() => {
      window.listeners = 0;
      for (const target of [window, document]) {
        const add = target.addEventListener.bind(target);
        const remove = target.removeEventListener.bind(target);
        target.addEventListener = (...a) => (window.listeners++, add(...a));
        target.removeEventListener = (...a) => (window.listeners--, remove(...a));
      }
    });
    await page.goto(`${svc.http}/demo`);
    const counts = await page.evaluate(async () => {
      const before = window.listeners;
      const { NotificationClient } = await import("/demo/client.js");
      const c = new NotificationClient({ url: location.origin, userId: "u", getToken: () => "t" });
      const during = window.listeners;
      c.dispose();
      return { added: during - before, left: window.listeners - before };
    });
    assert.ok(counts.added >= 4, `added ${counts.added}`);
    assert.equal(counts.left, 0);
  } finally {
    await context.close();
  }
});

test("EventSource in the page: the service restarts while notifications are published; every one arrives once, in order", { skip }, async () => {
  const user = `es-${process.pid}`;
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(30000);
  try {
    await page.goto(`${svc.http}/demo`);
    await page.evaluate(async (user) => {
      const { token } = await (await fetch("/demo/token", { method: "POST", body: JSON.stringify({ user }) })).json();
      window.got = [];
      window.es = new EventSource(`/sse/v1/status/${user}?token=${token}`);
      window.es.onmessage = (ev) => {
        const m = JSON.parse(ev.data);
        if (m.id) window.got.push(m.id);
        if (m.event === "resume.position") window.positioned = true;
      };
    }, user);
    await waitFor(() => page.evaluate(() => window.positioned === true), "stream open");
    const ids = [await publish(redis, user, "before", {})];
    await waitFor(async () => (await page.evaluate(() => window.got.length)) === 1, "first event");
    await svc.proc.kill();
    for (let i = 0; i < 3; i++) ids.push(await publish(redis, user, "while_down", { i }));
    await waitFor(() => svc.start(), "service restarted", 20000);
    ids.push(await publish(redis, user, "after", {}));
    await waitFor(async () => (await page.evaluate(() => window.got.length)) >= ids.length, "every event", 30000);
    assert.deepEqual(await page.evaluate(() => window.got), ids);
  } finally {
    await context.close();
  }
});

test("the client falls back to Server-Sent Events behind a proxy that refuses WebSockets, and returns when it allows them", { skip }, async () => {
  const proxy = await startFilteringProxy(svc);
  const user = `fb-${process.pid}`;
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(30000);
  try {
    await page.goto(`${proxy.url}/demo`);
    await page.evaluate(async (user) => {
      const { NotificationClient } = await import("/demo/client.js");
      const getToken = async () => (await (await fetch("/demo/token", { method: "POST", body: JSON.stringify({ user }) })).json()).token;
      window.got = [];
      window.transports = [];
      window.c = new NotificationClient({ url: location.origin, userId: user, getToken, minDelayMs: 20, maxDelayMs: 100,
        sseAfterFailures: 2, wsRetryMs: 1500, checkMs: 100 });
      window.c.on("notification", (n) => window.got.push(n.id));
      window.c.on("transport", (t) => window.transports.push(t));
      window.c.connect();
    }, user);
    await waitFor(() => page.evaluate(() => window.c.transport === "sse" && window.c.state === "open"), "open over SSE");
    const ids = [await publish(redis, user, "over_sse", {})];
    await waitFor(async () => (await page.evaluate(() => window.got.length)) === 1, "notification over SSE");
    proxy.allowUpgrades(true);
    await waitFor(() => page.evaluate(() => window.c.transport === "websocket" && window.c.state === "open"), "back on WebSocket");
    ids.push(await publish(redis, user, "over_ws", {}));
    await waitFor(async () => (await page.evaluate(() => window.got.length)) === 2, "notification over WebSocket");
    assert.deepEqual(await page.evaluate(() => window.got), ids);
    assert.deepEqual(await page.evaluate(() => window.transports), ["sse", "websocket"]);
  } finally {
    await context.close();
    await proxy.close();
  }
});

test("pagehide closes the socket so the page enters the back/forward cache; pageshow reconnects", { skip }, async () => {
  // Playwright turns the back/forward cache off by default: a launch of its own with it on.
  const bf = await chromium.launch({ executablePath, headless: true, args: flags, ignoreDefaultArgs: ["--disable-back-forward-cache"], timeout: 60000 });
  const own = await startService(redis, { JWT_SECRET_KEY: "" });
  const active = async () => {
    const text = await (await fetch(`${own.http}/metrics`)).text();
    return Number(/websocket_connections_active\{transport="websocket"\} (\d+)/.exec(text)?.[1]);
  };
  try {
    const page = await (await bf.newContext()).newPage();
    page.setDefaultTimeout(30000);
    await page.goto(`${own.http}/demo`);
    await page.evaluate(async () => {
      const { NotificationClient } = await import("/demo/client.js");
      const getToken = async () => (await (await fetch("/demo/token", { method: "POST", body: JSON.stringify({ user: "bfcache" }) })).json()).token;
      window.shows = [];
      addEventListener("pageshow", (e) => window.shows.push(e.persisted));
      window.c = new NotificationClient({ url: location.origin, userId: "bfcache", getToken });
      window.c.connect();
    });
    await waitFor(() => page.evaluate(() => window.c.state === "open"), "open");
    assert.equal(await active(), 1);
    await page.goto(`${own.http}/healthz`);
    await waitFor(async () => (await active()) === 0, "socket closed on pagehide");
    await page.goBack({ waitUntil: "commit" });
    await waitFor(() => page.evaluate(() => window.shows?.includes(true)), "restored from the back/forward cache");
    await waitFor(() => page.evaluate(() => window.c.state === "open"), "reconnected on pageshow");
    await waitFor(async () => (await active()) === 1, "socket open again");
  } finally {
    await bf.close();
    await own.stop();
  }
});

// A page on another origin (127.0.0.2) than the service (127.0.0.1, which
// allows it in CORS_ORIGINS), whose WebSockets are blocked: the client falls
// back to Server-Sent Events and must see the service's refusals as they
// are (issue 18, defect 8), not as network errors retried forever.
test("another origin over Server-Sent Events: quota, revocation and a revoked token reach the app as terminal errors", { skip }, async () => {
  const site = await startPageServer();
  const own = await startService(redis, { CORS_ORIGINS: site.origin, WEBSOCKET_MAX_CONNECTIONS_PER_USER: "1" });
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(30000);
  const user = `xo-${process.pid}`;
  try {
    await page.goto(`${site.origin}/`);
    await page.evaluate(async ({ service }) => {
      const { NotificationClient } = await import("/client.js");
      class Blocked {
        constructor() {
          throw new Error("WebSockets blocked on this network");
        }
      }
      window.clients = {};
      window.make = (name, userId, token) => {
        const r = { states: [], errors: [], transports: [] };
        const c = new NotificationClient({ url: service, userId, getToken: () => token, WebSocket: Blocked, sseAfterFailures: 1, minDelayMs: 20, maxDelayMs: 200 });
        c.on("state", (s) => r.states.push(s));
        c.on("error", (e) => r.errors.push(e));
        c.on("transport", (t) => r.transports.push(t));
        window.clients[name] = { c, r };
        c.connect();
      };
      window.get = (name) => ({ state: window.clients[name].c.state, transport: window.clients[name].c.transport, ...window.clients[name].r });
    }, { service: own.http });
    assert.notEqual(await page.evaluate(() => location.origin), new URL(own.http).origin);
    const token = mint(user);

    await page.evaluate(({ user, token }) => window.make("first", user, token), { user, token });
    await waitFor(async () => (await page.evaluate(() => window.get("first"))).state === "open", "the first client open over SSE");
    assert.equal((await page.evaluate(() => window.get("first"))).transport, "sse");

    // The quota is full: 429 → 4000, terminal, and Retry-After is readable.
    await page.evaluate(({ user, token }) => window.make("second", user, token), { user, token });
    await waitFor(async () => (await page.evaluate(() => window.get("second"))).state === "closed", "the second client ended by the quota");
    const second = await page.evaluate(() => window.get("second"));
    assert.deepEqual(second.errors.map((e) => [e.code, e.errorCode]), [[4000, "QUOTA_EXCEEDED"]]);
    const retryAfter = await page.evaluate(async ({ url }) => (await fetch(url)).headers.get("Retry-After"), {
      url: `${own.http}/sse/v1/status/${user}?token=${token}`,
    });
    assert.match(String(retryAfter), /^\d+$/);

    // An operator revokes the user: the open stream ends with 4004, terminal.
    await revoke(redis, user);
    await waitFor(async () => (await page.evaluate(() => window.get("first"))).state === "closed", "the first client ended by the revocation");
    assert.deepEqual((await page.evaluate(() => window.get("first"))).errors.map((e) => [e.code, e.errorCode]), [[4004, "REVOKED"]]);

    // The revoked token again: 401 → 1008 AUTHENTICATION_ERROR, one retry with
    // getToken's token (the same, still revoked), then terminal.
    await page.evaluate(({ user, token }) => window.make("revoked", user, token), { user, token });
    await waitFor(async () => (await page.evaluate(() => window.get("revoked"))).state === "closed", "the revoked token's client ended");
    const revoked = await page.evaluate(() => window.get("revoked"));
    assert.deepEqual(revoked.errors.map((e) => [e.code, e.errorCode, e.message]), [[1008, "AUTHENTICATION_ERROR", "token revoked"]]);
    const refused = await metric(own, 'websocket_connections_rejected_total{reason="token_revoked",transport="sse"}');
    assert.ok(refused >= 2 && refused <= 4, `${refused} refused stream requests for the revoked token: one retry, not a loop`);
  } finally {
    await context.close();
    await own.stop();
    await site.close();
  }
});

// The client reopens its own stream (liveness check; a token refresh does
// the same) while the service still counts the old one against a quota of
// one: here a proxy that notices the dropped request late holds it open.
test("a reopened stream that finds the quota still holding its old one retries, and opens once the old one is gone", { skip }, async () => {
  const own = await startService(redis, { JWT_SECRET_KEY: "", WEBSOCKET_MAX_CONNECTIONS_PER_USER: "1" });
  const proxy = await startFilteringProxy(own);
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(30000);
  const quota = 'websocket_connections_rejected_total{reason="quota_exceeded",transport="sse"}';
  try {
    await page.goto(`${proxy.url}/demo`);
    await page.evaluate(async () => {
      const { NotificationClient } = await import("/demo/client.js");
      const getToken = async () => (await (await fetch("/demo/token", { method: "POST", body: JSON.stringify({ user: "reopen" }) })).json()).token;
      window.errors = [];
      window.c = new NotificationClient({ url: location.origin, userId: "reopen", getToken, sseAfterFailures: 1, minDelayMs: 1000, maxDelayMs: 4000, random: () => 1 });
      window.c.on("error", (e) => window.errors.push(e));
      window.c.connect();
    });
    await waitFor(() => page.evaluate(() => window.c.transport === "sse" && window.c.state === "open"), "open over SSE", 30000);
    proxy.hold(true);
    const before = await metric(own, quota);
    await page.evaluate(() => window.c.checkLiveness());
    // The new stream and the client's look at its status both meet the old one.
    await waitFor(async () => (await metric(own, quota)) >= before + 2, "the reopened stream refused by the quota");
    proxy.hold(false);
    proxy.release();
    await waitFor(() => page.evaluate(() => window.c.state === "open" || window.c.state === "closed"), "open or closed", 30000);
    assert.deepEqual(await page.evaluate(() => window.errors), []);
    assert.equal(await page.evaluate(() => window.c.state), "open");
  } finally {
    await context.close();
    await proxy.close();
    await own.stop();
  }
});
