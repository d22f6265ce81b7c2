"""``banbus.Node``: what a cluster node embeds — a small facade over the parts.

The record in Redis is the truth; the stream is how changes travel; a node's
view is a cache of the record that converges to it after any fault.  The
parts, each with its own theory of operation:

==================  =============================================================
``_keys``           key names and limits (one source for Python, CLI and Lua)
``_clock``          the server clock, re-measured on a schedule
``_resp``           the reader's connection (lean RESP, or redis-py in RESP2)
``_follower``       the stream follower: apply in order, verdicts on anomalies
``_snapshot``       watermark -> scan -> install -> catch-up
``_publisher``      own writes: local apply, function calls, outbox, overlay
``_reseed``         re-seeding after data loss; anti-entropy (digests)
``_reader``         the reader task tying them together (connect, verdicts)
``_cache``          the view itself: pure state, no I/O
==================  =============================================================

The reconciliation rules, as built:

* A snapshot replaces the view wholesale.  Own writes are re-applied over it
  only while the record does not know them: not yet answered, or answered
  with a seq past the snapshot's watermark.  An answer at or before the
  node's position means the record decided: its word is taken.
* Every queued or in-flight own write has one owner (the publisher) and one
  fate: acknowledged, refused (undone here), or expired (dropped, and its
  bookkeeping with it).
* Re-seeding answers data loss only (new epoch, head behind the node, the
  node's last entry gone from an untrimmed stream), never a merely
  surprising stream; it writes only what is missing, and removals made since
  the loss win (tombstones).
* Anti-entropy compares digests of the view and of the record every
  ``check_interval`` seconds, aligned on a seq, and reloads on a difference
  no seq revealed.
* The offset to the server clock is re-measured every ``clock_interval``
  seconds, whatever the reader is doing.
* Everything kept per write is bounded by what is pending or held: the
  overlay and outbox by pending writes, the expiry wheel by twice what is
  held, Redis by the stream's maxlen, the live entries and capped tombstones.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import time
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, Literal, Self

import anyio
import anyio.lowlevel
import msgspec
import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from ._cache import BanCache, CacheMode
from ._clock import ServerClock, local_clock_ms
from ._eventlog import EventLog
from ._eventlog import enabled as eventlog_enabled
from ._exceptions import BanbusError, InvalidTarget, NodeClosed, RedisUnavailable, ServerError
from ._follower import Follower
from ._heartbeat import Beat, Heartbeat, host_facts
from ._keys import DEFAULT_MIN_PREFIX_V4, DEFAULT_MIN_PREFIX_V6, MAX_THRESHOLD, namespace_keys
from ._library import ensure_library
from ._model import (
    Allow,
    AnyEvent,
    Ban,
    BanRecord,
    Disallow,
    Entry,
    Unban,
    check_origin,
    check_reason,
    entry_decoder,
    parse_ttl,
)
from ._policy import Policy, Report, check_kind, check_weight, sanitise_detail
from ._publisher import Publisher, Write
from ._reader import Reader
from ._reporter import Reporter
from ._reseed import AntiEntropy, Reseeder
from ._resp import open_reader
from ._state import SavedOutbox, SavedView, SavedWrite, StateFile
from ._statistics import NodeStatistics
from ._targets import Target, parse_target
from ._topology import Topology, open_topology
from ._version import __version__

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from types import TracebackType

    from ._cache import Kind
    from ._resp import ReaderConnection
    from ._supervisor import Supervisor
    from ._topology import ReadFrom

__all__ = ["Node", "NodeStatistics", "namespace_keys"]

log = logging.getLogger("banbus")


class Node:
    """A cluster member: a local ban cache kept in sync with the namespace in Redis.

    Use it as an async context manager; the body runs once the node is in sync::

        async with banbus.Node("redis://127.0.0.1:6379/0", node_id="mx1") as node:
            node.is_banned("203.0.113.7")
            await node.ban("198.51.100.0/24", ttl=3600, reason="scan")

    :param redis: where the namespace lives (see README, "Deploying"): a URL —
        ``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://`` /
        ``rediss+sentinel://`` (Sentinels, then ``/service``),
        ``redis+cluster://`` / ``rediss+cluster://`` (cluster nodes; a plain
        URL of a cluster node works too) — or a ``redis.asyncio.Redis``
        (of one server, of a cluster node, or from ``Sentinel.master_for``),
        a ``redis.asyncio.RedisCluster``, or a ``redis.asyncio.Sentinel``
        with *service*.  A client given is the source of the connection
        options; the node opens its own connections with them, follows the
        primary through failovers and slot moves, and never closes the
        client.
    :param service: the Sentinel service name, with a ``Sentinel`` object.
    :param read_from: ``"replica"``: bootstrap and follow the stream from a
        replica (Sentinel or Cluster), so the primary carries only writes;
        the lag shows in :meth:`statistics` (``read_lag_*``).
    :param topology_interval: seconds between look-ups of the primary when
        nothing suggests it moved (Sentinel, Cluster).
    :param start_timeout: how long entering the node keeps trying to reach
        Redis (default: 0 for one server, 15 s for Sentinel and Cluster,
        whose failover may be under way); a node with a *state_file* starts
        without Redis anyway.
    :param node_id: this node's name in events (``origin``); default host-pid.
    :param namespace: the namespace (all keys live under ``{namespace}``).
    :param min_prefix_v4: widest IPv4 prefix accepted without ``force``.
    :param min_prefix_v6: widest IPv6 prefix accepted without ``force``.
    :param block_ms: how long one ``XREAD BLOCK`` waits; an idle reader checks
        the library's head this often.
    :param batch_size: stream entries per read.  The default, 256, is the
        fastest here: a reply of 256 entries makes ~520 lists, fewer than
        the garbage collector's young-generation threshold (700), so a burst
        does not set it off mid-reply (2000 applied ~10% fewer events/s).
    :param backoff: (first, cap) reconnect delay in seconds; jittered.
    :param reseed: when Redis loses data (restart without persistence,
        failover to a replica that lost writes, FLUSHALL), restore what this
        node held that is missing — unless removed since.  A namespace emptied
        on purpose with ``banbus clear`` is not re-seeded.
    :param cache: how the local view holds exact addresses (see the README,
        "Choosing a cache mode"): ``"full"`` (default) keeps every record
        exact in ~35 bytes per IPv4 ban; ``"compact"`` ~10 bytes, the expiry
        rounded up to the second and ``lookup`` without reason, origin or seq;
        ``"bloom"`` ~2 bytes: a bloom filter answers "certainly not banned",
        and an address it may hold that this node does not know exactly is
        confirmed against Redis — :meth:`check` waits for that answer,
        ``is_banned`` answers False until it arrives and the supervisor then
        cuts the address's connections.  Bloom mode needs ``banbus[bloom]``,
        keeps no digest (no anti-entropy) and no state file.
    :param compact: the older spelling of ``cache="compact"``.
    :param check_interval: seconds between anti-entropy comparisons of the
        view's digest with the record's (0 turns them off).
    :param clock_interval: seconds between measurements of the server clock;
        ``None``: never measure it — *clock* then *is* the server clock (for
        tests that move time by hand).
    :param clock: the local monotonic clock in milliseconds (default: one
        that counts host suspension); tests inject a fake one.
    :param state_file: keep the view and the outbox in this file (and
        ``state_file + ".outbox"``), so that a restarted node enforces at
        once — even while Redis is unreachable — and publishes writes it had
        queued (see ``_state``).
    :param state_interval: seconds between saves of the view, at least.
    :param heartbeat_interval: seconds between heartbeats (``banbus status``
        lists the nodes that sent one within three intervals); 0: none.
    :param never_ban: addresses and networks :meth:`report` never counts or
        bans (default loopback: ``127.0.0.0/8`` and ``::1``); an explicit
        :meth:`ban` still works on them.  The allowlist is never auto-banned
        either.
    """

    def __init__(
        self,
        redis: str | aioredis.Redis | aioredis.RedisCluster | aioredis.Sentinel,
        *,
        service: str | None = None,
        read_from: ReadFrom = "primary",
        topology_interval: float = 1.0,
        start_timeout: float | None = None,
        node_id: str | None = None,
        namespace: str = "banbus",
        min_prefix_v4: int = DEFAULT_MIN_PREFIX_V4,
        min_prefix_v6: int = DEFAULT_MIN_PREFIX_V6,
        block_ms: int = 2000,
        batch_size: int = 256,
        backoff: tuple[float, float] = (0.05, 2.0),
        scan_count: int = 10_000,
        reseed: bool = True,
        cache: CacheMode = "full",
        compact: bool = False,
        check_interval: float = 2.0,
        clock_interval: float | None = 2.0,
        clock: Callable[[], int] | None = None,
        state_file: str | os.PathLike[str] | None = None,
        state_interval: float = 1.0,
        never_ban: Iterable[str] = ("127.0.0.0/8", "::1"),
        heartbeat_interval: float = 5.0,
    ) -> None:
        self._keys = namespace_keys(namespace)
        self.namespace = namespace
        if node_id is None:
            node_id = re.sub(r"[^A-Za-z0-9._:@-]", "-", f"{socket.gethostname()}-{os.getpid()}")
            node_id = node_id[:64]
        self.node_id = check_origin(node_id)
        # Checks the argument now (nothing is contacted until __aenter__).
        self._topology: Topology = open_topology(
            redis, self._keys, service=service, read_from=read_from, interval=topology_interval
        )
        self._start_timeout = start_timeout
        self.min_prefix_v4 = min_prefix_v4
        self.min_prefix_v6 = min_prefix_v6
        if block_ms < 1 or batch_size < 1 or scan_count < 1:
            raise ValueError("block_ms, batch_size and scan_count must be positive")
        if check_interval < 0 or (clock_interval is not None and clock_interval <= 0):
            raise ValueError("check_interval must be >= 0 and clock_interval > 0 (or None)")
        self._block_ms = block_ms
        self._batch = batch_size
        self._backoff = backoff
        self._scan_count = scan_count
        self._reseed_enabled = reseed
        self._check_interval = check_interval
        self._clock_interval = clock_interval
        self._state: Literal["new", "starting", "running", "closed"] = "new"
        self._clock = ServerClock(clock or local_clock_ms, measured=clock_interval is not None)
        if compact and cache != "full":
            raise ValueError("give cache='compact' or compact=True, not both")
        mode: CacheMode = "compact" if compact else cache
        if mode == "bloom":
            if state_file is not None:
                raise ValueError("cache='bloom' keeps no records to save: no state_file")
            check_interval = 0.0  # no local record to compare
            self._check_interval = 0.0
        self._cache = BanCache(self._clock.now, mode=mode, digest=check_interval > 0,
                               confirm=self._confirm_later)  # fmt: skip
        self._confirming: set[str] = set()
        self._bloom_stats = dict.fromkeys(
            ("confirmations", "banned", "false_positives", "unconfirmed", "reloads"), 0
        )
        self._spawn: Callable[..., Any] | None = None
        # The hot path without a second Python call: the cache's bound method
        # (it stays valid across reloads, which swap the cache's insides).
        self.is_banned = self._cache.is_banned  # type: ignore[method-assign]
        self._listeners: list[Callable[[str], None]] = []
        self._supervisor: Supervisor | None = None
        self._seq_waiters: list[tuple[int, anyio.Event]] = []
        self._stack: AsyncExitStack | None = None
        #: How long aclose() waits for the outbox to drain.
        self._flush_timeout = 2.0
        # Built in __aenter__, once there is a client.
        self._client: aioredis.Redis | None = None
        self._publisher: Publisher | None = None
        self._follower: Follower | None = None
        self._reseeder: Reseeder | None = None
        self._antientropy: AntiEntropy | None = None
        self._reader: Reader | None = None
        self._state_file = StateFile(state_file, namespace) if state_file is not None else None
        self._state_interval = state_interval
        if isinstance(never_ban, str):
            raise TypeError("never_ban must be a list of addresses or networks, not a string")
        self._never_ban: list[Target] = [parse_target(t, force=True) for t in never_ban]
        self._reporter: Reporter | None = None
        self._report_stats = {"banned_here": 0, "exempt": 0}
        if heartbeat_interval < 0:
            raise ValueError("heartbeat_interval must be >= 0 (0 turns heartbeats off)")
        self._heartbeat_interval = heartbeat_interval
        self._heartbeat: Heartbeat | None = None
        self._eventlog: EventLog | None = None
        #: Counters a process embedding the node adds to its heartbeat.
        self.heartbeat_extra: Callable[[], dict[str, int]] | None = None
        self._started_ms = 0

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise NodeClosed(f"node {self.node_id!r} was already started; create a new Node")
        self._state = "starting"
        stack = AsyncExitStack()
        try:
            topology = self._topology
            stack.push_async_callback(topology.aclose)
            client = self._client = topology.client
            saved = self._state_file.load() if self._state_file is not None else (None, None)
            offline = saved != (None, None)
            timeout = self._start_timeout
            if timeout is None:
                timeout = 0.0 if topology.kind == "server" else 15.0
            try:
                await topology.start(0.0 if offline else timeout, probe=ensure_library)
            except RedisUnavailable as exc:
                if not offline:
                    raise
                log.warning("banbus: %s starts from its state file; Redis: %s", self.node_id, exc)
            except BanbusError:
                raise
            except redis_errors.RedisError as exc:
                raise ServerError(str(exc)) from exc
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tg.cancel_scope.cancel)
            self._build(client, tg.start_soon)
            self._spawn = tg.start_soon
            assert self._reader is not None and self._publisher is not None
            assert self._reseeder is not None
            if offline:
                self._restore(*saved)
            await tg.start(self._reader.run, offline)
            tg.start_soon(self._expiry_task)
            tg.start_soon(self._publisher.run)
            tg.start_soon(self._reseeder.run)
            assert self._reporter is not None
            tg.start_soon(self._reporter.run)
            self._started_ms = self._clock.now()
            if eventlog_enabled():
                follower = self._follower
                assert follower is not None
                self._eventlog = EventLog(
                    node_id=self.node_id, lookup=lambda t: self._cache.entry("ban", t),
                    lag=lambda: follower.lag_ms,
                )  # fmt: skip
                stack.callback(self.subscribe(self._eventlog.ban_landed))
                stack.callback(self.supervisor.watch(self._eventlog.connection_cut))
                tg.start_soon(self._eventlog.run)
            if self._heartbeat_interval > 0:
                self._heartbeat = Heartbeat(
                    client, self.namespace, self.node_id, interval=self._heartbeat_interval,
                    beat=self._beat, now=self._clock.now,
                )  # fmt: skip
                tg.start_soon(self._heartbeat.run)
                stack.push_async_callback(self._leave)
            tg.start_soon(self._clock.run, self._server_time, self._clock_interval or 1.0)
            topology.on_change(self._topology_changed)
            tg.start_soon(topology.run, self._position)
            if self._state_file is not None:
                tg.start_soon(self._save_state)
                stack.push_async_callback(self._save_state_now)
        except BaseException:
            self._state = "closed"
            await stack.aclose()
            raise
        self._stack = stack
        self._state = "running"
        return self

    def _build(self, client: aioredis.Redis, spawn: Callable[..., Any]) -> None:
        keys, cache, clock = self._keys, self._cache, self._clock
        self._publisher = publisher = Publisher(
            client, namespace=self.namespace, node_id=self.node_id, cache=cache, clock=clock,
            position=lambda: (follower.seq, follower.epoch), notify=self._notify,
            backoff=self._backoff,
        )  # fmt: skip
        self._reseeder = reseeder = Reseeder(
            client, keys, cache=cache, publisher=publisher, clock=clock, node_id=self.node_id,
            enabled=self._reseed_enabled,
        )  # fmt: skip
        self._follower = follower = Follower(
            keys, cache=cache, publisher=publisher, reseeder=reseeder, clock=clock,
            notify=self._notify, applied=self._wake_waiters, batch=self._batch,
            block_ms=self._block_ms,
        )  # fmt: skip
        follower.listening = lambda: bool(self._listeners)
        settling = [False]

        async def settle_in_steps() -> None:
            try:
                for _ in cache.settle_steps():
                    await anyio.lowlevel.checkpoint()
            finally:
                settling[0] = False

        def settle() -> None:
            # Caught up with the stream: pack the burst and grow the filter in
            # the background, a bounded step per loop iteration (settle_steps).
            if not settling[0] and cache.settle_due:
                settling[0] = True
                spawn(settle_in_steps)

        follower.idle = settle
        self._antientropy = antientropy = AntiEntropy(
            keys, cache=cache, publisher=publisher, reseeder=reseeder, follower=follower,
            clock=clock, interval=self._check_interval or 1.0, enabled=self._check_interval > 0,
        )  # fmt: skip
        self._reporter = Reporter(
            publisher, node_id=self.node_id, spawn=spawn, ban=self._auto_ban,
            wait_for_seq=self.wait_for_seq,
        )  # fmt: skip
        self._reader = Reader(
            keys, node_id=self.node_id, connect=self._connect,
            reload_library=lambda: ensure_library(client), spawn=spawn, cache=cache,
            clock=clock, follower=follower, publisher=publisher, reseeder=reseeder,
            antientropy=antientropy, notify=self._notify, scan_count=self._scan_count,
            backoff=self._backoff, lost=self._topology.avoid,
            leave_replica=self._topology.leave_replica,
        )  # fmt: skip
        reader = self._reader
        follower.digest_due = lambda: antientropy.due() or reader.reload_wanted

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the reader and release connections (idempotent)."""
        if self._state == "closed":
            return
        if self._publisher is not None and self._publisher.outbox and self._state == "running":
            # Give writes made while Redis was away a last chance to land.
            left = await self._publisher.flush(self._flush_timeout)
            if left:
                log.warning("banbus: %s closed with %d unpublished writes (Redis unreachable)",
                            self.node_id, left)  # fmt: skip
        self._state = "closed"
        stack, self._stack = self._stack, None
        # Not shielded: the task group's scope must be exited from the scope it
        # was entered in; the group cancels its tasks itself.
        if stack is not None:
            await stack.aclose()
        for _, event in self._seq_waiters:
            event.set()

    def _check_running(self) -> None:
        if self._state != "running":
            raise NodeClosed(
                f"node {self.node_id!r} is {self._state}; use it inside 'async with Node(...)'"
            )

    def __repr__(self) -> str:
        seq = self._follower.seq if self._follower is not None else 0
        return (
            f"<banbus.Node {self.node_id!r} ns={self.namespace!r} {self._state} "
            f"bans={self._cache.ban_count} seq={seq}>"
        )

    # -- the hot path (sync, no I/O) ---------------------------------------------------

    async def check(self, ip: str) -> bool:
        """``is_banned``, exact in every cache mode.

        In bloom mode an address the filter may hold and this node does not
        know exactly is looked up in the record (one ``HGET``, answer kept);
        if Redis cannot answer, the address counts as banned (a "maybe" is
        far more often a ban than a false positive).  In the other modes this
        is ``is_banned`` (no I/O).
        """
        self._check_running()
        cache = self._cache
        if not cache.pending(ip):
            return cache.is_banned(ip)
        if not await self._confirm(ip):
            return True
        return cache.is_banned(ip)

    def _confirm_later(self, ip: str) -> None:
        """Bloom mode: *ip* may be banned (cache callback): confirm in the background."""
        if self._spawn is None or ip in self._confirming or self._state != "running":
            return
        self._confirming.add(ip)
        self._spawn(self._confirm_task, ip)

    async def _confirm_task(self, ip: str) -> None:
        try:
            await self._confirm(ip)
        finally:
            self._confirming.discard(ip)

    async def _confirm(self, ip: str) -> bool:
        """Look *ip* up in the record and keep the answer; False if Redis could not say."""
        try:
            entry = await self._fetch_record(ip)
        except (redis_errors.RedisError, OSError, TimeoutError) as exc:
            self._bloom_stats["unconfirmed"] += 1
            log.warning("banbus: %s could not confirm %s against the record (%s); a check() "
                        "counts it as banned", self.node_id, ip, exc)  # fmt: skip
            return False
        self._confirmed(ip, entry)
        return True

    def _confirmed(self, ip: str, entry: Entry | None) -> None:
        stats = self._bloom_stats
        stats["confirmations"] += 1
        if entry is None:
            stats["false_positives"] += 1
        else:
            stats["banned"] += 1
        if self._cache.confirmed(ip, entry):
            self._notify(ip)  # like a ban that just landed: its connections go

    async def _fetch_record(self, ip: str) -> Entry | None:
        assert self._client is not None
        with anyio.fail_after(5.0):
            raw = await self._client.hget(self._keys.bans, ip)
        if raw is None:
            return None
        try:
            return entry_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("banbus: record of %s is malformed (%s): skipped", ip, exc)
            return None

    def is_banned(self, ip: str) -> bool:
        """True if *ip* (a peer address as sockets report it) is banned here and now."""
        return self._cache.is_banned(ip)

    def lookup(self, ip: str) -> BanRecord | None:
        """The ban record covering *ip*, or None (not banned, expired or allowlisted)."""
        return self._cache.lookup(ip)

    def is_allowed(self, ip: str) -> bool:
        """True if *ip* is on the allowlist."""
        return self._cache.allowed(ip)

    def bans(self) -> Iterator[BanRecord]:
        """Every active ban held by this node."""
        return self._cache.records("ban")

    def allows(self) -> Iterator[BanRecord]:
        """Every active allowlist entry held by this node."""
        return self._cache.records("allow")

    @property
    def cache(self) -> BanCache:
        """The local state (read-only use: ``is_banned`` without the method hop)."""
        return self._cache

    def server_time(self) -> int:
        """The Redis server's clock now, in ms, as this node estimates it."""
        return self._clock.now()

    # -- connection supervisor (see _supervisor) ----------------------------------------

    @property
    def supervisor(self) -> Supervisor:
        """The connection supervisor: live connections indexed by peer, cut on ban."""
        if self._supervisor is None:
            from ._supervisor import Supervisor

            self._supervisor = Supervisor(self)
        return self._supervisor

    def protect(self, handler: Any, **options: Any) -> Any:
        """Wrap an ``asyncio.start_server`` client handler (see :meth:`Supervisor.protect`)."""
        return self.supervisor.protect(handler, **options)

    def track(self, ip: str, closer: Callable[[], object], **options: Any) -> Any:
        """Track one live connection from *ip* (see :meth:`Supervisor.track`)."""
        return self.supervisor.track(ip, closer, **options)

    def subscribe(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call *callback(target)* whenever bans under *target* may now apply.

        That is: a ban lands (locally or from the stream), or an allowlist
        entry is lifted.  Called synchronously from the apply path: it must be
        quick and must not raise.  Returns an unsubscribe function.
        """
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)

    def _notify(self, target: str) -> None:
        for callback in self._listeners:
            try:
                callback(target)
            except Exception:
                log.exception("banbus: ban listener %r failed", callback)

    # -- writes ----------------------------------------------------------------------------

    async def ban(
        self,
        target: str,
        ttl: int | float | str | None = 0,
        reason: str = "",
        *,
        force: bool = False,
        replace: bool = False,
    ) -> BanRecord:
        """Ban *target* (address or CIDR) on every node.

        Applied here at once (live connections are cut before this returns),
        then published.  If Redis is unreachable the ban stays enforced here
        and is published from the outbox on reconnect (``seq`` is then 0).

        :param ttl: seconds (or ``"90s"``, ``"10m"``, ``"1h"``, ``"7d"``); 0 = permanent.
        :param force: accept a prefix wider than the minimum (never ``/0``).
        :param replace: set the expiry exactly, instead of the later of the
            existing and the new one.
        :raises InvalidTarget | UnsafeBan | InvalidTTL | InvalidReason: bad input;
            nothing was written.
        :raises ServerError: the server refused it (nothing is kept here).
        """
        return await self._add("ban", target, ttl, reason, force=force, replace=replace)

    async def allow(
        self,
        target: str,
        ttl: int | float | str | None = 0,
        reason: str = "",
        *,
        force: bool = False,
        replace: bool = False,
    ) -> BanRecord:
        """Put *target* on the allowlist (it beats every ban) on every node."""
        return await self._add("allow", target, ttl, reason, force=force, replace=replace)

    async def unban(self, target: str) -> bool:
        """Lift the ban on exactly *target* on every node; True if it was banned."""
        return await self._remove("ban", target)

    async def disallow(self, target: str) -> bool:
        """Remove exactly *target* from the allowlist on every node; True if it was there."""
        return await self._remove("allow", target)

    def _parse(self, target: str, force: bool) -> str:
        return parse_target(
            target, min_prefix_v4=self.min_prefix_v4, min_prefix_v6=self.min_prefix_v6,
            force=force,
        ).text  # fmt: skip

    async def _add(
        self,
        kind: Kind,
        target: str,
        ttl: int | float | str | None,
        reason: str,
        *,
        force: bool,
        replace: bool,
    ) -> BanRecord:
        self._check_running()
        assert self._publisher is not None
        # Everything is checked before anything is applied.
        text = self._parse(target, force)
        seconds = parse_ttl(ttl)
        reason = check_reason(reason)
        expires = self._clock.now() + seconds * 1000 if seconds else 0
        cls = Ban if kind == "ban" else Allow
        event = cls(target=text, expires=expires, reason=reason, origin=self.node_id,
                    eid=self._publisher.new_eid())  # fmt: skip
        reply = await self._publisher.publish(Write(event, replace=replace, force=force))
        if reply is None:  # queued in the outbox
            held = self._cache.entry(kind, text)
            return BanRecord(text, held.expires if held else expires, reason, self.node_id, 0,
                             kind)  # fmt: skip
        return BanRecord(reply.target, reply.expires, reason, self.node_id, reply.seq, kind)

    async def _remove(self, kind: Kind, target: str) -> bool:
        self._check_running()
        assert self._publisher is not None
        text = self._parse(target, force=True)
        held = self._cache.get(text, kind) is not None
        cls = Unban if kind == "ban" else Disallow
        event = cls(target=text, origin=self.node_id, eid=self._publisher.new_eid())
        reply = await self._publisher.publish(Write(event))
        if reply is None:
            return held
        return reply.status != "absent"

    # -- heartbeat ---------------------------------------------------------------------------

    def _beat(self) -> Beat:
        stats = self.statistics()
        sup = self._supervisor.statistics() if self._supervisor is not None else None
        host, pid = host_facts()
        return Beat(
            node_id=self.node_id, host=host, pid=pid, version=__version__,
            started_ms=self._started_ms, sent_ms=self._clock.now(),
            interval=self._heartbeat_interval, seq=stats.last_seq, lag_ms=stats.lag_ms,
            bans=stats.bans_active, networks=stats.networks_active, allows=stats.allows_active,
            outbox=stats.outbox_pending, pending=stats.writes_pending,
            tracked=sup.tracked if sup else 0, cut=sup.cut if sup else 0,
            refused=sup.refused if sup else 0, reconnects=stats.reconnects,
            resyncs=stats.resyncs, auto_bans=stats.auto_bans + stats.auto_bans_local,
            topology=stats.topology, reading_from=stats.reading_from, connected=stats.connected,
            extra=self.heartbeat_extra() if self.heartbeat_extra is not None else {},
        )  # fmt: skip

    async def _leave(self) -> None:
        if self._heartbeat is None:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
            try:
                await self._heartbeat.remove()
            except (redis_errors.RedisError, OSError) as exc:
                log.debug("banbus: %s could not remove its heartbeat: %s", self.node_id, exc)

    # -- auto-ban ---------------------------------------------------------------------------

    async def report(
        self, ip: str, kind: str, weight: int = 1, *, detail: str | bytes = ""
    ) -> Report:
        """Count an offense of *ip*; the report that crosses the kind's policy bans.

        Counting happens in Redis, shared by every node: an address is banned
        when ``threshold`` offenses fall within any ``window`` seconds,
        whichever nodes saw them, and of racing reports exactly one gets the
        ban in ``Report.banned`` (enforced on this node, connections cut,
        before this returns).  An address already banned, allowlisted or in
        *never_ban* costs no round trip.  Reports of the same kind and address
        in one event-loop tick are merged; a tick's reports share one round
        trip.  While Redis is unreachable the policy is applied on this node
        (a crossing bans here at once and is published from the outbox).

        :param kind: the policy (built in: ``scan``, ``auth``; others are set
            with ``banbus policy set``).
        :param weight: offenses this report counts for (1 to 1000).
        :param detail: attacker-controlled context for the reason (a request
            path, a user name): sanitised, never a reason to refuse.
        :raises InvalidTarget: *ip* is not a single address.
        :raises InvalidInput: bad kind or weight, or no policy for *kind*.
        """
        self._check_running()
        reporter = self._reporter
        assert reporter is not None
        # The hot path: a scanner already banned keeps knocking.  (Banned
        # means a valid address; allowlisted addresses are never banned.)
        policy = reporter.policies.get(kind)
        if (
            policy is not None
            and self._cache.is_banned(ip)
            and type(weight) is int
            and 0 < weight <= MAX_THRESHOLD
        ):
            self._report_stats["banned_here"] += 1
            return Report(banned=None, count=0, threshold=policy.threshold, shadow=False,
                          status="banned_here", target=ip, kind=kind)  # fmt: skip
        target = parse_target(ip, force=True)
        if target.is_network:
            raise InvalidTarget(f"{target.text} is a network; report the address that offended")
        check_kind(kind)
        check_weight(weight)
        threshold = policy.threshold if policy is not None else 0
        if self._never(target) or self._cache.allowed(target.text):
            self._report_stats["exempt"] += 1
            return Report(banned=None, count=0, threshold=threshold, shadow=False,
                          status="exempt", target=target.text, kind=kind)  # fmt: skip
        if self._cache.is_banned(target.text):
            self._report_stats["banned_here"] += 1
            return Report(banned=None, count=0, threshold=threshold, shadow=False,
                          status="banned_here", target=target.text, kind=kind)  # fmt: skip
        text = sanitise_detail(detail) if detail else ""
        return await reporter.submit(target, kind, weight, text)

    def exempt(self, *targets: str) -> None:
        """Never count or auto-ban these addresses or networks here (added to
        *never_ban*; the ASGI middleware adds its trusted proxies)."""
        parsed = [parse_target(t, force=True) for t in targets]
        self._never_ban.extend(t for t in parsed if t not in self._never_ban)

    def _never(self, target: Target) -> bool:
        for net in self._never_ban:
            if net.version != target.version:
                continue
            shift = (32 if net.version == 4 else 128) - net.prefixlen
            if target.value >> shift == net.value >> shift:
                return True
        return False

    async def _auto_ban(self, target: str, ttl: int, reason: str) -> BanRecord:
        """A ban decided on this node while Redis was away (see :meth:`report`)."""
        return await self.ban(target, ttl, reason, force=True)

    async def policies(self) -> list[Policy]:
        """The namespace's policies (built-in ones included), from Redis."""
        self._check_running()
        assert self._reporter is not None
        await self._reporter.load_policies()
        return sorted(self._reporter.policies.values(), key=lambda p: p.kind)

    # -- waiting ---------------------------------------------------------------------------

    async def wait_for_seq(self, seq: int) -> None:
        """Wait until this node has applied the event with sequence number *seq*.

        Use with the ``seq`` of a record returned by :meth:`ban` on another node
        to synchronise on propagation (tests, operators' scripts).
        """
        self._check_running()
        assert self._follower is not None
        if self._follower.seq >= seq:
            return
        event = anyio.Event()
        waiter = (seq, event)
        self._seq_waiters.append(waiter)
        try:
            await event.wait()
        finally:
            # Cancelled (a timeout around it): do not keep the waiter — after a
            # data loss that seq may never come.
            if not event.is_set():
                with contextlib.suppress(ValueError):
                    self._seq_waiters.remove(waiter)
        self._check_running()

    def _wake_waiters(self) -> None:
        if not self._seq_waiters:
            return
        assert self._follower is not None
        position = self._follower.seq
        due = [w for w in self._seq_waiters if w[0] <= position]
        if due:
            self._seq_waiters = [w for w in self._seq_waiters if w[0] > position]
            for _, event in due:
                event.set()

    # -- statistics ---------------------------------------------------------------------------

    def statistics(self) -> NodeStatistics:
        """Counters and gauges of this node (a frozen snapshot)."""
        follower, publisher = self._follower, self._publisher
        reseeder, antientropy, reader = self._reseeder, self._antientropy, self._reader
        f = (
            follower.stats
            if follower
            else dict.fromkeys(("applied", "skipped", "own", "forged", "notices", "would_ban"), 0)
        )
        p = publisher.stats if publisher else {}
        r = reseeder.stats if reseeder else {}
        a = antientropy.stats if antientropy else {}
        rd = reader.stats if reader else {}
        rp = self._reporter.stats if self._reporter else {}
        topo = self._topology
        return NodeStatistics(
            node_id=self.node_id,
            namespace=self.namespace,
            events_applied=f["applied"],
            events_skipped=f["skipped"],
            own_events_confirmed=f["own"],
            resyncs=rd.get("resyncs", 0),
            reconnects=rd.get("reconnects", 0),
            lag_ms=follower.lag_ms if follower else 0.0,
            max_lag_ms=follower.max_lag_ms if follower else 0.0,
            bans_active=self._cache.ban_count,
            networks_active=self._cache.network_count,
            allows_active=self._cache.allow_count,
            outbox_pending=len(publisher.outbox) if publisher else 0,
            writes_pending=publisher.pending if publisher else 0,
            writes_expired=p.get("expired", 0),
            writes_refused=p.get("refused", 0),
            retries_duplicate=p.get("duplicates", 0),
            retries_unverified=p.get("unverified", 0),
            last_seq=follower.seq if follower else 0,
            clock_offset_ms=self._clock.now() - time.time_ns() // 1_000_000,
            clock_measurements=self._clock.measurements,
            losses=rd.get("losses", 0),
            reseed_written=r.get("written", 0),
            reseed_present=r.get("present", 0),
            reseed_lifted=r.get("lifted", 0),
            reseed_pending=len(reseeder.held_b) + len(reseeder.held_a) if reseeder else 0,
            forged_entries=f["forged"],
            digest_checks=a.get("checks", 0),
            digest_mismatches=a.get("mismatches", 0),
            record_digest_mismatch=a.get("record_mismatch", 0),
            expiry_wheel=self._cache.wheel_size,
            cache_mode=self._cache.mode,
            bloom_confirmations=self._bloom_stats["confirmations"],
            bloom_confirmed_banned=self._bloom_stats["banned"],
            bloom_false_positives=self._bloom_stats["false_positives"],
            bloom_unconfirmed=self._bloom_stats["unconfirmed"],
            bloom_reloads=self._bloom_stats["reloads"],
            connected=reader.connected if reader else False,
            topology=topo.kind,
            primary=topo.describe(topo.primary),
            reading_from=topo.describe(topo.reading or topo.primary),
            topology_changes=topo.changes,
            topology_lookups=topo.lookups,
            topology_lookup_failures=topo.lookup_failures,
            read_lag_events=topo.read_lag[0],
            read_lag_ms=topo.read_lag[1],
            notices_seen=f["notices"],
            would_bans_seen=f["would_ban"],
            reports_sent=rp.get("sent", 0),
            report_round_trips=rp.get("round_trips", 0),
            reports_coalesced=rp.get("coalesced", 0),
            reports_skipped_banned=self._report_stats["banned_here"],
            reports_exempt=self._report_stats["exempt"],
            reports_counted_locally=rp.get("local", 0),
            auto_bans=rp.get("auto_bans", 0),
            auto_bans_local=rp.get("local_bans", 0),
            shadow_crossings=rp.get("shadow", 0),
        )

    # -- background tasks -------------------------------------------------------------------

    async def _expiry_task(self) -> None:
        assert self._publisher is not None
        cache, clock, publisher = self._cache, self._clock, self._publisher
        while True:
            due = cache.next_expiry()
            delay = 1.0 if due is None else min(1.0, max(0.0, (due - clock.now()) / 1000))
            await anyio.sleep(delay)
            for _ in cache.expire_steps():  # a sweep of the packed stores, a step at a time
                await anyio.lowlevel.checkpoint()
            if cache.reload_wanted and self._reader is not None:
                cache.reload_wanted = False
                self._bloom_stats["reloads"] += 1
                self._reader.reload_wanted = True
            publisher.prune()
            # Digest bookkeeping waits for quiet moments (see _reseed); if
            # none comes, a little of it here keeps it from piling up.
            if cache.pending_changes > 100_000:
                cache.fold_some(10_000)

    # -- the state file (see _state) ------------------------------------------------------

    def _restore(self, view: SavedView | None, outbox: SavedOutbox | None) -> None:
        """Enforce what the state file holds; queue its writes."""
        assert self._follower is not None and self._publisher is not None
        now = self._clock.now()
        if view is not None:

            def live(rows: list[tuple[str, int, str, str, int]]) -> list[tuple[str, Entry]]:
                return [(t, Entry(e, r, o, q)) for t, e, r, o, q in rows if not e or e > now]

            self._cache.replace(live(view.bans), live(view.allows))
            self._follower.reset(view.last_id, view.seq, view.epoch)
        for saved in outbox.writes if outbox is not None else ():
            cls = _EVENTS[saved.op]
            if cls is Ban or cls is Allow:
                event: AnyEvent = cls(
                    target=saved.target, expires=saved.expires, reason=saved.reason,
                    origin=saved.origin, eid=saved.eid,
                )  # fmt: skip
            else:
                event = cls(target=saved.target, origin=saved.origin, eid=saved.eid)
            write = Write(event, replace=saved.replace, force=saved.force)
            write.ambiguous, write.since = saved.ambiguous, saved.since
            self._publisher.hold(write)
            self._publisher._queue(write)
        log.warning("banbus: %s restored %d bans, %d allowlist entries and %d queued writes from "
                    "%s", self.node_id, self._cache.ban_count, self._cache.allow_count,
                    len(outbox.writes) if outbox else 0, self._state_file.path
                    if self._state_file else "?")  # fmt: skip

    def _state_keys(self) -> tuple[object, object]:
        """What changes when the view, or the outbox, needs saving again."""
        assert self._follower is not None and self._publisher is not None
        assert self._reseeder is not None
        follower, publisher, cache = self._follower, self._publisher, self._cache
        view = (follower.seq, follower.epoch, cache._generation, cache.ban_count,
                cache.allow_count, publisher.pending, len(self._reseeder.held_b))  # fmt: skip
        outbox = tuple(w.event.eid for w in publisher.unanswered())
        return view, outbox

    async def _snapshot_view(self) -> SavedView:
        assert self._follower is not None and self._publisher is not None
        follower = self._follower
        position = (follower.epoch, follower.seq, follower.last_id)
        # Under targets with unanswered own writes, the entry without them: the
        # outbox file holds those writes, and a restart folds them over it again.
        under = {(k, t): e for k, t, e in self._publisher.answered_bases()}
        rows: dict[str, list[tuple[str, int, str, str, int]]] = {"ban": [], "allow": []}
        kinds: tuple[Kind, Kind] = ("ban", "allow")
        for kind in kinds:
            out = rows[kind]
            for i, r in enumerate(self._cache.records(kind)):
                if (kind, r.target) not in under:
                    out.append((r.target, r.expires, r.reason, r.origin, r.seq))
                if i % 50_000 == 49_999:
                    await anyio.lowlevel.checkpoint()
        for (kind, target), e in under.items():
            if e is not None:
                rows[kind].append((target, e.expires, e.reason, e.origin, e.seq))
        return SavedView(self.namespace, position[0], position[1], position[2],
                         self._clock.now(), rows["ban"], rows["allow"])  # fmt: skip

    def _snapshot_outbox(self) -> SavedOutbox:
        assert self._publisher is not None
        writes = []
        for w in self._publisher.unanswered():
            e = w.event
            writes.append(SavedWrite(
                _op(e), e.target, getattr(e, "expires", 0), getattr(e, "reason", ""), e.origin,
                e.eid, w.replace, w.force, True, w.since or self._clock.now() - 5000,
            ))  # fmt: skip
        return SavedOutbox(self.namespace, writes)

    async def _save_state(self) -> None:
        assert self._state_file is not None
        await self._state_file.run(
            view_key=lambda: self._state_keys()[0], snapshot_view=self._snapshot_view,
            outbox_key=lambda: self._state_keys()[1], snapshot_outbox=self._snapshot_outbox,
            interval=self._state_interval,
        )  # fmt: skip

    async def _save_state_now(self) -> None:
        """A last save on close (shielded: a node shut down by cancellation saves too)."""
        assert self._state_file is not None
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            try:
                await self._state_file.save_outbox(self._snapshot_outbox())
                await self._state_file.save_view(await self._snapshot_view())
            except OSError as exc:
                log.error("banbus: cannot write the state file %s: %s", self._state_file.path, exc)

    async def _server_time(self) -> int:
        assert self._client is not None
        seconds, micros = await self._client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def _connect(self) -> ReaderConnection:
        target = self._topology.reader_target()
        return await open_reader(
            target.address, target.connection_class, target.connection_kwargs,
            f"banbus-reader:{self.node_id}", readonly=target.readonly,
        )  # fmt: skip

    def _topology_changed(self) -> None:
        """The primary (or the replica read from) moved: read from there, write there."""
        if self._reader is not None:
            self._reader.drop()
        if self._publisher is not None:
            self._publisher.kick()

    def _position(self) -> tuple[int, str]:
        assert self._follower is not None
        return self._follower.seq, self._follower.last_id


_EVENTS: dict[str, type[AnyEvent]] = {"ban": Ban, "unban": Unban, "allow": Allow,
                                      "disallow": Disallow}  # fmt: skip


def _op(event: AnyEvent) -> str:
    return type(event).__name__.lower()
