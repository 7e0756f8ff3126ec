"""Bad input is refused with ValueError / TypeError naming the problem,
before anything reaches Redis: the client here fails the test if touched."""

from __future__ import annotations

import json
from typing import Any

import pytest

from huleedu_websocket import Publisher, SyncPublisher, _core

from .conftest import do


class Untouchable:
    """A client any call to which is a test failure."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"Redis was called ({name}) for input that should have been refused")


@pytest.fixture(params=["async", "sync"])
def pub(request: pytest.FixtureRequest) -> Publisher | SyncPublisher:
    if request.param == "async":
        return Publisher(Untouchable(), max_payload_bytes=1024)
    return SyncPublisher(Untouchable(), max_payload_bytes=1024)


class Opaque:
    pass


BAD_PUBLISH: list[tuple[str, tuple[Any, ...], dict[str, Any], type[Exception], str]] = [
    ("empty user", ("", "e", {}), {}, ValueError, "user_id is empty"),
    ("user not str", (123, "e", {}), {}, TypeError, "user_id must be a str"),
    ("event not str", ("u", None, {}), {}, TypeError, "event_type must be a str"),
    ("empty event", ("u", "", {}), {}, ValueError, "event_type is empty"),
    ("data not serialisable", ("u", "e", {"x": Opaque()}), {}, TypeError, "data is not JSON-serialisable.*Opaque"),
    ("NaN", ("u", "e", {"x": float("nan")}), {}, ValueError, "data is not JSON-serialisable"),
    ("infinity", ("u", "e", [float("inf")]), {}, ValueError, "data is not JSON-serialisable"),
    ("lone surrogate", ("u", "e", "\ud800"), {}, ValueError, "not valid UTF-8"),
    ("too large", ("u", "e", "x" * 1000), {}, ValueError, "exceeds max_payload_bytes=1024"),
    ("empty key", ("u", "e", {}), {"idempotency_key": ""}, ValueError, "idempotency_key is empty"),
    ("key not str", ("u", "e", {}), {"idempotency_key": 5}, TypeError, "idempotency_key must be a str"),
]


@pytest.mark.parametrize("name,args,kwargs,exc,match", BAD_PUBLISH, ids=[c[0] for c in BAD_PUBLISH])
async def test_publish_refuses(
    pub: Publisher | SyncPublisher, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], exc: type[Exception], match: str
) -> None:
    with pytest.raises(exc, match=match):
        await do(pub.publish(*args, **kwargs))
    if not kwargs:
        with pytest.raises(exc, match=match):
            await do(pub.publish_user_notification(*args))


async def test_circular_data(pub: Publisher | SyncPublisher) -> None:
    d: dict[str, Any] = {}
    d["self"] = d
    with pytest.raises(ValueError, match="data is not JSON-serialisable.*[Cc]ircular"):
        await do(pub.publish("u", "e", d))


BAD_RAW: list[tuple[str, Any, type[Exception], str]] = [
    ("top-level id in a mapping", {"id": "x", "event": "e"}, ValueError, 'top-level "id"'),
    ("top-level id in text", '{"event":"e","id":"x"}', ValueError, 'top-level "id"'),
    ("duplicate id in text", '{"id":1,"id":2}', ValueError, 'top-level "id"'),
    ("top-level id in bytes", b' {"id":null}', ValueError, 'top-level "id"'),
    ("array", "[1,2]", ValueError, "not a JSON object.*array"),
    ("string", '"hello"', ValueError, "not a JSON object.*string"),
    ("number", "42", ValueError, "not a JSON object.*number"),
    ("null", "null", ValueError, "not a JSON object.*null"),
    ("invalid JSON", '{"event":', ValueError, "not valid JSON"),
    ("NaN in text", '{"x": NaN}', ValueError, "not valid JSON"),
    ("trailing garbage", '{"a":1} x', ValueError, "not valid JSON"),
    ("not UTF-8", '{"a":"ä"}'.encode("utf-16"), ValueError, "not UTF-8"),
    ("a list", [1, 2], TypeError, "document must be a Mapping or JSON text"),
    ("mapping not serialisable", {"x": Opaque()}, TypeError, "document is not JSON-serialisable"),
    ("too large", {"x": "y" * 1000}, ValueError, "exceeds max_payload_bytes"),
    ("too large text", json.dumps({"x": "y" * 1000}), ValueError, "exceeds max_payload_bytes"),
]


@pytest.mark.parametrize("name,doc,exc,match", BAD_RAW, ids=[c[0] for c in BAD_RAW])
async def test_publish_raw_refuses(pub: Publisher | SyncPublisher, name: str, doc: Any, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        await do(pub.publish_raw("u", doc))


async def test_size_limit_leaves_room_for_the_id(pub: Publisher | SyncPublisher) -> None:
    """1024 - 64 bytes pass the check (and reach the client, which raises here)."""
    doc = '{"x":"' + "y" * (1024 - 64 - 8) + '"}'
    assert len(doc) == 1024 - 64
    with pytest.raises(AssertionError, match="Redis was called"):
        await do(pub.publish_raw("u", doc))
    with pytest.raises(ValueError, match="exceeds"):
        await do(pub.publish_raw("u", doc + " "))


BAD_TEACHER: list[tuple[str, Any, type[Exception], str]] = [
    ("not a mapping", [("teacher_id", "t")], TypeError, "event must be a Mapping"),
    ("no teacher", {"notification_type": "x"}, ValueError, "no teacher_id"),
    ("empty teacher", {"teacher_id": "", "notification_type": "x"}, ValueError, "no teacher_id"),
    ("no type", {"teacher_id": "t"}, ValueError, "no notification_type"),
    ("payload not a mapping", {"teacher_id": "t", "notification_type": "x", "payload": [1]}, ValueError, "payload must be a mapping"),
    ("payload not serialisable", {"teacher_id": "t", "notification_type": "x", "payload": {"o": Opaque()}}, TypeError, "not JSON-serialisable"),
]


@pytest.mark.parametrize("name,ev,exc,match", BAD_TEACHER, ids=[c[0] for c in BAD_TEACHER])
async def test_teacher_notification_refuses(pub: Publisher | SyncPublisher, name: str, ev: Any, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        await do(pub.publish_teacher_notification(ev))


BAD_DISCONNECT: list[tuple[str, tuple[Any, ...], dict[str, Any], type[Exception], str]] = [
    ("empty user", ("",), {}, ValueError, "user_id is empty"),
    ("reason not str", ("u", None), {}, TypeError, "reason must be a str"),
    ("revoke_for zero", ("u",), {"revoke": True, "revoke_for": 0}, ValueError, "revoke_for must be positive"),
    ("revoke_for text", ("u",), {"revoke": True, "revoke_for": "1h"}, TypeError, "revoke_for must be a timedelta"),
]


@pytest.mark.parametrize("name,args,kwargs,exc,match", BAD_DISCONNECT, ids=[c[0] for c in BAD_DISCONNECT])
async def test_disconnect_refuses(
    pub: Publisher | SyncPublisher, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], exc: type[Exception], match: str
) -> None:
    with pytest.raises(exc, match=match):
        await do(pub.disconnect_user(*args, **kwargs))


BAD_OPTIONS: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("empty prefix", {"prefix": ""}, ValueError, "prefix"),
    ("history_len 0", {"history_len": 0}, ValueError, "history_len"),
    ("history_age negative", {"history_age": -1}, ValueError, "history_age must be positive"),
    ("max_payload_bytes tiny", {"max_payload_bytes": 10}, ValueError, "max_payload_bytes must exceed"),
]


@pytest.mark.parametrize("cls", [Publisher, SyncPublisher])
@pytest.mark.parametrize("name,opts,exc,match", BAD_OPTIONS, ids=[c[0] for c in BAD_OPTIONS])
def test_options_refused(cls: type[Publisher] | type[SyncPublisher], name: str, opts: dict[str, Any], exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        cls(Untouchable(), **opts)


# Key names computed by Go's notify.HistoryKey / RevocationKey: a user id
# with "}" gets a tag hashing to the channel's slot, others keep "{<channel>}".
@pytest.mark.parametrize(
    ("user", "history", "revocation"),
    [
        ("u1", "{ws:u1}:h", "{ws:u1}:r"),
        ("p{q", "{ws:p{q}:h", "{ws:p{q}:r"),
        ("a}b{c", "{15x}ws:a}b{c:h", "{15x}ws:a}b{c:r"),
        ("x{y}", "{y}ws:x{y}:h", "{y}ws:x{y}:r"),
        ("}{", "{64u}ws:}{:h", "{64u}ws:}{:r"),
        ("ü{ß}", "{5iq}ws:ü{ß}:h", "{5iq}ws:ü{ß}:r"),
    ],
)
def test_key_names_match_go(user: str, history: str, revocation: str) -> None:
    ch = _core.channel("ws", user)
    assert _core.history_key(ch) == history
    assert _core.revocation_key(ch) == revocation
    assert _core.key_slot(_core.meta_key(ch)) == _core.key_slot(ch)
    assert _core.key_slot(_core.idempotency_key_name(ch, "k")) == _core.key_slot(ch)
