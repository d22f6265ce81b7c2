"""The local ban state: a plain class, no Redis, no ``await``.

Theory of operation
-------------------

:class:`BanCache` holds two :class:`_Table` s — bans and the allowlist — each an
exact-address dict plus CIDR tables (one dict per prefix length in use, keyed
by ``address >> host_bits``).  The I/O layer feeds it events (:meth:`apply`)
and whole snapshots (:meth:`replace`); it answers :meth:`is_banned` without
I/O.

``is_banned(ip)`` takes the peer text exactly as a socket reports it.  A miss —
the common case — costs one dict probe, and, only when IPv4 networks are
banned, one ``inet_pton`` plus a probe of a 64 Ki-entry bitmap indexed by the
address's /16 (a network marks every /16 it overlaps); only a marked /16 goes
on to the per-prefix tables.  No ``ipaddress`` parsing on that path.  A hit
then checks expiry against the (server) clock and the allowlist, which always
wins.

Expiry times are absolute server-clock milliseconds.  A hit is checked against
the clock, so expiry is exact even if the sweep is late; the sweep
(:meth:`expire`) reclaims memory from a per-second bucket wheel, which costs a
pointer per ban instead of a heap entry.
"""

from __future__ import annotations

import heapq
import socket
from array import array
from typing import TYPE_CHECKING, Final, Literal, TypeAlias

from ._digest import Digest, entry_hash
from ._keys import DIGEST_EXCLUDE_LIMIT, DIGEST_P1, DIGEST_P2
from ._model import Allow, Ban, BanRecord, Clear, Disallow, Entry, StreamEvent, Unban
from ._targets import normalize_peer

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

__all__ = ["BanCache", "Kind"]

_AF_INET: Final = socket.AF_INET
_AF_INET6: Final = socket.AF_INET6
_pton: Final = socket.inet_pton
_ntop: Final = socket.inet_ntop
_from_bytes: Final = int.from_bytes
_BUCKET_MS: Final = 1000
#: The expiry wheel is rebuilt when its stale items exceed what is held by this much.
_WHEEL_SLACK: Final = 1024

Kind: TypeAlias = Literal["ban", "allow"]


def _split(target: str) -> tuple[int, int, int] | None:
    """``(version, prefixlen, network int)`` for a CIDR target, None for an address.

    Targets reaching the cache are canonical (validated upstream), so this is
    cheap parsing, not validation.
    """
    address, slash, prefix = target.partition("/")
    if not slash:
        return None
    if ":" in address:
        return 6, int(prefix), _from_bytes(_pton(_AF_INET6, address))
    return 4, int(prefix), _from_bytes(_pton(_AF_INET, address))


