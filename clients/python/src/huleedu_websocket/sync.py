"""The synchronous twin of Publisher (redis.Redis, redis.cluster.RedisCluster), for scripts and workers."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeAlias

from redis.exceptions import NoScriptError

from . import _core
from ._core import (
    DEFAULT_HISTORY_AGE,
    DEFAULT_HISTORY_LEN,
    DEFAULT_HISTORY_META_TTL,
    DEFAULT_MAX_PAYLOAD_BYTES,
    DEFAULT_PREFIX,
    DEFAULT_REVOKE_FOR,
    Disconnected,
    LuaScript,
    Published,
)

if TYPE_CHECKING:
    import redis
    import redis.cluster

    SyncClient: TypeAlias = "redis.Redis | redis.cluster.RedisCluster"


class SyncPublisher:
    """Publisher's synchronous twin, through a redis-py client: a redis.Redis
    (standalone, or a Sentinel's master_for()), or a redis.cluster.RedisCluster.
    Same methods, same arguments, same results, without await.

    Every notification is published with history through publish.lua (the
    gateway's own script), so it carries an "id", clients that reconnect
    resume it, and an idempotency key makes a retry a no-op. Bad input raises
    ValueError/TypeError before anything is sent; Redis errors are redis-py's
    exceptions, raised as they are.

    prefix is the gateway's REDIS_CHANNEL_PREFIX; sharded=True for gateways
    running with REDIS_PUBSUB_MODE=sharded (the script then uses SPUBLISH).
    history_len / history_age are the retention (history_age also bounds how
    long an idempotency key is remembered); durations are timedeltas or
    seconds. max_payload_bytes is the gateway's WEBSOCKET_MAX_MESSAGE_BYTES
    (None: no limit).
    json_default is passed to json.dumps for values it cannot encode."""

    def __init__(
        self,
        client: SyncClient,
        *,
        prefix: str = DEFAULT_PREFIX,
        sharded: bool = False,
        history_len: int = DEFAULT_HISTORY_LEN,
        history_age: float | timedelta = DEFAULT_HISTORY_AGE,
        history_meta_ttl: float | timedelta = DEFAULT_HISTORY_META_TTL,
        max_payload_bytes: int | None = DEFAULT_MAX_PAYLOAD_BYTES,
        json_default: Callable[[Any], Any] | None = None,
    ) -> None:
        self._client = client
        self._opts = _core.Options.make(
            prefix, sharded, history_len, history_age, history_meta_ttl, max_payload_bytes, json_default
        )

    @property
    def client(self) -> SyncClient:
        return self._client

    def channel(self, user_id: str) -> str:
        """The user's channel, "<prefix>:<user_id>"."""
        return _core.channel(self._opts.prefix, _core.check_user(user_id))

    def publish_user_notification(self, user_id: str, event_type: str, data: Any) -> int:
        """Sends {"event": event_type, "data": data} to the user, with history.
        Returns the number of gateway instances subscribed to the user's channel
        (not WebSockets): the same call and result as the platform's
        RedisClient.publish_user_notification."""
        return (self.publish(user_id, event_type, data)).receivers

    def publish(
        self, user_id: str, event_type: str, data: Any, *, idempotency_key: str | None = None
    ) -> Published:
        """Sends {"event": event_type, "data": data} with history. With an
        idempotency_key, a retry within history_age returns the first publish's
        id with duplicate=True and delivers nothing again."""
        payload = _core.encode_notification(event_type, data, self._opts)
        return self._publish(user_id, payload, idempotency_key)

    def publish_raw(
        self, user_id: str, document: Mapping[str, Any] | str | bytes, *, idempotency_key: str | None = None
    ) -> Published:
        """Sends any JSON object (a Mapping, or JSON text sent as given) with
        history; a top-level "id" is refused (publish.lua inserts it)."""
        payload = _core.encode_document(document, self._opts)
        return self._publish(user_id, payload, idempotency_key)

    def publish_teacher_notification(self, event: Mapping[str, Any]) -> Published:
        """Publishes a TeacherNotificationRequestedV1 (as a mapping) to its
        teacher: event = notification_type, data = payload + category,
        priority, action_required, deadline (deadline_timestamp), batch_id,
        class_id, correlation_id, timestamp. The idempotency key is a digest of
        the event, so a redelivered event is delivered once (within history_age)."""
        user_id, event_type, data, key = _core.teacher_notification(event, self._opts)
        return self.publish(user_id, event_type, data, idempotency_key=key)

    def disconnect_user(
        self,
        user_id: str,
        reason: str = "",
        *,
        revoke: bool = False,
        revoke_for: float | timedelta = DEFAULT_REVOKE_FOR,
    ) -> Disconnected:
        """Closes every socket of the user on every gateway instance with 4004
        REVOKED (reason in the close message). With revoke=True the user's
        tokens issued up to now are refused from now on, for revoke_for (your
        tokens' longest lifetime)."""
        keys, args = _core.disconnect_call(user_id, reason, revoke, revoke_for, self._opts)
        return _core.disconnected(self._run(_core.DISCONNECT_SCRIPT, keys, args))

    def _publish(self, user_id: str, payload: bytes, idempotency_key: str | None) -> Published:
        keys, args = _core.publish_call(user_id, payload, idempotency_key, self._opts)
        return _core.published(self._run(_core.PUBLISH_SCRIPT, keys, args))

    def _run(self, script: LuaScript, keys: Sequence[str], args: Sequence[str | bytes]) -> Any:
        """EVALSHA, and EVAL when the server does not know the script (after a
        restart, a failover, SCRIPT FLUSH): EVAL also caches it. The keys all
        share the user's hash tag, so a cluster client sends both to the slot's
        master."""
        try:
            return self._client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return self._client.eval(script.body, len(keys), *keys, *args)
