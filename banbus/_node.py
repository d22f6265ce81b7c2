"""``banbus.Node``: what a cluster node embeds.

Theory of operation
-------------------

Delivery is *at least once, in order, with gap detection*:

* Every write goes through the Redis function library, which atomically
  updates the current record (``{ns}:bans``/``{ns}:allow`` + expiry zsets),
  assigns the next per-namespace sequence number (``{ns}:seq``) and appends one
  event to the stream ``{ns}:log``.
* **Bootstrap**: ``banbus_state`` returns the stream's newest id and its seq
  (the watermark) atomically; the node then pages through the record with
  HSCAN and reads the stream from the watermark.  Applying events is
  idempotent and ordered (each event carries the *resulting* state, e.g. the
  merged expiry), so whatever HSCAN saw of writes after the watermark is
  overwritten in order by the replay: the result is exact.
* **Reader**: one task with its own connection (a lean RESP client, see
  ``_resp``) runs ``XREAD BLOCK`` from its cursor.  Entries are decoded,
  validated and applied inside the socket callback; a ban that lands reaches
  the connection supervisor before any other task runs.  Malformed entries
  are logged, counted and skipped; the cursor moves on.
* **Gap detection**: each event's seq must be the previous one plus one.  A
  jump (the cursor was trimmed away) or a step back (the stream was recreated,
  or a failover lost writes) triggers a **resync**: a fresh bootstrap.  When
  ``XREAD`` times out (idle), the node compares the server's watermark and
  namespace epoch with its own, which catches a stream recreated *behind* the
  cursor, where XREAD would simply stay silent.
* **Reconnect**: any connection error closes the reader connection; it
  reconnects with capped, jittered exponential backoff and re-checks the
  watermark before reading on.
* **Own writes** apply locally before the round trip (the banning node
  enforces at once) and are recognised by their event id when they come back.
  A write Redis did not acknowledge stays enforced locally and waits in the
  **outbox**; it is published on reconnect with its idempotency key (the
  function library ignores a key it has already seen), so retries never
  double-apply and nothing decided locally is lost.
* **Expiry**: expiry times are server-clock milliseconds; the node keeps its
  offset to the server clock (measured with ``TIME``/``banbus_state``) and
  expires bans locally, exactly, also while Redis is unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import socket
import time
import uuid
from collections import deque
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, Final, Literal, Self

import anyio
import msgspec
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ._cache import BanCache
from ._exceptions import (
    BanbusError,
    InvalidInput,
    NodeClosed,
    RedisUnavailable,
    ServerError,
)
from ._library import ensure_library, translate_error
from ._model import (
    Allow,
    AnyEvent,
    Ban,
    BanRecord,
    Disallow,
    Entry,
    Unban,
    ban_fields,
    check_origin,
    check_reason,
    decode_flat,
    entries_decoder,
    entry_decoder,
    parse_ttl,
)
from ._resp import RespConnection, RespError, ServerAddress, address_of
from ._targets import DEFAULT_MIN_PREFIX_V4, DEFAULT_MIN_PREFIX_V6, parse_target

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from types import TracebackType

    from anyio.abc import TaskGroup, TaskStatus

    from ._supervisor import Supervisor

__all__ = ["Node", "NodeStatistics", "namespace_keys"]

log = logging.getLogger("banbus")

#: Error replies that mean "not now" rather than "no" (the write is retried).
_TRANSIENT: Final = frozenset(
    ("OOM", "READONLY", "LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "NOREPLICAS",
     "CLUSTERDOWN", "NOSCRIPT")
)  # fmt: skip
_TRANSIENT_ERRORS: Final = (
    redis_errors.OutOfMemoryError,
    redis_errors.ReadOnlyError,
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
)
_NAMESPACE_RE: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_AF_INET: Final = socket.AF_INET
_pton: Final = socket.inet_pton
_ntop: Final = socket.inet_ntop


def namespace_keys(namespace: str) -> dict[str, str]:
    """The Redis keys of *namespace* (all share the hash tag ``{namespace}``)."""
    if not isinstance(namespace, str) or not _NAMESPACE_RE.match(namespace):
        raise InvalidInput(
            f"namespace {namespace!r} must be 1-64 characters of letters, digits and _.:-"
        )
    tag = "{" + namespace + "}"
    return {
        "log": f"{tag}:log",
        "bans": f"{tag}:bans",
        "bans_exp": f"{tag}:bans:exp",
        "allow": f"{tag}:allow",
        "allow_exp": f"{tag}:allow:exp",
        "seq": f"{tag}:seq",
        "epoch": f"{tag}:epoch",
        "config": f"{tag}:config",
    }


class NodeStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a node's counters (see :meth:`Node.statistics`)."""

    node_id: str
    namespace: str
    #: Stream events applied (own and others').
    events_applied: int
    #: Stream entries skipped as malformed (logged once each, then counted).
    events_skipped: int
    #: Own events seen coming back from the stream.
    own_events_confirmed: int
    #: Full reloads from the record (gap, trimmed cursor, recreated stream).
    resyncs: int
    #: Reader reconnections.
    reconnects: int
    #: Time from an event's creation (its stream id) to its application, last event.
    lag_ms: float
    #: The highest lag seen.
    max_lag_ms: float
    #: Bans held locally (expired ones are reclaimed within a second).
    bans_active: int
    #: Of which CIDR networks.
    networks_active: int
    allows_active: int
    #: Local writes waiting for Redis.
    outbox_pending: int
    #: Sequence number of the last applied event.
    last_seq: int
    #: Redis server clock minus this host's wall clock (expiry uses the server's).
    clock_offset_ms: int
    connected: bool


