"""Everything that happens before Redis, shared by the async and the sync
publisher: the channel and key names (exactly as the gateway and
notify/*.lua spell them), the scripts, input validation and encoding, and
the decoding of the scripts' replies.

Bad input raises ValueError or TypeError here, naming the problem, so no
malformed notification ever reaches Redis (where the gateway would drop it
silently and only count it)."""

from __future__ import annotations

import functools

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from enum import Enum
from importlib import resources
from typing import Any, Final
from uuid import UUID

DEFAULT_PREFIX: Final = "ws"
"""The channel prefix when the gateway's REDIS_CHANNEL_PREFIX is unset."""

DEFAULT_HISTORY_LEN: Final = 100
"""Notifications kept per user (publish.lua's ARGV[3])."""

DEFAULT_HISTORY_AGE: Final = timedelta(minutes=5)
"""Age of the oldest notification kept, and the history's expiry (ARGV[4]);
also how long an idempotency key is remembered."""

DEFAULT_HISTORY_META_TTL: Final = timedelta(hours=24)
"""Expiry of a history's epoch and offset (ARGV[5])."""

DEFAULT_REVOKE_FOR: Final = timedelta(hours=24)
"""How long a revocation is kept: set it to your tokens' longest lifetime."""

DEFAULT_MAX_PAYLOAD_BYTES: Final = 65536
"""The gateway's default WEBSOCKET_MAX_MESSAGE_BYTES: larger payloads are dropped."""

ID_RESERVE_BYTES: Final = 64
"""Room left for the field publish.lua inserts, '"id":"<epoch>-<offset>-<check>",'
(at most 56 bytes): the gateway measures the payload with it."""


class LuaScript:
    """One of the gateway's Lua scripts, shipped in this package as an exact
    copy of notify/*.lua (a Go test fails if the copies differ)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.body: bytes = resources.files(__package__).joinpath("lua", name).read_bytes()
        self.sha: str = hashlib.sha1(self.body).hexdigest()


PUBLISH_SCRIPT: Final = LuaScript("publish.lua")
DISCONNECT_SCRIPT: Final = LuaScript("disconnect.lua")


def channel(prefix: str, user_id: str) -> str:
    """The user's Redis channel, "<prefix>:<user_id>", as the gateway subscribes it."""
    return prefix + ":" + user_id


def _crc16(data: bytes) -> int:
    """CRC-16/XMODEM, the checksum Redis Cluster hashes with."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def key_slot(name: str) -> int:
    """Redis Cluster's slot of a key or shard channel name (its hash tag, if any)."""
    raw = name.encode()
    i = raw.find(b"{")
    if i >= 0:
        j = raw.find(b"}", i + 1)
        if j > i + 1:
            raw = raw[i + 1 : j]
    return _crc16(raw) % 16384


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, d = divmod(n, 36)
        out = digits[d] + out
        if n == 0:
            return out


@functools.lru_cache(maxsize=1024)
def _slot_tag(slot: int) -> str:
    """The first base-36 number that hashes to slot (as notify's slotTag)."""
    n = 0
    while True:
        tag = _base36(n)
        if _crc16(tag.encode()) % 16384 == slot:
            return tag
        n += 1


def _hash_tag(ch: str) -> str:
    """The "{...}" that starts the names of a channel's keys, so that they live
    in the channel's slot: "{<channel>}" for a channel without "}" (every
    existing history's names), else "{<t>}<channel>" with t a short tag
    hashing to the channel's slot (a "}" would end the tag early). The same
    names as notify.HistoryKey in Go."""
    if "}" not in ch:
        return "{" + ch + "}"
    return "{" + _slot_tag(key_slot(ch)) + "}" + ch


def history_key(ch: str) -> str:
    """The channel's history list, in the channel's slot (one script call, one
    cluster node)."""
    return _hash_tag(ch) + ":h"


def meta_key(ch: str) -> str:
    """The history's epoch and newest offset."""
    return _hash_tag(ch) + ":m"


def idempotency_key_name(ch: str, key: str) -> str:
    """Marks a publish done under an idempotency key."""
    return _hash_tag(ch) + ":i:" + key


def revocation_key(ch: str) -> str:
    """The user's revocation time (unix seconds)."""
    return _hash_tag(ch) + ":r"


@dataclass(frozen=True)
class Published:
    """The result of one publish with history."""

    id: str
    """The notification's id, as clients receive it (and resume from)."""
    receivers: int
    """Gateway instances subscribed to the user's channel (not WebSockets); 0 for a duplicate."""
    duplicate: bool = False
    """The idempotency key was used within the retention age: nothing was stored
    or sent again, and id is the first publish's."""


@dataclass(frozen=True)
class Disconnected:
    """The result of disconnect_user."""

    revoked_at: int
    """The revocation time (Redis's clock, unix seconds); 0 without revoke."""
    receivers: int
    """Gateway instances that held a subscription for the user."""


