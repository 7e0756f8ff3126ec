"""The publisher against real Redis in every topology the gateway supports
(standalone, 3-master cluster classic and sharded, Sentinel), through both
APIs: what publish.lua and disconnect.lua store and return."""

from __future__ import annotations

import enum
import json
import re
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import redis.exceptions

from huleedu_websocket import PUBLISH_SCRIPT, Published, Publisher, SyncPublisher

from .conftest import PublisherFactory, do

ID = re.compile(r"^[0-9a-z]+-[1-9][0-9]*-[0-9a-z]+$")


def user() -> str:
    return "py-" + uuid.uuid4().hex[:12]


def history(raw: Any, ch: str) -> list[dict[str, Any]]:
    """The notifications in a channel's history, oldest first."""
    out = []
    for entry in raw.lrange("{" + ch + "}:h", 0, -1):
        _offset, _ms, _check, doc = entry.decode().split("|", 3)
        out.append(json.loads(doc))
    return out


async def test_publish_stores_with_id(make_pub: PublisherFactory, raw: Any) -> None:
    pub, u = make_pub(), user()
    first = await do(pub.publish(u, "essay_status_updated", {"essay_id": "e-1", "status": "graded"}))
    second = await do(pub.publish(u, "essay_status_updated", {"essay_id": "e-2"}))
    assert isinstance(first, Published) and ID.match(first.id) and not first.duplicate
    assert first.receivers == 0  # nobody subscribed
    assert first.id.split("-")[1] == "1" and second.id.split("-")[1] == "2"
    assert first.id.split("-")[0] == second.id.split("-")[0]  # one epoch
    assert history(raw, "ws:" + u) == [
        {"id": first.id, "event": "essay_status_updated", "data": {"essay_id": "e-1", "status": "graded"}},
        {"id": second.id, "event": "essay_status_updated", "data": {"essay_id": "e-2"}},
    ]
    raw_entry = raw.lrange("{ws:" + u + "}:h", 0, 0)[0].decode()
    assert raw_entry.split("|", 3)[3].startswith('{"id":"' + first.id + '","event"')


async def test_publish_user_notification_keeps_the_platform_call(make_pub: PublisherFactory, raw: Any) -> None:
    pub, u = make_pub(), user()
    receivers = await do(pub.publish_user_notification(u, "batch_file_added", {"batch_id": "b-1"}))
    assert receivers == 0 and isinstance(receivers, int)
    [n] = history(raw, "ws:" + u)
    assert n["event"] == "batch_file_added" and n["data"] == {"batch_id": "b-1"} and ID.match(n["id"])


async def test_publish_raw(make_pub: PublisherFactory, raw: Any) -> None:
    pub, u = make_pub(), user()
    a = await do(pub.publish_raw(u, {"event": "class_created", "data": {"class_id": "c-1"}, "extra": [1, 2]}))
    text = ' {"event": "x",  "data": {"nested": {"id": "allowed below the top level"}}}'
    b = await do(pub.publish_raw(u, text))
    c = await do(pub.publish_raw(u, b"{}"))
    assert [n["id"] for n in history(raw, "ws:" + u)] == [a.id, b.id, c.id]
    entries = [e.decode().split("|", 3)[3] for e in raw.lrange("{ws:" + u + "}:h", 0, -1)]
    # JSON text is sent as given, after the id publish.lua inserts.
    assert entries[1] == '{"id":"' + b.id + '","event": "x",  "data": {"nested": {"id": "allowed below the top level"}}}'
    assert entries[2] == '{"id":"' + c.id + '"}'


