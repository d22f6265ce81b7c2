"""Heartbeats: every node says, every few seconds, that it lives and how it is doing.

Each beat is one pipelined round trip::

    SET  {ns}:node:<node_id>  <JSON>  PX <3 intervals>
    ZADD {ns}:nodes  <server ms until it counts as dead>  <node_id>
    ZREMRANGEBYSCORE {ns}:nodes -inf <now>        # the dead drop out

``banbus status`` reads the live members of ``{ns}:nodes`` and their JSON.
A node that stops cleanly removes its own entry; one that dies drops out
after three intervals.  The JSON (:class:`Beat`) is documented in README
"Operating".
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING

import anyio
import msgspec
import redis.exceptions as redis_errors

if TYPE_CHECKING:
    from collections.abc import Callable

    import redis.asyncio as aioredis

__all__ = ["Beat", "Heartbeat", "node_key", "nodes_key"]

log = logging.getLogger("banbus")


class Beat(msgspec.Struct, kw_only=True):
    """What a node publishes about itself (``{ns}:node:<id>``, JSON)."""

    node_id: str
    host: str
    pid: int
    version: str
    #: Server ms: when the node started, when this beat was sent.
    started_ms: int
    sent_ms: int
    #: Seconds between beats (the entry lives three of them).
    interval: float
    #: The last event applied, and how old it was when applied.
    seq: int
    lag_ms: float
    bans: int
    networks: int
    allows: int
    #: Own writes waiting for Redis / not yet confirmed.
    outbox: int
    pending: int
    #: Connections the supervisor tracks, has cut and refused.
    tracked: int
    cut: int
    refused: int
    reconnects: int
    resyncs: int
    auto_bans: int
    topology: str
    reading_from: str
    connected: bool
    #: What the process embedding the node adds (``banbus agent``: its counters).
    extra: dict[str, int] = {}


def node_key(namespace: str, node_id: str) -> str:
    return f"{{{namespace}}}:node:{node_id}"


def nodes_key(namespace: str) -> str:
    return f"{{{namespace}}}:nodes"


class Heartbeat:
    def __init__(
        self,
        client: aioredis.Redis,
        namespace: str,
        node_id: str,
        *,
        interval: float,
        beat: Callable[[], Beat],
        now: Callable[[], int],
    ) -> None:
        self._client = client
        self._namespace = namespace
        self._node_id = node_id
        self._interval = interval
        self._beat = beat
        self._now = now
        self.stats = dict.fromkeys(("sent", "failed"), 0)

    async def run(self) -> None:
        while True:
            try:
                await self.send()
            except redis_errors.NoPermissionError as exc:
                log.warning("banbus: %s cannot publish its heartbeat (%s); banbus status will "
                            "not list it", self._node_id, exc)  # fmt: skip
                return
            except (redis_errors.RedisError, OSError) as exc:
                self.stats["failed"] += 1
                log.debug("banbus: heartbeat of %s failed: %s", self._node_id, exc)
            await anyio.sleep(self._interval)

    async def send(self) -> None:
        beat = self._beat()
        ttl_ms = int(self._interval * 3000)
        now = self._now()
        pipe = self._client.pipeline(transaction=False)
        pipe.set(node_key(self._namespace, self._node_id), msgspec.json.encode(beat), px=ttl_ms)
        pipe.zadd(nodes_key(self._namespace), {self._node_id: now + ttl_ms})
        pipe.zremrangebyscore(nodes_key(self._namespace), "-inf", now)
        await pipe.execute(raise_on_error=True)
        self.stats["sent"] += 1

    async def remove(self) -> None:
        """The node is closing: drop out of ``banbus status`` at once."""
        pipe = self._client.pipeline(transaction=False)
        pipe.zrem(nodes_key(self._namespace), self._node_id)
        pipe.delete(node_key(self._namespace, self._node_id))
        await pipe.execute()


def host_facts() -> tuple[str, int]:
    return socket.gethostname(), os.getpid()
