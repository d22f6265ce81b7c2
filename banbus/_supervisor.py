"""The connection supervisor: live connections indexed by peer, cut when a ban lands.

Theory of operation
-------------------

Every live connection a node serves is registered (*tracked*) with its
normalised peer address (``::ffff:a.b.c.d`` → ``a.b.c.d``, zone ids stripped)
and a *closer*.  The index has, per address family, a dict ``address int ->
connections`` and a sorted list of the distinct addresses (kept with
:mod:`bisect`):

* an **exact ban** is one dict probe;
* a **CIDR ban** is two bisections for ``[network, broadcast]`` and a walk over
  exactly the addresses inside it — unrelated connections are never visited.

The node calls :meth:`Supervisor._on_ban` synchronously, from the socket
callback that applied the stream event (or from ``Node.ban()`` for own bans),
so connections are cut before any other task runs.  Each covered address is
confirmed with ``node.is_banned`` first, so the allowlist always wins (and an
expired or lifted ban cuts nothing).

*Cutting* unregisters the connection first, then calls its closer: for
transports this is an abort — ``SO_LINGER (1, 0)`` then ``abort()``, so the
peer gets a TCP RST and the kernel drops unsent data — or, in ``"close"``
mode, a graceful ``close()``.  A connection from a banned peer is *refused*
when it is tracked (at accept), which is a plain ``is_banned`` check: an unban
or allow takes effect for the next connection at once.

Integrations (all built on :meth:`Supervisor.track`):

* :meth:`Supervisor.protect` wraps an ``asyncio.start_server`` handler
  ``(reader, writer)`` or an anyio ``listener.serve()`` handler ``(stream)``;
* :meth:`Supervisor.protocol` wraps an ``asyncio.Protocol`` factory;
* :meth:`Supervisor.track_transport` registers any asyncio transport;
* :mod:`banbus.asgi` and :mod:`banbus.uvicorn` for ASGI servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import socket
import struct
import time
from bisect import bisect_left, bisect_right, insort
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, TypeAlias

import anyio
import msgspec
from anyio.abc import SocketAttribute

from ._targets import normalize_peer

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable
    from types import TracebackType

    from anyio.abc import ByteStream

__all__ = ["Mode", "Supervisor", "SupervisorStatistics", "TrackedConnection"]

log = logging.getLogger("banbus")

Mode: TypeAlias = Literal["abort", "close"]
_MODES: Final = ("abort", "close")
_AF_INET: Final = socket.AF_INET
_AF_INET6: Final = socket.AF_INET6
_pton: Final = socket.inet_pton
_from_bytes: Final = int.from_bytes
#: ``struct linger {int l_onoff; int l_linger;}`` = (1, 0): close() sends RST.
_LINGER_RST: Final = struct.pack("ii", 1, 0)
_SOL_SOCKET: Final = socket.SOL_SOCKET
_SO_LINGER: Final = socket.SO_LINGER


class _NodeLike(Protocol):
    """What the supervisor needs from a node (tests pass a fake)."""

    def is_banned(self, ip: str) -> bool: ...

    def subscribe(self, callback: Callable[[str], None]) -> Callable[[], None]: ...


class SupervisorStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the supervisor's counters (see :meth:`Supervisor.statistics`)."""

    #: Connections tracked right now.
    tracked: int
    #: Distinct peer addresses among them.
    addresses: int
    #: Connections admitted since start (tracked, then untracked or cut).
    accepted: int
    #: Connections refused at accept because the peer was banned.
    refused: int
    #: Live connections cut because a ban landed: total, by exact-address bans
    #: and by network (CIDR) bans.
    cut: int
    cut_address: int
    cut_network: int
    #: Cuts requested through :meth:`Supervisor.recheck` (e.g. after an allow was lifted).
    cut_recheck: int
    #: Connections not protected: outside the ``ports``/``listeners`` filter,
    #: or without an IP peer (unix sockets).
    ignored: int
    #: Ban notifications handled.
    bans_seen: int
    mode: str


