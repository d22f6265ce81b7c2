"""Re-seeding after data loss, and anti-entropy: the two ways a node repairs the record or itself.

Re-seeding
----------

When the follower finds evidence that the *record* lost data (a new epoch:
Redis restarted empty, FLUSHALL; the head went back; the node's last entry
vanished: a failover lost writes), the node reloads the record as usual —
and what it held that the record no longer has becomes a *candidate*.
Candidates stay enforced while the :class:`Reseeder` restores them with
conditional writes (``RESEED <ms>``): the library writes one only when the
target is still absent **and** was not removed at or after *ms* — the server
time of the last event the node had seen before the loss.  So:

* only what is missing is written (a forged epoch, a record that is in fact
  intact, costs reads, not writes);
* a removal made since the loss wins: the library keeps tombstones
  (``{ns}:removed``, capped), and every removal writes one — also the
  removal of a target the record does not have, which is exactly the unban
  an operator makes right after a loss;
* nodes take turns (a ``SET NX`` lock): a node waits while another
  re-seeds, and drops the candidates the other one's events restore.

A candidate ends when the stream brings an event on its target (the record's
word), or when its conditional write is answered.  Re-seeding restores
entries that are missing, not older versions of entries that are present
(a lost extension of a ban stays lost), and not lost removals.

Anti-entropy
------------

Sequence numbers reveal lost and forged events; they cannot reveal a view
that differs from the record for another reason (a bug, a record edited by
hand).  Every *interval* (and at once after a suspicious duplicate seq), the
:class:`AntiEntropy` compares the node's digest of its view with the digest
the library keeps of the record (:mod:`banbus._digest`).  The comparison is
aligned: a non-blocking ``XREAD`` and ``FCALL_RO banbus_digest`` go out in one
write, Redis runs them back to back, and the node compares only when its
position equals the seq the digest was taken at.  Pending own writes are
compared by their base (what the record says under them).

A mismatch is first judged like any anomaly (a forged entry, a gap).  If the
stream is sound, the view has drifted: the node reloads.  The first
comparison after a reload *calibrates*: a difference there means the record
differs from its own digest (edited by hand), which is reported once with
the repair command (``banbus repair``) and taken as the baseline, so the
node does not reload in a loop.
"""

from __future__ import annotations

import logging
import random
import time
from typing import TYPE_CHECKING, Any, Final, Literal

import anyio
import anyio.lowlevel
import redis.exceptions as redis_errors

from ._digest import Digest, entry_hash
from ._exceptions import BanbusError, InvalidInput
from ._model import Allow, Ban, Entry
from ._packed import BulkLoad
from ._publisher import Reply, Write

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from ._cache import BanCache, Kind
    from ._clock import ServerClock
    from ._follower import Follower
    from ._keys import Keys
    from ._publisher import Publisher
    from ._resp import ReaderConnection
    from ._snapshot import Snapshot

__all__ = ["AntiEntropy", "Reseeder"]

log = logging.getLogger("banbus")

#: Conditional writes per pipeline.
_BATCH: Final = 500
#: The re-seed lock lives this long unless refreshed (ms).
_LOCK_MS: Final = 10_000
#: Entries an anti-entropy comparison reads first (see AntiEntropy.check).
_CHECK_COUNT: Final = 2000