class _PyReaderConn:
    """Reader connection through redis-py, for pools banbus cannot dial itself (Sentinel …)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.is_open = True

    @classmethod
    async def open(cls, client: aioredis.Redis, name: str) -> _PyReaderConn:
        pool = client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        kwargs.update(decode_responses=True, encoding_errors="replace", socket_timeout=None,
                      client_name=name)  # fmt: skip
        conn = pool.connection_class(**kwargs)
        await conn.connect()  # type: ignore[no-untyped-call]
        return cls(conn)

    async def call(self, *args: Any, sink: Callable[[Any], None] | None = None) -> Any:
        try:
            await self._conn.send_command(*args)
            reply = await self._conn.read_response()
        except redis_errors.ResponseError as exc:
            raise RespError(str(exc)) from exc
        except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
            self.is_open = False
            raise ConnectionError(str(exc)) from exc
        if sink is not None:
            sink(reply)
        return reply

    def close(self) -> None:
        self.is_open = False
        with contextlib.suppress(Exception):
            self._conn._close()


_Conn = RespConnection | _PyReaderConn


class _Resync(Exception):
    """Internal: the reader must reload from the record."""


class Node:
    """A cluster member: a local ban cache kept in sync with the namespace in Redis.

    Use it as an async context manager; the body runs once the node is in sync::

        async with banbus.Node("redis://127.0.0.1:6379/0", node_id="mx1") as node:
            node.is_banned("203.0.113.7")
            await node.ban("198.51.100.0/24", ttl=3600, reason="scan")

    :param redis: a ``redis://``/``rediss://``/``unix://`` URL, or an existing
        ``redis.asyncio.Redis`` (the node then uses it for writes and never
        closes it; the reader always opens its own connection).
    :param node_id: this node's name in events (``origin``); default host-pid.
    :param namespace: the namespace (all keys live under ``{namespace}``).
    :param min_prefix_v4: widest IPv4 prefix accepted without ``force``.
    :param min_prefix_v6: widest IPv6 prefix accepted without ``force``.
    :param block_ms: how long one ``XREAD BLOCK`` waits; an idle reader checks the
        watermark this often.
    :param batch_size: stream entries per read.
    :param backoff: (first, cap) reconnect delay in seconds; jittered.
    :param reseed: when the namespace comes back empty (Redis lost its data:
        restart without persistence, failover to an empty replica, FLUSHALL),
        re-publish the bans and allowlist this node held — one node wins a
        lock and does it.  A namespace emptied on purpose with ``banbus
        clear`` is not re-seeded.
    :param compact: keep exact IPv4 bans in ~75 bytes each instead of ~270
        (for millions of imported bans): their expiry is rounded up to the
        second and ``lookup`` returns them without reason, origin or seq.
    """

    def __init__(
        self,
        redis: str | aioredis.Redis,
        *,
        node_id: str | None = None,
        namespace: str = "banbus",
        min_prefix_v4: int = DEFAULT_MIN_PREFIX_V4,
        min_prefix_v6: int = DEFAULT_MIN_PREFIX_V6,
        block_ms: int = 2000,
        batch_size: int = 2000,
        backoff: tuple[float, float] = (0.05, 2.0),
        scan_count: int = 10_000,
        reseed: bool = True,
        compact: bool = False,
    ) -> None:
        self._keys = namespace_keys(namespace)
        self.namespace = namespace
        if node_id is None:
            node_id = re.sub(r"[^A-Za-z0-9._:@-]", "-", f"{socket.gethostname()}-{os.getpid()}")
            node_id = node_id[:64]
        self.node_id = check_origin(node_id)
        if not isinstance(redis, str | aioredis.Redis):
            raise TypeError("redis must be a URL or a redis.asyncio.Redis instance")
        self._redis_arg = redis
        self._client: aioredis.Redis | None = None
        self._owns_client = isinstance(redis, str)
        self.min_prefix_v4 = min_prefix_v4
        self.min_prefix_v6 = min_prefix_v6
        if block_ms < 1 or batch_size < 1 or scan_count < 1:
            raise ValueError("block_ms, batch_size and scan_count must be positive")
        self._block_ms = block_ms
        self._batch = batch_size
        self._backoff = backoff
        self._scan_count = scan_count
        self._reseed_enabled = reseed
        self._state: Literal["new", "starting", "running", "closed"] = "new"

        self._offset_ms = 0
        self._cache = BanCache(self._server_now, compact=compact)
        self._cursor = "0-0"
        self._last_seq = 0
        self._epoch = ""
        self._resync_needed = False
        self._conn: _Conn | None = None
        self._address: ServerAddress | None = None
        self._stack: AsyncExitStack | None = None
        self._tg: TaskGroup | None = None
        self._listeners: list[Callable[[str], None]] = []
        self._supervisor: Supervisor | None = None
        # The hot path without a second Python call: the cache's bound method
        # (it stays valid across resyncs, which swap the cache's insides).
        self.is_banned = self._cache.is_banned  # type: ignore[method-assign]
        #: Own events not yet seen on the stream: eid -> event.
        self._pending: dict[str, AnyEvent] = {}
        #: Own events Redis did not acknowledge, oldest first.
        self._outbox: deque[AnyEvent] = deque()
        #: Event ids of queued writes that asked for REPLACE (the event has no such field).
        self._replacing: set[str] = set()
        self._outbox_wakeup = anyio.Event()
        self._seq_waiters: list[tuple[int, anyio.Event]] = []
        #: Reads sent ahead while applying a full batch (see _on_xread).
        self._prefetch: deque[Any] = deque()
        #: During bootstrap: the stream id to catch up to before the body runs.
        self._catchup_until: str | None = None
        #: Own writes Redis acknowledged: eid -> seq (see _sync).
        self._acked: dict[str, int] = {}
        self._sync_timeout = 120.0
        #: How long aclose() waits for the outbox to drain.
        self._flush_timeout = 2.0
        self._stats = dict.fromkeys(("applied", "skipped", "own", "resyncs", "reconnects"), 0)
        self._lag_ms = 0.0
        self._max_lag_ms = 0.0
        self._skip_logged = 0

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise NodeClosed(f"node {self.node_id!r} was already started; create a new Node")
        self._state = "starting"
        stack = AsyncExitStack()
        try:
            client = self._redis_arg
            if isinstance(client, str):
                try:
                    # One immediate retry on a dropped connection (e.g. an idle
                    # kill): safe, every write carries its event id.
                    client = aioredis.Redis.from_url(
                        client, socket_timeout=5.0, socket_connect_timeout=5.0,
                        health_check_interval=0, retry=Retry(NoBackoff(), 1),
                        retry_on_error=[redis_errors.ConnectionError],
                    )  # fmt: skip
                except ValueError as exc:
                    raise InvalidInput(f"invalid Redis URL {self._redis_arg!r}: {exc}") from exc
                stack.push_async_callback(_aclose_shielded, client)
            self._client = client
            self._address = address_of(client)
            try:
                await ensure_library(client)
            except BanbusError:
                raise
            except redis_errors.RedisError as exc:
                raise ServerError(str(exc)) from exc
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(self._tg.cancel_scope.cancel)
            await self._tg.start(self._reader_task)
            self._tg.start_soon(self._expiry_task)
            self._tg.start_soon(self._outbox_task)
        except BaseException:
            self._state = "closed"
            await stack.aclose()
            raise
        self._stack = stack
        self._state = "running"
        return self

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
        if self._outbox and self._state == "running":
            # Give writes made while Redis was away a last chance to land.
            with anyio.move_on_after(self._flush_timeout):
                while self._outbox:
                    self._outbox_wakeup.set()
                    await anyio.sleep(0.01)
            if self._outbox:
                log.warning("banbus: %s closed with %d unpublished writes (Redis unreachable)",
                            self.node_id, len(self._outbox))  # fmt: skip
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
        return (
            f"<banbus.Node {self.node_id!r} ns={self.namespace!r} {self._state} "
            f"bans={self._cache.ban_count} seq={self._last_seq}>"
        )

    # -- the hot path (sync, no I/O) ---------------------------------------------------

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

    @property
    def cache(self) -> BanCache:
        """The local state (read-only use: ``is_banned`` without the method hop)."""
        return self._cache

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
        """
        return await self._write(True, target, ttl, reason, force=force, replace=replace)

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
        return await self._write(False, target, ttl, reason, force=force, replace=replace)

    async def unban(self, target: str) -> bool:
        """Lift the ban on exactly *target* on every node; True if it was banned."""
        return await self._remove(True, target)

    async def disallow(self, target: str) -> bool:
        """Remove exactly *target* from the allowlist on every node."""
        return await self._remove(False, target)

    def _parse(self, target: str, force: bool) -> str:
        return parse_target(
            target, min_prefix_v4=self.min_prefix_v4, min_prefix_v6=self.min_prefix_v6,
            force=force,
        ).text  # fmt: skip

    def _new_eid(self) -> str:
        return f"{self.node_id}.{uuid.uuid4().hex[:16]}"

    async def _write(
        self,
        ban: bool,
        target: str,
        ttl: int | float | str | None,
        reason: str,
        *,
        force: bool,
        replace: bool,
    ) -> BanRecord:
        self._check_running()
        text = self._parse(target, force)
        seconds = parse_ttl(ttl)
        reason = check_reason(reason)
        kind: Literal["ban", "allow"] = "ban" if ban else "allow"
        # Apply locally first, with the expiry the server will compute (merged
        # with what we hold unless replace).
        expires = self._server_now() + seconds * 1000 if seconds else 0
        previous = self._cache.get(text, kind)
        if previous is not None and not replace:
            if previous.expires == 0 or expires == 0:
                expires = 0
            else:
                expires = max(expires, previous.expires)
        eid = self._new_eid()
        cls = Ban if ban else Allow
        event = cls(target=text, expires=expires, reason=reason, origin=self.node_id,
                    eid=eid)  # fmt: skip
        self._pending[eid] = event
        self._apply_local(event)
        args: list[str | int] = [text, seconds, reason]
        if force:
            args.append("FORCE")
        if replace:
            args.append("REPLACE")
            self._replacing.add(eid)
        try:
            reply = await self._publish(event, args)
        except BanbusError:
            # The server refused for good (e.g. a stricter namespace config,
            # a wrong key type): undo, so this node does not diverge.
            self._pending.pop(eid, None)
            self._replacing.discard(eid)
            self._restore(kind, text, previous)
            raise
        if reply is None:  # queued in the outbox (which keeps the REPLACE mark)
            return BanRecord(text, expires, reason, self.node_id, 0, kind)
        self._replacing.discard(eid)
        seq, _sid, canonical, server_expires = reply
        self._ack(eid, int(seq))
        if isinstance(canonical, bytes):
            canonical = canonical.decode()
        return BanRecord(str(canonical), int(server_expires), reason, self.node_id, int(seq),
                         kind)  # fmt: skip

    async def _remove(self, ban: bool, target: str) -> bool:
        self._check_running()
        text = self._parse(target, force=True)
        kind: Literal["ban", "allow"] = "ban" if ban else "allow"
        previous = self._cache.get(text, kind)
        held = previous is not None
        eid = self._new_eid()
        event = (Unban if ban else Disallow)(target=text, origin=self.node_id, eid=eid)
        self._pending[eid] = event
        self._apply_local(event)
        try:
            reply = await self._publish(event, [text])
        except BanbusError:
            self._pending.pop(eid, None)
            self._restore(kind, text, previous)
            raise
        if reply is None:
            return held
        if int(reply[0]) == 0:
            self._pending.pop(eid, None)  # nothing was written: no event will come back
            return held
        self._ack(eid, int(reply[0]))
        return True

    def _ack(self, eid: str, seq: int) -> None:
        if eid in self._pending:  # not yet read back from the stream
            self._acked[eid] = seq

    def _apply_local(self, event: AnyEvent) -> None:
        if self._cache.apply(event):
            self._notify(event.target)

    def _restore(
        self, kind: Literal["ban", "allow"], target: str, previous: BanRecord | None
    ) -> None:
        if previous is None:
            self._cache.apply(Unban(target=target) if kind == "ban" else Disallow(target=target))
        else:
            entry = Entry(previous.expires, previous.reason, previous.origin, previous.seq)
            self._cache.put(kind, target, entry)

    async def _publish(self, event: AnyEvent, args: list[str | int]) -> list[Any] | None:
        """FCALL the write; None if Redis is unreachable (the event waits in the outbox)."""
        if self._outbox:
            # Earlier writes are still waiting: this one goes behind them, so
            # that e.g. a ban and the unban after it land in that order.
            self._outbox.append(event)
            self._outbox_wakeup.set()
            return None
        try:
            return await self._fcall(event, args)
        except RedisUnavailable as exc:
            log.warning("banbus: Redis unreachable (%s); %s %s queued in the outbox",
                        exc, _op(event), event.target)  # fmt: skip
            self._outbox.append(event)
            self._outbox_wakeup.set()
            return None
        except anyio.get_cancelled_exc_class():
            # The caller gave up mid-call: the write is enforced here already and
            # may or may not have reached Redis; the outbox publishes it with the
            # same idempotency key, so it lands exactly once.
            self._outbox.append(event)
            self._outbox_wakeup.set()
            raise

    async def _fcall(self, event: AnyEvent, args: list[str | int]) -> list[Any]:
        assert self._client is not None
        name = f"banbus_{_op(event)}"
        for attempt in range(2):
            try:
                reply = await self._client.fcall(
                    name, 1, self.namespace, *args, "ORIGIN", event.origin, "EID", event.eid
                )
            except redis_errors.ResponseError as exc:
                if attempt == 0 and "function not found" in str(exc).lower():
                    # The server came back empty (restart without persistence,
                    # FUNCTION FLUSH): reload the library and retry once.
                    await ensure_library(self._client)
                    continue
                if isinstance(exc, _TRANSIENT_ERRORS) or str(exc).split(" ", 1)[0] in _TRANSIENT:
                    # Not a verdict on the write: the server cannot take writes
                    # right now.  The outbox retries it with the same event id.
                    raise RedisUnavailable(f"server busy: {exc}") from exc
                raise translate_error(exc) from exc
            except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
                raise RedisUnavailable(f"{type(exc).__name__}: {exc}") from exc
            return list(reply)
        raise AssertionError("unreachable")

    # -- waiting / listeners ---------------------------------------------------------------

    def subscribe(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call *callback(target)* whenever a ban lands (locally or from the stream).

        Called synchronously from the apply path: it must be quick and must not
        raise.  Returns an unsubscribe function.
        """
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)

    def _notify(self, target: str) -> None:
        for callback in self._listeners:
            try:
                callback(target)
            except Exception:
                log.exception("banbus: ban listener %r failed", callback)

    async def wait_for_seq(self, seq: int) -> None:
        """Wait until this node has applied the event with sequence number *seq*.

        Use with the ``seq`` of a record returned by :meth:`ban` on another node
        to synchronise on propagation (tests, operators' scripts).
        """
        self._check_running()
        if self._last_seq >= seq:
            return
        event = anyio.Event()
        self._seq_waiters.append((seq, event))
        await event.wait()
        self._check_running()

    def _wake_waiters(self) -> None:
        if not self._seq_waiters:
            return
        due = [w for w in self._seq_waiters if w[0] <= self._last_seq]
        if due:
            self._seq_waiters = [w for w in self._seq_waiters if w[0] > self._last_seq]
            for _, event in due:
                event.set()

    # -- statistics ---------------------------------------------------------------------------

    def statistics(self) -> NodeStatistics:
        """Counters and gauges of this node (a frozen snapshot)."""
        s = self._stats
        return NodeStatistics(
            node_id=self.node_id,
            namespace=self.namespace,
            events_applied=s["applied"],
            events_skipped=s["skipped"],
            own_events_confirmed=s["own"],
            resyncs=s["resyncs"],
            reconnects=s["reconnects"],
            lag_ms=self._lag_ms,
            max_lag_ms=self._max_lag_ms,
            bans_active=self._cache.ban_count,
            networks_active=self._cache.network_count,
            allows_active=self._cache.allow_count,
            outbox_pending=len(self._outbox),
            last_seq=self._last_seq,
            clock_offset_ms=self._server_now() - time.time_ns() // 1_000_000,
            connected=self._conn is not None and self._conn.is_open,
        )

    # -- clock --------------------------------------------------------------------------------

    def _server_now(self) -> int:
        """Current server time in ms, from the monotonic clock plus the measured offset."""
        return time.monotonic_ns() // 1_000_000 + self._offset_ms

    def _observe_server_time(self, server_ms: int, sent_ns: int, received_ns: int) -> None:
        rtt_ms = (received_ns - sent_ns) / 1e6
        if rtt_ms > 50 and self._offset_ms:
            return  # a slow round trip says little about the clock
        midpoint = (sent_ns + received_ns) // 2_000_000
        self._offset_ms = server_ms - midpoint

    # -- reader ---------------------------------------------------------------------------------

    async def _connect(self) -> _Conn:
        name = f"banbus-reader:{self.node_id}"
        try:
            if self._address is not None:
                conn: _Conn = await RespConnection.open(self._address, name=name)
            else:
                assert self._client is not None
                conn = await _PyReaderConn.open(self._client, name)
        except RespError as exc:
            raise ServerError(f"reader connection refused: {exc}") from exc
        except (OSError, TimeoutError, redis_errors.RedisError) as exc:
            raise RedisUnavailable(f"cannot connect the reader: {exc}") from exc
        self._conn = conn
        return conn

    async def _reader_task(self, *, task_status: TaskStatus[None]) -> None:
        conn: _Conn | None = await self._connect()
        assert conn is not None
        try:
            await self._sync(conn, first=True)
        except (ConnectionError, OSError, TimeoutError) as exc:
            conn.close()
            raise RedisUnavailable(f"bootstrap failed: {exc}") from exc
        except RespError as exc:
            conn.close()
            raise ServerError(f"bootstrap refused by the server: {exc}") from exc
        task_status.started()
        delay = self._backoff[0]
        resync = False
        try:
            while True:
                try:
                    if conn is None:
                        conn = await self._connect()
                        log.info("banbus: reader of %s reconnected", self.node_id)
                        self._outbox_wakeup.set()
                        # The server may have come back empty, without the functions.
                        with contextlib.suppress(ServerError):
                            assert self._client is not None
                            await ensure_library(self._client)
                        await self._check(conn)
                    if resync:
                        # Inside the try: a connection lost mid-resync reconnects
                        # and resyncs again instead of killing the reader.
                        await self._sync(conn, first=False)
                        resync = False
                    await self._read(conn)
                    delay = self._backoff[0]
                except _Resync:
                    resync = True
                except Exception as exc:
                    # Connection trouble — or a bug: either way the reader must
                    # not die (that would cancel the user's `async with` body).
                    # Reconnect and resync from the record.
                    if not isinstance(
                        exc,
                        ConnectionError
                        | OSError
                        | TimeoutError
                        | RedisUnavailable
                        | RespError
                        | ServerError,
                    ):
                        log.exception("banbus: reader of %s failed; resyncing", self.node_id)
                        resync = True
                    self._prefetch.clear()  # their connection is gone
                    if conn is not None:
                        conn.close()
                        conn = None
                        self._conn = None
                        self._stats["reconnects"] += 1
                    log.warning("banbus: reader of %s lost Redis (%s); retrying in %.2fs",
                                self.node_id, exc, delay)  # fmt: skip
                    await anyio.sleep(delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, self._backoff[1])
        finally:
            if conn is not None:
                conn.close()
            self._conn = None

    async def _read(self, conn: _Conn) -> None:
        if isinstance(conn, RespConnection):
            if await self._read_chain(conn) == "resync":
                raise _Resync
            await self._check(conn)  # idle: compare watermarks
            return
        with anyio.fail_after(self._block_ms / 1000 + 5.0):
            reply = await conn.call(
                "XREAD", "COUNT", self._batch, "BLOCK", self._block_ms,
                "STREAMS", self._keys["log"], self._cursor, sink=self._on_xread,
            )  # fmt: skip
        reply = await self._drain(reply)
        if self._resync_needed:
            raise _Resync
        if not reply:
            await self._check(conn)

    async def _read_chain(self, conn: RespConnection) -> str:
        """Follow the stream with XREADs sent from the socket callback itself.

        Each reply is applied in ``data_received`` and the next ``XREAD BLOCK``
        goes out from there too, so a ban costs one callback per node — no
        task wake-up, no cancel scope.  (A full batch sends a non-blocking read
        *before* applying, so Redis and the network work meanwhile.)  The task
        only wakes when the chain stops: ``"idle"`` (a BLOCK timed out),
        ``"resync"``, or an error; or when no reply came for ``block + 5 s``
        (a dead connection).
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[str] = loop.create_future()
        key, batch, block = self._keys["log"], self._batch, self._block_ms
        last_reply = [time.monotonic()]

        def finish(result: str | BaseException) -> None:
            if not done.done():
                if isinstance(result, BaseException):
                    done.set_exception(result)
                else:
                    done.set_result(result)

        def failed(future: asyncio.Future[Any]) -> None:
            if not future.cancelled() and future.exception() is not None:
                finish(future.exception())  # type: ignore[arg-type]

        def send(cursor: str, blocking: bool) -> None:
            if blocking:
                future = conn.call("XREAD", "COUNT", batch, "BLOCK", block, "STREAMS", key,
                                   cursor, sink=on_block)  # fmt: skip
            else:
                future = conn.call("XREAD", "COUNT", batch, "STREAMS", key, cursor,
                                   sink=on_prefetch)  # fmt: skip
            future.add_done_callback(failed)

        def on_reply(reply: Any, blocking: bool) -> None:
            last_reply[0] = time.monotonic()
            if done.done():
                return  # a read sent before the chain stopped
            if self._resync_needed:
                finish("resync")
                return
            if not reply:
                if blocking:
                    finish("idle")
                else:
                    send(self._cursor, True)
                return
            entries = reply[0][1]
            full = len(entries) >= batch
            if full:
                send(entries[-1][0], False)
            self._apply_entries(entries)
            if self._resync_needed:
                finish("resync")
            elif not full:
                send(self._cursor, True)

        def on_block(reply: Any) -> None:
            on_reply(reply, True)

        def on_prefetch(reply: Any) -> None:
            on_reply(reply, False)

        send(self._cursor, True)
        limit = block / 1000 + 5.0
        try:
            while True:
                await asyncio.wait([done], timeout=limit)
                if done.done():
                    return done.result()
                if time.monotonic() - last_reply[0] > limit:
                    raise TimeoutError(f"no reply from Redis within {limit:.0f}s")
        finally:
            if not done.done():
                done.cancel()

    async def _drain(self, reply: Any) -> Any:
        """Await prefetched reads (see ``_on_xread``); return the last reply."""
        prefetch = self._prefetch
        while prefetch:
            with anyio.fail_after(10.0):
                reply = await prefetch.popleft()
        return reply

    async def _check(self, conn: _Conn) -> None:
        """Compare the server's watermark and epoch with ours; resync if they disagree."""
        sent = time.monotonic_ns()
        with anyio.fail_after(5.0):
            state = await conn.call("FCALL_RO", "banbus_state", 1, self.namespace)
        self._observe_server_time(int(state[3]), sent, time.monotonic_ns())
        last_id, seq, epoch = str(state[0]), int(state[1]), str(state[2] or "")
        if epoch != self._epoch and not self._epoch and seq >= self._last_seq:
            # The namespace was empty at bootstrap and has been created since.
            if seq == self._last_seq and last_id == self._cursor:
                self._epoch = epoch  # we have read all of it: same stream
                return
            if not _id_le(last_id, self._cursor):
                return  # we are behind: XREAD delivers the rest; decide next time
        if epoch != self._epoch or seq < self._last_seq:
            log.warning("banbus: namespace %r was reset or rolled back on the server "
                        "(epoch %r -> %r, seq %d -> %d); resyncing",
                        self.namespace, self._epoch, epoch, self._last_seq, seq)  # fmt: skip
            raise _Resync
        if seq > self._last_seq and _id_le(last_id, self._cursor):
            log.warning("banbus: stream %s moved behind our cursor; resyncing",
                        self._keys["log"])  # fmt: skip
            raise _Resync

    async def _sync(self, conn: _Conn, *, first: bool) -> None:
        """Bootstrap (or resync): watermark, record, then the stream from the watermark."""
        # A silent server (blackholed link, SIGSTOP) must not hang the reader:
        # no single round trip of a resync may take this long.
        with anyio.fail_after(self._sync_timeout):
            await self._sync_inner(conn, first=first)

    async def _sync_inner(self, conn: _Conn, *, first: bool) -> None:
        for _attempt in range(10):
            sent = time.monotonic_ns()
            state = await conn.call("FCALL_RO", "banbus_state", 1, self.namespace)
            self._observe_server_time(int(state[3]), sent, time.monotonic_ns())
            bans = await self._scan(conn, self._keys["bans"])
            allows = await self._scan(conn, self._keys["allow"])
            self._resync_needed = False
            new_epoch = str(state[2] or "")
            reset = (self._epoch and new_epoch != self._epoch) or int(state[1]) < self._last_seq
            kept: tuple[list[BanRecord], list[BanRecord]] = ([], [])
            if not first and reset and self._reseed_enabled:
                # The namespace was reset under us (Redis lost its data) and
                # nobody cleared it on purpose: keep enforcing what we held
                # until the re-publication (one node does it) comes back.
                cleared = await conn.call("EXISTS", "{" + self.namespace + "}:cleared")
                if not cleared:
                    kept = (list(self._cache.records("allow")), list(self._cache.records("ban")))
                    if (kept[0] or kept[1]) and self._tg is not None:
                        self._tg.start_soon(self._reseed, kept, self._epoch)
            allowed_before = self._cache.allow_targets()
            newly = self._cache.replace(bans, allows)
            for records in kept:
                for record in records:
                    entry = Entry(record.expires, record.reason, record.origin, record.seq)
                    self._cache.put(record.kind, record.target, entry)
            # A lifted allowlist entry may expose banned connections too.
            newly += allowed_before - self._cache.allow_targets()
            self._cursor = str(state[0])
            self._last_seq = int(state[1])
            self._epoch = str(state[2] or "")
            # Own writes Redis has not acknowledged (in flight, or in the
            # outbox) stay enforced.  Acknowledged ones are in this snapshot or
            # will come from the stream after it (or were lost with a wiped
            # namespace, like everyone else's): they need no re-applying.
            for eid in self._acked:
                self._pending.pop(eid, None)
            self._acked.clear()
            for event in list(self._pending.values()):
                self._cache.apply(event)
            # Catch up from the watermark to where the stream is now — not
            # until it is quiet, which under sustained writes may be never; the
            # reader takes over from there.
            head = await conn.call("FCALL_RO", "banbus_state", 1, self.namespace)
            self._catchup_until = str(head[0])
            try:
                while not _id_le(self._catchup_until, self._cursor):
                    reply = await self._drain(await conn.call(
                        "XREAD", "COUNT", self._batch, "STREAMS", self._keys["log"],
                        self._cursor, sink=self._on_xread,
                    ))  # fmt: skip
                    if self._resync_needed or not reply or len(reply[0][1]) < self._batch:
                        break
            finally:
                self._catchup_until = None
            if not self._resync_needed:
                break
        else:
            raise ServerError("could not reach a consistent snapshot after 10 attempts")
        if not first:
            self._stats["resyncs"] += 1
            log.info("banbus: %s resynced %s (%d bans)", self.node_id, self.namespace,
                     self._cache.ban_count)  # fmt: skip
            for target in newly:
                self._notify(target)
        self._wake_waiters()

    async def _scan(self, conn: _Conn, key: str) -> list[tuple[str, Entry]]:
        out: list[tuple[str, Entry]] = []
        ntop, pton, af = _ntop, _pton, _AF_INET
        future = conn.call("HSCAN", key, "0", "COUNT", self._scan_count)
        while True:
            cursor, flat = await future
            if cursor != "0":
                # Pipelined: Redis pages the next batch while we decode this one.
                future = conn.call("HSCAN", key, cursor, "COUNT", self._scan_count)
            targets = flat[0::2]
            values = flat[1::2]
            entries: list[Entry | None]
            try:
                entries = entries_decoder.decode("[" + ",".join(values) + "]")  # type: ignore[assignment]
                if len(entries) != len(values):  # a value with a top-level comma
                    raise msgspec.DecodeError("value count mismatch")
            except (msgspec.DecodeError, msgspec.ValidationError):
                entries = [
                    self._decode_one(key, t, v) for t, v in zip(targets, values, strict=True)
                ]
            append = out.append
            for target, entry in zip(targets, entries, strict=True):
                if entry is None:
                    continue
                try:
                    # The common case: a canonical IPv4 address, checked without parsing.
                    if ntop(af, pton(af, target)) == target:
                        append((target, entry))
                        continue
                except OSError:
                    pass
                if self._valid_target(target):
                    append((target, entry))
                else:
                    self._skip(f"record {key}[{target!r}]", "not a canonical target")
            if cursor == "0":
                return out

    def _decode_one(self, key: str, target: str, value: str) -> Entry | None:
        try:
            return entry_decoder.decode(value)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._skip(f"record {key}[{target!r}]", str(exc))
            return None

    def _valid_target(self, target: str) -> bool:
        """Is *target* canonical text a node may store? (stream and record input)."""
        try:
            if _ntop(_AF_INET, _pton(_AF_INET, target)) == target:
                return True  # the common case: a canonical IPv4 address, no parsing
        except OSError:
            pass
        try:
            return parse_target(target, force=True).text == target
        except InvalidInput:
            return False

    def _skip(self, what: str, why: str) -> None:
        self._stats["skipped"] += 1
        if self._skip_logged < 100:
            self._skip_logged += 1
            log.warning("banbus: skipped malformed %s: %s", what, why)

    def _on_xread(self, reply: Any) -> None:
        """Apply an XREAD reply; runs inside the socket callback."""
        if not reply or self._resync_needed:  # nil on timeout (fakeredis: an empty array)
            return
        entries = reply[0][1]
        conn = self._conn
        if (
            len(entries) >= self._batch
            and isinstance(conn, RespConnection)
            and (self._catchup_until is None or not _id_le(self._catchup_until, entries[-1][0]))
        ):
            # A full batch: more is likely waiting.  Ask for it now, so Redis
            # and the network work while we apply this one.
            self._prefetch.append(conn.call(
                "XREAD", "COUNT", self._batch, "STREAMS", self._keys["log"], entries[-1][0],
                sink=self._on_xread,
            ))  # fmt: skip
        self._apply_entries(entries)

    def _skip_entry(self, entry_id: str, fields: list[str] | None) -> None:
        """Move past a skipped entry without counting its seq as seen.

        A hand-written entry may carry any ``seq``; believing it would make the
        real event with that number look like a step back.  (The price: an
        entry a *newer* library version numbered but this node cannot read
        costs a resync — version upgrades should roll nodes first.)
        """
        self._cursor = entry_id

    def _apply_entries(self, entries: list[Any]) -> None:
        """Validate and apply stream entries in order; runs inside the socket callback."""
        stats = self._stats
        pending = self._pending
        cache = self._cache
        store = cache._store
        node_id = self.node_id
        ntop, pton, af = _ntop, _pton, _AF_INET
        now = self._server_now()
        applied = 0
        for entry_id, fields in entries:
            if self._resync_needed:
                break
            # Fast path: a ban/allow of an IPv4 address in the library's layout,
            # in sequence.  Everything else takes the general path below.
            fast = ban_fields(fields) if fields else None
            if fast is not None and fast[6] == self._last_seq + 1:
                is_ban, target, expires, reason, origin, eid, seq = fast
                try:
                    canonical = ntop(af, pton(af, target)) == target
                except OSError:
                    canonical = False
                if canonical:
                    if store(is_ban, target, expires, reason, origin, seq, now) and self._listeners:
                        self._notify(target)
                    self._last_seq = seq
                    self._cursor = entry_id
                    applied += 1
                    if eid in pending and origin == node_id:
                        del pending[eid]
                        self._acked.pop(eid, None)
                        stats["own"] += 1
                    continue
            try:
                event = decode_flat(fields or [])
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                self._skip(f"stream entry {entry_id}", str(exc))
                self._skip_entry(entry_id, fields)
                continue
            if event.seq == 0 or not self._valid_target(event.target):
                self._skip(f"stream entry {entry_id}",
                           "no sequence number (not written by the banbus functions)"
                           if event.seq == 0 else f"invalid target {event.target!r}")  # fmt: skip
                self._skip_entry(entry_id, fields)
                continue
            if event.seq != self._last_seq + 1:
                if event.seq <= self._last_seq and not _id_le(entry_id, self._cursor):
                    log.warning("banbus: seq went back from %d to %d at %s; resyncing",
                                self._last_seq, event.seq, entry_id)  # fmt: skip
                elif event.seq > self._last_seq:
                    log.warning("banbus: missed events %d..%d (stream trimmed past us); "
                                "resyncing", self._last_seq + 1, event.seq - 1)  # fmt: skip
                self._resync_needed = True
                break
            if cache.apply(event, now) and self._listeners:
                self._notify(event.target)
            self._last_seq = event.seq
            self._cursor = entry_id
            applied += 1
            if event.eid in pending and event.origin == self.node_id:
                del pending[event.eid]
                self._acked.pop(event.eid, None)
                stats["own"] += 1
        if applied:
            stats["applied"] += applied
            lag = self._server_now() - int(self._cursor.partition("-")[0])
            self._lag_ms = float(max(lag, 0))
            self._max_lag_ms = max(self._max_lag_ms, self._lag_ms)
            self._wake_waiters()

    # -- background tasks -------------------------------------------------------------------

    async def _expiry_task(self) -> None:
        cache = self._cache
        while True:
            now = self._server_now()
            due = self._cache.next_expiry()
            delay = 1.0 if due is None else min(1.0, max(0.0, (due - now) / 1000))
            await anyio.sleep(delay)
            cache = self._cache  # replaced wholesale on resync
            cache.expire()

    async def _reseed(self, held: tuple[list[BanRecord], list[BanRecord]], old_epoch: str) -> None:
        """Re-publish *held* records into a namespace that came back empty.

        One node wins ``SET {ns}:reseed NX``; event ids derived from the old
        epoch and the target make a re-publication by a second node (after the
        lock expired) a no-op.  An operator's ``banbus clear`` leaves a
        ``{ns}:cleared`` marker that stops it.
        """
        assert self._client is not None
        tag = "{" + self.namespace + "}"
        try:
            if await self._client.exists(f"{tag}:cleared"):
                log.info("banbus: %s was cleared on purpose; not re-seeding", self.namespace)
                return
            won = await self._client.set(f"{tag}:reseed", self.node_id, nx=True, px=60_000)
            if not won:
                return
            now = self._server_now()
            count = 0
            for records, name in ((held[0], "banbus_allow"), (held[1], "banbus_ban")):
                for start in range(0, len(records), 1000):
                    pipe = self._client.pipeline(transaction=False)
                    for record in records[start : start + 1000]:
                        left = record.expires - now if record.expires else 0
                        if record.expires and left <= 0:
                            continue
                        seconds = -(-left // 1000) if record.expires else 0
                        eid = "reseed." + old_epoch + "." + record.target.replace("/", "@")
                        pipe.fcall(name, 1, self.namespace, record.target, seconds,
                                   record.reason, "FORCE", "ORIGIN", record.origin or "fcall",
                                   "EID", eid[:128])  # fmt: skip
                        count += 1
                    await pipe.execute(raise_on_error=False)
            log.warning("banbus: namespace %r came back empty; %s re-published %d entries",
                        self.namespace, self.node_id, count)  # fmt: skip
        except redis_errors.RedisError as exc:
            log.error("banbus: re-seeding %r failed: %s", self.namespace, exc)

    async def _outbox_task(self) -> None:
        delay = self._backoff[0]
        while True:
            await self._outbox_wakeup.wait()
            self._outbox_wakeup = anyio.Event()
            while self._outbox:
                event = self._outbox[0]
                args: list[str | int]
                if isinstance(event, Ban | Allow):
                    left = max(0, event.expires - self._server_now()) if event.expires else 0
                    if event.expires and left == 0:
                        self._outbox.popleft()  # expired while waiting: nothing to publish
                        continue
                    seconds = -(-left // 1000) if event.expires else 0
                    args = [event.target, seconds, event.reason, "FORCE"]
                    if event.eid in self._replacing:
                        args.append("REPLACE")
                else:
                    args = [event.target]
                try:
                    reply = await self._fcall(event, args)
                except RedisUnavailable:
                    await anyio.sleep(delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, self._backoff[1])
                    continue
                except BanbusError as exc:
                    log.error("banbus: outbox %s %s refused by the server: %s; undone here",
                              _op(event), event.target, exc)  # fmt: skip
                    self._pending.pop(event.eid, None)
                    # Do not diverge: the cluster never got it, so neither do we.
                    if isinstance(event, Ban):
                        self._cache.apply(Unban(target=event.target))
                    elif isinstance(event, Allow):
                        self._cache.apply(Disallow(target=event.target))
                else:
                    if int(reply[0]):
                        self._ack(event.eid, int(reply[0]))
                    else:
                        self._pending.pop(event.eid, None)
                self._outbox.popleft()
                self._replacing.discard(event.eid)
                delay = self._backoff[0]


async def _aclose_shielded(client: aioredis.Redis) -> None:
    # Shielded: a node shut down by cancellation must still close its
    # connections (otherwise they leak and warn as unclosed).
    with anyio.CancelScope(shield=True):
        await client.aclose()


def _op(event: AnyEvent) -> str:
    return type(event).__name__.lower()


def _id_le(a: str, b: str) -> bool:
    """Stream id *a* <= *b*."""
    ams, _, aseq = a.partition("-")
    bms, _, bseq = b.partition("-")
    return (int(ams), int(aseq or 0)) <= (int(bms), int(bseq or 0))
