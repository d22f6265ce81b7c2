"""The connection supervisor: track live connections, cut them when a ban lands.

Theory of operation
-------------------

The supervisor depends on its node through one public protocol,
:class:`BanSource`: ``is_banned(ip)`` and ``subscribe(callback)``.

*Tracking* (:meth:`Supervisor.track`) files a connection with its normalised
peer address and a *closer* in the connection index
(:mod:`banbus._connections`).  A peer that is banned at that moment is
*refused* instead: its closer is called at once and nothing is filed.  That
is a plain ``is_banned`` check, so an unban or a new allowlist entry takes
effect for the next connection at once.  Connections outside the
``ports``/``listeners`` filter, or without an IP peer, are *ignored*.

*Cutting*: the supervisor subscribes to its source at construction.  The
node calls :meth:`Supervisor._on_ban` synchronously — from the socket
callback that applied the stream event, or from ``Node.ban()`` for its own
bans — whenever a ban lands or an allowlist entry is lifted, so covered
connections are cut before any other task runs.  The index yields the
tracked addresses the target covers (one probe for an address, two
bisections for a network); each is confirmed with ``is_banned`` first, so
the allowlist always wins and an expired or lifted ban cuts nothing.
All the connections to cut are unindexed first (so a closer may untrack
freely), then each closer is called, followed by the :meth:`Supervisor.watch`
callbacks.  How a
closer closes is :mod:`banbus._transports`' business (abort with RST, or a
graceful close); the server integrations are in :mod:`banbus._integrations`.

:meth:`Supervisor.recheck` runs the same cut on demand: for one target, or
as a scan of every tracked address.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from typing import TYPE_CHECKING, Literal, Protocol

import msgspec

from . import _integrations
from ._connections import (
    _AF_INET,
    _AF_INET6,
    _TRACKED,
    TrackedConnection,
    _Family,
    _parse_network,
    _parse_peer,
)
from ._targets import normalize_peer
from ._transports import _MODES, Mode

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Awaitable, Callable, Iterable

__all__ = ["BanSource", "Mode", "Supervisor", "SupervisorStatistics", "TrackedConnection"]

log = logging.getLogger("banbus")


class BanSource(Protocol):
    """What a :class:`Supervisor` needs from its node (:class:`~banbus.Node` is one).

    ``subscribe`` must call *callback(target)* synchronously whenever a ban
    lands or an allowlist entry is lifted (*target* in canonical form: an
    address or a network), and return a function that unsubscribes.
    """

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


class Supervisor:
    """Live connections of one node, indexed by peer address; cut when a ban lands.

    Created by ``node.supervisor`` (one per node).  It subscribes to the
    node's bans at construction and unsubscribes on :meth:`close`.

    :param node: the :class:`~banbus.Node`, or any other :class:`BanSource`.
    :param mode: ``"abort"`` (default: TCP RST, unsent data dropped) or
        ``"close"`` (graceful FIN after pending writes) for transports and
        streams the supervisor closes itself.
    :param ports: protect only connections to these local ports.
    :param listeners: protect only connections tracked with one of these
        listener names (``listener=`` of the integrations).
    """

    def __init__(
        self,
        node: BanSource,
        *,
        mode: Mode = "abort",
        ports: Iterable[int] | None = None,
        listeners: Iterable[str] | None = None,
    ) -> None:
        self._source = node
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
        if refuse and self._source.is_banned(peer):
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
        return _integrations.track_transport(self, transport, listener=listener, mode=mode,
                                             on_cut=on_cut)  # fmt: skip

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
        return _integrations.protect(self, handler, listener=listener, mode=mode)

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
        return _integrations.protocol(self, factory, listener=listener, mode=mode)

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
        parsed = _parse_network(target)
        if parsed is None:
            return 0
        af, value, plen = parsed
        family = self._v6 if af == _AF_INET6 else self._v4
        reason = f"ban {target}"
        if plen is None or plen >= family.bits:
            bucket = family.by_addr.get(value)
            if bucket is None:
                return 0
            return self._cut_bucket(bucket, kind or "cut_address", reason)
        counter = kind or "cut_network"
        by_addr = family.by_addr
        covered = family.covered(value, plen)
        # Confirm each covered address once (the allowlist may exempt some).
        is_banned = self._source.is_banned
        banned = [key for key in covered if is_banned(next(iter(by_addr[key])).peer)]
        if len(banned) > 1 and len(banned) == len(covered):
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
        cut = 0
        for key in banned:
            bucket = by_addr.get(key)  # an earlier closer may have untracked it
            if bucket:
                cut += self._cut_tracked(bucket, counter, reason)
        return cut

    def _cut_bucket(
        self,
        bucket: dict[TrackedConnection, None],
        counter: str,
        reason: str,
    ) -> int:
        """Cut the connections of one address if it is banned now."""
        if not self._source.is_banned(next(iter(bucket)).peer):
            return 0
        return self._cut_tracked(bucket, counter, reason)

    def _cut_tracked(
        self,
        bucket: dict[TrackedConnection, None],
        counter: str,
        reason: str,
    ) -> int:
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
