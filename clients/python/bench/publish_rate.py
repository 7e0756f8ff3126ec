"""Publishes per second from one asyncio process: with history (the
package's Publisher.publish, and publish.lua pipelined) against plain
PUBLISH (one call at a time and pipelined), on the same Redis in one run.

    /usr/bin/python3 bench/publish_rate.py [--seconds 2.5] [--concurrency 64] [--redis redis://…]

Without --redis it starts its own redis-server (no persistence) on a free
loopback port and kills it at the end. Run from clients/python with the
package installed, or with PYTHONPATH=src."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
import redis.asyncio

from huleedu_websocket import Publisher
from huleedu_websocket._core import PUBLISH_SCRIPT, Options, encode_notification, publish_call


@contextmanager
def fresh_redis() -> Iterator[str]:
    """A redis-server on a free loopback port, in its own session, killed
    with its process group on the way out."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="pyws-bench-") as d:
        p = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", d],
            stdout=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            r = redis.Redis(port=port)
            deadline = time.monotonic() + 10
            while True:
                try:
                    r.ping()
                    break
                except redis.ConnectionError:
                    if p.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("redis-server did not start")
                    time.sleep(0.02)
            r.close()
            yield f"redis://127.0.0.1:{port}"
        finally:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


DATA = {"essay_id": "e-0000001", "status": "graded", "batch_id": "b-42", "timestamp": "2026-12-03T21:00:00Z"}


async def rate(seconds: float, step: Callable[[], Awaitable[int]], workers: int) -> float:
    """Runs step in `workers` tasks for `seconds`; returns publishes per second."""
    done = 0
    stop = time.monotonic() + seconds

    async def work() -> None:
        nonlocal done
        while time.monotonic() < stop:
            n = await step()  # not `done += await step()`: that reads done before the await
            done += n

    start = time.monotonic()
    await asyncio.gather(*(work() for _ in range(workers)))
    return done / (time.monotonic() - start)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis", default="")
    ap.add_argument("--seconds", type=float, default=2.5)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--batch", type=int, default=100, help="commands per pipeline")
    ap.add_argument("--users", type=int, default=5000)
    a = ap.parse_args()

    async def run(url: str) -> dict[str, Any]:
        r = redis.asyncio.Redis.from_url(url)
        pub = Publisher(r)
        opts = Options.make("ws", False, 100, 300, 86400, 65536, None)
        users = [f"u{i}" for i in range(a.users)]
        payload = encode_notification("essay_status_updated", DATA, opts)

        async def history_one() -> int:
            await pub.publish(random.choice(users), "essay_status_updated", DATA)
            return 1

        async def plain_one() -> int:
            await r.publish("ws:" + random.choice(users), payload)
            return 1

        async def history_pipelined() -> int:
            async with r.pipeline(transaction=False) as p:
                for _ in range(a.batch):
                    keys, args = publish_call(random.choice(users), payload, None, opts)
                    p.evalsha(PUBLISH_SCRIPT.sha, len(keys), *keys, *args)
                await p.execute()
            n: int = a.batch
            return n

        async def plain_pipelined() -> int:
            async with r.pipeline(transaction=False) as p:
                for _ in range(a.batch):
                    p.publish("ws:" + random.choice(users), payload)
                await p.execute()
            n: int = a.batch
            return n

        await r.script_load(PUBLISH_SCRIPT.body)
        out = {
            "history, Publisher.publish, %d tasks" % a.concurrency: await rate(a.seconds, history_one, a.concurrency),
            "plain PUBLISH, %d tasks" % a.concurrency: await rate(a.seconds, plain_one, a.concurrency),
            "history, EVALSHA pipelined by %d" % a.batch: await rate(a.seconds, history_pipelined, 1),
            "plain PUBLISH pipelined by %d" % a.batch: await rate(a.seconds, plain_pipelined, 1),
        }
        await r.close()
        return {k: round(v) for k, v in out.items()}

    if a.redis:
        res = await run(a.redis)
    else:
        with fresh_redis() as url:
            res = await run(url)
    json.dump(res, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    asyncio.run(main())