class Reseeder:
    """Restore what the record lost from what this node held (see the module docstring)."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        *,
        cache: BanCache,
        publisher: Publisher,
        clock: ServerClock,
        node_id: str,
        enabled: bool,
    ) -> None:
        self._client = client
        self._keys = keys
        self._cache = cache
        self._publisher = publisher
        self._clock = clock
        self._node_id = node_id
        self.enabled = enabled
        #: Candidates: target -> the entry held before the loss, one map per kind.
        self.held_b: dict[str, Entry] = {}
        self.held_a: dict[str, Entry] = {}
        self._since = 0
        self._wakeup = anyio.Event()
        self.stats = dict.fromkeys(("candidates", "written", "present", "lifted", "expired"), 0)

    @property
    def busy(self) -> bool:
        return bool(self.held_b or self.held_a)

    def collect(self, snapshot: Snapshot) -> list[tuple[Kind, str, Entry]]:
        """What the record held, as far as this view knows, that *snapshot* lacks.

        Call it before installing the snapshot.  Under own pending writes it
        is the entry they were folded over (their base): the publisher keeps
        the writes themselves.
        """
        if not self.enabled:
            return []
        now = self._clock.now()
        out: list[tuple[Kind, str, Entry]] = []
        kinds: tuple[tuple[Kind, set[str], dict[str, Any]], ...] = (
            ("ban", set(_targets(snapshot.bans)), self._publisher.slots_b),
            ("allow", {t for t, _ in snapshot.allows}, self._publisher.slots_a),
        )
        for kind, present, slots in kinds:
            for record in self._cache.records(kind):
                target = record.target
                if target in present or target in slots:
                    continue
                entry = Entry(record.expires, record.reason, record.origin, record.seq)
                out.append((kind, target, entry))
            for target, slot in slots.items():
                base = slot.base
                if target in present or base is None:
                    continue
                if base.expires and base.expires <= now:
                    continue
                out.append((kind, target, base))
        return out

    def hold(self, candidates: list[tuple[Kind, str, Entry]], since: int) -> None:
        """Keep *candidates* enforced over the new snapshot and start restoring them.

        *since*: the server time of the last event seen before the loss;
        removals at or after it win.  Candidates still held from an earlier
        loss keep the earlier (smaller) one.
        """
        if not candidates:
            return
        self._since = min(self._since, since) if self.busy else since
        for kind, target, entry in candidates:
            (self.held_b if kind == "ban" else self.held_a)[target] = entry
            if not self._publisher.rebase(kind, target, entry):
                self._cache.put(kind, target, entry)
        self.stats["candidates"] += len(candidates)
        log.warning("banbus: %d entries held here are missing from %r; restoring them "
                    "(unless removed since)", len(candidates), self._keys.namespace)  # fmt: skip
        self._wakeup.set()

    def drop_all(self) -> None:
        """The namespace was cleared on purpose (the view was emptied): restore nothing."""
        self.held_b.clear()
        self.held_a.clear()

    async def run(self) -> None:
        """Restore candidates whenever there are some; one node at a time (a lock)."""
        while True:
            await self._wakeup.wait()
            self._wakeup = anyio.Event()
            delay = 0.05
            while self.busy:
                try:
                    if await self._lock():
                        await self._restore()
                        await self._unlock()
                        continue
                except (BanbusError, redis_errors.RedisError, OSError) as exc:
                    log.warning("banbus: re-seeding %r paused: %s", self._keys.namespace, exc)
                # Another node re-seeds (its events resolve our candidates) or
                # Redis is away: wait and look again.
                await anyio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 1.0)

    async def _lock(self) -> bool:
        """Take the lock, or find it ours already (a pass that paused on an error)."""
        if await self._client.set(self._keys.reseed, self._node_id, nx=True, px=_LOCK_MS):
            return True
        return await self._owner() == self._node_id

    async def _owner(self) -> str | None:
        owner = await self._client.get(self._keys.reseed)
        return owner.decode() if isinstance(owner, bytes) else owner

    async def _unlock(self) -> None:
        if await self._owner() == self._node_id:
            await self._client.delete(self._keys.reseed)

    async def _restore(self) -> None:
        publisher = self._publisher
        while self.busy:
            batch: list[Write] = []
            for kind, held in (("ban", self.held_b), ("allow", self.held_a)):
                for target, entry in list(held.items())[: _BATCH - len(batch)]:
                    cls = Ban if kind == "ban" else Allow
                    event = cls(target=target, expires=entry.expires, reason=entry.reason,
                                origin=entry.origin or self._node_id,
                                eid=publisher.new_eid("r"))  # fmt: skip
                    batch.append(Write(event, force=True, reseed=self._since))
            replies = await publisher.call_writes(batch)
            busy: BanbusError | None = None
            for write, reply in zip(batch, replies, strict=True):
                if isinstance(reply, BanbusError) and not isinstance(reply, InvalidInput):
                    busy = reply  # not a verdict on the entry: it stays a candidate
                else:
                    self._settle(write, reply)
            if busy is not None:
                raise busy
            await self._client.pexpire(self._keys.reseed, _LOCK_MS)
        log.info("banbus: re-seeding %r done: %s", self._keys.namespace, self.stats)

    def _settle(self, write: Write, reply: Reply | BanbusError) -> None:
        held = self.held_b if write.kind == "ban" else self.held_a
        target = write.event.target
        if isinstance(reply, BaseException):
            log.error("banbus: re-seeding %s refused: %s", target, reply)
            status = "lifted"
        else:
            status = reply.status
        counter = status if status in ("written", "present", "expired") else "lifted"
        self.stats[counter] += 1
        if held.pop(target, None) is None:
            return  # the stream already spoke for it
        if counter == "lifted" or counter == "expired":
            # Removed since the loss, refused, or expired meanwhile: the
            # record does not have it, so neither does this node.  (Written
            # or present: its event follows on the stream.)
            if not self._publisher.rebase(write.kind, target, None):
                self._cache.set_entry(write.kind, target, None)


class AntiEntropy:
    """Compare the view's digest with the record's (see the module docstring)."""

    def __init__(
        self,
        keys: Keys,
        *,
        cache: BanCache,
        publisher: Publisher,
        reseeder: Reseeder,
        follower: Follower,
        clock: ServerClock,
        interval: float,
        enabled: bool,
    ) -> None:
        self._keys = keys
        self._cache = cache
        self._publisher = publisher
        self._reseeder = reseeder
        self._follower = follower
        self._clock = clock
        self._interval = interval
        self.enabled = enabled
        #: When the next comparison is due (``time.monotonic()``: a schedule, not
        #: the server clock, which tests may move by hand).
        self._next = 0.0
        #: The record's digest minus the view's, as calibrated after a reload.
        self._offset: Digest | None = None
        #: The last difference seen (for the calibration after a clean verify),
        #: and the one a reload before found (see accept()).
        self.difference: Digest | None = None
        self._candidate: Digest | None = None
        self.stats = dict.fromkeys(("checks", "mismatches", "record_mismatch"), 0)

    def reloaded(self) -> None:
        """A snapshot was installed: the next comparison calibrates."""
        self._offset = None
        self._next = time.monotonic() + self._interval

    def due(self) -> bool:
        if not self.enabled or not self._cache.digest_known or self._reseeder.busy:
            return False
        return self._follower.suspect or time.monotonic() >= self._next

    async def check(
        self, conn: ReaderConnection
    ) -> Literal["ok", "mismatch", "skipped", "anomaly"]:
        """One aligned comparison; the caller judges a mismatch (see :meth:`accept`).

        The read and the digest go out together; only when the read finds the
        stream drained (the node is at the head the digest was taken at) is
        the view's digest brought up to date — a node catching up on a burst
        does no digest work.  Nothing else applies stream events meanwhile
        (the reader is here), so the view stays at that seq while the
        pending changes are folded, a chunk per loop iteration.
        """
        self._next = time.monotonic() + self._interval
        self._follower.suspect = False
        cutoff = (self._clock.now() // 1000 + 2) * 1000
        follower = self._follower
        # As many as the follower read per call before its reads shrank to
        # 256: a few hundred events landing meanwhile must not make every
        # comparison under steady traffic give up.
        count = max(follower.batch, _CHECK_COUNT)
        state: list[Any] = ["skipped", None]

        def on_read(reply: Any) -> None:
            entries = reply[0][1] if reply else []
            if entries and not follower.apply(entries):
                state[0] = "anomaly"
            elif len(entries) >= count:
                state[0] = "behind"

        def on_digest(reply: Any) -> None:
            seq, _, status, d1, d2, n = reply
            if state[0] == "skipped" and status == "ok" and int(seq) == follower.seq:
                state[1] = Digest(int(d1), int(d2), int(n))
            # else: writes landed in between, or the library is busy: later

        with anyio.fail_after(10.0):
            read = conn.call("XREAD", "COUNT", count, "STREAMS", self._keys.log,
                             follower.cursor, sink=on_read)  # fmt: skip
            digest = conn.call("FCALL_RO", "banbus_digest", 1, self._keys.function_key, cutoff,
                               sink=on_digest)  # fmt: skip
            await read
            await digest
        if state[0] == "anomaly":
            return "anomaly"
        record = state[1]
        if record is None:
            return "skipped"
        cache = self._cache
        while cache.pending_changes > 20_000:
            cache.fold_some(20_000)
            await anyio.lowlevel.checkpoint()
        mine = self.view_digest(cutoff)
        if mine is None:
            return "skipped"
        self.stats["checks"] += 1
        difference = record.minus(mine)
        if self._offset is not None and difference == self._offset:
            return "ok"
        if self._offset is None and difference == Digest():
            self._offset = difference
            self._candidate = None
            self.stats["record_mismatch"] = 0
            return "ok"
        self.difference = difference
        self.stats["mismatches"] += 1
        return "mismatch"

    def accept(self) -> bool:
        """The stream is sound but the digests differ: is it the record's own difference?

        Only right after a reload (the view is then the record), and only
        when the same difference shows after two reloads in a row: a record
        edited by hand differs from its digest every time, a view that
        drifted does not after a reload.  Returns True when the difference
        was taken as the baseline (reported once), False when the view must
        be reloaded.
        """
        if self._offset is not None or self.difference is None:
            return False
        if self._candidate != self.difference:
            self._candidate = self.difference  # reload once more, then look again
            return False
        self._offset = self.difference
        self.stats["record_mismatch"] = 1
        log.error("banbus: the record of %r differs from its digest (was it edited by hand, "
                  "outside the banbus functions?); run 'banbus repair' (FCALL banbus_repair "
                  "1 %s) to recompute it", self._keys.namespace,
                  self._keys.namespace)  # fmt: skip
        return True

    def view_digest(self, cutoff: int) -> Digest | None:
        """The digest of what the record holds, as this view knows it."""
        digest = self._cache.digest(cutoff)
        if digest is None:
            return None
        for kind, target, base in self._publisher.bases():
            view = self._cache.entry(kind, target)
            if view is not None and (view.expires == 0 or view.expires > cutoff):
                digest = digest.sub(entry_hash(kind, target, view.expires))
            if base is not None and (base.expires == 0 or base.expires > cutoff):
                digest = digest.add(entry_hash(kind, target, base.expires))
        return digest


def _targets(rows: BulkLoad | list[tuple[str, Entry]]) -> list[str]:
    return rows.targets() if isinstance(rows, BulkLoad) else [t for t, _ in rows]