async def test_idempotency_key_makes_a_retry_a_noop(make_pub: PublisherFactory, raw: Any) -> None:
    pub, u = make_pub(), user()
    first = await do(pub.publish(u, "essay_status_updated", {"n": 1}, idempotency_key="essay-e-1-graded"))
    retry = await do(pub.publish(u, "essay_status_updated", {"n": 1}, idempotency_key="essay-e-1-graded"))
    other = await do(pub.publish(u, "essay_status_updated", {"n": 2}, idempotency_key="essay-e-2-graded"))
    assert retry == Published(id=first.id, receivers=0, duplicate=True)
    assert not first.duplicate and not other.duplicate and other.id != first.id
    assert [n["id"] for n in history(raw, "ws:" + u)] == [first.id, other.id]


async def test_retention_options(make_pub: PublisherFactory, raw: Any) -> None:
    pub, u = make_pub(history_len=2, history_age=timedelta(seconds=60), history_meta_ttl=600), user()
    ids = [(await do(pub.publish(u, "e", {"i": i}, idempotency_key=f"k{i}"))).id for i in range(3)]
    assert [n["id"] for n in history(raw, "ws:" + u)] == ids[1:]
    assert 0 < raw.pttl("{ws:" + u + "}:h") <= 60000
    assert 60000 < raw.pttl("{ws:" + u + "}:m") <= 600000
    assert 0 < raw.pttl("{ws:" + u + "}:i:k0") <= 60000


async def test_channel_prefix(make_pub: PublisherFactory, raw: Any) -> None:
    pub, u = make_pub(prefix="hule"), user()
    p = await do(pub.publish(u, "e", None))
    assert pub.channel(u) == "hule:" + u
    assert [n["id"] for n in history(raw, "hule:" + u)] == [p.id]
    assert raw.exists("{ws:" + u + "}:h") == 0


async def test_script_unknown_to_the_server_falls_back_to_eval(make_pub: PublisherFactory, raw: Any, topology: str) -> None:
    """After a restart, failover or SCRIPT FLUSH, EVALSHA answers NOSCRIPT: the
    publisher sends EVAL (which caches the script again)."""
    pub, u = make_pub(), user()
    await do(pub.publish(u, "e", 1))  # cached now
    if topology.startswith("cluster"):
        for node in raw.get_primaries():
            raw.get_redis_connection(node).script_flush()
    else:
        raw.script_flush()
    ch = "ws:" + u
    with pytest.raises(redis.exceptions.NoScriptError):
        raw.evalsha(PUBLISH_SCRIPT.sha, 2, "{" + ch + "}:h", "{" + ch + "}:m", ch, "{}", 100, 300000, 86400000, "0")
    p = await do(pub.publish(u, "e", 2))
    d = await do(pub.disconnect_user(u, "x"))
    assert ID.match(p.id) and d.receivers == 0
    assert [n["data"] for n in history(raw, ch)] == [1, 2]


async def test_redis_errors_surface(make_pub: PublisherFactory, raw: Any) -> None:
    pub, u = make_pub(), user()
    raw.set("{ws:" + u + "}:m", "not a hash")
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        await do(pub.publish(u, "e", {}))


async def test_disconnect_and_revoke(make_pub: PublisherFactory, raw: Any) -> None:
    pub, u = make_pub(), user()
    now = int(raw.time()[0])
    d = await do(pub.disconnect_user(u, "account disabled", revoke=True, revoke_for=timedelta(minutes=1)))
    assert now <= d.revoked_at <= now + 60 and d.receivers == 0
    assert int(raw.get("{ws:" + u + "}:r")) == d.revoked_at
    assert 0 < raw.pttl("{ws:" + u + "}:r") <= 60000
    plain = await do(pub.disconnect_user(u, "just close"))
    assert plain.revoked_at == 0
    assert int(raw.get("{ws:" + u + "}:r")) == d.revoked_at  # a disconnect alone keeps the revocation


class Priority(enum.Enum):
    HIGH = "high"


