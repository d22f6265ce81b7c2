"""The reader task: one connection at a time, and what to do with each verdict.

Theory of operation
-------------------

The reader owns the node's own connection to Redis (see ``_resp``) and runs
the other parts in a loop::

    connect ──► (reconnected: judge the position) ──► reload if needed
       ▲                                                  │
       │                                                  ▼
    backoff ◄── connection lost ◄── follow ──► idle / anomaly ──► verify
                                       │                            │
                                       └──► digest due ──► compare ─┘

* **Reload** (``_snapshot``): bootstrap, and every resync.  After data loss
  (a ``LOSS`` verdict) what the view held that the record lacks is handed to
  the re-seeder (``_reseed``) before the snapshot replaces the view, so
  nothing held stops being enforced.
* **Verdicts** (``_follower.Verdict``): ``SKIP`` moves past a bad entry,
  ``GAP`` and ``FORGED`` reload, ``LOSS`` reloads and re-seeds.
* **Anti-entropy**: a digest mismatch on a sound stream reloads, except the
  first one after a reload, which calibrates (``_reseed.AntiEntropy``).
* **Reconnect** with capped, jittered exponential backoff; a reconnected
  reader judges its position before it reads on (the server may have come
  back empty, or from a replica that lost writes), reloads the function
  library if the server lost it, and kicks the outbox.

Before the node has started (bootstrap), errors propagate to
``Node.__aenter__``; after, the reader never dies: an unexpected error is
logged, and the reader reconnects and reloads.
"""

from __future__ import annotations

import contextlib
import logging
import random
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from ._exceptions import BanbusError, RedisUnavailable, ServerError
from ._follower import Verdict
from ._resp import RespError
from ._snapshot import take

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from anyio.abc import TaskStatus

    from ._cache import BanCache
    from ._clock import ServerClock
    from ._follower import Follower
    from ._keys import Keys
    from ._publisher import Publisher
    from ._reseed import AntiEntropy, Reseeder
    from ._resp import ReaderConnection

__all__ = ["Reader"]

log = logging.getLogger("banbus")

_CONNECTION_ERRORS = (ConnectionError, OSError, TimeoutError, RedisUnavailable, RespError)