_TRACKED: Final = "tracked"


class TrackedConnection:
    """One connection registered with the supervisor.

    Returned by :meth:`Supervisor.track`.  :meth:`untrack` (alias
    :meth:`close`) unregisters it without touching the connection; it is also
    a context manager that untracks on exit.

    ``state`` is one of ``"tracked"``, ``"untracked"``, ``"refused"`` (the peer
    was banned at accept; the closer has been called), ``"cut"`` (a ban landed
    while it was open; the closer has been called) or ``"ignored"`` (not
    protected: outside the supervisor's ``ports``/``listeners`` filter, or
    no IP peer).
    """

    __slots__ = ("_closer", "_family", "_supervisor", "_value", "cut_at", "listener", "mode",
                 "peer", "port", "reason", "state")  # fmt: skip

    def __init__(
        self,
        supervisor: Supervisor,
        peer: str,
        closer: Callable[[], object],
        *,
        family: int,
        value: int,
        port: int | None,
        listener: str | None,
        mode: Mode,
    ) -> None:
        self._supervisor = supervisor
        #: Normalised peer address (``::ffff:1.2.3.4`` → ``1.2.3.4``).
        self.peer = peer
        self._closer = closer
        self._family = family
        self._value = value
        #: Local (listening) port, if known.
        self.port = port
        self.listener = listener
        self.mode: Mode = mode
        self.state = _TRACKED
        #: Why it was cut or refused: ``"ban <target>"``, ``"refused"`` …
        self.reason = ""
        #: ``time.perf_counter()`` when it was cut or refused.
        self.cut_at = 0.0

    @property
    def tracked(self) -> bool:
        """True while registered (neither untracked, cut nor refused)."""
        return self.state == _TRACKED

    @property
    def refused(self) -> bool:
        """True if the peer was banned when the connection was tracked."""
        return self.state == "refused"

    @property
    def cut(self) -> bool:
        """True if the supervisor closed it (cut by a ban, or refused at accept)."""
        return self.state in ("cut", "refused")

    def untrack(self) -> None:
        """Stop tracking (idempotent).  Does not close the connection."""
        if self.state == _TRACKED:
            self._supervisor._remove(self)
            self.state = "untracked"

    close = untrack

    def __enter__(self) -> TrackedConnection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.untrack()

    def _fire(self, state: str, reason: str) -> None:
        """Mark cut/refused and call the closer (the entry is already unindexed)."""
        self.state = state
        self.reason = reason
        self.cut_at = time.perf_counter()
        try:
            self._closer()
        except Exception:
            log.exception("banbus: closer for %s failed", self.peer)
        self._supervisor._announce(self)

    def __repr__(self) -> str:
        where = f" {self.listener}" if self.listener else ""
        where += f":{self.port}" if self.port is not None else ""
        extra = f" ({self.reason})" if self.reason else ""
        return f"<TrackedConnection {self.peer}{where} {self.state}{extra}>"