def milliseconds(value: float | timedelta, what: str) -> int:
    """A positive duration (a timedelta or seconds) in whole milliseconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float, timedelta)):
        raise TypeError(f"{what} must be a timedelta or a number of seconds, not {type(value).__name__}")
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    ms = math.ceil(seconds * 1000) if math.isfinite(seconds) else 0
    if ms <= 0:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return ms


@dataclass(frozen=True)
class Options:
    """A publisher's settings, validated once."""

    prefix: str
    sharded: bool
    history_len: int
    history_age_ms: int
    history_meta_ttl_ms: int
    max_payload_bytes: int | None
    json_default: Callable[[Any], Any] | None

    @staticmethod
    def make(
        prefix: str,
        sharded: bool,
        history_len: int,
        history_age: float | timedelta,
        history_meta_ttl: float | timedelta,
        max_payload_bytes: int | None,
        json_default: Callable[[Any], Any] | None,
    ) -> Options:
        if not isinstance(prefix, str) or not prefix:
            raise ValueError("prefix must be a non-empty string (the gateway's REDIS_CHANNEL_PREFIX, default 'ws')")
        if isinstance(history_len, bool) or not isinstance(history_len, int) or history_len < 1:
            raise ValueError(f"history_len must be a positive int, got {history_len!r}")
        if max_payload_bytes is not None and (isinstance(max_payload_bytes, bool) or not isinstance(max_payload_bytes, int)):
            raise TypeError("max_payload_bytes must be an int, or None for no limit")
        if max_payload_bytes is not None and max_payload_bytes <= ID_RESERVE_BYTES:
            raise ValueError(f"max_payload_bytes must exceed {ID_RESERVE_BYTES} (room for the id), got {max_payload_bytes}")
        age = milliseconds(history_age, "history_age")
        meta = milliseconds(history_meta_ttl, "history_meta_ttl")
        return Options(prefix, bool(sharded), history_len, age, max(meta, age), max_payload_bytes, json_default)


def check_user(user_id: object) -> str:
    if not isinstance(user_id, str):
        raise TypeError(f"user_id must be a str, not {type(user_id).__name__}")
    if not user_id:
        raise ValueError("user_id is empty: the notification would reach nobody")
    return user_id


def check_idempotency_key(key: object) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str):
        raise TypeError(f"idempotency_key must be a str or None, not {type(key).__name__}")
    if not key:
        raise ValueError("idempotency_key is empty: pass None for no key")
    return key


def _dumps(value: Any, default: Callable[[Any], Any] | None, what: str) -> bytes:
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=default)
    except TypeError as e:
        raise TypeError(f"{what} is not JSON-serialisable: {e}") from e
    except ValueError as e:  # NaN or infinity, a circular reference
        raise ValueError(f"{what} is not JSON-serialisable: {e}") from e
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid UTF-8 text (a lone surrogate?): {e}") from e


def encode_notification(event_type: object, data: Any, opts: Options) -> bytes:
    """The envelope the frontend expects: {"event": event_type, "data": data}."""
    if not isinstance(event_type, str):
        raise TypeError(f"event_type must be a str, not {type(event_type).__name__}")
    if not event_type:
        raise ValueError("event_type is empty")
    payload = _dumps({"event": event_type, "data": data}, opts.json_default, "data")
    return check_size(payload, opts)


class _Pairs(list[tuple[str, Any]]):
    """A JSON object's members in order, duplicates kept (json.loads hook)."""


def encode_document(document: object, opts: Options) -> bytes:
    """A whole notification: a Mapping (encoded here) or JSON text (str or
    UTF-8 bytes, sent exactly as given). It must be a JSON object without a
    top-level "id", which publish.lua inserts."""
    if isinstance(document, Mapping):
        for k in document:
            if k == "id":
                raise ValueError('document has a top-level "id": it is reserved for the id publish.lua inserts')
        payload = _dumps(document, opts.json_default, "document")
    elif isinstance(document, (str, bytes, bytearray)):
        if isinstance(document, str):
            text = document
            try:
                payload = text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"document is not valid UTF-8 text: {e}") from e
        else:
            payload = bytes(document)
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"document is not UTF-8: {e}") from e
        try:
            parsed = json.loads(text, object_pairs_hook=_Pairs, parse_constant=_refuse_constant)
        except ValueError as e:
            raise ValueError(f"document is not valid JSON: {e}") from e
        if not isinstance(parsed, _Pairs):
            raise ValueError(f"document is not a JSON object (it is a JSON {_json_kind(parsed)})")
        if any(k == "id" for k, _ in parsed):
            raise ValueError('document has a top-level "id": it is reserved for the id publish.lua inserts')
    else:
        raise TypeError(f"document must be a Mapping or JSON text (str or bytes), not {type(document).__name__}")
    return check_size(payload, opts)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_kind(v: Any) -> str:
    if isinstance(v, list):
        return "array"
    if isinstance(v, str):
        return "string"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    return "number"


