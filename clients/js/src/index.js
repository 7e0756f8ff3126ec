// @huleedu/websocket-client: the official client of websocket-service.
// One connection per NotificationClient to /ws/v1/status/{userId}; it
// reconnects with backoff, refreshes the token in-band, detects dead sockets,
// and resumes from the last notification id so the app sees every
// notification once. Protocol: docs/protocol.md and docs/asyncapi.yaml.

/** Close codes after which reconnecting cannot help (README "Close codes"). */
const TERMINAL = new Set([4000, 4004, 1003, 1009]);
/** Close codes that ask for a longer wait: the server is busy or we were too chatty. */
const SLOW = new Set([1013, 4003]);

const defaults = {
  minDelayMs: 500,
  maxDelayMs: 30000,
  stableAfterMs: 5000, // an open connection resets the backoff only after this long
  idleMs: 25000, // nothing received for this long: send an app-level ping
  pongTimeoutMs: 10000, // no answer to that ping: the socket is dead, reconnect
  checkMs: 5000, // how often liveness and token expiry are checked
  sseAfterFailures: 3, // WebSocket attempts that never opened before trying Server-Sent Events
  wsRetryMs: 300000, // on Server-Sent Events, try WebSocket again after this long
  quotaGraceMs: 90000, // after this client closed a connection itself, 4000 is retried for this long
};

/** Reads a JWT's exp (seconds) without verifying it: only to refresh in time. */
export function tokenExpiry(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(part + "===".slice((part.length + 3) % 4))).exp;
    return typeof exp === "number" ? exp * 1000 : undefined;
  } catch {
    return undefined;
  }
}

/**
 * The delay before reconnect attempt n (0-based): full jitter over
 * [0, ceiling], the ceiling doubling from minDelayMs up to maxDelayMs. The cap
 * bounds the range, not the result, so capped clients stay spread out.
 */
export function backoffDelay(attempt, minDelayMs, maxDelayMs, random = Math.random) {
  const ceiling = Math.min(maxDelayMs, minDelayMs * 2 ** Math.min(attempt, 30));
  return Math.round(random() * ceiling);
}

// A history id: "<epoch>-<offset>-<check>", epoch and check base36
// microseconds (10-12 digits, no leading zero), the check at most an hour
// before the epoch (notify.ParseID).
const HISTORY_ID = /^([1-9a-z][0-9a-z]{9,11})-[1-9][0-9]{0,17}-([1-9a-z][0-9a-z]{9,11})$/;
const MAX_CLOCK_STEP_US = 3600e6;

/**
 * The resume id of a frame, read exactly as the gateway reads it
 * (notify.PayloadID): the string opening the frame, {"id":"…", when it has
 * the history id grammar. Not JSON.parse's id (the last "id" key wins there),
 * and not a plain PUBLISH's own "id" ("order-7", "job-7-done").
 */
export function historyId(text) {
  const open = '{"id":"';
  if (typeof text !== "string" || !text.startsWith(open)) return undefined;
  const end = text.indexOf('"', open.length);
  if (end < 0) return undefined;
  const id = text.slice(open.length, end);
  const m = HISTORY_ID.exec(id);
  if (!m || parseInt(m[2], 36) < parseInt(m[1], 36) - MAX_CLOCK_STEP_US) return undefined;
  return id;
}

export class NotificationClient {
  #o;
  #ws = null; // the open WebSocket, or
  #es = null; // the open EventSource
  #transport = "websocket";
  #wsFailures = 0; // WebSocket attempts in a row that never opened
  #sseSince = 0;
  #state = "closed";
  #listeners = new Map();
  #timer = null; // reconnect timer
  #ticker = null; // liveness and refresh checks while open
  #attempt = 0;
  #authRetried = false;
  #openedAt = 0;
  #lastRx = 0;
  #pingSentAt = 0;
  #exp = undefined;
  #tokenAt = 0;
  #wakeTimer = null;
  #refreshing = false;
  #lastId;
  #seen = new Set();
  #opened = false; // the current connection opened
  #wanted = false; // connect() called and not close()d
  #gen = 0; // connection generation: events of a replaced socket are ignored
  #ownCloseAt = 0; // when this client last closed a connection of its own (reopen, refresh, switch, pagehide)
  #unhook = [];