class _Family:
    """The index of one address family: address int -> connections, plus sorted keys."""

    __slots__ = ("bits", "by_addr", "keys")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        #: address -> connections (a dict used as an insertion-ordered set).
        self.by_addr: dict[int, dict[TrackedConnection, None]] = {}
        #: The distinct addresses, sorted, for range queries.
        self.keys: list[int] = []

    def add(self, conn: TrackedConnection) -> None:
        bucket = self.by_addr.get(conn._value)
        if bucket is None:
            bucket = self.by_addr[conn._value] = {}
            insort(self.keys, conn._value)
        bucket[conn] = None

    def discard(self, conn: TrackedConnection) -> bool:
        """Unindex *conn*; False if it was not indexed."""
        bucket = self.by_addr.get(conn._value)
        if bucket is None or conn not in bucket:
            return False
        del bucket[conn]
        if not bucket:
            del self.by_addr[conn._value]
            keys = self.keys
            i = bisect_left(keys, conn._value)
            if i < len(keys) and keys[i] == conn._value:
                del keys[i]
        return True

    def pop_range(self, value: int, plen: int) -> list[dict[TrackedConnection, None]]:
        """Remove and return the connections of every address inside ``value/plen``."""
        keys = self.keys
        last = value | ((1 << (self.bits - plen)) - 1)
        lo, hi = bisect_left(keys, value), bisect_right(keys, last)
        pop = self.by_addr.pop
        buckets = [pop(key) for key in keys[lo:hi]]
        del keys[lo:hi]
        return buckets

    def covered(self, value: int, plen: int) -> list[int]:
        """Tracked addresses inside ``value/plen``."""
        if plen >= self.bits:
            return [value] if value in self.by_addr else []
        keys = self.keys
        last = value | ((1 << (self.bits - plen)) - 1)
        return keys[bisect_left(keys, value) : bisect_right(keys, last)]


def _parse_peer(ip: str) -> tuple[str, int, int] | None:
    """``(normalised text, family, int)`` of a peer address, None if it is no IP."""
    peer = normalize_peer(ip)
    try:
        return peer, _AF_INET, _from_bytes(_pton(_AF_INET, peer))
    except OSError:
        pass
    try:
        return peer, _AF_INET6, _from_bytes(_pton(_AF_INET6, peer))
    except OSError:
        return None


def _set_rst(sock: Any) -> None:
    """Make close() send a TCP RST (``SO_LINGER`` on, 0 seconds)."""
    if sock is None:
        return
    try:
        sock.setsockopt(_SOL_SOCKET, _SO_LINGER, _LINGER_RST)
    except (OSError, AttributeError, ValueError):
        pass  # already closed, or not a TCP socket


def abort_transport(transport: asyncio.BaseTransport) -> None:
    """Abort *transport* so that the peer gets a TCP RST right away."""
    _TransportCloser(transport, "abort")()


class _TransportCloser:
    """Closer of a tracked transport; resolves the socket once, at track time.

    Cutting 10k connections at once is a loop over this, so it avoids
    per-call lookups.
    """

    __slots__ = ("_close", "_on_cut", "_sock")

    def __init__(
        self,
        transport: asyncio.BaseTransport,
        mode: Mode,
        on_cut: Callable[[], object] | None = None,
    ) -> None:
        abort = getattr(transport, "abort", None)
        if mode == "abort" and abort is not None:
            self._sock = transport.get_extra_info("socket")
            self._close: Callable[[], object] = abort
        else:
            self._sock = None
            self._close = transport.close
        self._on_cut = on_cut

    def __call__(self) -> None:
        if self._sock is not None:
            _set_rst(self._sock)
        self._close()
        if self._on_cut is not None:
            self._on_cut()


def _current_task() -> object:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


