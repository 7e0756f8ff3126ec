"""Fixtures: the Redis topologies (started by the Go harness,
clients/python/python_test.go, and named in the environment), a redis-py
client and a publisher of each API (async and sync) for each topology, and
the gateway binary per topology.

Environment: PYWS_REDIS_URL (standalone), PYWS_CLUSTER_NODES (host:port,…),
PYWS_SENTINEL_ADDRS (host:port,…) and PYWS_SENTINEL_MASTER, WSS_BIN (the
built gateway). A test whose part is missing is skipped, unless
PYWS_REQUIRE_ALL=1 (the Go harness sets it), when it fails."""

from __future__ import annotations

import inspect
import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel

from huleedu_websocket import Publisher, SyncPublisher

from .procs import Gateway, start_gateway

TOPOLOGIES = ["standalone", "cluster", "cluster-sharded", "sentinel"]
APIS = ["async", "sync"]


def need(name: str) -> str:
    v = os.environ.get(name, "")
    if not v:
        msg = f"{name} is not set (run these tests with `go test ./clients/python/`, which starts every part)"
        if os.environ.get("PYWS_REQUIRE_ALL") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return v


def _addrs(v: str) -> list[tuple[str, int]]:
    out = []
    for a in v.split(","):
        host, _, port = a.rpartition(":")
        out.append((host, int(port)))
    return out


async def do(x: Any) -> Any:
    """The same test body drives both APIs: awaits what the async one
    returns, passes the sync one's result through."""
    return await x if inspect.isawaitable(x) else x


def sync_client(topology: str) -> Any:
    """A synchronous redis-py client of the topology."""
    if topology == "standalone":
        return redis.Redis.from_url(need("PYWS_REDIS_URL"))
    if topology.startswith("cluster"):
        nodes = [redis.cluster.ClusterNode(h, p) for h, p in _addrs(need("PYWS_CLUSTER_NODES"))]
        return redis.cluster.RedisCluster(startup_nodes=nodes)
    if topology == "sentinel":
        s = redis.sentinel.Sentinel(_addrs(need("PYWS_SENTINEL_ADDRS")))
        return s.master_for(need("PYWS_SENTINEL_MASTER"))
    raise ValueError(topology)


def async_client(topology: str) -> Any:
    if topology == "standalone":
        return redis.asyncio.Redis.from_url(need("PYWS_REDIS_URL"))
    if topology.startswith("cluster"):
        nodes = [redis.asyncio.cluster.ClusterNode(h, p) for h, p in _addrs(need("PYWS_CLUSTER_NODES"))]
        return redis.asyncio.cluster.RedisCluster(startup_nodes=nodes)
    if topology == "sentinel":
        s = redis.asyncio.sentinel.Sentinel(_addrs(need("PYWS_SENTINEL_ADDRS")))
        return s.master_for(need("PYWS_SENTINEL_MASTER"))
    raise ValueError(topology)


def gateway_env(topology: str) -> dict[str, str]:
    if topology == "standalone":
        return {"REDIS_URL": need("PYWS_REDIS_URL")}
    if topology.startswith("cluster"):
        mode = "sharded" if topology == "cluster-sharded" else "classic"
        return {"REDIS_CLUSTER_NODES": need("PYWS_CLUSTER_NODES"), "REDIS_PUBSUB_MODE": mode}
    if topology == "sentinel":
        return {"REDIS_SENTINEL_ADDRS": need("PYWS_SENTINEL_ADDRS"), "REDIS_SENTINEL_MASTER": need("PYWS_SENTINEL_MASTER")}
    raise ValueError(topology)


@pytest.fixture(params=TOPOLOGIES)
def topology(request: pytest.FixtureRequest) -> str:
    t: str = request.param
    return t


@pytest.fixture(params=APIS)
def api(request: pytest.FixtureRequest) -> str:
    a: str = request.param
    return a


@pytest.fixture
def raw(topology: str) -> Iterator[Any]:
    """A synchronous client for looking at what the scripts stored."""
    c = sync_client(topology)
    yield c
    c.close()


PublisherFactory = Callable[..., Publisher | SyncPublisher]


@pytest.fixture
async def make_pub(topology: str, api: str) -> AsyncIterator[PublisherFactory]:
    """make_pub(**options) -> a Publisher (api "async") or SyncPublisher
    (api "sync") on a fresh client of the topology, sharded on the sharded
    cluster."""
    clients: list[Any] = []

    def make(**opts: Any) -> Publisher | SyncPublisher:
        opts.setdefault("sharded", topology == "cluster-sharded")
        if api == "async":
            c = async_client(topology)
            clients.append(c)
            return Publisher(c, **opts)
        c = sync_client(topology)
        clients.append(c)
        return SyncPublisher(c, **opts)

    yield make
    for c in clients:
        await do(c.close())


class Gateways:
    """One gateway binary per topology, started on first use and killed
    (with its process group) at the end of the session."""

    def __init__(self) -> None:
        self.running: dict[str, Gateway] = {}

    def get(self, topology: str) -> Gateway:
        if topology not in self.running:
            binary = need("WSS_BIN")
            self.running[topology] = start_gateway(binary, gateway_env(topology))
        return self.running[topology]

    def stop(self) -> None:
        for g in self.running.values():
            g.stop()


@pytest.fixture(scope="session")
def gateways() -> Iterator[Gateways]:
    g = Gateways()
    try:
        yield g
    finally:
        g.stop()
