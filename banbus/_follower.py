"""The stream follower: read ``{ns}:log`` in order, apply, and notice what is wrong.

Theory of operation
-------------------

Delivery is *at least once, in order, with gap detection*.  The follower
keeps the node's **position**: the id of the last entry it consumed
(``cursor``), the seq of the last event it applied (``seq``) and the
namespace's ``epoch``.  Each event the function library writes carries the
next seq, so the follower applies an entry only when its seq is exactly
``seq + 1``.

**One read-ahead engine** serves catch-up (after a snapshot, up to a target
id) and the steady state: ``XREAD`` calls chained from the reply callback
itself.  Each reply is applied inside ``data_received``, and the next read
goes out from there too, so a ban costs one callback per node — no task
wake-up — and reaches the connection supervisor before any other task runs.
A full batch sends a non-blocking read *before* it is applied (Redis and the
network work meanwhile); otherwise the next read blocks (``BLOCK``).  The
chain stops, and :meth:`Follower.follow` returns, when:

* ``"caught_up"`` — catch-up reached its target id;
* ``"idle"`` — a blocking read timed out (the task then checks the head);
* ``"anomaly"`` — an entry's seq is not the next one (see below);
* ``"digest"`` — an anti-entropy comparison is due (see ``_reseed``).

No reply for ``block + 5 s`` means a dead connection (``TimeoutError``).

**Bad entries** (malformed, not written by the library, an invalid target)
are logged, counted and skipped; the cursor moves past them and the seq
does not, so a hand-written entry cannot make the next real one look
out of order.

**Anomalies** are judged against the library's *head* (``banbus_state``: the
seq and id of the last event it wrote, and the epoch) and against the
node's own last entry, which must still be in the stream.  :meth:`verify`
returns one verdict:

* ``SKIP`` — the entry claims a seq the library never wrote (beyond the
  head) or one already applied: a forgery or a duplicate, skipped;
* ``GAP`` — events were missed (the stream was trimmed past the cursor, it
  moved behind the cursor): reload the record, nothing was lost;
* ``FORGED`` — the node's last applied entry is not the library's (an entry
  added by hand with the next seq): its id is remembered and skipped from
  now on, and the record is reloaded;
* ``LOSS`` — the record lost data: the epoch changed (Redis restarted empty,
  FLUSHALL, an operator reset it), the head went back behind the node, or the
  node's last entry vanished from a stream that was not trimmed past it
  (a failover lost writes).  Reload, then re-seed what is missing
  (``_reseed``);
* ``OK`` — nothing to do.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from enum import Enum
from itertools import chain, repeat
from typing import TYPE_CHECKING, Any, Final, Literal

import anyio
import msgspec

from ._exceptions import InvalidInput
from ._model import Ban, Clear, Notice, TargetEvent, Unban, ban_columns, ban_fields, decode_flat
from ._packed import earliest_of
from ._targets import STRICT_PTON, parse_target

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._cache import BanCache, Kind
    from ._clock import ServerClock
    from ._keys import Keys
    from ._publisher import Publisher
    from ._reseed import Reseeder
    from ._resp import ReaderConnection

__all__ = ["Follower", "Outcome", "Verdict", "id_le", "valid_target"]

log = logging.getLogger("banbus")

_AF_INET: Final = socket.AF_INET
_pton: Final = socket.inet_pton
_ntop: Final = socket.inet_ntop
#: Entry ids found forged, skipped when read again (bounded).
_FORGED_LIMIT: Final = 1024
#: Batches of this many entries or more try the column path (Follower._apply_columns).
_COLUMNS_FROM: Final = 64

Outcome = Literal["caught_up", "idle", "anomaly", "digest"]


class Verdict(Enum):
    OK = "ok"
    SKIP = "skip"
    GAP = "gap"
    FORGED = "forged"
    LOSS = "loss"


def id_le(a: str, b: str) -> bool:
    """Stream id *a* <= *b*."""
    ams, _, aseq = a.partition("-")
    bms, _, bseq = b.partition("-")
    return (int(ams), int(aseq or 0)) <= (int(bms), int(bseq or 0))


def valid_target(target: str) -> bool:
    """Is *target* canonical text a node may store?  (Stream and record input.)"""
    try:
        if _ntop(_AF_INET, _pton(_AF_INET, target)) == target:
            return True  # the common case: a canonical IPv4 address, no parsing
    except (OSError, ValueError):
        pass
    try:
        return parse_target(target, force=True).text == target
    except InvalidInput:
        return False


class Follower:
    """The node's position in the stream, and the reader that advances it.

    :param keys: the namespace's keys.
    :param cache: the view events are applied to.
    :param publisher: told about events on targets with own writes pending.
    :param reseeder: told about events on targets it is restoring.
    :param clock: the server clock (expiry of applied bans, lag).
    :param notify: called with a target when bans under it may now apply.
    :param applied: called after each batch that applied events.
    :param batch: entries per ``XREAD``.
    :param block_ms: how long a blocking ``XREAD`` waits.
    """

    def __init__(
        self,
        keys: Keys,
        *,
        cache: BanCache,
        publisher: Publisher,
        reseeder: Reseeder,
        clock: ServerClock,
        notify: Callable[[str], None],
        applied: Callable[[], None],
        batch: int,
        block_ms: int,
    ) -> None:
        self._keys = keys
        self._cache = cache
        self._publisher = publisher
        self._reseeder = reseeder
        self._clock = clock
        self._notify = notify
        self._applied = applied
        self.batch = batch
        self._block_ms = block_ms
        #: The last entry consumed (applied or skipped).
        self.cursor = "0-0"
        #: The last event applied: its seq and entry id.
        self.seq = 0
        self.last_id = "0-0"
        self.epoch = ""
        #: An entry repeated a seq already applied: one of the two was forged.
        #: The anti-entropy compares at once (see _reseed).
        self.suspect = False
        self._probed = 0
        #: The entry that stopped the chain: (id, seq).
        self.anomaly: tuple[str, int] | None = None
        self._forged: set[str] = set()
        self._forged_order: deque[str] = deque()
        #: Is a comparison due?  (Set by the anti-entropy; checked before a blocking read.)
        self.digest_due: Callable[[], bool] = lambda: False
        #: Does anybody listen to ban notifications?  (Skips the call when not.)
        self.listening: Callable[[], bool] = lambda: True
        #: Called each time the follower has caught up and waits on a blocking
        #: read (the node's cache packs its recent changes then).
        self.idle: Callable[[], None] = lambda: None
        self.stats = dict.fromkeys(
            ("applied", "skipped", "own", "forged", "notices", "would_ban"), 0
        )
        self.lag_ms = 0.0
        self.max_lag_ms = 0.0
        self._skip_logged = 0

    # -- position ----------------------------------------------------------------------

    def reset(self, cursor: str, seq: int, epoch: str) -> None:
        """Move to a snapshot's watermark."""
        self.cursor, self.seq, self.epoch = cursor, seq, epoch
        self.last_id = cursor
        self.anomaly = None
        self._applied()

    def skip_anomaly(self) -> None:
        """Move past the entry that stopped the chain (judged a forgery or a duplicate)."""
        if self.anomaly is not None:
            entry_id, seq = self.anomaly
            self.skip(f"stream entry {entry_id}", f"seq {seq} is a duplicate or was not "
                       "written by the library")  # fmt: skip
            self.cursor = self.anomaly[0]
            self.anomaly = None

    def forged(self, entry_id: str) -> None:
        """Remember *entry_id* as not written by the library: skip it from now on."""
        if entry_id in self._forged:
            return
        self.stats["forged"] += 1
        self._forged.add(entry_id)
        self._forged_order.append(entry_id)
        if len(self._forged_order) > _FORGED_LIMIT:
            self._forged.discard(self._forged_order.popleft())

    def skip(self, what: str, why: str) -> None:
        """Count (and log, the first hundred times) a malformed entry that was skipped."""
        self.stats["skipped"] += 1
        if self._skip_logged < 100:
            self._skip_logged += 1
            log.warning("banbus: skipped %s: %s", what, why)

    # -- reading -----------------------------------------------------------------------

    async def follow(self, conn: ReaderConnection, *, until: str | None = None) -> Outcome:
        """Read and apply until the chain stops; return why (see the module docstring).

        *until*: catch up to this entry id and return ``"caught_up"``.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Outcome] = loop.create_future()
        key, batch, block_ms = self._keys.log, self.batch, self._block_ms
        last_reply = [time.monotonic()]

        def finish(result: Outcome | BaseException) -> None:
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
                future = conn.call("XREAD", "COUNT", batch, "BLOCK", block_ms, "STREAMS", key,
                                   cursor, sink=on_block)  # fmt: skip
            else:
                future = conn.call("XREAD", "COUNT", batch, "STREAMS", key, cursor,
                                   sink=on_ahead)  # fmt: skip
            future.add_done_callback(failed)

        def next_read() -> None:
            if until is not None:
                finish("caught_up")  # the stream has nothing more right now
                return
            self.idle()  # caught up with the stream: the node's housekeeping
            if not self.epoch and self.seq and self._probed != self.seq:
                # Learn the epoch of a namespace created since we started
                # (once per position: verify() adopts it when it can).
                self._probed = self.seq
                finish("idle")
            elif self.digest_due():
                finish("digest")
            else:
                send(self.cursor, True)

        def on_reply(reply: Any, blocking: bool) -> None:
            last_reply[0] = time.monotonic()
            if done.done():
                return  # a read sent before the chain stopped
            if not reply:  # nil on timeout (fakeredis: an empty array)
                if blocking:
                    finish("idle")
                else:
                    next_read()
                return
            entries = reply[0][1]
            full = len(entries) >= batch
            if full and (until is None or not id_le(until, entries[-1][0])):
                # More is likely waiting: ask for it now, so Redis and the
                # network work while this batch is applied.
                send(entries[-1][0], False)
            if not self.apply(entries):
                finish("anomaly")
            elif until is not None and id_le(until, self.cursor):
                finish("caught_up")
            elif not full:
                next_read()

        def on_block(reply: Any) -> None:
            on_reply(reply, True)

        def on_ahead(reply: Any) -> None:
            on_reply(reply, False)

        if until is not None and id_le(until, self.cursor):
            return "caught_up"
        send(self.cursor, until is None and not self.digest_due())
        limit = block_ms / 1000 + 5.0
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

    def apply(self, entries: list[Any]) -> bool:
        """Validate and apply stream entries in order; False when one is out of sequence.

        Runs inside the socket callback: this is every node's per-event hot path.
        A batch of bans from a burst takes :meth:`_apply_columns`.
        """
        if len(entries) >= _COLUMNS_FROM and self._apply_columns(entries):
            return True
        stats = self.stats
        cache = self._cache
        store = cache.store_address
        publisher = self._publisher
        slots_b, slots_a = publisher.slots_b, publisher.slots_a
        reseeder = self._reseeder
        held_b, held_a = reseeder.held_b, reseeder.held_a
        notify = self._notify if self.listening() else None
        # Own writes or re-seed candidates pending on some target?  (Rarely:
        # checked per event only then.)
        watching = bool(slots_b or slots_a or held_b or held_a)
        forged = self._forged
        ntop, pton, af, strict = _ntop, _pton, _AF_INET, STRICT_PTON
        now = self._clock.now()
        seq = self.seq
        cursor = self.cursor
        last_id = self.last_id
        applied = own = 0
        ok = True
        for entry_id, fields in entries:
            if forged and entry_id in forged:
                cursor = entry_id
                stats["skipped"] += 1
                continue
            # Fast path: a ban/allow of an IPv4 address in the library's layout,
            # in sequence.  Everything else takes the general path below.
            fast = ban_fields(fields) if fields else None
            if fast is not None and fast[6] == seq + 1:
                is_ban, target, expires, reason, origin, eid, seq_ = fast
                try:
                    packed = pton(af, target)
                    canonical = strict or ntop(af, packed) == target
                except (OSError, ValueError):
                    canonical = False
                if canonical:
                    if store(is_ban, target, expires, reason, origin, seq_, now) and notify:
                        notify(target)
                    seq = seq_
                    cursor = last_id = entry_id
                    applied += 1
                    if watching:
                        held = held_b if is_ban else held_a
                        if target in held:
                            del held[target]  # the record has spoken for it
                        slots = slots_b if is_ban else slots_a
                        if target in slots:
                            self.seq, self.cursor, self.last_id = seq, cursor, last_id
                            kind: Kind = "ban" if is_ban else "allow"
                            own += origin == publisher.node_id
                            publisher.observe(kind, target, eid, cache.entry(kind, target))
                    continue
            try:
                event = decode_flat(fields or [])
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                self.skip(f"stream entry {entry_id}", str(exc))
                cursor = entry_id
                continue
            if isinstance(event, Notice):  # no seq: changes nothing held here
                cursor = entry_id
                stats["notices"] += 1
                if event.name == "would_ban":
                    stats["would_ban"] += 1
                continue
            if event.seq == 0:
                self.skip(f"stream entry {entry_id}", "no sequence number (not written by "
                           "the banbus functions)")  # fmt: skip
                cursor = entry_id
                continue
            if isinstance(event, TargetEvent) and not valid_target(event.target):
                self.skip(f"stream entry {entry_id}", f"invalid target {event.target!r}")
                cursor = entry_id
                continue
            if event.seq != seq + 1:
                self.anomaly = (entry_id, event.seq)
                ok = False
                break
            seq = event.seq
            cursor = last_id = entry_id
            applied += 1
            self.seq, self.cursor, self.last_id = seq, cursor, last_id
            if isinstance(event, Clear):
                cache.clear()
                reseeder.drop_all()
                publisher.cleared()
                continue
            if cache.apply(event, now) and notify:
                notify(event.target)
            kind = "ban" if isinstance(event, Ban | Unban) else "allow"
            held = held_b if kind == "ban" else held_a
            if held and event.target in held:
                del held[event.target]
            slots = slots_b if kind == "ban" else slots_a
            if slots and event.target in slots:
                own += event.origin == publisher.node_id
                publisher.observe(kind, event.target, event.eid, cache.entry(kind, event.target))
        self.seq, self.cursor, self.last_id = seq, cursor, last_id
        if applied:
            self._advanced(applied, own, now)
        return ok

    def _advanced(self, applied: int, own: int, now: int) -> None:
        """After a batch that applied events: statistics, lag, waiters."""
        stats = self.stats
        stats["applied"] += applied
        stats["own"] += own
        lag = now - int(self.cursor.partition("-")[0])
        self.lag_ms = float(max(lag, 0))
        if self.lag_ms > self.max_lag_ms:
            self.max_lag_ms = self.lag_ms
        publisher = self._publisher
        if publisher.waiting:
            publisher.advanced(self.seq, self.epoch)
        self._applied()

    def _apply_columns(self, entries: list[Any]) -> bool:
        """Apply a batch of bans as a burst brings them, column by column; False:
        nothing done, the batch takes the per-event path.

        The batch qualifies when every entry is a ban of a canonical IPv4
        address in the library's exact layout, within the per-event path's
        limits (or stricter ones), the seqs follow on from this node's, no
        target comes twice, none has expired, and nothing is pending that the
        per-event path watches (own writes, re-seeds, forged ids).  The
        checks and the apply are ``map``/``zip``/``countOf`` over the columns
        (in C: no Python frame per event), and give what the per-event path
        gives (``tests/test_cache_modes.py`` compares the two).  Listeners
        hear of the batch's bans once all are stored.
        """
        publisher, reseeder = self._publisher, self._reseeder
        if publisher.slots_b or publisher.slots_a or reseeder.held_b or reseeder.held_a:
            return False
        n = len(entries)
        # (Not zip(*entries): its thousands of iterators, alive at once, set
        # off the garbage collector.)
        flat = list(chain.from_iterable(entries))
        ids = flat[0::2]
        columns = ban_columns(flat[1::2])
        if columns is None or (self._forged and not self._forged.isdisjoint(ids)):
            return False
        targets, expiries, reasons, origins, numbers = columns
        if numbers != list(range(self.seq + 1, self.seq + 1 + n)):
            return False
        now = self._clock.now()
        earliest = earliest_of(expiries)
        if earliest and earliest <= now:
            return False
        try:
            packed = list(map(_pton, repeat(_AF_INET), targets))
        except (OSError, ValueError):
            return False
        if not STRICT_PTON and list(map(_ntop, repeat(_AF_INET), packed)) != targets:
            return False
        if len(set(targets)) != n:
            return False
        self._cache.store_bans(targets, expiries, reasons, origins, numbers, earliest, now)
        self.seq, self.cursor = numbers[-1], ids[-1]
        self.last_id = self.cursor
        if self.listening():
            notify = self._notify
            for target in targets:
                notify(target)
        self._advanced(n, 0, now)
        return True

    # -- judging -----------------------------------------------------------------------------

    async def head(self, conn: ReaderConnection) -> tuple[str, int, str]:
        """The library's head ``(id, seq, epoch)``; measures the clock on the way."""
        sent = self._clock.local()
        with anyio.fail_after(10.0):
            state = await conn.call("FCALL_RO", "banbus_state", 1, self._keys.function_key)
        self._clock.observe(int(state[3]), sent, self._clock.local())
        return str(state[0]), int(state[1]), str(state[2] or "")

    async def verify(self, conn: ReaderConnection) -> Verdict:
        """Judge the position (and the anomaly, if any) against the library's head."""
        key = self._keys.log
        sent = self._clock.local()
        last_id = self.last_id
        with anyio.fail_after(10.0):
            state, mine, first = await asyncio.gather(
                conn.call("FCALL_RO", "banbus_state", 1, self._keys.function_key),
                conn.call("XRANGE", key, last_id, last_id),
                conn.call("XRANGE", key, "-", "+", "COUNT", 1),
            )
        self._clock.observe(int(state[3]), sent, self._clock.local())
        head_id, head_seq, epoch = str(state[0]), int(state[1]), str(state[2] or "")
        seq = self.seq
        mine_seq = _seq_of(mine[0][1]) if mine else None
        if (
            self.anomaly is None
            and seq == head_seq
            and last_id == head_id
            and (self.epoch == epoch or not self.epoch)
        ):
            # At the library's last event: nothing was missed, whatever
            # happened to the stream's older entries.
            if not self.epoch and epoch:
                self.epoch = epoch
            return Verdict.OK
        if not self.epoch:
            if epoch and (seq == 0 or (mine_seq == seq and seq <= head_seq)):
                # A namespace created after we started: our last entry is
                # still in its stream, so this is the incarnation we follow.
                self.epoch = epoch
        elif epoch != self.epoch:
            log.warning("banbus: namespace %r has a new epoch (%r, was %r): Redis lost or "
                        "reset it", self._keys.namespace, epoch, self.epoch)  # fmt: skip
            return Verdict.LOSS
        if seq and mine_seq == seq and (seq > head_seq or (seq == head_seq and head_id != last_id)):
            # Our last applied entry claims a seq the library never wrote, or
            # one it wrote elsewhere.
            log.warning("banbus: stream entry %s (seq %d) was not written by the library "
                        "(its head: seq %d at %s); reloading", last_id, seq, head_seq,
                        head_id)  # fmt: skip
            self.forged(last_id)
            return Verdict.FORGED
        if head_seq < seq:
            log.warning("banbus: namespace %r went back from seq %d to %d: Redis lost writes",
                        self._keys.namespace, seq, head_seq)  # fmt: skip
            return Verdict.LOSS
        if seq and last_id != "0-0" and not mine:
            if (first and not id_le(first[0][0], last_id)) or (not first and head_seq >= seq):
                log.warning("banbus: stream %s was trimmed past us; reloading", key)
                return Verdict.GAP
            log.warning("banbus: our last entry %s vanished from %s: Redis lost writes",
                        last_id, key)  # fmt: skip
            return Verdict.LOSS
        if self.anomaly is not None:
            anomaly_seq = self.anomaly[1]
            if anomaly_seq > head_seq:
                return Verdict.SKIP  # the library never wrote that seq
            if anomaly_seq > seq + 1:
                log.warning("banbus: missed events %d..%d; reloading", seq + 1,
                            anomaly_seq - 1)  # fmt: skip
                return Verdict.GAP
            # A seq we applied, again: a duplicate, or we applied a forgery
            # earlier.  Skip it, and compare digests at once.
            self.suspect = True
            return Verdict.SKIP
        if head_seq > seq and id_le(head_id, self.cursor):
            log.warning("banbus: stream %s moved behind our cursor; reloading", key)
            return Verdict.GAP
        return Verdict.OK


def _seq_of(fields: list[Any]) -> int | None:
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == "seq":
            value = fields[i + 1]
            return int(value) if isinstance(value, str) and value.isdigit() else None
    return None