class Supervisor:
    """Live connections of one node, indexed by peer address; cut when a ban lands.

    Created by ``node.supervisor`` (one per node).  It subscribes to the
    node's bans at construction and unsubscribes on :meth:`close`.

    :param node: the :class:`~banbus.Node` (anything with ``is_banned`` and
        ``subscribe``).
    :param mode: ``"abort"`` (default: TCP RST, unsent data dropped) or
        ``"close"`` (graceful FIN after pending writes) for transports and
        streams the supervisor closes itself.
    :param ports: protect only connections to these local ports.
    :param listeners: protect only connections tracked with one of these
        listener names (``listener=`` of the integrations).
    """

    def __init__(
        self,
        node: _NodeLike,
        *,
        mode: Mode = "abort",
        ports: Iterable[int] | None = None,
        listeners: Iterable[str] | None = None,
    ) -> None:
        self._node = node
        self.mode: Mode = "abort"
        self.ports: frozenset[int] | None = None
        self.listeners: frozenset[str] | None = None
        self.configure(mode=mode, ports=ports, listeners=listeners)
        self._v4 = _Family(32)
        self._v6 = _Family(128)
        self._count = 0
        self._stats = dict.fromkeys(
            ("accepted", "refused", "cut_address", "cut_network", "cut_recheck", "ignored",
             "bans_seen"), 0,
        )  # fmt: skip
        self._watchers: list[Callable[[TrackedConnection], None]] = []
        self._unsubscribe: Callable[[], None] | None = node.subscribe(self._on_ban)

    def configure(
        self,
        *,
        mode: Mode | None = None,
        ports: Iterable[int] | Literal[False] | None = False,
        listeners: Iterable[str] | Literal[False] | None = False,
    ) -> Supervisor:
        """Change the options (see the class docstring); ``None`` lifts a filter.

        Applies to connections tracked from now on.  Returns the supervisor.
        """
        if mode is not None:
            if mode not in _MODES:
                raise ValueError(f"mode must be 'abort' or 'close', not {mode!r}")
            self.mode = mode
        if ports is not False:
            self.ports = None if ports is None else frozenset(int(p) for p in ports)
        if listeners is not False:
            self.listeners = None if listeners is None else frozenset(listeners)
        return self

    def close(self) -> None:
        """Stop listening for bans (tracked connections are left alone)."""
        if self._unsubscribe is not None:
            with contextlib.suppress(ValueError):
                self._unsubscribe()
            self._unsubscribe = None

    def __repr__(self) -> str:
        s = self._stats
        return (
            f"<banbus.Supervisor mode={self.mode} tracked={self._count} "
            f"refused={s['refused']} cut={s['cut_address'] + s['cut_network'] + s['cut_recheck']}>"
        )

    # -- registration ------------------------------------------------------------------

    def _covers(self, port: int | None, listener: str | None) -> bool:
        if self.ports is not None and port not in self.ports:
            return False
        return self.listeners is None or listener in self.listeners

    def track(
        self,
        ip: str,
        closer: Callable[[], object],
        *,
        port: int | None = None,
        listener: str | None = None,
        mode: Mode | None = None,
        refuse: bool = True,
    ) -> TrackedConnection:
        """Track one live connection from *ip*; *closer()* is called to cut it.

        If *ip* is banned right now (and *refuse* is true), *closer* is called
        at once and the returned connection is ``refused`` — check
        ``conn.tracked`` before serving.  Use the result as a context manager,
        or call :meth:`TrackedConnection.untrack` when the connection ends::

            with node.track(peer_ip, sock.close) as conn:
                if conn.tracked:
                    serve(sock)

        *closer* must be a quick synchronous callable that does not raise (it
        runs inside the callback that applied the ban); to stop async work,
        cancel a scope from it.

        :param port: the local port (for the ``ports`` filter).
        :param listener: a listener name (for the ``listeners`` filter).
        :param mode: recorded on the connection for closers that honour it.
        """
        mode = mode or self.mode
        parsed = _parse_peer(ip) if isinstance(ip, str) else None
        if parsed is None or not self._covers(port, listener):
            self._stats["ignored"] += 1
            conn = TrackedConnection(self, normalize_peer(ip) if isinstance(ip, str) else "",
                                     closer, family=0, value=0, port=port, listener=listener,
                                     mode=mode)  # fmt: skip
            conn.state = "ignored"
            return conn
        peer, family, value = parsed
        conn = TrackedConnection(self, peer, closer, family=family, value=value, port=port,
                                 listener=listener, mode=mode)  # fmt: skip
        if refuse and self._node.is_banned(peer):
            self._stats["refused"] += 1
            conn._fire("refused", "refused")
            return conn
        (self._v4 if family == _AF_INET else self._v6).add(conn)
        self._count += 1
        self._stats["accepted"] += 1
        return conn

    def _remove(self, conn: TrackedConnection) -> None:
        if (self._v4 if conn._family == _AF_INET else self._v6).discard(conn):
            self._count -= 1

    def track_transport(
        self,
        transport: asyncio.BaseTransport,
        *,
        listener: str | None = None,
        mode: Mode | None = None,
        on_cut: Callable[[], object] | None = None,
    ) -> TrackedConnection:
        """Track an asyncio transport; cutting aborts (RST) or closes it.

        A banned peer is refused: the transport is aborted before this returns.
        Call ``untrack()`` from ``connection_lost``.

        :param on_cut: also called after the transport was closed.
        """
        mode = mode or self.mode
        peername = transport.get_extra_info("peername")
        sockname = transport.get_extra_info("sockname")
        ip = peername[0] if isinstance(peername, tuple) and peername else ""
        port = sockname[1] if isinstance(sockname, tuple) and len(sockname) > 1 else None

        closer = _TransportCloser(transport, mode, on_cut)
        return self.track(ip, closer, port=port, listener=listener, mode=mode)

    # -- integrations --------------------------------------------------------------------

    def protect(
        self,
        handler: Callable[..., Awaitable[object]],
        *,
        listener: str | None = None,
        mode: Mode | None = None,
    ) -> Callable[..., Awaitable[None]]:
        """Wrap a connection handler so its connection is tracked while it runs.

        Works for ``asyncio.start_server`` handlers ``(reader, writer)`` and
        anyio ``listener.serve()`` handlers ``(stream)``::

            server = await asyncio.start_server(node.protect(handle), "0.0.0.0", 8080)
            await listener.serve(node.protect(handle_stream))

        A banned peer is refused (the handler never runs).  When a ban lands:

        * asyncio streams: the transport is aborted; the handler sees EOF on
          its next read (its task is not cancelled, so a handler that is itself
          banning the peer finishes publishing the ban);
        * anyio streams: the handler's cancel scope is cancelled and the stream
          closed (RST in abort mode).  If the handler itself issued the ban,
          the socket is shut down instead of cancelling the handler mid-call.

        The connection is untracked when the handler returns.
        """

        @functools.wraps(handler)
        async def protected(*args: Any) -> None:
            if len(args) == 2:
                await self._serve_asyncio(handler, args[0], args[1], listener, mode)
            elif len(args) == 1:
                await self._serve_anyio(handler, args[0], listener, mode)
            else:
                raise TypeError(
                    "a protected handler takes (reader, writer) for asyncio.start_server "
                    f"or (stream) for anyio listeners, not {len(args)} arguments"
                )

        return protected

    async def _serve_asyncio(
        self,
        handler: Callable[..., Awaitable[object]],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        listener: str | None,
        mode: Mode | None,
    ) -> None:
        conn = self.track_transport(writer.transport, listener=listener, mode=mode)
        if conn.cut:
            writer.close()  # already aborted; releases the writer
            return
        try:
            await handler(reader, writer)
        finally:
            conn.untrack()

    async def _serve_anyio(
        self,
        handler: Callable[..., Awaitable[object]],
        stream: ByteStream,
        listener: str | None,
        mode: Mode | None,
    ) -> None:
        mode = mode or self.mode
        remote = stream.extra(SocketAttribute.remote_address, None)
        ip = remote[0] if isinstance(remote, tuple) else ""
        port = stream.extra(SocketAttribute.local_port, None)
        raw = stream.extra(SocketAttribute.raw_socket, None)
        scope = anyio.CancelScope()
        task = _current_task()

        def closer() -> None:
            if mode == "abort":
                _set_rst(raw)
            if _current_task() is task and raw is not None:
                # The handler itself is banning its peer: cancelling it now
                # would interrupt the ban's publication.  Shut the socket
                # instead; the handler's next I/O fails.
                with contextlib.suppress(OSError):
                    raw.shutdown(socket.SHUT_RDWR)
            else:
                scope.cancel()

        conn = self.track(ip, closer, port=port, listener=listener, mode=mode)
        try:
            if conn.tracked:
                with scope:
                    await handler(stream)
        finally:
            conn.untrack()
            if conn.cut:
                with anyio.CancelScope(shield=True):
                    await anyio.aclose_forcefully(stream)

    def protocol(
        self,
        factory: Callable[[], asyncio.BaseProtocol],
        *,
        listener: str | None = None,
        mode: Mode | None = None,
    ) -> Callable[[], asyncio.BaseProtocol]:
        """Wrap an ``asyncio.Protocol`` factory (``loop.create_server(...)``).

        Each protocol is wrapped in a proxy that tracks its transport in
        ``connection_made`` (a banned peer is aborted before the inner
        protocol sees the connection) and untracks in ``connection_lost``.
        """

        def make() -> asyncio.BaseProtocol:
            inner = factory()
            if isinstance(inner, asyncio.BufferedProtocol):
                return _GuardedBufferedProtocol(self, inner, listener, mode)
            return _GuardedProtocol(self, inner, listener, mode)  # type: ignore[arg-type]

        return make

    # -- cutting ---------------------------------------------------------------------------

    def _on_ban(self, target: str) -> None:
        """Node callback: *target* was just banned (canonical text)."""
        self._stats["bans_seen"] += 1
        if self._count:
            self._cut(target, "")

    def recheck(self, target: str | None = None) -> int:
        """Cut tracked connections that are banned now; return how many.

        With *target* (an address or network in canonical form) only the
        connections it covers are checked; without, all of them (a scan:
        for after a resync or a lifted allowlist entry).
        """
        if target is not None:
            return self._cut(target, "cut_recheck")
        cut = 0
        for family in (self._v4, self._v6):
            for value in list(family.by_addr):
                bucket = family.by_addr.get(value)
                if bucket:
                    cut += self._cut_bucket(bucket, "cut_recheck", "recheck")
        return cut

    def _cut(self, target: str, kind: str) -> int:
        address, slash, prefix = target.partition("/")
        try:
            if ":" in address:
                family = self._v6
                value = _from_bytes(_pton(_AF_INET6, address))
            else:
                family = self._v4
                value = _from_bytes(_pton(_AF_INET, address))
            plen = int(prefix) if slash else family.bits
        except (OSError, ValueError):
            return 0
        if plen >= family.bits:
            bucket = family.by_addr.get(value)
            if bucket is None:
                return 0
            return self._cut_bucket(bucket, kind or "cut_address", f"ban {target}")
        cut = 0
        reason = f"ban {target}"
        counter = kind or "cut_network"
        covered = family.covered(value, plen)
        if len(covered) > 1 and self._covers_all(target):
            # Every covered address is banned: unindex the whole range in one
            # slice deletion (per-address deletes would memmove the sorted
            # list once each), then cut.
            conns = [conn for bucket in family.pop_range(value, plen) for conn in bucket]
            for conn in conns:  # first all out of the index, so closers may untrack freely
                conn.state = "cut"
            self._count -= len(conns)
            self._stats[counter] += len(conns)
            # A burst of thousands of closes allocates enough to trigger full
            # collections over every live connection object; defer them.
            pause_gc = len(conns) > 1000 and gc.isenabled()
            if pause_gc:
                gc.disable()
            try:
                for conn in conns:
                    conn._fire("cut", reason)
            finally:
                if pause_gc:
                    gc.enable()
            return len(conns)
        for key in covered:
            bucket = family.by_addr.get(key)
            if bucket:
                cut += self._cut_bucket(bucket, counter, reason)
        return cut

    def _covers_all(self, network: str) -> bool:
        """True if every address in *network* is banned now: no per-address check needed.

        Holds when the network itself is an active ban and the allowlist is
        empty (the only thing that could exempt an address inside it).
        Only a real node's cache can tell; otherwise check each address.
        """
        cache = getattr(self._node, "cache", None)
        if cache is None:
            return False
        try:
            return cache.allow_count == 0 and cache.get(network) is not None
        except Exception:
            return False

    def _cut_bucket(
        self,
        bucket: dict[TrackedConnection, None],
        counter: str,
        reason: str,
    ) -> int:
        if not self._node.is_banned(next(iter(bucket)).peer):
            return 0
        conns = [conn for conn in bucket if conn.state == _TRACKED]
        for conn in conns:  # first all out of the index, so closers may untrack freely
            self._remove(conn)
            conn.state = "cut"
        self._stats[counter] += len(conns)
        for conn in conns:
            conn._fire("cut", reason)
        return len(conns)

    def _announce(self, conn: TrackedConnection) -> None:
        for watcher in self._watchers:
            try:
                watcher(conn)
            except Exception:
                log.exception("banbus: supervisor watcher %r failed", watcher)

    def watch(self, callback: Callable[[TrackedConnection], None]) -> Callable[[], None]:
        """Call *callback(conn)* right after a connection is cut or refused.

        Runs synchronously in the apply path: keep it quick.  Returns a
        function that removes the watcher.
        """
        self._watchers.append(callback)
        return lambda: self._watchers.remove(callback)

    # -- inspection ------------------------------------------------------------------------

    def connections(self, ip: str | None = None) -> list[TrackedConnection]:
        """The tracked connections (of peer *ip*, if given)."""
        if ip is None:
            return [c for f in (self._v4, self._v6) for b in f.by_addr.values() for c in b]
        parsed = _parse_peer(ip)
        if parsed is None:
            return []
        _, family, value = parsed
        bucket = (self._v4 if family == _AF_INET else self._v6).by_addr.get(value)
        return list(bucket) if bucket else []

    def __len__(self) -> int:
        return self._count

    def statistics(self) -> SupervisorStatistics:
        """Counters of this supervisor (a frozen snapshot)."""
        s = self._stats
        return SupervisorStatistics(
            tracked=self._count,
            addresses=len(self._v4.by_addr) + len(self._v6.by_addr),
            accepted=s["accepted"],
            refused=s["refused"],
            cut=s["cut_address"] + s["cut_network"] + s["cut_recheck"],
            cut_address=s["cut_address"],
            cut_network=s["cut_network"],
            cut_recheck=s["cut_recheck"],
            ignored=s["ignored"],
            bans_seen=s["bans_seen"],
            mode=self.mode,
        )


