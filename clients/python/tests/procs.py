"""Processes the tests start (the gateway binary), each in a session of its
own and killed with its whole process group; tokens; small real clients (a
WebSocket through the websockets package, Server-Sent Events over a plain
socket)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

SECRET = "python-client-tests-secret-at-least-32-bytes"

T = TypeVar("T")


def wait_until(cond: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    """Polls cond until it returns something truthy, or fails after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Proc:
    """A child in a new session (its own process group); kill() sends
    SIGKILL to the whole group and reaps the leader."""

    def __init__(self, args: list[str], env: Mapping[str, str]) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="pyws-proc-", suffix=".log", delete=False)
        self.popen = subprocess.Popen(
            args, env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()[-20000:]

    def kill(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait()
        self.log.close()
        os.unlink(self.log.name)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Gateway:
    """The websocket-service binary on a free loopback port."""

    env: dict[str, str]
    port: int = 0
    proc: Proc | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc = None


def start_gateway(binary: str, redis_env: Mapping[str, str]) -> Gateway:
    """Starts the gateway and waits for /readyz; a port taken between
    free_port() and the bind is retried on another."""
    last = ""
    for _ in range(5):
        port = free_port()
        env = {
            "WEBSOCKET_HOST": "127.0.0.1",
            "WEBSOCKET_PORT": str(port),
            "JWT_SECRET_KEY": SECRET,
            "LOG_FORMAT": "text",
            "LOG_LEVEL": "warn",
            "SHUTDOWN_TIMEOUT": "5s",
            **redis_env,
        }
        proc = Proc([binary], env)
        g = Gateway(env=env, port=port, proc=proc)
        try:
            wait_until(lambda: not proc.alive() or _http_ok(g.http + "/readyz"), f"gateway on {port}", 60)
        except BaseException:
            g.stop()
            raise
        if proc.alive():
            return g
        last = proc.output()
        g.stop()
    raise RuntimeError(f"the gateway did not start: {last}")


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def mint(sub: str, ttl: int = 3600, iat: int | None = None) -> str:
    """An HS256 token for sub, signed with the gateway's JWT_SECRET_KEY."""
    now = int(time.time()) if iat is None else iat
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps({"sub": sub, "iat": now, "exp": now + ttl}).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


@dataclass
class Event:
    id: str | None
    data: dict[str, Any]


@dataclass
class SSE:
    """A Server-Sent Events stream read over a plain socket (the gateway
    writes the stream itself, without chunked encoding)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int
    headers: dict[str, str]
    body: bytes = b""
    lines: list[str] = field(default_factory=list)

    async def next(self, timeout: float = 30.0) -> Event:
        return await asyncio.wait_for(self._next(), timeout)

    async def _next(self) -> Event:
        ev_id: str | None = None
        data: list[str] = []
        while True:
            raw = await self.reader.readline()
            if not raw:
                raise EOFError("the stream ended")
            line = raw.decode().rstrip("\r\n")
            if line == "":
                if data:
                    doc = json.loads("\n".join(data))
                    assert isinstance(doc, dict)
                    return Event(ev_id, doc)
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "id":
                ev_id = value
            elif name == "data":
                data.append(value)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


async def open_sse(gw: Gateway, user: str, token: str, last_event_id: str | None = None) -> SSE:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    head = (
        f"GET /sse/v1/status/{user} HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\n"
        f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n"
    )
    if last_event_id is not None:
        head += f"Last-Event-ID: {last_event_id}\r\n"
    writer.write((head + "\r\n").encode())
    await writer.drain()
    status_line = (await asyncio.wait_for(reader.readline(), 30)).decode()
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = (await asyncio.wait_for(reader.readline(), 30)).decode().rstrip("\r\n")
        if not line:
            break
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    s = SSE(reader, writer, status, headers)
    if status != 200:
        n = int(headers.get("content-length", "0"))
        s.body = await asyncio.wait_for(reader.readexactly(n), 30) if n else b""
    return s
