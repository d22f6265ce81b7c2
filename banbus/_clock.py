"""The server clock, as a node sees it.

Every expiry in banbus is an absolute time on the *Redis server's* clock
(the function library reads ``TIME``), so that all nodes expire a ban at the
same moment whatever their own clocks say.  A node estimates the server clock
as ``local() + offset``:

* ``local`` is a monotonic clock that keeps counting while the host is
  suspended (``CLOCK_BOOTTIME`` on Linux, else ``time.monotonic``), so
  expiry stays right while Redis is unreachable;
* ``offset`` is measured from round trips (:meth:`ServerClock.observe`): the
  server's time is taken to be at the midpoint of the request and the reply.
  A slow round trip says little, so one taking more than
  :data:`_TRUSTED_RTT_MS` is ignored — unless no good one came for
  :data:`_STALE_MS`, when any measurement beats an old one.

The node re-measures on a schedule (:meth:`ServerClock.run`, every
*interval* seconds), not only when its reader is idle: under steady traffic
the reader never idles, and a clock that jumped (a suspended VM whose clock
source did not count the suspension, a migrated guest) must be corrected
within an interval.  Listeners registered with :meth:`ServerClock.on_change`
hear of every correction larger than a millisecond, so the expiry sweep
re-plans at once.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Final

import anyio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["ServerClock", "local_clock_ms"]

log = logging.getLogger("banbus")

#: A round trip slower than this is not used to correct the offset…
_TRUSTED_RTT_MS: Final = 50.0
#: …unless the last trusted measurement is older than this.
_STALE_MS: Final = 30_000

try:
    _BOOTTIME: int | None = time.CLOCK_BOOTTIME
except AttributeError:  # pragma: no cover - not Linux
    _BOOTTIME = None


_gettime_ns: Final = time.clock_gettime_ns


def local_clock_ms() -> int:
    """Milliseconds of a monotonic clock that counts host suspension (Linux)."""
    if _BOOTTIME is not None:
        return time.clock_gettime_ns(_BOOTTIME) // 1_000_000
    return time.monotonic_ns() // 1_000_000  # pragma: no cover - not Linux


class ServerClock:
    """The node's estimate of the Redis server clock, in milliseconds.

    :param local: the local monotonic clock in ms (tests inject a fake one).
    :param measured: False: never measure; *local* is taken to be the server's
        clock itself (tests that move time by hand).
    """

    __slots__ = (
        "_boottime", "_listeners", "_local", "_measured", "_trusted_at", "measurements", "offset",
    )  # fmt: skip

    def __init__(self, local: Callable[[], int] = local_clock_ms, *, measured: bool = True) -> None:
        self._local = local
        self._boottime = local is local_clock_ms and _BOOTTIME is not None
        self._measured = measured
        #: Server time minus local time, ms.  Until the first measurement the
        #: server's clock is taken to be this host's wall clock (a node that
        #: starts from its state file while Redis is away plans expiry with it).
        self.offset = time.time_ns() // 1_000_000 - local() if measured else 0
        #: Round trips used to set the offset.
        self.measurements = 0
        self._trusted_at: int | None = None
        self._listeners: list[Callable[[], None]] = []

    def now(self) -> int:
        """The server's time now, in ms (its ``TIME``, as estimated here)."""
        if self._boottime:  # local_clock_ms, inlined: is_banned reads this on a hit
            return _gettime_ns(_BOOTTIME) // 1_000_000 + self.offset  # type: ignore[arg-type]
        return self._local() + self.offset

    def local(self) -> int:
        """The local monotonic clock, in ms."""
        return self._local()

    @property
    def measured(self) -> bool:
        return self._trusted_at is not None

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call *callback()* whenever a measurement moves the offset by more than 1 ms."""
        self._listeners.append(callback)

    def observe(self, server_ms: int, sent_ms: int, received_ms: int) -> bool:
        """Use one round trip: *server_ms* was read between local *sent_ms* and *received_ms*.

        Returns True if the offset was (re)set from it.
        """
        if not self._measured:
            return False
        rtt = received_ms - sent_ms
        now = received_ms
        if (
            rtt > _TRUSTED_RTT_MS
            and self._trusted_at is not None
            and now - self._trusted_at < _STALE_MS
        ):
            return False
        offset = server_ms - (sent_ms + received_ms) // 2
        moved = offset - self.offset
        self.offset = offset
        self.measurements += 1
        self._trusted_at = now
        if abs(moved) > 1:
            if abs(moved) > 1000:
                log.warning(
                    "banbus: the server clock is %+d ms from %s",
                    moved, "our last measurement" if self.measurements > 1 else "this host's",
                )  # fmt: skip
            for callback in self._listeners:
                callback()
        return True

    async def measure(self, read_server_ms: Callable[[], Awaitable[int]]) -> bool:
        """One round trip through *read_server_ms* (returns the server's time in ms)."""
        sent = self._local()
        server_ms = await read_server_ms()
        return self.observe(server_ms, sent, self._local())

    async def run(self, read_server_ms: Callable[[], Awaitable[int]], interval: float) -> None:
        """Re-measure every *interval* seconds, forever; failures keep the last offset."""
        if not self._measured:
            return
        while True:
            await anyio.sleep(interval)
            try:
                with anyio.fail_after(max(interval, 1.0)):
                    await self.measure(read_server_ms)
            except Exception as exc:  # Redis unreachable: the local clock carries on
                log.debug("banbus: clock measurement failed: %s", exc)
