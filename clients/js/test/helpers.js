// Test helpers: the real service binary and redis-server on free loopback
// ports, tokens, publishing through the binary's CLI. Every process is
// started in its own process group and killed with it; the Go harness
// (clients/js/js_test.go) runs all of this inside a PID namespace as well.
import { spawn, execFile } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";

export const BIN = process.env.WSS_BIN;
export const SECRET = "js-client-tests-secret-at-least-32-bytes-long";
if (!BIN) throw new Error("WSS_BIN must name the websocket-service binary (the Go harness sets it)");

/** Polls cond until it is truthy or the deadline passes. */
export async function waitFor(cond, what, timeoutMs = 15000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** A process in its own group; kill() ends the group and waits for the leader. */
class Proc {
  constructor(cmd, args, env) {
    this.output = "";
    this.child = spawn(cmd, args, { env: { ...process.env, ...env }, detached: true, stdio: ["ignore", "pipe", "pipe"] });
    this.exited = new Promise((resolve) => this.child.on("exit", (code, sig) => resolve({ code, sig })));
    this.alive = true;
    this.exited.then(() => (this.alive = false));
    const keep = (d) => (this.output = (this.output + d).slice(-20000));
    this.child.stdout.on("data", keep);
    this.child.stderr.on("data", keep);
  }
  signal(sig) {
    try {
      process.kill(-this.child.pid, sig);
    } catch {}
  }
  async kill() {
    this.signal("SIGCONT");
    this.signal("SIGKILL");
    await this.exited;
  }
}

async function httpOK(url) {
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(1000) });
    return res.ok;
  } catch {
    return false;
  }
}

/** A redis-server on a free port, without persistence. */
export async function startRedis() {
  for (let i = 0; ; i++) {
    const port = await freePort();
    const dir = mkdtempSync(path.join(os.tmpdir(), "jsclient-redis-"));
    const args = ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir];
    const r = { port, url: `redis://127.0.0.1:${port}`, dir };
    r.start = async () => {
      r.proc = new Proc("redis-server", args, {});
      await waitFor(async () => !r.proc.alive || (await redisPing(port)), `redis-server on ${port}`);
      return r.proc.alive;
    };
    r.kill = () => r.proc.kill();
    r.stop = async () => {
      await r.proc.kill();
      rmSync(dir, { recursive: true, force: true });
    };
    if (await r.start()) return r;
    rmSync(dir, { recursive: true, force: true });
    if (i >= 4) throw new Error(`redis-server did not start: ${r.proc.output}`);
  }
}

function redisPing(port) {
  return new Promise((resolve) => {
    const s = net.connect(port, "127.0.0.1");
    s.setTimeout(500);
    s.on("connect", () => s.write("PING\r\n"));
    s.on("data", (d) => {
      resolve(d.toString().startsWith("+PONG"));
      s.destroy();
    });
    s.on("error", () => resolve(false));
    s.on("timeout", () => (s.destroy(), resolve(false)));
  });
}

/** The service binary on a free port (a taken port is retried on another). */
export async function startService(redis, env = {}) {
  for (let i = 0; ; i++) {
    const port = await freePort();
    const svc = { port, url: `ws://127.0.0.1:${port}`, http: `http://127.0.0.1:${port}` };
    const fullEnv = {
      WEBSOCKET_HOST: "127.0.0.1", WEBSOCKET_PORT: String(port), REDIS_URL: redis.url, JWT_SECRET_KEY: SECRET,
      LOG_FORMAT: "text", LOG_LEVEL: "warn", SHUTDOWN_TIMEOUT: "5s", ...env,
    };
    svc.start = async () => {
      svc.proc = new Proc(BIN, [], fullEnv);
      await waitFor(async () => !svc.proc.alive || (await httpOK(`${svc.http}/readyz`)), `service on ${port}`);
      return svc.proc.alive;
    };
    /** SIGKILL, then the same binary on the same port. */
    svc.restart = async () => {
      await svc.proc.kill();
      await waitFor(() => svc.start(), `service restarted on ${port}`, 20000);
    };
    svc.stop = () => svc.proc.kill();
    if (await svc.start()) return svc;
    if (i >= 4) throw new Error(`service did not start: ${svc.proc.output}`);
  }
}

const b64url = (s) => Buffer.from(s).toString("base64url");