  constructor(options) {
    if (!options || !options.url || !options.userId || typeof options.getToken !== "function") {
      throw new TypeError("NotificationClient needs url, userId and getToken");
    }
    this.#o = { ...defaults, ...options };
    this.#lastId = options.since;
    this.#hookPage();
  }

  /** "connecting" | "open" | "degraded" | "reconnecting" | "closed" */
  get state() {
    return this.#state;
  }

  /** The id to resume from: the last notification id or resume position seen. */
  get lastEventId() {
    return this.#lastId;
  }

  /** "websocket", or "sse" while WebSockets cannot get through (a proxy) and event streams can. */
  get transport() {
    return this.#transport;
  }

  /** Adds a listener; returns the function that removes it. */
  on(type, fn) {
    if (!this.#listeners.has(type)) this.#listeners.set(type, new Set());
    this.#listeners.get(type).add(fn);
    return () => this.#listeners.get(type)?.delete(fn);
  }

  connect() {
    this.#wanted = true;
    if (this.#ws || this.#es || this.#timer || this.#state === "connecting") return;
    this.#attempt = 0;
    this.#authRetried = false;
    this.#open();
  }

  close() {
    this.#wanted = false;
    this.#stop(1000);
    this.#setState("closed");
  }

  /** close() and remove every listener this client added to the page. */
  dispose() {
    this.close();
    for (const off of this.#unhook) off();
    this.#unhook = [];
    this.#listeners.clear();
  }

  /** Checks the connection at once (e.g. after the device woke up). */
  checkLiveness() {
    if (this.#es) {
      // A stream cannot be pinged: reopen it (the resume makes that lossless).
      this.#stop(1000);
      this.#open();
    } else if (this.#ws && this.#ws.readyState === 1) {
      this.#ping();
      clearTimeout(this.#wakeTimer);
      this.#wakeTimer = setTimeout(() => this.#check(), this.#o.pongTimeoutMs);
    } else if (this.#wanted && this.#timer) {
      clearTimeout(this.#timer);
      this.#timer = null;
      this.#open();
    }
  }

  #emit(type, value) {
    for (const fn of [...(this.#listeners.get(type) || [])]) {
      try {
        fn(value);
      } catch (e) {
        this.#log("listener threw", e);
      }
    }
  }

  #log(...args) {
    this.#o.logger?.debug?.("[websocket-client]", ...args);
  }

  #setState(s) {
    if (this.#state === s) return;
    this.#state = s;
    this.#emit("state", s);
  }

  async #open() {
    const gen = ++this.#gen;
    this.#setState(this.#attempt === 0 && this.#state !== "reconnecting" ? "connecting" : "reconnecting");
    let token;
    try {
      token = await this.#o.getToken();
    } catch (e) {
      this.#log("getToken failed", e);
      if (gen === this.#gen && this.#wanted) this.#retry(false);
      return;
    }
    if (gen !== this.#gen || !this.#wanted) return;
    const ES = this.#o.EventSource || globalThis.EventSource;
    if (this.#transport === "websocket" && ES && this.#wsFailures >= this.#o.sseAfterFailures && (await this.#httpWorks())) {
      if (gen !== this.#gen || !this.#wanted) return;
      this.#setTransport("sse");
    }
    this.#exp = tokenExpiry(token);
    this.#tokenAt = Date.now();
    this.#opened = false;
    if (this.#transport === "sse") this.#openStream(gen, token, ES);
    else this.#openSocket(gen, token);
  }

  #openSocket(gen, token) {
    const base = this.#base().replace(/^http/, "ws");
    const q = new URLSearchParams({ since: this.#lastId ?? "" });
    // The token rides in Sec-WebSocket-Protocol after "bearer" (kept out of
    // access logs); tokenIn: "query" sends ?token= for older servers.
    const inQuery = this.#o.tokenIn === "query";
    if (inQuery) q.set("token", token);
    const WS = this.#o.WebSocket || globalThis.WebSocket;
    let ws;
    try {
      const url = `${base}/ws/v1/status/${encodeURIComponent(this.#o.userId)}?${q}`;
      ws = inQuery ? new WS(url) : new WS(url, ["bearer", token]);
    } catch (e) {
      this.#log("WebSocket constructor failed", e);
      this.#wsFailures++;
      this.#retry(false);
      return;
    }
    this.#ws = ws;
    ws.onopen = () => {
      if (gen !== this.#gen) return;
      this.#wsFailures = 0;
      this.#onOpen();
    };
    ws.onmessage = (ev) => gen === this.#gen && this.#onFrame(ev.data);
    ws.onclose = (ev) => {
      if (gen !== this.#gen) return;
      if (!this.#opened) this.#wsFailures++;
      this.#onClose(ev.code, ev.reason);
    };
    ws.onerror = () => {}; // a close event always follows
  }

  // An event stream: the token in the query (EventSource sends no headers),
  // the position as since; EventSource's own reconnects are replaced by
  // this client's, which fetch a fresh token and back off.
  #openStream(gen, token, ES) {
    const q = new URLSearchParams({ token });
    if (this.#lastId !== undefined) q.set("since", this.#lastId);
    const url = `${this.#base()}/sse/v1/status/${encodeURIComponent(this.#o.userId)}?${q}`;
    let es;
    try {
      es = new ES(url);
    } catch (e) {
      this.#log("EventSource constructor failed", e);
      this.#retry(false);
      return;
    }
    this.#es = es;
    es.onopen = () => gen === this.#gen && this.#onOpen();
    es.onmessage = (ev) => {
      if (gen !== this.#gen) return;
      if (typeof ev.data === "string" && ev.data.startsWith('{"event":"connection.closed"')) {
        let d = {};
        try {
          d = JSON.parse(ev.data).data || {};
        } catch {}
        this.#dropStream();
        this.#onClose(d.code || 1006, JSON.stringify({ error_code: d.error_code, message: d.message }));
        return;
      }
      this.#onFrame(ev.data);
    };
    es.onerror = async () => {
      if (gen !== this.#gen) return;
      const opened = this.#opened;
      this.#dropStream();
      // Before it opened, EventSource hides the HTTP status: ask for it.
      const [code, reason] = opened ? [1006, ""] : await this.#refusal(url);
      if (gen === this.#gen) this.#onClose(code, reason);
    };
  }

  #dropStream() {
    const es = this.#es;
    this.#es = null;
    if (es) {
      es.onopen = es.onmessage = es.onerror = null;
      es.close();
    }
  }

  // The close code a refused stream request stands for.
  async #refusal(url) {
    const f = this.#o.fetch || globalThis.fetch;
    if (!f) return [1006, ""];
    const ctl = new AbortController();
    try {
      const res = await f(url, { signal: ctl.signal, headers: { Accept: "text/event-stream" } });
      if (res.ok) {
        this.#ownCloseAt = Date.now(); // this stream, aborted below, may be counted a moment longer
        return [1006, ""];
      }
      const body = await res.json().catch(() => ({}));
      const code = { 401: 1008, 403: 1008, 429: 4000, 503: 1013 }[res.status] || 1011;
      return [code, JSON.stringify(body)];
    } catch {
      return [1006, ""];
    } finally {
      ctl.abort();
    }
  }

  // Plain HTTP reaches the service (a WebSocket that fails while this works
  // is a proxy or filter in the way).
  async #httpWorks() {
    const f = this.#o.fetch || globalThis.fetch;
    if (!f) return false;
    try {
      const res = await f(`${this.#base()}/healthz`, { cache: "no-store" });
      return res.ok;
    } catch {
      return false;
    }
  }

  #base() {
    return String(this.#o.url).replace(/^ws/, "http").replace(/\/+$/, "");
  }

  #setTransport(t) {
    if (this.#transport === t) return;
    this.#transport = t;
    this.#sseSince = Date.now();
    this.#wsFailures = 0;
    this.#log("transport", t);
    this.#emit("transport", t);
  }

  #onOpen() {
    this.#opened = true;
    this.#openedAt = this.#lastRx = Date.now();
    this.#pingSentAt = 0;
    this.#setState("open");
    clearInterval(this.#ticker);
    this.#ticker = setInterval(() => this.#check(), this.#o.checkMs);
  }

  #onFrame(data) {
    // Any frame shows the path worked, so no ping is needed for a while; only
    // the pong answers an outstanding ping: a frame read after a wake-up may
    // have waited in a buffer since before the connection died.
    this.#lastRx = Date.now();
    const text = typeof data === "string" ? data : String(data);
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      return;
    }
    if (!msg || typeof msg !== "object") return;
    switch (msg.event) {
      case "pong":
        this.#pingSentAt = 0;
        return;
      case "token.refreshed":
        this.#refreshing = false;
        return;
      case "connection.degraded":
        return this.#setState("degraded");
      case "connection.restored":
        this.#setState("open");
        if (msg.data && msg.data.complete === false) this.#emit("resync", { reason: "restored_incomplete" });
        return;
      case "resume.position":
        if (msg.data && msg.data.id) this.#lastId = msg.data.id;
        return;
      case "resume.incomplete":
        return this.#emit("resync", { reason: msg.data?.reason, since: msg.data?.since });
    }
    const id = historyId(text);
    if (id !== undefined) {
      if (this.#seen.has(id)) return;
      this.#seen.add(id);
      if (this.#seen.size > 1000) this.#seen.delete(this.#seen.values().next().value);
      this.#lastId = id;
      msg.id = id;
    }
    this.#emit("notification", msg);
  }

  #onClose(code, reasonText) {
    clearInterval(this.#ticker);
    this.#ticker = null;
    this.#ws = null;
    this.#es = null;
    this.#refreshing = false;
    let reason = {};
    try {
      reason = JSON.parse(reasonText || "{}");
    } catch {}
    const err = { code, errorCode: reason.error_code, message: reason.message || reasonText || "" };
    this.#log("closed", err);
    if (!this.#wanted) return;
    if (this.#openedAt && Date.now() - this.#openedAt >= this.#o.stableAfterMs) {
      this.#attempt = 0;
      this.#authRetried = false;
      this.#ownCloseAt = 0; // a connection lived after it: the quota had let go of the old one
    }
    this.#openedAt = 0;
    if (code === 4000 && this.#ownCloseAt && Date.now() - this.#ownCloseAt < this.#o.quotaGraceMs) {
      // The quota may still count the connection this client closed itself
      // a moment ago (the server has not processed that close yet, or has
      // not noticed a dead peer): a wait, not a verdict.
      this.#log("quota still counts the connection closed by this client: retrying");
      this.#retry(false);
      return;
    }
    const terminal = TERMINAL.has(code) || (code === 1008 && (err.errorCode !== "AUTHENTICATION_ERROR" || this.#authRetried));
    if (terminal) {
      this.#wanted = false;
      this.#setState("closed");
      this.#emit("error", err);
      return;
    }
    if (code === 1008 || code === 4001) {
      // a fresh token from getToken, at once (1008 only once in a row)
      if (code === 1008) this.#authRetried = true;
      this.#setState("reconnecting");
      this.#open();
      return;
    }
    this.#retry(SLOW.has(code));
  }

  #retry(slow) {
    this.#setState("reconnecting");
    const n = this.#attempt++ + (slow ? 3 : 0);
    const delay = backoffDelay(n, this.#o.minDelayMs, this.#o.maxDelayMs, this.#o.random);
    this.#log("reconnecting in", delay, "ms");
    this.#timer = setTimeout(() => {
      this.#timer = null;
      if (this.#wanted) this.#open();
    }, delay);
  }

  // Runs every checkMs while open (throttled timers only run it less often;
  // every decision uses wall-clock time, so a late run still decides right).
  #check() {
    const now = Date.now();
    if (this.#es) {
      if (now - this.#sseSince >= this.#o.wsRetryMs) {
        this.#log("trying WebSocket again");
        this.#setTransport("websocket");
        this.#stop(1000);
        this.#open();
        return;
      }
      this.#maybeRefresh(now);
      return;
    }
    const ws = this.#ws;
    if (!ws || ws.readyState !== 1) return;
    if (this.#pingSentAt && now - this.#pingSentAt >= this.#o.pongTimeoutMs) {
      this.#log("no pong: reconnecting");
      this.#drop();
      return;
    }
    if (!this.#pingSentAt && now - this.#lastRx >= this.#o.idleMs) this.#ping();
    this.#maybeRefresh(now);
  }

  #ping() {
    if (!this.#pingSentAt) this.#pingSentAt = Date.now();
    this.#send({ type: "ping" });
  }

  async #maybeRefresh(now) {
    if (this.#refreshing || this.#exp === undefined) return;
    const lifetime = this.#exp - this.#tokenAt;
    const margin = Math.min(Math.max(lifetime / 2, 0), 120000);
    if (now < this.#exp - margin) return;
    this.#refreshing = true;
    const gen = this.#gen;
    try {
      if (this.#es) {
        // No way to send a token up a stream: reopen it with a fresh one.
        this.#stop(1000);
        this.#open();
        return;
      }
      const token = await this.#o.getToken();
      if (gen !== this.#gen || !this.#ws) return;
      const exp = tokenExpiry(token);
      if (exp === undefined || exp <= (this.#exp ?? 0)) {
        this.#refreshing = false; // not newer: try again on a later check
        return;
      }
      this.#exp = exp;
      this.#tokenAt = Date.now();
      this.#send({ type: "refresh", token });
    } catch (e) {
      this.#log("getToken failed for refresh", e);
      this.#refreshing = false;
    }
  }

  #send(frame) {
    try {
      this.#ws?.send(JSON.stringify(frame));
    } catch (e) {
      this.#log("send failed", e);
    }
  }

  // Abandons the current socket (dead or paused) and reconnects after backoff.
  #drop() {
    this.#stop(4100);
    if (this.#wanted) this.#retry(false);
  }

  #stop(code) {
    this.#gen++;
    if (this.#ws || this.#es) this.#ownCloseAt = Date.now();
    clearTimeout(this.#timer);
    clearTimeout(this.#wakeTimer);
    clearInterval(this.#ticker);
    this.#timer = this.#ticker = this.#wakeTimer = null;
    const ws = this.#ws;
    this.#ws = null;
    this.#dropStream();
    this.#refreshing = false;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
      try {
        ws.close(code);
      } catch {}
    }
  }

  #hookPage() {
    const add = (target, type, fn) => {
      if (!target?.addEventListener) return;
      target.addEventListener(type, fn);
      this.#unhook.push(() => target.removeEventListener(type, fn));
    };
    const win = typeof window === "undefined" ? undefined : window;
    const doc = typeof document === "undefined" ? undefined : document;
    const wake = () => this.#wanted && this.checkLiveness();
    add(win, "online", wake);
    add(win, "pageshow", (e) => {
      if (!e.persisted || !this.#wanted) return wake();
      this.#attempt = 0; // restored from the back/forward cache: connect again
      if (!this.#ws && !this.#es && !this.#timer) this.#open();
    });
    add(win, "pagehide", () => {
      if (!this.#wanted) return;
      this.#stop(1000); // lets the page enter the back/forward cache
      this.#setState("reconnecting");
    });
    add(doc, "visibilitychange", () => doc.visibilityState === "visible" && wake());
  }
}
