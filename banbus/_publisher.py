"""The publisher: this node's own writes, from the call to their fate.

Theory of operation
-------------------

A node enforces its own writes at once, before the round trip to Redis, so
its view is *the record plus the writes the record does not know yet*.  The
publisher owns those writes and keeps that equation true:

* **The overlay.**  Each target with own writes in flight has a *slot*: its
  *base* (what the record says, as far as this node knows) and the writes on
  it, oldest first.  The view's entry for the target is the writes folded
  over the base the way the function library will apply them (a ban keeps the
  later expiry unless REPLACE; a removal removes; a re-seed only fills a
  gap).  Stream events on a slotted target update its base and the view is
  re-folded, so a concurrent write from another node never makes this node
  forget its own pending one, and never hides the record either.

* **One owner, one fate.**  Every write ends in exactly one of:

  - *acknowledged* — Redis answered with its seq.  It leaves the overlay when
    its own event comes back on the stream, or as soon as the node's
    position reaches that seq (a snapshot at or past it already holds the
    record's verdict on the target: the record's word is taken);
  - *refused* — the server said no for good: it leaves the overlay and the
    view falls back to the base (nothing diverges);
  - *expired* — a ban that ran out while waiting in the outbox: dropped, it
    leaves the overlay (it never reaches Redis, so no node keeps it).

  All bookkeeping (slots, the outbox, acknowledged writes waiting for the
  stream) is per pending write and is freed with its fate: memory follows
  what is in flight, not the write rate.

* **The outbox.**  A write Redis did not answer (unreachable, busy, a
  cancelled caller) waits in the outbox, in order; new writes queue behind
  it, so a ban and the unban after it land in that order.  A write whose
  first attempt may have been executed (the connection died after sending)
  is *ambiguous*: its retries carry ``RETRY <ms>`` and the function library
  looks for its event id in the stream since then, so it is written once.
  No idempotency data is kept per write in Redis (the stream is the record
  of what was written); writes are sent on a pool connection directly, never
  through redis-py's blind automatic retries.

* **Snapshots.**  When the node reloads the record (bootstrap, resync), each
  slot's base becomes the snapshot's entry; acknowledged writes at or before
  the snapshot's watermark leave (the record decided); the rest are folded
  over the new base.
"""

from __future__ import annotations

import heapq
import logging
import random
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple

import anyio
import redis.exceptions as redis_errors

from ._exceptions import BanbusError, InvalidInput, RedisUnavailable
from ._library import ensure_library, translate_error
from ._model import Allow, AnyEvent, Ban, Entry, Unban
from ._topology import redirected

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence

    import redis.asyncio as aioredis

    from ._cache import BanCache, Kind
    from ._clock import ServerClock

__all__ = ["Publisher", "Reply", "Unreachable", "Write"]

log = logging.getLogger("banbus")

#: Error replies that mean "not now" rather than "no" (the write is retried);
#: also those that say the primary is elsewhere (``_topology.redirected``).
_TRANSIENT: Final = frozenset(
    ("OOM", "READONLY", "LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "NOREPLICAS",
     "CLUSTERDOWN", "NOSCRIPT", "MOVED", "ASK", "UNBLOCKED")
)  # fmt: skip
_TRANSIENT_ERRORS: Final = (
    redis_errors.OutOfMemoryError,
    redis_errors.ReadOnlyError,
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
)
#: Write round trips in flight at once (well under redis-py's default pool of 100).
_CONCURRENCY: Final = 32
#: How far before a write's first attempt its retry looks for it in the
#: stream: covers the error of this node's server-clock estimate.
_RETRY_MARGIN_MS: Final = 5_000


class Reply(NamedTuple):
    """The function library's answer to a write."""

    seq: int
    stream_id: str
    target: str
    expires: int
    #: written, absent, duplicate, unverified, present, lifted (see _library.lua).
    status: str
    #: The namespace's epoch: seqs compare only within one.
    epoch: str = ""