class _Table:
    """Exact addresses plus CIDR networks of one kind (bans or allowlist)."""

    __slots__ = (
        "compact", "exact", "filter16", "members", "nets", "packed", "seconds", "v4", "v4_lengths",
        "v6", "v6_lengths",
    )  # fmt: skip

    def __init__(self, compact: bool = False) -> None:
        #: Compact mode: exact IPv4 addresses live in ``packed`` instead.
        self.compact = compact
        #: IPv4 address int -> expiry in whole seconds, rounded up (0 = permanent):
        #: ~84 bytes per address instead of ~270 (measured at 1M), no reason/origin/seq kept.
        self.packed: dict[int, int] = {}
        #: Interned expiry seconds: bans of one second share one int object.
        self.seconds: dict[int, int] = {}
        self.exact: dict[str, Entry] = {}
        #: The keys of ``exact`` again, as a set: a miss probes one hash table
        #: slot instead of a dict's index *and* entry (≈190 vs ≈340 ns at a
        #: million addresses), for ≈34 bytes per address.
        self.members: set[str] = set()
        #: CIDR target text -> entry (the authoritative map for networks).
        self.nets: dict[str, Entry] = {}
        #: prefix length -> {network >> host_bits: target text}
        self.v4: dict[int, dict[int, str]] = {}
        self.v6: dict[int, dict[int, str]] = {}
        #: Prefix lengths in use, longest first (so a lookup finds the most specific).
        self.v4_lengths: list[int] = []
        self.v6_lengths: list[int] = []
        #: How many IPv4 networks overlap each /16.
        self.filter16 = array("L", bytes(65536 * array("L").itemsize))

    def __len__(self) -> int:
        return len(self.exact) + len(self.nets) + len(self.packed)

    def _packed_key(self, target: str) -> int | None:
        if not self.compact or "/" in target or ":" in target:
            return None
        try:
            return _from_bytes(_pton(_AF_INET, target))
        except OSError:
            return None

    def get(self, target: str) -> Entry | None:
        entry = self.exact.get(target)
        if entry is not None:
            return entry
        if self.packed:
            key = self._packed_key(target)
            if key is not None:
                seconds = self.packed.get(key)
                return None if seconds is None else Entry(seconds * 1000)
        return self.nets.get(target)

    def expires_of(self, target: str) -> int | None:
        """The stored expiry (ms, 0 = permanent) of exactly *target*, or None."""
        entry = self.exact.get(target)
        if entry is not None:
            return entry.expires
        if self.packed:
            key = self._packed_key(target)
            if key is not None:
                seconds = self.packed.get(key)
                return None if seconds is None else seconds * 1000
        entry = self.nets.get(target)
        return None if entry is None else entry.expires

    def put(self, target: str, entry: Entry) -> bool:
        """Store *entry*; True if *target* was not present before."""
        key = self._packed_key(target)
        if key is not None:
            return self.put_packed(key, entry.expires)
        if "/" not in target:
            new = target not in self.exact
            self.exact[target] = entry
            self.members.add(target)
            return new
        new = target not in self.nets
        self.nets[target] = entry
        if new:
            split = _split(target)
            assert split is not None
            version, plen, network = split
            if version == 4:
                key = network >> (32 - plen)
                self.v4.setdefault(plen, {})[key] = target
                self._mark16(network, plen, 1)
            else:
                key = network >> (128 - plen)
                self.v6.setdefault(plen, {})[key] = target
            self._lengths()
        return new

    def put_packed(self, key: int, expires: int) -> bool:
        """Store the IPv4 address *key* in compact form; True if it was not present."""
        new = key not in self.packed
        seconds = -(-expires // 1000)
        self.packed[key] = self.seconds.setdefault(seconds, seconds)
        return new

    def remove(self, target: str) -> Entry | None:
        key = self._packed_key(target)
        if key is not None:
            seconds = self.packed.pop(key, None)
            return None if seconds is None else Entry(seconds * 1000)
        if "/" not in target:
            self.members.discard(target)
            return self.exact.pop(target, None)
        entry = self.nets.pop(target, None)
        if entry is None:
            return None
        split = _split(target)
        assert split is not None
        version, plen, network = split
        tables = self.v4 if version == 4 else self.v6
        table = tables[plen]
        del table[network >> ((32 if version == 4 else 128) - plen)]
        if not table:
            del tables[plen]
            self._lengths()
        if version == 4:
            self._mark16(network, plen, -1)
        return entry

    def _mark16(self, network: int, plen: int, delta: int) -> None:
        first = network >> 16
        last = first if plen >= 16 else first + (1 << (16 - plen)) - 1
        filt = self.filter16
        for slot in range(first, last + 1):
            filt[slot] += delta

    def _lengths(self) -> None:
        self.v4_lengths[:] = sorted(self.v4, reverse=True)
        self.v6_lengths[:] = sorted(self.v6, reverse=True)

    def match_v4(self, value: int) -> str | None:
        """The most specific network containing the IPv4 *value*, or None."""
        v4 = self.v4
        for plen in self.v4_lengths:
            target = v4[plen].get(value >> (32 - plen))
            if target is not None:
                return target
        return None

    def match_v6(self, value: int) -> str | None:
        v6 = self.v6
        for plen in self.v6_lengths:
            target = v6[plen].get(value >> (128 - plen))
            if target is not None:
                return target
        return None

    def matches(self, ip: str) -> Iterator[str]:
        """Every target (exact first, then networks, most specific first) covering *ip*."""
        if ip in self.exact:
            yield ip
        try:
            value = _from_bytes(_pton(_AF_INET, ip))
            if value in self.packed:
                yield ip
        except OSError:
            try:
                value = _from_bytes(_pton(_AF_INET6, ip))
            except OSError:
                return
            for plen in self.v6_lengths:
                target = self.v6[plen].get(value >> (128 - plen))
                if target is not None:
                    yield target
            return
        if self.filter16[value >> 16]:
            for plen in self.v4_lengths:
                target = self.v4[plen].get(value >> (32 - plen))
                if target is not None:
                    yield target


class BanCache:
    """Bans and allowlist of one namespace, answering ``is_banned`` without I/O.

    :param clock: returns the current *server* time in milliseconds (the node
        passes its offset-corrected clock; tests pass a fake).
    :param compact: keep exact IPv4 bans as ``int -> expiry second`` (~84 bytes
        each instead of ~270): expiry is rounded up to the second and
        ``lookup`` returns no reason/origin/seq for them.  For huge imported
        blocklists, where memory matters more.
    :param digest: keep the view's digest (:mod:`banbus._digest`) up to date
        for anti-entropy; off, changes are not tracked.
    """

    __slots__ = (
        "_allow",
        "_bans",
        "_clock",
        "_digest",
        "_dirty_a",
        "_dirty_b",
        "_exact",
        "_filter",
        "_generation",
        "_packed",
        "_strings",
        "_track",
        "_v4_lengths",
        "_v6_lengths",
        "_wheel",
        "_wheel_heap",
        "_wheel_limit",
        "_wheel_size",
    )  # fmt: skip

    def __init__(
        self, clock: Callable[[], int], *, compact: bool = False, digest: bool = False
    ) -> None:
        self._clock = clock
        self._bans = _Table(compact)
        self._allow = _Table()
        # Bound once: the hot path reads these attributes, never chains them.
        self._exact = self._bans.members
        self._packed = self._bans.packed
        self._filter = self._bans.filter16
        self._v4_lengths = self._bans.v4_lengths
        self._v6_lengths = self._bans.v6_lengths
        #: expiry second -> ([ban targets], [allow targets]) due in it; swept by expire().
        self._wheel: dict[int, tuple[list[str | int], list[str | int]]] = {}
        self._wheel_heap: list[int] = []
        #: Targets in the wheel, stale ones included, and when to look at that
        #: again (see _bound_wheel).
        self._wheel_size = 0
        self._wheel_limit = _WHEEL_SLACK
        #: Interned reason/origin strings: a million bans share a handful.
        self._strings: dict[str, str] = {}
        self._track = digest
        #: Bumped by replace() and clear(): a recompute() in progress gives up.
        self._generation = 0
        #: The digest of the tables, as of the last fold (None: unknown, see
        #: recompute()); the dirty maps hold, for each target changed since,
        #: its expiry then (None: absent).
        self._digest: Digest | None = Digest() if digest else None
        self._dirty_b: dict[str, Entry | None] | None = {} if digest else None
        self._dirty_a: dict[str, Entry | None] | None = {} if digest else None

    # -- hot path ------------------------------------------------------------------

    def is_banned(self, ip: str) -> bool:
        """True if *ip* (as a socket reports it) is banned and not allowlisted."""
        if ip in self._exact:
            return self._confirm(ip)
        if self._v4_lengths or self._packed:
            try:
                packed = _pton(_AF_INET, ip)
            except OSError:
                return self._slow(ip)
            if self._packed:  # compact mode: exact IPv4 bans are ints
                seconds = self._packed.get(_from_bytes(packed))
                if seconds is not None and (not seconds or seconds * 1000 > self._clock()):
                    return not self._allowed(ip)
            if self._v4_lengths and self._filter[packed[0] << 8 | packed[1]]:
                target = self._bans.match_v4(_from_bytes(packed))
                return target is not None and self._confirm(target, ip)
            return False
        if ":" in ip:
            return self._slow(ip)
        return False

    def _slow(self, ip: str) -> bool:
        """IPv6, IPv4-mapped, zone ids and non-canonical text."""
        peer = normalize_peer(ip)
        if peer != ip:
            return self.lookup(peer) is not None
        if self._v6_lengths:
            try:
                value = _from_bytes(_pton(_AF_INET6, ip))
            except OSError:
                return False
            target = self._bans.match_v6(value)
            return target is not None and self._confirm(target, ip)
        return False

    def _confirm(self, target: str, ip: str | None = None) -> bool:
        entry = self._bans.get(target)
        if entry is None:
            return False
        if entry.expires and entry.expires <= self._clock():
            # Expired but not swept yet: a wider ban may still cover the address.
            return self.lookup(ip or target) is not None
        return not self._allowed(ip or target)

    def _allowed(self, ip: str) -> bool:
        allow = self._allow
        if not allow:
            return False
        now = -1
        for target in allow.matches(ip):
            entry = allow.get(target)
            if entry is None:
                continue
            if not entry.expires:
                return True
            if now < 0:
                now = self._clock()
            if entry.expires > now:
                return True
        return False

    # -- queries ---------------------------------------------------------------------

    def lookup(self, ip: str) -> BanRecord | None:
        """The ban covering *ip* (exact first, then the most specific network).

        None if *ip* is not banned, the ban expired, or *ip* is allowlisted.
        """
        peer = normalize_peer(ip)
        now = self._clock()
        for target in self._bans.matches(peer):
            entry = self._bans.get(target)
            if entry is None or (entry.expires and entry.expires <= now):
                continue
            if self._allowed(peer):
                return None
            return self._record(target, entry, "ban")
        return None

    def allowed(self, ip: str) -> bool:
        """True if *ip* is covered by an active allowlist entry."""
        return self._allowed(normalize_peer(ip))

    def get(self, target: str, kind: Kind = "ban") -> BanRecord | None:
        """The active record stored for exactly *target* (canonical text)."""
        entry = (self._bans if kind == "ban" else self._allow).get(target)
        if entry is None or (entry.expires and entry.expires <= self._clock()):
            return None
        return self._record(target, entry, kind)

    def entry(self, kind: Kind, target: str) -> Entry | None:
        """The entry stored for exactly *target*, expired or not (compact: expiry only)."""
        return (self._bans if kind == "ban" else self._allow).get(target)

    def records(self, kind: Kind = "ban") -> Iterator[BanRecord]:
        """Every active record of *kind* (a snapshot; safe to iterate while applying)."""
        table = self._bans if kind == "ban" else self._allow
        now = self._clock()
        for source in (table.exact, table.nets):
            for target, entry in list(source.items()):
                if not entry.expires or entry.expires > now:
                    yield self._record(target, entry, kind)
        for key, seconds in list(table.packed.items()):
            if not seconds or seconds * 1000 > now:
                text = _ntop(_AF_INET, key.to_bytes(4, "big"))
                yield BanRecord(text, seconds * 1000, "", "", 0, kind)

    @staticmethod
    def _record(target: str, entry: Entry, kind: Kind) -> BanRecord:
        return BanRecord(target, entry.expires, entry.reason, entry.origin, entry.seq, kind)

    @property
    def ban_count(self) -> int:
        """Bans held (including expired ones the sweep has not reclaimed yet)."""
        return len(self._bans)

    def allow_targets(self) -> set[str]:
        """The targets on the allowlist (expired ones not yet swept included)."""
        return set(self._allow.exact) | set(self._allow.nets)

    @property
    def allow_count(self) -> int:
        return len(self._allow)

    @property
    def network_count(self) -> int:
        return len(self._bans.nets)

    @property
    def wheel_size(self) -> int:
        """Targets waiting in the expiry wheel (bounded by twice what is held)."""
        return self._wheel_size

    # -- mutation ----------------------------------------------------------------------

    def apply(self, event: StreamEvent, now: int | None = None) -> bool:
        """Apply one event; True if addresses under *event.target* may now be banned.

        That is a ban that is active, or a removed allowlist entry (what it
        covered may be banned underneath): the supervisor then re-checks the
        connections under the target.

        Idempotent: applying the same event twice leaves the same state.  A ban
        whose expiry has already passed removes the target instead (the event
        says "banned until then", and then is over).  *now* (server ms)
        defaults to the clock; a batch passes it once.
        """
        if isinstance(event, Ban):
            return self._store(True, event.target, event.expires, event.reason,
                               event.origin, event.seq, now)  # fmt: skip
        if isinstance(event, Allow):
            self._store(False, event.target, event.expires, event.reason, event.origin,
                        event.seq, now)  # fmt: skip
            return False
        if isinstance(event, Unban):
            self._remove(True, event.target)
        elif isinstance(event, Disallow):
            return self._remove(False, event.target)
        elif isinstance(event, Clear):
            self.clear()
        return False

    def put(self, kind: Kind, target: str, entry: Entry, now: int | None = None) -> bool:
        """Store a decoded record (bootstrap); True if it is an active ban."""
        return self._store(kind == "ban", target, entry.expires, entry.reason, entry.origin,
                           entry.seq, now)  # fmt: skip

    def set_entry(self, kind: Kind, target: str, entry: Entry | None) -> bool:
        """Make *target*'s entry exactly *entry* (None: absent).

        Returns True, as :meth:`apply` does, when addresses under *target* may
        now be banned: an active ban was stored, or an allowlist entry went away.
        """
        if entry is not None:
            return self.put(kind, target, entry)
        if kind == "ban":
            self._remove(True, target)
            return False
        return self._remove(False, target)

    def _remove(self, ban: bool, target: str) -> bool:
        """Remove *target*; True if it was there."""
        table = self._bans if ban else self._allow
        dirty = self._dirty_b if ban else self._dirty_a
        if dirty is not None and target not in dirty:
            dirty[target] = table.get(target)
        return table.remove(target) is not None

    def _store(
        self,
        ban: bool,
        target: str,
        expires: int,
        reason: str,
        origin: str,
        seq: int,
        now: int | None,
    ) -> bool:
        table = self._bans if ban else self._allow
        dirty = self._dirty_b if ban else self._dirty_a
        if dirty is not None:
            # The entry before the first change since the digest's last fold.
            if table.packed or table.nets:
                if target not in dirty:
                    dirty[target] = table.get(target)
            else:
                dirty.setdefault(target, table.exact.get(target))
        if expires and expires <= (self._clock() if now is None else now):
            table.remove(target)
            return False
        strings = self._strings
        if len(strings) < 65536:
            reason = strings.setdefault(reason, reason)
            origin = strings.setdefault(origin, origin)
        key = table._packed_key(target) if table.compact else None
        if key is not None:
            table.put_packed(key, expires)
        elif "/" in target:
            table.put(target, Entry(expires, reason, origin, seq))
        else:
            table.exact[target] = Entry(expires, reason, origin, seq)
            table.members.add(target)
        if expires:
            bucket = expires // _BUCKET_MS
            due = self._wheel.get(bucket)
            if due is None:
                due = self._wheel[bucket] = ([], [])
                heapq.heappush(self._wheel_heap, bucket)
            # Compact: the very int object that keys the dict (no second copy).
            due[0 if ban else 1].append(target if key is None else key)
            self._wheel_size += 1
            if self._wheel_size > self._wheel_limit:
                self._bound_wheel()
        return ban

    def _bound_wheel(self) -> None:
        """Re-stores and removals leave stale items in the wheel: keep it within
        twice what is held (rebuilt when it is not: amortised O(1) per store)."""
        limit = 2 * (len(self._bans) + len(self._allow)) + _WHEEL_SLACK
        if self._wheel_size > limit:
            self._rebuild_wheel()
            limit = 2 * (len(self._bans) + len(self._allow)) + _WHEEL_SLACK
        self._wheel_limit = limit

    def _rebuild_wheel(self) -> None:
        wheel: dict[int, tuple[list[str | int], list[str | int]]] = {}
        size = 0
        for index, table in enumerate((self._bans, self._allow)):
            for source in (table.exact, table.nets):
                for target, entry in source.items():
                    if entry.expires:
                        wheel.setdefault(entry.expires // _BUCKET_MS, ([], []))[index].append(
                            target
                        )
                        size += 1
            for key, seconds in table.packed.items():
                if seconds:
                    wheel.setdefault(seconds * 1000 // _BUCKET_MS, ([], []))[index].append(key)
                    size += 1
        self._wheel = wheel
        self._wheel_heap = list(wheel)
        heapq.heapify(self._wheel_heap)
        self._wheel_size = size

    def replace(
        self,
        bans: Iterable[tuple[str, Entry]],
        allows: Iterable[tuple[str, Entry]],
    ) -> list[str]:
        """Swap in a full snapshot (bootstrap/resync); return targets newly banned.

        The new tables are built aside and swapped in one step, so ``is_banned``
        never sees a half-loaded state.  The digest is unknown afterwards until
        :meth:`recompute` has run.
        """
        fresh = BanCache(self._clock, compact=self._bans.compact)
        fresh._strings = self._strings
        now = self._clock()
        for target, entry in allows:
            fresh.put("allow", target, entry, now)
        fresh._load_bans(bans, now)
        old = self._bans
        newly = (
            [t for t in fresh._bans.exact if t not in old.exact]
            + [t for t in fresh._bans.nets if t not in old.nets]
            if len(old)
            else list(fresh._bans.exact) + list(fresh._bans.nets)
        )
        newly += [
            _ntop(_AF_INET, key.to_bytes(4, "big"))
            for key in fresh._bans.packed
            if key not in old.packed
        ]
        track, generation = self._track, self._generation
        for name in self.__slots__:
            setattr(self, name, getattr(fresh, name))
        self._track = track
        self._generation = generation + 1
        return newly

    def _load_bans(self, bans: Iterable[tuple[str, Entry]], now: int) -> None:
        """Bulk :meth:`put` for bootstrap: the same rules, inlined for a million rows.

        Keeps the decoded entries themselves (interning their strings in place)
        instead of allocating new ones.
        """
        exact = self._bans.exact
        compact = self._bans.compact
        strings = self._strings
        intern = strings.setdefault
        wheel = self._wheel
        heap = self._wheel_heap
        size = 0
        for target, entry in bans:
            expires = entry.expires
            if expires and expires <= now:
                continue
            if len(strings) < 65536:
                entry.reason = intern(entry.reason, entry.reason)
                entry.origin = intern(entry.origin, entry.origin)
            key = self._bans._packed_key(target) if compact else None
            if key is not None:
                self._bans.put_packed(key, expires)
            elif "/" in target:
                self._bans.put(target, entry)
            else:
                exact[target] = entry
            if expires:
                bucket = expires // _BUCKET_MS
                due = wheel.get(bucket)
                if due is None:
                    due = wheel[bucket] = ([], [])
                    heapq.heappush(heap, bucket)
                due[0].append(target if key is None else key)
                size += 1
        self._wheel_size += size
        self._bans.members.update(exact)

    def clear(self) -> None:
        """Drop everything (the digest of an empty view is known: zero)."""
        self.replace((), ())
        if self._track:
            self._digest = Digest()
            self._dirty_b, self._dirty_a = {}, {}

    # -- expiry ------------------------------------------------------------------------

    def next_expiry(self) -> int | None:
        """Server ms at which :meth:`expire` next has work, or None."""
        return (self._wheel_heap[0] + 1) * _BUCKET_MS if self._wheel_heap else None

    def expire(self, now: int | None = None) -> int:
        """Drop every entry expired at *now* (server ms); return how many."""
        if now is None:
            now = self._clock()
        heap, wheel = self._wheel_heap, self._wheel
        dropped = 0
        while heap and (heap[0] + 1) * _BUCKET_MS <= now:
            due = wheel.pop(heapq.heappop(heap))
            self._wheel_size -= len(due[0]) + len(due[1])
            for ban, table, targets in ((True, self._bans, due[0]), (False, self._allow, due[1])):
                for target in targets:
                    if isinstance(target, int):  # compact: an IPv4 address int
                        seconds = table.packed.get(target)
                        if seconds and seconds * 1000 <= now:
                            self._remove(ban, _ntop(_AF_INET, target.to_bytes(4, "big")))
                            dropped += 1
                        continue
                    entry = table.get(target)
                    if entry is not None and entry.expires and entry.expires <= now:
                        self._remove(ban, target)
                        dropped += 1
        return dropped

    # -- digest (anti-entropy, see banbus._digest) ----------------------------------------

    @property
    def digest_known(self) -> bool:
        return self._digest is not None

    def recompute(self, chunk: int = 20_000) -> Iterator[None]:
        """Compute the digest from scratch, yielding every *chunk* entries.

        The caller may let events apply between steps: changes made meanwhile
        are tracked as usual, and the digest computed is that of the tables as
        they were when this started (which the tracked changes then update).
        """
        if not self._track:
            return
        generation = self._generation
        self._digest = None
        self._dirty_b, self._dirty_a = {}, {}
        # Both lists before the first yield: what was there when this started.
        kinds = []
        for kind, table, dirty in (("ban", self._bans, self._dirty_b),
                                   ("allow", self._allow, self._dirty_a)):  # fmt: skip
            targets: list[str] = [*table.exact, *table.nets]
            targets += [_ntop(_AF_INET, key.to_bytes(4, "big")) for key in list(table.packed)]
            kinds.append((kind, table, dirty, targets))
        d1 = d2 = n = 0
        done = 0
        for kind, table, dirty, targets in kinds:
            for target in targets:
                if target in dirty:
                    before = dirty[target]
                    expires = None if before is None else before.expires
                else:
                    expires = table.expires_of(target)
                if expires is not None:
                    h1, h2 = entry_hash(kind, target, expires)
                    d1 += h1
                    d2 += h2
                    n += 1
                done += 1
                if done % chunk == 0:
                    yield
                    if generation != self._generation:
                        return  # replaced meanwhile: a newer recompute takes over
        self._digest = Digest(d1 % DIGEST_P1, d2 % DIGEST_P2, n)

    def _fold(self, limit: int | None = None) -> Digest:
        """Fold the tracked changes (at most *limit* of them) into the digest; return it.

        :func:`banbus._digest.entry_hash`, inlined: the target's part of the
        number is shared by its old and new entry.
        """
        assert self._digest is not None and self._dirty_b is not None
        assert self._dirty_a is not None
        d1, d2, n = self._digest
        p1, p2 = DIGEST_P1, DIGEST_P2
        budget = -1 if limit is None else limit
        for kind_bits, table, dirty in ((1, self._bans, self._dirty_b),
                                        (2, self._allow, self._dirty_a)):  # fmt: skip
            exact_get = table.exact.get
            simple = not (table.packed or table.nets)
            while dirty and budget:
                budget -= 1
                target, before = dirty.popitem()
                entry = exact_get(target)
                new: int | None = entry.expires if entry is not None else None
                if entry is None and not simple:
                    new = table.expires_of(target)
                old = None if before is None else before.expires
                if old == new:
                    continue
                base = int.from_bytes(target.encode(), "big") << 50 | kind_bits
                if old is not None:
                    x = base | -(-old // 1000) << 2
                    a, b = x % p1, x % p2
                    d1, d2, n = d1 - a * a % p1, d2 - b * b % p2, n - 1
                if new is not None:
                    x = base | -(-new // 1000) << 2
                    a, b = x % p1, x % p2
                    d1, d2, n = d1 + a * a % p1, d2 + b * b % p2, n + 1
        self._digest = Digest(d1 % p1, d2 % p2, n)
        return self._digest

    @property
    def pending_changes(self) -> int:
        """Changes not folded into the digest yet."""
        return len(self._dirty_b or ()) + len(self._dirty_a or ())

    def fold_some(self, limit: int) -> None:
        """Fold up to *limit* tracked changes (so that the fold at a comparison stays short)."""
        if self._digest is not None:
            self._fold(limit)

    def digest(self, cutoff: int) -> Digest | None:
        """The digest of the entries that outlive *cutoff* (server ms, a whole second).

        Entries expiring at or before *cutoff* are left out, as the function
        library leaves them out (``banbus_digest``).  None while the digest is
        unknown (see :meth:`recompute`) or when more than
        ``DIGEST_EXCLUDE_LIMIT`` entries would be left out.
        """
        if self._digest is None:
            return None
        d1, d2, n = self._fold()
        last = cutoff // _BUCKET_MS
        heap = self._wheel_heap
        seen: set[tuple[bool, str | int]] = set()
        stack = [0] if heap else []
        while stack:
            i = stack.pop()
            bucket = heap[i]
            if bucket > last:
                continue
            stack.extend(c for c in (2 * i + 1, 2 * i + 2) if c < len(heap))
            due = self._wheel.get(bucket)
            if due is None:
                continue
            for ban, items in ((True, due[0]), (False, due[1])):
                for item in items:
                    if (ban, item) in seen:
                        continue
                    seen.add((ban, item))
                    if len(seen) > DIGEST_EXCLUDE_LIMIT * 2:
                        return None
                    table = self._bans if ban else self._allow
                    if isinstance(item, int):
                        target = _ntop(_AF_INET, item.to_bytes(4, "big"))
                    else:
                        target = item
                    expires = table.expires_of(target)
                    if expires and expires <= cutoff:
                        h1, h2 = entry_hash("ban" if ban else "allow", target, expires)
                        d1, d2, n = d1 - h1, d2 - h2, n - 1
        return Digest(d1 % DIGEST_P1, d2 % DIGEST_P2, n)
