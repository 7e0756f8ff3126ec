"""Publish notifications to HuleEdu's websocket-service gateway.

    from huleedu_websocket import Publisher
    pubsub = Publisher(redis.asyncio.Redis.from_url("redis://redis:6379"))
    await pubsub.publish_user_notification("user-123", "essay_status_updated", {"essay_id": "e-1"})

Every notification goes through the gateway's own Lua scripts (shipped in
this package, byte-for-byte notify/publish.lua and notify/disconnect.lua):
with history, so clients resume what they missed; with an optional
idempotency key, so a retry is delivered once. SyncPublisher is the same API
for synchronous redis-py clients."""

from ._core import (
    DEFAULT_HISTORY_AGE,
    DEFAULT_HISTORY_LEN,
    DEFAULT_HISTORY_META_TTL,
    DEFAULT_MAX_PAYLOAD_BYTES,
    DEFAULT_PREFIX,
    DEFAULT_REVOKE_FOR,
    DISCONNECT_SCRIPT,
    PUBLISH_SCRIPT,
    TEACHER_DATA_FIELDS,
    Disconnected,
    LuaScript,
    Published,
    channel,
)
from .publisher import Publisher
from .sync import SyncPublisher

__all__ = [
    "DEFAULT_HISTORY_AGE",
    "DEFAULT_HISTORY_LEN",
    "DEFAULT_HISTORY_META_TTL",
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "DEFAULT_PREFIX",
    "DEFAULT_REVOKE_FOR",
    "DISCONNECT_SCRIPT",
    "PUBLISH_SCRIPT",
    "TEACHER_DATA_FIELDS",
    "Disconnected",
    "LuaScript",
    "Published",
    "Publisher",
    "SyncPublisher",
    "channel",
]