/** An HS256 token for sub, valid ttlSec seconds. */
export function mint(sub, ttlSec = 3600, secret = SECRET) {
  const now = Math.floor(Date.now() / 1000);
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify({ sub, iat: now, exp: now + ttlSec }));
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

/** Publishes with history through `websocket-service publish`; returns the id. */
export async function publish(redis, user, event, data = {}) {
  const { stdout } = await promisify(execFile)(BIN, ["publish", "--user", user, "--event", event, "--data", JSON.stringify(data)], {
    env: { ...process.env, REDIS_URL: redis.url },
  });
  return stdout.trim().split(" ")[1];
}

/**
 * A static page server on 127.0.0.2: another origin than the service's
 * (127.0.0.1), serving an empty page at / and the client library at
 * /client.js.
 */
export async function startPageServer() {
  const lib = readFileSync(new URL("../src/index.js", import.meta.url));
  const server = http.createServer((req, res) => {
    if (req.url === "/client.js") {
      res.writeHead(200, { "Content-Type": "text/javascript" });
      return res.end(lib);
    }
    res.writeHead(200, { "Content-Type": "text/html" });
    res.end("<!doctype html><title>another origin</title>");
  });
  await new Promise((r) => server.listen(0, "127.0.0.2", r));
  return {
    origin: `http://127.0.0.2:${server.address().port}`,
    close: () => new Promise((r) => (server.closeAllConnections(), server.close(r))),
  };
}

/** Runs `websocket-service disconnect --user user --revoke`. */
export async function revoke(redis, user) {
  await promisify(execFile)(BIN, ["disconnect", "--user", user, "--revoke"], { env: { ...process.env, REDIS_URL: redis.url } });
}

/** A counter of the service's /metrics, by its name and labels as written there. */
export async function metric(svc, series) {
  const text = await (await fetch(`${svc.http}/metrics`)).text();
  for (const line of text.split("\n")) {
    if (line.startsWith(series + " ")) return Number(line.slice(series.length + 1));
  }
  return 0;
}

/** Records what a client emits. */
export function record(client) {
  const r = { notifications: [], states: [], errors: [], resyncs: [] };
  client.on("notification", (n) => r.notifications.push(n));
  client.on("state", (s) => r.states.push(s));
  client.on("error", (e) => r.errors.push(e));
  client.on("resync", (e) => r.resyncs.push(e));
  return r;
}

/**
 * An HTTP/1.1 proxy in front of the service, like a school or corporate
 * filter: it passes plain requests (streaming the responses) and refuses
 * WebSocket upgrades until allowUpgrades(true). When the browser drops a
 * request it ends the request to the service too, unless hold(true): then,
 * like a proxy or load balancer that notices late, it keeps those until
 * release().
 */
export async function startFilteringProxy(target) {
  const sockets = new Set();
  const held = new Set();
  let upgrades = false;
  let holding = false;
  const server = http.createServer((req, res) => {
    const up = http.request({ host: "127.0.0.1", port: target.port, path: req.url, method: req.method, headers: req.headers, agent: false }, (r) => {
      res.writeHead(r.statusCode, r.headers);
      r.pipe(res);
    });
    up.on("error", () => res.destroy());
    res.on("close", () => {
      if (holding) held.add(up);
      else up.destroy();
    });
    req.pipe(up);
  });
  server.on("connection", (s) => {
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
  });
  server.on("upgrade", (req, socket, head) => {
    if (!upgrades) {
      socket.end("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
      return;
    }
    const up = net.connect(target.port, "127.0.0.1", () => {
      let raw = `${req.method} ${req.url} HTTP/1.1\r\n`;
      for (let i = 0; i < req.rawHeaders.length; i += 2) raw += `${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}\r\n`;
      up.write(raw + "\r\n");
      up.write(head);
      socket.pipe(up).pipe(socket);
    });
    sockets.add(up);
    up.on("close", () => sockets.delete(up));
    up.on("error", () => socket.destroy());
    socket.on("error", () => up.destroy());
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const port = server.address().port;
  return {
    url: `http://127.0.0.1:${port}`,
    allowUpgrades: (b) => (upgrades = b),
    hold: (b) => (holding = b),
    /** Ends the held requests to the service; resolves with how many there were. */
    release: () => {
      const n = held.size;
      for (const up of held) up.destroy();
      held.clear();
      return n;
    },
    close: async () => {
      for (const up of held) up.destroy();
      for (const s of sockets) s.destroy();
      await new Promise((r) => server.close(r));
    },
  };
}
