/** Connection state of a NotificationClient. */
export type State = "connecting" | "open" | "degraded" | "reconnecting" | "closed";

/** A notification as published: the envelope {event, data}, plus id when it was published with history. */
export interface Notification<D = unknown> {
  /** The history (resume) id when published with history (see historyId); a plain PUBLISH's own "id" is left as it came. */
  id?: string;
  event: string;
  data: D;
  [field: string]: unknown;
}

/** Why the app should refetch its state: history could not cover a gap. */
export interface ResyncInfo {
  /** resume.incomplete's reason (trimmed, reset, ahead, rollback, invalid, unavailable) or "restored_incomplete". */
  reason?: string;
  since?: string;
}

/** A terminal close: the client stopped and will not reconnect by itself. */
export interface ClientError {
  code: number;
  errorCode?: string;
  message: string;
}

export interface Logger {
  debug?(...args: unknown[]): void;
}

/** A WebSocket constructor: the browser's, or the ws package's in Node. */
export type WebSocketConstructor = new (url: any, protocols?: any) => WebSocketLike;

export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: any) => void) | null;
  onclose: ((ev: any) => void) | null;
  onerror: ((ev: any) => void) | null;
}

export interface ClientOptions {
  /** Base URL of the service, ws(s):// or http(s)://; the client connects to /ws/v1/status/{userId}. */
  url: string;
  userId: string;
  /** Called before every connect, on 4001 and before the token expires. */
  getToken: () => string | Promise<string>;
  /** WebSocket implementation (default: globalThis.WebSocket). */
  WebSocket?: WebSocketConstructor;
  /** First reconnect delay ceiling (default 500 ms); doubles per attempt. */
  minDelayMs?: number;
  /** Largest reconnect delay ceiling (default 30,000 ms). */
  maxDelayMs?: number;
  /** An open connection resets the backoff only after this long (default 5,000 ms). */
  stableAfterMs?: number;
  /** Send an app-level ping after this long without a frame (default 25,000 ms). */
  idleMs?: number;
  /** Reconnect when no pong answers the ping within this (default 10,000 ms; other frames do not count). */
  pongTimeoutMs?: number;
  /** How often liveness and token expiry are checked (default 5,000 ms). */
  checkMs?: number;
  /**
   * Where the token travels: "protocol" (default) as the Sec-WebSocket-Protocol entry after
   * "bearer", out of URLs and access logs; "query" as ?token= (servers before 1.1).
   */
  tokenIn?: "protocol" | "query";
  /** The last id the app has seen, to resume from on the first connect. */
  since?: string;
  logger?: Logger;
  /** Random source for the backoff jitter (default Math.random). */
  random?: () => number;
  /** EventSource implementation for the Server-Sent Events fallback (default: globalThis.EventSource; none: no fallback). */
  EventSource?: new (url: string) => EventSourceLike;
  /** fetch, to check that plain HTTP works before falling back, and to read a refused stream's status (default: globalThis.fetch). */
  fetch?: typeof globalThis.fetch;
  /** WebSocket attempts in a row that never opened before falling back to Server-Sent Events (default 3). */
  sseAfterFailures?: number;
  /** On Server-Sent Events, try WebSocket again after this long (default 300,000 ms). */
  wsRetryMs?: number;
  /**
   * For this long after the client closed a connection itself (liveness reopen, token refresh over
   * Server-Sent Events, transport switch, pagehide), 4000 QUOTA_EXCEEDED is retried with backoff instead
   * of ending the client: the server may still count the old connection (default 90,000 ms, the
   * server's default WEBSOCKET_IDLE_TIMEOUT).
   */
  quotaGraceMs?: number;
}

export interface EventSourceLike {
  close(): void;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: any) => void) | null;
  onerror: ((ev: any) => void) | null;
}

/** How the client is connected. */
export type Transport = "websocket" | "sse";

export interface EventMap {
  notification: Notification;
  state: State;
  resync: ResyncInfo;
  error: ClientError;
  transport: Transport;
}

export declare class NotificationClient {
  constructor(options: ClientOptions);
  readonly state: State;
  /** The id to resume from: the last notification id or resume position seen. */
  readonly lastEventId: string | undefined;
  /** "websocket", or "sse" while WebSockets cannot get through and event streams can. */
  readonly transport: Transport;
  /** Adds a listener; returns the function that removes it. */
  on<K extends keyof EventMap>(type: K, listener: (value: EventMap[K]) => void): () => void;
  connect(): void;
  close(): void;
  /** close() and remove every listener the client added to the page. */
  dispose(): void;
  /** Checks the connection at once, e.g. after the device woke up. */
  checkLiveness(): void;
}

/** Reads a JWT's exp (milliseconds) without verifying it. */
/** The resume id of a frame's text as the gateway reads it: the history id opening it ({"id":"…), else undefined. */
export declare function historyId(text: string): string | undefined;

export declare function tokenExpiry(token: string): number | undefined;

/** The reconnect delay for attempt n (0-based): full jitter under a ceiling capped at maxDelayMs. */
export declare function backoffDelay(attempt: number, minDelayMs: number, maxDelayMs: number, random?: () => number): number;
