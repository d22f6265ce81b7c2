"""The connection index: live connections keyed by peer address, queried by ban target.

Theory of operation
-------------------

Every live connection is a :class:`TrackedConnection` filed under its
*normalised* peer address (``::ffff:a.b.c.d`` → ``a.b.c.d``, zone ids
stripped; :func:`_parse_peer`), so an IPv4 client seen through a dual-stack
socket is found by an IPv4 ban.  The address is kept as an integer, and each
address family has its own :class:`_Family`:

* ``by_addr``: address int → connections (a dict used as an insertion-ordered
  set, since one address often holds several connections);
* ``keys``: the distinct addresses, sorted (kept with :mod:`bisect`).

An **exact ban** is one dict probe.  A **CIDR ban** ``value/plen`` covers the
integer range ``[value, value | host bits]``: two bisections on ``keys`` give
exactly the tracked addresses inside it, so unrelated connections are never
visited whatever their number.  :meth:`_Family.pop_range` unindexes a whole
range with one slice deletion (deleting address by address would shift the
sorted list once per address).

The index only files and finds; deciding whether to cut, and calling the
closers, is the supervisor's job (:mod:`banbus._supervisor`).
"""

from __future__ import annotations

import logging
import socket
import time
from bisect import bisect_left, bisect_right, insort
from typing import TYPE_CHECKING, Final

from ._targets import normalize_peer

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

    from ._supervisor import Supervisor
    from ._transports import Mode

__all__ = ["TrackedConnection"]

log = logging.getLogger("banbus")

_AF_INET: Final = socket.AF_INET
_AF_INET6: Final = socket.AF_INET6
_pton: Final = socket.inet_pton
_from_bytes: Final = int.from_bytes

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
    except (OSError, ValueError):
        pass
    try:
        return peer, _AF_INET6, _from_bytes(_pton(_AF_INET6, peer))
    except (OSError, ValueError):
        return None


def _parse_network(target: str) -> tuple[int, int, int | None] | None:
    """``(family, network int, prefix length)`` of a canonical ban target, None if invalid.

    The prefix length is None for an exact address.
    """
    address, slash, prefix = target.partition("/")
    try:
        if ":" in address:
            family, value = _AF_INET6, _from_bytes(_pton(_AF_INET6, address))
        else:
            family, value = _AF_INET, _from_bytes(_pton(_AF_INET, address))
        return family, value, int(prefix) if slash else None
    except (OSError, ValueError):
        return None