def check_size(payload: bytes, opts: Options) -> bytes:
    if opts.max_payload_bytes is not None and len(payload) + ID_RESERVE_BYTES > opts.max_payload_bytes:
        raise ValueError(
            f"notification is {len(payload)} bytes: with the id it exceeds max_payload_bytes={opts.max_payload_bytes} "
            "(the gateway's WEBSOCKET_MAX_MESSAGE_BYTES), and the gateway would drop it"
        )
    return payload


def publish_call(user_id: object, payload: bytes, idempotency_key: object, opts: Options) -> tuple[list[str], list[str | bytes]]:
    """publish.lua's KEYS and ARGV, exactly as notify.HistoryPublisher passes
    them. ARGV[7], the size limit with the id (0: none), is checked by
    publish.lua versions that read it and ignored by those that do not; the
    check above already refused anything that could exceed it."""
    ch = channel(opts.prefix, check_user(user_id))
    key = check_idempotency_key(idempotency_key)
    keys = [history_key(ch), meta_key(ch)]
    if key is not None:
        keys.append(idempotency_key_name(ch, key))
    args: list[str | bytes] = [
        ch,
        payload,
        str(opts.history_len),
        str(opts.history_age_ms),
        str(opts.history_meta_ttl_ms),
        "1" if opts.sharded else "0",
        str(opts.max_payload_bytes or 0),
    ]
    return keys, args


def disconnect_call(
    user_id: object, reason: object, revoke: bool, revoke_for: float | timedelta, opts: Options
) -> tuple[list[str], list[str | bytes]]:
    """disconnect.lua's KEYS and ARGV, exactly as notify.Disconnecter passes them."""
    ch = channel(opts.prefix, check_user(user_id))
    if not isinstance(reason, str):
        raise TypeError(f"reason must be a str, not {type(reason).__name__}")
    ttl = milliseconds(revoke_for, "revoke_for")
    args: list[str | bytes] = [ch, reason.encode("utf-8"), "1" if revoke else "0", str(ttl), "1" if opts.sharded else "0"]
    return [revocation_key(ch)], args


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v)


def _reply(res: Any, script: str) -> tuple[Any, int]:
    if not isinstance(res, (list, tuple)) or len(res) != 2:
        raise RuntimeError(f"{script} returned {res!r}, expected two values")
    return res[0], int(res[1])


def published(res: Any) -> Published:
    msg_id, receivers = _reply(res, "publish.lua")
    if receivers < 0:
        return Published(id=_text(msg_id), receivers=0, duplicate=True)
    return Published(id=_text(msg_id), receivers=receivers)


def disconnected(res: Any) -> Disconnected:
    revoked_at, receivers = _reply(res, "disconnect.lua")
    return Disconnected(revoked_at=int(revoked_at), receivers=receivers)


TEACHER_DATA_FIELDS: Final = (
    "category",
    "priority",
    "action_required",
    "deadline",
    "batch_id",
    "class_id",
    "correlation_id",
    "timestamp",
)
"""What publish_teacher_notification adds to the payload (deadline is the
event's deadline_timestamp)."""


def plain(value: Any) -> Any:
    """The JSON form of the values a platform event model holds: enums by
    value, datetimes and dates in ISO 8601, UUIDs as text; mappings and
    sequences recursively. Anything else is left to json.dumps."""
    if isinstance(value, Enum):
        return plain(value.value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def teacher_notification(event: object, opts: Options) -> tuple[str, str, dict[str, Any], str]:
    """(user id, event type, data, idempotency key) for a
    TeacherNotificationRequestedV1 given as a mapping (model_dump() or the
    Kafka message's JSON). The key is a digest of the whole event, so a
    redelivered event (same content) is published once, and two events that
    differ in anything are two notifications."""
    if not isinstance(event, Mapping):
        raise TypeError(f"event must be a Mapping (e.g. model.model_dump()), not {type(event).__name__}")
    ev = plain(event)
    teacher_id = ev.get("teacher_id")
    if not isinstance(teacher_id, str) or not teacher_id:
        raise ValueError("event has no teacher_id (a non-empty string)")
    notification_type = ev.get("notification_type")
    if not isinstance(notification_type, str) or not notification_type:
        raise ValueError("event has no notification_type (a non-empty string)")
    payload = ev.get("payload")
    if payload is None:
        payload = {}
    if not isinstance(payload, Mapping):
        raise ValueError(f"event payload must be a mapping, not {type(payload).__name__}")
    data: dict[str, Any] = dict(payload)
    data.update(
        category=ev.get("category"),
        priority=ev.get("priority"),
        action_required=bool(ev.get("action_required", False)),
        deadline=ev.get("deadline_timestamp"),
        batch_id=ev.get("batch_id"),
        class_id=ev.get("class_id"),
        correlation_id=ev.get("correlation_id"),
        timestamp=ev.get("timestamp"),
    )
    try:
        canonical = json.dumps(ev, sort_keys=True, separators=(",", ":"), default=opts.json_default)
    except (TypeError, ValueError) as e:
        raise type(e)(f"event is not JSON-serialisable: {e}") from e
    key = "teacher-notification:" + hashlib.sha256(canonical.encode()).hexdigest()[:32]
    return teacher_id, notification_type, data, key