class Reader:
    """The reader task of one node (see the module docstring)."""

    def __init__(
        self,
        keys: Keys,
        *,
        node_id: str,
        connect: Callable[[], Awaitable[ReaderConnection]],
        reload_library: Callable[[], Awaitable[Any]],
        spawn: Callable[..., Any],
        cache: BanCache,
        clock: ServerClock,
        follower: Follower,
        publisher: Publisher,
        reseeder: Reseeder,
        antientropy: AntiEntropy,
        notify: Callable[[str], None],
        scan_count: int,
        backoff: tuple[float, float],
        lost: Callable[[str], None] = lambda why: None,
        leave_replica: Callable[[str], bool] = lambda why: False,
    ) -> None:
        self._keys = keys
        self._node_id = node_id
        self._connect = connect
        self._reload_library = reload_library
        self._spawn = spawn
        self._cache = cache
        self._clock = clock
        self._follower = follower
        self._publisher = publisher
        self._reseeder = reseeder
        self._antientropy = antientropy
        self._notify = notify
        self._scan_count = scan_count
        self._backoff = backoff
        self._lost = lost
        self._leave_replica = leave_replica
        self._conn: ReaderConnection | None = None
        self._wake: anyio.Event | None = None
        self.connected = False
        self.stats = dict.fromkeys(("resyncs", "reconnects", "losses"), 0)
        #: Reload from the record at the next turn of the follower (bloom mode:
        #: the filter wore out; see Node).
        self.reload_wanted = False

    def drop(self) -> None:
        """Close the connection (the primary moved): the reader reconnects and judges
        its position like after any reconnect."""
        if self._conn is not None:
            self._conn.close()
        if self._wake is not None:
            self._wake.set()  # out of a reconnect backoff: there is somewhere new to go

    async def run(
        self, offline: bool = False, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Follow the namespace.  *offline*: the view was loaded from the state file —
        the node runs at once, and the first connection is judged like a reconnect."""
        started = offline
        need: Verdict | None = None if offline else Verdict.GAP  # the bootstrap is a reload
        if offline:
            task_status.started()
        delay = self._backoff[0]
        while True:
            try:
                async with self._connection() as conn:
                    if started:
                        log.info("banbus: reader of %s reconnected", self._node_id)
                        # The server may have come back empty, without the functions.
                        with contextlib.suppress(BanbusError):
                            await self._reload_library()
                        self._publisher.kick()
                        if need is None:
                            need = self._judge(await self._follower.verify(conn))
                    while True:
                        if need is not None:
                            await self._reload(conn, loss=need is Verdict.LOSS, first=not started)
                            need = None
                        if not started:
                            task_status.started()
                            started = True
                        delay = self._backoff[0]
                        need = await self._step(conn)
            except Exception as exc:
                if (
                    isinstance(exc, RespError)
                    and "Function not found" in str(exc)
                    and self._leave_replica("it has not received the function library")
                ):
                    continue  # a new replica, still syncing: read from the primary meanwhile
                if not started:
                    if isinstance(exc, RespError):
                        raise ServerError(f"bootstrap refused by the server: {exc}") from exc
                    if isinstance(exc, BanbusError):
                        raise
                    if isinstance(exc, _CONNECTION_ERRORS):
                        raise RedisUnavailable(f"bootstrap failed: {exc}") from exc
                    raise
                if not isinstance(exc, _CONNECTION_ERRORS):
                    # A bug, or a server answering nonsense: the reader must not
                    # die (that would cancel the user's `async with` body).
                    log.exception("banbus: reader of %s failed; reloading", self._node_id)
                    need = Verdict.GAP
                self.stats["reconnects"] += 1
                self._lost(str(exc))
                log.warning("banbus: reader of %s lost Redis (%s); retrying in %.2fs",
                            self._node_id, exc, delay)  # fmt: skip
                self._wake = anyio.Event()
                with anyio.move_on_after(delay * random.uniform(0.5, 1.0)):
                    await self._wake.wait()
                if self._wake.is_set():
                    delay = self._backoff[0]
                self._wake = None
                delay = min(delay * 2, self._backoff[1])

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[ReaderConnection]:
        conn = await self._connect()
        self.connected = True
        self._conn = conn
        # serve() ends when the connection closes, and never raises.
        self._spawn(conn.serve)
        try:
            yield conn
        finally:
            conn.close()
            self._conn = None
            self.connected = False

    async def _step(self, conn: ReaderConnection) -> Verdict | None:
        """Follow until the chain stops; return what must happen next (None: read on)."""
        follower = self._follower
        outcome = await follower.follow(conn)
        if self.reload_wanted:
            self.reload_wanted = False
            return Verdict.GAP
        if outcome != "digest":
            return self._judge(await follower.verify(conn))
        result = await self._antientropy.check(conn)
        if result == "anomaly":
            return self._judge(await follower.verify(conn))
        if result != "mismatch":
            return None
        verdict = await follower.verify(conn)
        if verdict is not Verdict.OK:
            return self._judge(verdict)
        if self._antientropy.accept():
            return None
        log.warning("banbus: the view of %s differs from the record of %r although the stream "
                    "is sound; reloading", self._node_id, self._keys.namespace)  # fmt: skip
        return Verdict.GAP

    def _judge(self, verdict: Verdict) -> Verdict | None:
        if verdict is Verdict.OK:
            return None
        if verdict is Verdict.SKIP:
            self._follower.skip_anomaly()
            return None
        return Verdict.LOSS if verdict is Verdict.LOSS else Verdict.GAP

    async def _reload(self, conn: ReaderConnection, *, loss: bool, first: bool) -> None:
        """Snapshot, install, catch up (see ``_snapshot``); re-seed after a loss."""
        follower = self._follower
        cache = self._cache
        if loss:
            self.stats["losses"] += 1
        # Removals at or after the last event this node saw before the loss
        # beat a re-seed (fixed now: a retried attempt must not move it).
        since = min(int(follower.last_id.partition("-")[0]), self._clock.now())
        for _attempt in range(10):
            snap = await take(conn, self._keys, clock=self._clock, scan_count=self._scan_count,
                              skip=follower.skip,
                              bulk=partial(cache.bulk_load, newly=not first))  # fmt: skip
            candidates = self._reseeder.collect(snap) if loss and not first else []
            allowed_before = cache.allow_targets()
            newly = cache.replace(snap.bans, snap.allows, newly=not first)
            follower.reset(snap.head_id, snap.seq, snap.epoch)
            self._publisher.installed(snap.seq, snap.epoch)
            self._reseeder.hold(candidates, since)
            self._antientropy.reloaded()
            # A lifted allowlist entry may expose banned connections too.
            newly += allowed_before - cache.allow_targets()
            if not first:
                self.stats["resyncs"] += 1
                log.info("banbus: %s reloaded %r (%d bans)", self._node_id, self._keys.namespace,
                         cache.ban_count)  # fmt: skip
                for target in newly:
                    self._notify(target)
            head_id, _, epoch = await follower.head(conn)
            if epoch != snap.epoch:
                # The namespace was reset during the scan: again, as a loss.
                loss = loss or bool(snap.epoch)
                continue
            while True:
                if await follower.follow(conn, until=head_id) == "caught_up":
                    # The digest of the view, in the background once the node is
                    # up to date (a chunk per loop iteration; see BanCache.recompute).
                    self._spawn(self._recompute)
                    return
                verdict = self._judge(await follower.verify(conn))
                if verdict is not None:
                    loss = loss or verdict is Verdict.LOSS
                    break
        raise ServerError("could not reach a consistent snapshot after 10 attempts")

    async def _recompute(self) -> None:
        """Compute the view's digest in the background, a chunk per loop iteration
        (the first after the task that spawned this has gone on)."""
        await anyio.lowlevel.checkpoint()
        for _ in self._cache.recompute():
            await anyio.lowlevel.checkpoint()