class _GuardedProtocol(asyncio.Protocol):
    """Proxy protocol: tracks the transport, forwards everything to the inner one."""

    def __init__(
        self,
        supervisor: Supervisor,
        inner: asyncio.Protocol,
        listener: str | None,
        mode: Mode | None,
    ) -> None:
        self._supervisor = supervisor
        self._inner = inner
        self._listener = listener
        self._mode = mode
        self._conn: TrackedConnection | None = None

    @property
    def inner(self) -> asyncio.BaseProtocol:
        """The wrapped protocol."""
        return self._inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        conn = self._supervisor.track_transport(transport, listener=self._listener,
                                                mode=self._mode)  # fmt: skip
        self._conn = conn
        if not conn.cut:
            self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self._conn
        if conn is None or conn.refused:
            return  # the inner protocol never saw this connection
        conn.untrack()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()


class _GuardedBufferedProtocol(_GuardedProtocol, asyncio.BufferedProtocol):
    _inner: asyncio.BufferedProtocol  # type: ignore[assignment]

    def __init__(
        self,
        supervisor: Supervisor,
        inner: asyncio.BufferedProtocol,
        listener: str | None,
        mode: Mode | None,
    ) -> None:
        super().__init__(supervisor, inner, listener, mode)  # type: ignore[arg-type]

    def get_buffer(self, sizehint: int) -> Any:
        return self._inner.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._inner.buffer_updated(nbytes)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()