def teacher_event(**over: Any) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "teacher_id": "t-" + uuid.uuid4().hex[:10],
        "notification_type": "batch_results_ready",
        "category": "batch_progress",
        "priority": Priority.HIGH,
        "payload": {"batch_id": "overridden", "essays": 30, "message": "Klart: 30 uppsatser"},
        "action_required": True,
        "deadline_timestamp": datetime(2026, 12, 24, 12, 0, tzinfo=timezone.utc),
        "correlation_id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "batch_id": "b-1",
        "class_id": "c-1",
        "timestamp": datetime(2026, 12, 3, 9, 30, tzinfo=timezone.utc),
    }
    ev.update(over)
    return ev


async def test_teacher_notification(make_pub: PublisherFactory, raw: Any) -> None:
    pub = make_pub()
    ev = teacher_event()
    first = await do(pub.publish_teacher_notification(ev))
    redelivered = await do(pub.publish_teacher_notification(dict(ev)))
    assert redelivered == Published(id=first.id, receivers=0, duplicate=True)
    later = await do(pub.publish_teacher_notification({**ev, "timestamp": "2026-12-03T09:31:00+00:00"}))
    assert not later.duplicate
    n = history(raw, "ws:" + ev["teacher_id"])
    assert [x["id"] for x in n] == [first.id, later.id]
    assert n[0]["event"] == "batch_results_ready"
    assert n[0]["data"] == {
        "essays": 30,
        "message": "Klart: 30 uppsatser",
        "category": "batch_progress",
        "priority": "high",
        "action_required": True,
        "deadline": "2026-12-24T12:00:00+00:00",
        "batch_id": "b-1",
        "class_id": "c-1",
        "correlation_id": "12345678-1234-5678-1234-567812345678",
        "timestamp": "2026-12-03T09:30:00+00:00",
    }


async def test_teacher_notification_minimal(make_pub: PublisherFactory, raw: Any) -> None:
    pub = make_pub()
    ev = {"teacher_id": "t-" + uuid.uuid4().hex[:10], "notification_type": "class_created"}
    await do(pub.publish_teacher_notification(ev))
    [n] = history(raw, "ws:" + ev["teacher_id"])
    assert n["data"] == {
        "category": None, "priority": None, "action_required": False, "deadline": None,
        "batch_id": None, "class_id": None, "correlation_id": None, "timestamp": None,
    }


def test_same_api_both_ways() -> None:
    """The sync twin has every public method of the async publisher, with
    the same parameters."""
    import inspect

    def api(cls: type) -> dict[str, list[str]]:
        return {
            n: list(inspect.signature(f).parameters)
            for n, f in vars(cls).items()
            if callable(f) and not n.startswith("_")
        }

    assert api(Publisher) == api(SyncPublisher)
    for n, f in vars(Publisher).items():
        if callable(f) and not n.startswith("_") and n != "channel":
            assert inspect.iscoroutinefunction(f), n
            assert not inspect.iscoroutinefunction(vars(SyncPublisher)[n]), n


async def test_size_limit_configurable(make_pub: PublisherFactory, raw: Any) -> None:
    u, big = user(), "x" * 70000
    with pytest.raises(ValueError, match="exceeds max_payload_bytes=65536"):
        await do(make_pub().publish(u, "e", big))
    assert raw.exists("{ws:" + u + "}:h") == 0
    p = await do(make_pub(max_payload_bytes=None).publish(u, "e", big))
    q = await do(make_pub(max_payload_bytes=200000).publish(u, "e", big))
    assert [n["id"] for n in history(raw, "ws:" + u)] == [p.id, q.id]


def test_the_installed_package_is_under_test() -> None:
    """Under the Go harness the tests import the package pip installed (so its
    Lua files travel as package data), not src/."""
    import os

    import huleedu_websocket

    if os.environ.get("PYWS_EXPECT_INSTALLED") != "1":
        pytest.skip("PYWS_EXPECT_INSTALLED is not set (the Go harness sets it)")
    assert "site-packages" in huleedu_websocket.__file__, huleedu_websocket.__file__
    assert PUBLISH_SCRIPT.body.startswith(b"-- publish.lua")