class Unreachable(RedisUnavailable):
    """Redis could not be reached; *sent* tells whether the call may have run."""

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class Write:
    """One own write, pending until its fate is known."""

    __slots__ = ("ambiguous", "epoch", "event", "force", "kind", "replace", "reseed", "seq",
                 "since", "state")  # fmt: skip

    def __init__(
        self,
        event: AnyEvent,
        *,
        replace: bool = False,
        force: bool = False,
        reseed: int | None = None,
    ) -> None:
        self.event = event
        self.kind: Kind = "ban" if isinstance(event, Ban | Unban) else "allow"
        self.replace = replace
        self.force = force
        #: RESEED: write only into a gap, unless removed at or after this server ms.
        self.reseed = reseed
        #: Server ms before the first attempt (what a retry searches the stream from).
        self.since = 0
        #: The first attempt may have been executed: retries carry RETRY.
        self.ambiguous = False
        self.seq = 0
        #: The epoch *seq* belongs to.
        self.epoch = ""
        self.state: Literal["new", "sending", "queued", "answered", "done"] = "new"

    @property
    def adds(self) -> bool:
        return isinstance(self.event, Ban | Allow)

    def args(self, now: int) -> list[str | int] | None:
        """The FCALL arguments after the namespace; None if the write has expired."""
        event = self.event
        args: list[str | int] = [event.target]
        if isinstance(event, Ban | Allow):
            if event.expires:
                left = event.expires - now
                if left <= 0:
                    return None
                args.append(-(-left // 1000))
            else:
                args.append(0)
            args.append(event.reason)
            if self.replace:
                args.append("REPLACE")
            if self.reseed is not None:
                args += ["RESEED", self.reseed]
        if self.force:
            args.append("FORCE")
        args += ["ORIGIN", event.origin, "EID", event.eid, "STATUS"]
        if self.ambiguous:
            args += ["RETRY", max(0, self.since)]
        return args

    @property
    def function(self) -> str:
        return f"banbus_{type(self.event).__name__.lower()}"

    def __repr__(self) -> str:
        return f"<Write {self.function} {self.event.target} {self.state} seq={self.seq}>"


def _fold(base: Entry | None, writes: Iterable[Write], now: int) -> Entry | None:
    """*writes*, in order, over the record's entry *base*."""
    current = base
    for write in writes:
        if current is not None and current.expires and current.expires <= now:
            current = None
        event = write.event
        if not isinstance(event, Ban | Allow):
            current = None
        elif write.reseed is not None:
            if current is None:
                current = Entry(event.expires, event.reason, event.origin, 0)
        else:
            expires = event.expires
            if current is not None and not write.replace:
                if current.expires == 0 or expires == 0:
                    expires = 0
                else:
                    expires = max(expires, current.expires)
            current = Entry(expires, event.reason, event.origin, 0)
    return current


class _Slot:
    """The own writes on one target and the record's entry under them."""

    __slots__ = ("base", "writes")

    def __init__(self, base: Entry | None) -> None:
        self.base = base
        self.writes: list[Write] = []


class Publisher:
    """Own writes: local apply, the function call, the outbox, the overlay.

    :param client: the redis-py client writes go through (its pool, not its
        retrying ``execute_command``).
    :param namespace: the namespace (KEYS[1] of every call).
    :param node_id: the origin of this node's events.
    :param cache: the node's view.
    :param clock: the server clock.
    :param position: the seq of the last event the node's view holds, and its epoch.
    :param notify: called with a target when bans under it may now apply.
    :param backoff: (first, cap) seconds between outbox retries.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        namespace: str,
        node_id: str,
        cache: BanCache,
        clock: ServerClock,
        position: Callable[[], tuple[int, str]],
        notify: Callable[[str], None],
        backoff: tuple[float, float] = (0.05, 2.0),
    ) -> None:
        self._client = client
        self.namespace = namespace
        #: KEYS[1] of the calls: a key of the namespace, so that ACLs scoped to
        #: ``~{ns}:*`` allow them.
        self._function_key = "{" + namespace + "}:log"
        self.node_id = node_id
        self._cache = cache
        self._clock = clock
        self._position = position
        self._notify = notify
        self._backoff = backoff
        #: target -> slot, one map per kind (the follower probes them per event).
        self.slots_b: dict[str, _Slot] = {}
        self.slots_a: dict[str, _Slot] = {}
        #: Acknowledged writes waiting for the stream: (seq, order, write).
        self._answered: list[tuple[int, int, Write]] = []
        #: Acknowledged by another epoch than the view's: judged at the next reload.
        self._foreign: list[Write] = []
        self._order = 0
        self.outbox: deque[Write] = deque()
        #: Round trips in flight at most (the rest wait their turn).
        self._slots = anyio.Semaphore(_CONCURRENCY)
        self._wakeup = anyio.Event()
        self.stats = dict.fromkeys(("expired", "refused", "duplicates", "unverified", "retries"), 0)

    # -- the write path ------------------------------------------------------------------

    def new_eid(self, tag: str = "") -> str:
        return f"{self.node_id}.{tag}{uuid.uuid4().hex[:16]}"

    async def publish(self, write: Write) -> Reply | None:
        """Enforce *write* here, then send it.

        Returns the reply, or None when the write waits in the outbox (Redis
        unreachable or busy; also when earlier writes are still waiting).
        Cancelled mid-call, the write goes to the outbox and the cancellation
        propagates.

        :raises BanbusError: the server refused the write for good; it was
            undone here.
        """
        self.hold(write)
        if self.outbox:
            # Earlier writes are waiting: this one goes behind them, so that
            # e.g. a ban and the unban after it land in that order.
            self._queue(write)
            return None
        write.since = self._clock.now() - _RETRY_MARGIN_MS
        write.state = "sending"
        for attempt in (0, 1):
            try:
                reply = (await self.call_writes([write]))[0]
            except Unreachable as exc:
                write.ambiguous = write.ambiguous or exc.sent
                if attempt == 0 and exc.sent:
                    # A dropped connection (an idle kill, a failover): retry
                    # once at once; RETRY makes it safe if the first one ran.
                    self.stats["retries"] += 1
                    continue
                log.warning("banbus: Redis unreachable (%s); %s %s waits in the outbox",
                            exc, write.function, write.event.target)  # fmt: skip
                self._queue(write)
                return None
            except RedisUnavailable as exc:  # busy (OOM, READONLY…): not a verdict
                log.warning("banbus: %s; %s %s waits in the outbox", exc, write.function,
                            write.event.target)  # fmt: skip
                self._queue(write)
                return None
            except BaseException as exc:
                if isinstance(exc, anyio.get_cancelled_exc_class()):
                    # The caller gave up mid-call: the write is enforced here
                    # and may or may not have reached Redis; the outbox sends
                    # it again with RETRY, so it lands exactly once.
                    write.ambiguous = True
                    self._queue(write)
                    raise
                # A refusal, or anything unexpected: the cluster never got
                # it, so this node must not keep it either.
                self.settle(write, None)
                raise
            if isinstance(reply, BaseException):
                self.settle(write, None)
                raise reply
            self.settle(write, reply)
            return reply
        raise AssertionError("unreachable")

    def hold(self, write: Write) -> None:
        """Enforce *write* here: add it to its target's slot and fold."""
        slots = self.slots_b if write.kind == "ban" else self.slots_a
        target = write.event.target
        slot = slots.get(target)
        if slot is None:
            slot = slots[target] = _Slot(self._cache.entry(write.kind, target))
        slot.writes.append(write)
        self._refold(write.kind, target, slot)

    def settle(self, write: Write, reply: Reply | None) -> None:
        """Record *write*'s fate: *reply* from Redis, or None when refused (undone here)."""
        if write.state == "done":  # its own event came back first
            return
        if reply is None:
            self.stats["refused"] += 1
            self._release(write)
            return
        if reply.status == "duplicate":
            self.stats["duplicates"] += 1
        elif reply.status == "unverified":
            self.stats["unverified"] += 1
            log.warning("banbus: %s %s was retried after the stream was trimmed past its first "
                        "attempt; written again (it may have landed twice)",
                        write.function, write.event.target)  # fmt: skip
        seq, epoch = self._position()
        if reply.seq == 0 or (reply.seq <= seq and _same(reply.epoch, epoch)):
            # Nothing was written (a re-seed the record refused), or the
            # node's view is already at or past the write: a snapshot or
            # the stream brought the record's verdict on the target.
            self._release(write)
            return
        write.seq = reply.seq
        write.epoch = reply.epoch
        write.state = "answered"
        self._order += 1
        heapq.heappush(self._answered, (reply.seq, self._order, write))

    def _queue(self, write: Write) -> None:
        if write.state == "done":
            return  # its own event came back while its answer was lost: it landed
        write.state = "queued"
        self.outbox.append(write)
        self._wakeup.set()

    def _release(self, write: Write) -> None:
        """*write* has its fate: drop it from its slot and fold what remains."""
        write.state = "done"
        slots = self.slots_b if write.kind == "ban" else self.slots_a
        target = write.event.target
        slot = slots.get(target)
        if slot is None or write not in slot.writes:
            return
        slot.writes.remove(write)
        self._refold(write.kind, target, slot)
        if not slot.writes:
            del slots[target]

    def _refold(self, kind: Kind, target: str, slot: _Slot) -> None:
        """Set the view's entry for *target*: the slot's writes over its base."""
        current = _fold(slot.base, slot.writes, self._clock.now())
        if self._cache.set_entry(kind, target, current):
            self._notify(target)

    # -- what the reader tells the publisher ---------------------------------------------

    def observe(self, kind: Kind, target: str, eid: str, entry: Entry | None) -> None:
        """A stream event on a slotted *target* left the record's entry at *entry*."""
        slots = self.slots_b if kind == "ban" else self.slots_a
        slot = slots.get(target)
        if slot is None:
            return
        slot.base = entry
        for write in slot.writes:
            if write.event.eid == eid:
                write.state = "done"  # our own event: acknowledged for good
                slot.writes.remove(write)
                break
        self._refold(kind, target, slot)
        if not slot.writes:
            del slots[target]

    @property
    def waiting(self) -> bool:
        """Are acknowledged writes waiting for the stream?"""
        return bool(self._answered)

    def advanced(self, position: int, epoch: str) -> None:
        """The view reached seq *position*: acknowledged writes at or before it are settled."""
        answered = self._answered
        while answered and answered[0][0] <= position:
            _, _, write = heapq.heappop(answered)
            if write.state != "answered":
                continue
            if _same(write.epoch, epoch):
                self._release(write)
            else:
                # Answered by another incarnation of the namespace: the next
                # reload judges it (see installed()).
                self._foreign.append(write)

    def installed(self, watermark: int, epoch: str) -> None:
        """A snapshot at seq *watermark* of *epoch* replaced the view: re-base and re-fold.

        Acknowledged writes at or before the watermark leave: the record
        decided.  So do those acknowledged by an incarnation of the namespace
        that is gone (data loss): what they made of the view is re-seeded with
        the rest of it (see ``_reseed``).
        """
        keep: list[tuple[int, int, Write]] = []
        for item in [*self._answered, *((w.seq, 0, w) for w in self._foreign)]:
            write = item[2]
            if write.state != "answered":
                continue
            if _same(write.epoch, epoch) and write.seq > watermark:
                keep.append(item)
            else:
                write.state = "done"
                self._drop(write)
        heapq.heapify(keep)
        self._answered = keep
        self._foreign = []
        for kind, slots in self._kinds():
            for target, slot in list(slots.items()):
                slot.base = self._cache.entry(kind, target)
                if slot.writes:
                    self._refold(kind, target, slot)
                else:
                    del slots[target]

    def cleared(self) -> None:
        """The namespace was cleared on purpose: bases are gone, re-seeds are off."""
        for kind, slots in self._kinds():
            for target, slot in list(slots.items()):
                slot.base = None
                for write in [w for w in slot.writes if w.reseed is not None]:
                    write.state = "done"
                    slot.writes.remove(write)
                self._refold(kind, target, slot)
                if not slot.writes:
                    del slots[target]

    def _kinds(self) -> tuple[tuple[Kind, dict[str, _Slot]], ...]:
        return (("ban", self.slots_b), ("allow", self.slots_a))

    def _drop(self, write: Write) -> None:
        slots = self.slots_b if write.kind == "ban" else self.slots_a
        slot = slots.get(write.event.target)
        if slot is not None and write in slot.writes:
            slot.writes.remove(write)

    def prune(self) -> None:
        """Drop queued writes that need no sending any more.

        A ban that ran out while it waited never reaches Redis; a write whose
        own event came back on the stream (it landed before its answer was
        lost) is done.  A write being sent right now is left to its sender.
        """
        if not self.outbox:
            return
        now = self._clock.now()
        for write in list(self.outbox):
            if write.state == "done":
                self.outbox.remove(write)
            elif write.state == "queued" and write.adds and write.args(now) is None:
                self.outbox.remove(write)
                self.stats["expired"] += 1
                self._release(write)

    def rebase(self, kind: Kind, target: str, entry: Entry | None) -> bool:
        """If own writes are pending on *target*, put *entry* under them and re-fold.

        Returns False when there are none (the caller sets the view itself).
        """
        slot = (self.slots_b if kind == "ban" else self.slots_a).get(target)
        if slot is None:
            return False
        slot.base = entry
        self._refold(kind, target, slot)
        return True

    def bases(self) -> Iterator[tuple[Kind, str, Entry | None]]:
        """Each slotted target with the record's entry under it (for the digest)."""
        for target, slot in self.slots_b.items():
            yield "ban", target, slot.base
        for target, slot in self.slots_a.items():
            yield "allow", target, slot.base

    def answered_bases(self) -> Iterator[tuple[Kind, str, Entry | None]]:
        """Each slotted target without the writes Redis has not answered (the state file
        saves this under the outbox, which holds those writes)."""
        now = self._clock.now()
        for kind, slots in (("ban", self.slots_b), ("allow", self.slots_a)):
            for target, slot in slots.items():
                answered = [w for w in slot.writes if w.state not in ("new", "sending", "queued")]
                yield kind, target, _fold(slot.base, answered, now)  # type: ignore[misc]

    def unanswered(self) -> list[Write]:
        """Own writes Redis has not answered (queued, or on the wire), oldest first."""
        writes = [w for w in self.outbox if w.state != "done"]
        for slots in (self.slots_b, self.slots_a):
            for slot in slots.values():
                writes += [w for w in slot.writes if w.state in ("new", "sending")
                           and w not in writes]  # fmt: skip
        return writes

    @property
    def pending(self) -> int:
        """Own writes whose fate is not known yet."""
        return sum(len(s.writes) for s in self.slots_b.values()) + sum(
            len(s.writes) for s in self.slots_a.values()
        )

    # -- the outbox ------------------------------------------------------------------------

    async def run(self) -> None:
        """Publish queued writes, in order, with capped, jittered backoff.

        Never dies of a failure: whatever goes wrong (Redis away or busy, the
        library missing and not reloadable, an answer not understood), the
        write stays queued and is tried again later.
        """
        delay = self._backoff[0]
        while True:
            await self._wakeup.wait()
            self._wakeup = anyio.Event()
            while self.outbox:
                self.prune()
                if not self.outbox:
                    break
                write = self.outbox[0]
                write.state = "sending"
                if not write.since:
                    write.since = self._clock.now() - _RETRY_MARGIN_MS
                try:
                    reply = (await self.call_writes([write]))[0]
                except Exception as exc:
                    if isinstance(exc, Unreachable):
                        write.ambiguous = write.ambiguous or exc.sent
                    elif not isinstance(exc, RedisUnavailable):
                        write.ambiguous = True
                        log.warning("banbus: queued %s %s could not be sent (%s: %s); will "
                                    "retry", write.function, write.event.target,
                                    type(exc).__name__, exc)  # fmt: skip
                    if write.state == "sending":
                        write.state = "queued"
                    # Back off — but try again at once when the reader
                    # reconnects (kick()).
                    with anyio.move_on_after(delay * random.uniform(0.5, 1.0)):
                        await self._wakeup.wait()
                    self._wakeup = anyio.Event()
                    delay = min(delay * 2, self._backoff[1])
                    continue
                except BaseException:
                    if write.state == "sending":
                        write.state = "queued"
                    write.ambiguous = True
                    raise
                if self.outbox and self.outbox[0] is write:
                    self.outbox.popleft()
                if isinstance(reply, BaseException):
                    log.error("banbus: the server refused queued %s %s: %s; undone here",
                              write.function, write.event.target, reply)  # fmt: skip
                    self.settle(write, None)
                else:
                    self.settle(write, reply)
                delay = self._backoff[0]

    def kick(self) -> None:
        """Try the outbox now (the reader reconnected)."""
        self._wakeup.set()

    async def flush(self, timeout: float) -> int:
        """Give the outbox *timeout* seconds to drain; return what is left."""
        with anyio.move_on_after(timeout):
            while self.outbox:
                self._wakeup.set()
                await anyio.sleep(0.01)
        return len(self.outbox)

    # -- function calls --------------------------------------------------------------------

    async def call_writes(self, writes: Sequence[Write]) -> list[Reply | BanbusError]:
        """Send *writes* in one pipeline; a refusal comes back in its place.

        :raises Unreachable: the connection failed (``sent``: maybe executed).
        :raises RedisUnavailable: the server is busy (OOM, READONLY …).
        """
        now = self._clock.now()
        commands: list[tuple[Any, ...]] = []
        expired: set[int] = set()
        for index, write in enumerate(writes):
            args = write.args(now)
            if args is None:  # ran out before it could be sent: nothing to send
                expired.add(index)
                continue
            commands.append(("FCALL", write.function, 1, self._function_key, *args))
        replies = iter(await self._execute(commands) if commands else ())
        out: list[Reply | BanbusError] = []
        for index, write in enumerate(writes):
            if index in expired:
                self.stats["expired"] += 1
                out.append(Reply(0, "", write.event.target, 0, "expired", ""))
            else:
                out.append(self._reply(next(replies)))
        return out

    async def call(self, function: str, *args: str | int) -> Any:
        """One FCALL of the library (no retry); errors translated.

        :raises Unreachable | RedisUnavailable | BanbusError:
        """
        reply = (await self._execute([("FCALL", function, 1, self._function_key, *args)]))[0]
        if isinstance(reply, BaseException):
            raise self._error(reply)
        return reply

    @property
    def function_key(self) -> str:
        """KEYS[1] of the library's calls."""
        return self._function_key

    async def call_ro(self, function: str, *args: str | int) -> Any:
        """One read-only FCALL_RO of the library; errors translated."""
        reply = (await self._execute([("FCALL_RO", function, 1, self._function_key, *args)]))[0]
        if isinstance(reply, BaseException):
            raise self._error(reply)
        return reply

    async def execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """*commands* pipelined in one round trip; error replies in place (see
        :meth:`error_of`).

        :raises RedisUnavailable: Redis could not be reached (or is moving).
        """
        return await self._execute(commands)

    def error_of(self, exc: BaseException) -> BanbusError:
        """The banbus error for an error reply (:class:`RedisUnavailable` when the
        server cannot take writes now)."""
        return self._error(exc)

    def _reply(self, raw: Any) -> Reply | BanbusError:
        if isinstance(raw, BaseException):
            return self._error(raw)
        seq, stream_id, target, expires, status, epoch = (
            x.decode() if isinstance(x, bytes) else x for x in raw
        )
        return Reply(int(seq), str(stream_id), str(target), int(expires), str(status), str(epoch))

    def _error(self, exc: BaseException) -> BanbusError:
        if isinstance(exc, redis_errors.ResponseError):
            if (
                isinstance(exc, _TRANSIENT_ERRORS)
                or str(exc).split(" ", 1)[0] in _TRANSIENT
                or redirected(exc)
            ):
                # Not a verdict on the write: the server cannot take writes now.
                return RedisUnavailable(f"server busy: {exc}")
            return translate_error(exc)
        if isinstance(exc, BanbusError):
            return exc
        return InvalidInput(str(exc))

    async def _execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Run *commands* pipelined on one pool connection; errors in place of replies.

        The library is reloaded (and the batch re-run) once when the server
        answers ``Function not found`` — it restarted empty, or ran
        ``FUNCTION FLUSH`` — which means nothing of the batch ran.
        """
        for attempt in (0, 1):
            replies = await self._roundtrip(commands)
            if attempt == 0 and any(
                isinstance(r, redis_errors.ResponseError) and "function not found" in str(r).lower()
                for r in replies
            ):
                try:
                    await ensure_library(self._client)
                except RedisUnavailable as exc:
                    raise Unreachable(str(exc), sent=False) from exc
                except BanbusError as exc:
                    # Not this node's to load (ACL): the write waits until
                    # someone does — an operator, another node.
                    raise RedisUnavailable(f"the function library is missing: {exc}") from exc
                continue
            busy = next(
                (r for r in replies if isinstance(r, redis_errors.ResponseError)
                 and isinstance(self._error(r), RedisUnavailable)),
                None,
            )  # fmt: skip
            if busy is not None and len(commands) == 1:
                raise RedisUnavailable(f"server busy: {busy}") from busy
            return replies
        raise AssertionError("unreachable")

    async def _roundtrip(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        # A burst of writes waits here rather than exhausting the client's
        # pool (redis-py's default pool refuses a 101st connection, which
        # would read as "Redis unreachable" and send everything to the outbox).
        async with self._slots:
            return await self._roundtrip_on_a_connection(commands)

    async def _roundtrip_on_a_connection(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        pool = self._client.connection_pool
        try:
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            raise Unreachable(f"{type(exc).__name__}: {exc}", sent=False) from exc
        healthy = False
        try:
            try:
                await conn.send_packed_command(conn.pack_commands(commands))
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(await conn.read_response())
                    except redis_errors.ResponseError as exc:
                        replies.append(exc)
            except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
                raise Unreachable(f"{type(exc).__name__}: {exc}", sent=True) from exc
            healthy = True
            return replies
        finally:
            with anyio.CancelScope(shield=True):
                if not healthy:
                    # Replies may still be on their way: never reuse it.
                    await conn.disconnect(nowait=True)
                await pool.release(conn)


def _same(a: str, b: str) -> bool:
    """Are epochs *a* and *b* the same incarnation of the namespace?

    A view that does not know its epoch yet (the namespace was created after
    the node started) compares equal to none: its seqs cannot be trusted
    against an answer's until it has learnt it.
    """
    return a == b and a != ""
