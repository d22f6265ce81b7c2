"""Structured INFO logs of bans applied and connections cut, off the hot path.

Enabled when the ``banbus.events`` logger is enabled for INFO when the node
starts (``logging.getLogger("banbus.events").setLevel(logging.INFO)``, or a
root logger at INFO); otherwise nothing is registered and nothing is paid.
The apply path and the supervisor only append to a bounded queue; a task
writes the lines every 100 ms.  One line per event, ``key=value`` pairs
(values with spaces quoted as JSON), the same fields in ``record.banbus``
(a dict) for structured handlers::

    ban applied target=203.0.113.7 origin=mx1 reason="scan: 3 in 5m"
        expires=2026-11-29T11:00:00Z seq=42 lag_ms=0.6 node=mx2
    connection cut peer=203.0.113.7 port=8080 listener=asgi how=cut mode=abort
        reason="banned by 203.0.113.7" node=mx2

(each on one line).

When more than *limit* events wait (a burst, a bootstrap of a blocklist),
the oldest are dropped and one line says how many.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._connections import TrackedConnection
    from ._model import Entry

__all__ = ["EventLog", "enabled"]

events_log = logging.getLogger("banbus.events")


def enabled() -> bool:
    return events_log.isEnabledFor(logging.INFO)


def _value(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text)
    return text


def _stamp(ms: int) -> str:
    if not ms:
        return "permanent"
    when = dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="seconds")
    return when.replace("+00:00", "Z")


class EventLog:
    def __init__(
        self,
        *,
        node_id: str,
        lookup: Callable[[str], Entry | None],
        lag: Callable[[], float],
        limit: int = 10_000,
    ) -> None:
        self._node_id = node_id
        self._lookup = lookup
        self._lag = lag
        self._queue: deque[tuple[str, Any, float]] = deque()
        self._limit = limit
        self.dropped = 0
        self.written = 0

    # The apply path: an append, nothing else.
    def ban_landed(self, target: str) -> None:
        self._push("ban", target)

    def connection_cut(self, conn: TrackedConnection) -> None:
        self._push("cut", conn)

    def _push(self, kind: str, item: Any) -> None:
        queue = self._queue
        if len(queue) >= self._limit:
            queue.popleft()
            self.dropped += 1
        queue.append((kind, item, self._lag()))

    async def run(self) -> None:
        try:
            while True:
                await anyio.sleep(0.1)
                self.flush()
        finally:
            self.flush()

    def flush(self) -> None:
        queue = self._queue
        if self.dropped:
            events_log.warning("events dropped count=%d (more than %d waiting)", self.dropped,
                               self._limit)  # fmt: skip
            self.dropped = 0
        while queue:
            kind, item, lag = queue.popleft()
            if kind == "ban":
                self._ban(item, lag)
            else:
                self._cut(item)
            self.written += 1

    def _ban(self, target: str, lag: float) -> None:
        record = self._lookup(target)
        if record is None:
            return  # lifted since
        fields = {"target": target, "origin": record.origin, "reason": record.reason,
                  "expires": _stamp(record.expires), "seq": record.seq,
                  "lag_ms": round(lag, 3), "node": self._node_id}  # fmt: skip
        self._emit("ban applied", fields)

    def _cut(self, conn: TrackedConnection) -> None:
        fields = {"peer": conn.peer, "port": conn.port if conn.port is not None else "-",
                  "listener": conn.listener or "-", "how": conn.state, "mode": conn.mode,
                  "reason": conn.reason, "node": self._node_id}  # fmt: skip
        self._emit("connection cut", fields)

    @staticmethod
    def _emit(what: str, fields: dict[str, Any]) -> None:
        line = " ".join(f"{key}={_value(value)}" for key, value in fields.items())
        events_log.info("%s %s", what, line, extra={"banbus": {"event": what, **fields}})
