"""End to end: the real gateway binary, real WebSocket and SSE clients,
notifications published from Python through both APIs."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import websockets.client
import websockets.exceptions

from .conftest import Gateways, PublisherFactory, do
from .procs import SSE, Gateway, mint, open_sse


def user() -> str:
    return "py-e2e-" + uuid.uuid4().hex[:10]


class WS:
    """A WebSocket to the gateway (token in the Authorization header)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def next(self, timeout: float = 30.0) -> dict[str, Any]:
        import asyncio

        doc = json.loads(await asyncio.wait_for(self.conn.recv(), timeout))
        assert isinstance(doc, dict)
        return doc

    async def closed_with(self, timeout: float = 30.0) -> tuple[int | None, str]:
        """Reads until the server closes; returns the close code and reason."""
        import asyncio

        try:
            while True:
                await asyncio.wait_for(self.conn.recv(), timeout)
        except websockets.exceptions.ConnectionClosed as e:
            return (e.rcvd.code, e.rcvd.reason) if e.rcvd else (None, "")


@pytest.fixture
async def open_ws() -> AsyncIterator[Any]:
    opened: list[Any] = []

    async def open_(gw: Gateway, u: str, token: str, since: str | None = None) -> WS:
        url = f"{gw.ws}/ws/v1/status/{u}"
        if since is not None:
            url += "?since=" + since
        conn = await websockets.client.connect(url, extra_headers={"Authorization": "Bearer " + token}, open_timeout=30)
        opened.append(conn)
        return WS(conn)

    yield open_
    for c in opened:
        await c.close()


@pytest.fixture
async def open_stream() -> AsyncIterator[Any]:
    opened: list[SSE] = []

    async def open_(gw: Gateway, u: str, token: str, last_event_id: str | None = None) -> SSE:
        s = await open_sse(gw, u, token, last_event_id)
        opened.append(s)
        return s

    yield open_
    for s in opened:
        await s.close()


async def until_position(s: SSE) -> str | None:
    """Reads a stream up to its resume.position (sent once the user's channel
    is subscribed); returns the position."""
    while True:
        ev = await s.next()
        if ev.data.get("event") == "resume.position":
            pos: str | None = ev.data["data"]["id"]
            return pos


@pytest.mark.parametrize("topology", ["standalone"])
async def test_websocket_and_sse_receive_with_id(
    gateways: Gateways, make_pub: PublisherFactory, open_ws: Any, open_stream: Any, topology: str
) -> None:
    gw, pub, u = gateways.get(topology), make_pub(), user()
    tok = mint(u)
    ws = await open_ws(gw, u, tok)
    sse = await open_stream(gw, u, tok)
    await until_position(sse)
    assert sse.status == 200 and sse.headers["content-type"].startswith("text/event-stream")

    receivers = await do(pub.publish_user_notification(u, "essay_status_updated", {"essay_id": "e-1"}))
    p = await do(pub.publish(u, "batch_phase_concluded", {"batch_id": "b-1"}, idempotency_key="b-1-done"))
    assert receivers == 1 and p.receivers == 1  # one gateway instance holds the user

    first, second = await ws.next(), await ws.next()
    assert first["event"] == "essay_status_updated" and first["data"] == {"essay_id": "e-1"}
    assert second == {"id": p.id, "event": "batch_phase_concluded", "data": {"batch_id": "b-1"}}
    ev1, ev2 = await sse.next(), await sse.next()
    assert ev1.id == first["id"] and ev1.data == first
    assert ev2.id == p.id and ev2.data == second


@pytest.mark.parametrize("topology", ["standalone"])
async def test_teacher_notification_arrives(
    gateways: Gateways, make_pub: PublisherFactory, open_ws: Any, topology: str
) -> None:
    gw, pub, u = gateways.get(topology), make_pub(), user()
    ws = await open_ws(gw, u, mint(u))
    event = {"teacher_id": u, "notification_type": "batch_results_ready", "category": "batch_progress",
             "priority": "high", "payload": {"essays": 3}, "action_required": False, "correlation_id": "c-9"}
    p = await do(pub.publish_teacher_notification(event))
    got = await ws.next()
    assert got["id"] == p.id and got["event"] == "batch_results_ready"
    assert got["data"]["essays"] == 3 and got["data"]["correlation_id"] == "c-9"


@pytest.mark.parametrize("topology", ["standalone"])
async def test_resume_after_being_away(
    gateways: Gateways, make_pub: PublisherFactory, open_ws: Any, open_stream: Any, topology: str
) -> None:
    gw, pub, u = gateways.get(topology), make_pub(), user()
    tok = mint(u)
    ws = await open_ws(gw, u, tok, since="")
    assert (await ws.next())["event"] == "resume.position"
    seen = await do(pub.publish(u, "e", {"n": 1}))
    assert (await ws.next())["id"] == seen.id
    await ws.conn.close()

    missed = [await do(pub.publish(u, "e", {"n": n})) for n in (2, 3)]  # nobody connected

    back = await open_ws(gw, u, tok, since=seen.id)
    replay = [await back.next() for _ in range(3)]
    assert replay == [
        {"id": missed[0].id, "event": "e", "data": {"n": 2}},
        {"id": missed[1].id, "event": "e", "data": {"n": 3}},
        {"event": "resume.position", "data": {"id": missed[1].id}},
    ]
    sse = await open_stream(gw, u, tok, last_event_id=seen.id)
    got = [await sse.next() for _ in range(2)]
    assert [(e.id, e.data.get("data")) for e in got] == [(missed[0].id, {"n": 2}), (missed[1].id, {"n": 3})]
    assert await until_position(sse) == missed[1].id


@pytest.mark.parametrize("topology", ["standalone"])
async def test_idempotent_retry_is_delivered_once(
    gateways: Gateways, make_pub: PublisherFactory, open_ws: Any, topology: str
) -> None:
    gw, pub, u = gateways.get(topology), make_pub(), user()
    ws = await open_ws(gw, u, mint(u))
    first = await do(pub.publish(u, "essay_status_updated", {"essay_id": "e-7"}, idempotency_key="e-7-graded"))
    retry = await do(pub.publish(u, "essay_status_updated", {"essay_id": "e-7"}, idempotency_key="e-7-graded"))
    marker = await do(pub.publish(u, "marker", {}))
    assert retry.duplicate and retry.id == first.id and retry.receivers == 0
    # Delivery on a channel is in order: the marker comes right after the one copy.
    assert [(await ws.next())["id"] for _ in range(2)] == [first.id, marker.id]


@pytest.mark.parametrize("topology", ["standalone"])
async def test_disconnect_with_revoke_closes_4004_and_refuses_the_old_token(
    gateways: Gateways, make_pub: PublisherFactory, open_ws: Any, open_stream: Any, topology: str
) -> None:
    gw, pub, u = gateways.get(topology), make_pub(), user()
    tok = mint(u, iat=int(time.time()) - 5)
    ws = await open_ws(gw, u, tok)
    sse = await open_stream(gw, u, tok)
    await until_position(sse)

    d = await do(pub.disconnect_user(u, "account disabled", revoke=True, revoke_for=3600))
    assert d.receivers == 1 and d.revoked_at > 0
    code, reason = await ws.closed_with()
    assert code == 4004 and "account disabled" in reason
    end = await sse.next()
    assert end.data["event"] == "connection.closed" and end.data["data"]["code"] == 4004

    again = await open_ws(gw, u, tok)
    code, reason = await again.closed_with()
    assert code == 1008 and "revoked" in reason
    refused = await open_stream(gw, u, tok)
    assert refused.status in (401, 403) and b"revoked" in refused.body


@pytest.mark.parametrize("topology", ["standalone", "cluster", "cluster-sharded", "sentinel"])
async def test_every_topology_delivers(
    gateways: Gateways, make_pub: PublisherFactory, open_stream: Any, open_ws: Any, topology: str
) -> None:
    """The gateway in each topology (sharded: SPUBLISH inside publish.lua)
    receives what Python publishes, and the disconnect reaches it."""
    gw, pub, u = gateways.get(topology), make_pub(), user()
    tok = mint(u)
    sse = await open_stream(gw, u, tok)
    await until_position(sse)
    # Classic PUBLISH on a cluster counts the subscribers of the node that
    # ran the script only; the gateway's one pub/sub connection may be on
    # another node.
    expected = (0, 1) if topology == "cluster" else (1,)
    p = await do(pub.publish(u, "essay_status_updated", {"topology": topology}))
    assert p.receivers in expected
    ev = await sse.next()
    assert ev.id == p.id and ev.data == {"id": p.id, "event": "essay_status_updated", "data": {"topology": topology}}
    ws = await open_ws(gw, u, tok)
    d = await do(pub.disconnect_user(u, "bye"))
    assert d.receivers in expected and d.revoked_at == 0
    assert (await ws.closed_with())[0] == 4004
