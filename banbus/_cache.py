"""The local ban state: a plain class, no Redis, no ``await``.

Theory of operation
-------------------

:class:`BanCache` holds two :class:`_Table` s — bans and the allowlist.  Each
keeps exact IPv4 addresses packed in arrays (:mod:`banbus._packed`: 8 bytes
per address in compact mode, 32 with the full record), other exact targets
(IPv6) in a dict, and CIDR networks in one dict per prefix length in use,
keyed by ``address >> host_bits``.  The I/O layer feeds it events
(:meth:`apply`) and whole snapshots (:meth:`replace`); it answers
:meth:`is_banned` without I/O.

``is_banned(ip)`` takes the peer text exactly as a socket reports it.  A miss —
the common case — costs one bloom filter probe of the text (rbloom, 1.8 bytes
per exact ban: "certainly not" for all but ~0.1% of addresses; compact mode
1.35 bytes and ~1%), and, only when
IPv4 networks are banned, one ``inet_pton`` plus a probe of a 64 Ki-entry
array indexed by the address's /16, holding a bit per prefix length of the
networks that overlap that /16; only those lengths' tables are probed.  (The
store's recent changes, not in the filter until packed, are one dict probe.)
No ``ipaddress`` parsing on that path.  A hit then checks expiry against the (server) clock and the
allowlist, which always wins.

In **bloom mode** the exact addresses are held *only* in the filter: a
"maybe" that this node does not know exactly is confirmed against the record
(the node's *confirm* callback, or ``await node.check(ip)``) and the answer
kept; events since the last load are known exactly, in a dict the hot path
probes when the filter says no.  The filter itself stays as the load made it,
so at the next load it still tells the targets it held (maybes, confirmed when
an address connects) from targets it never held: those are the newly banned
whose live connections must be checked.  When the known targets grow large
(see ``_KNOWN_MIN``), the node reloads.

Expiry times are absolute server-clock milliseconds.  A hit is checked against
the clock, so expiry is exact even if the sweep is late.  Memory is reclaimed
by :meth:`expire`: from a per-second bucket wheel for dict-held targets, and by
periodic O(n) sweeps of the packed stores (which keep no per-entry pointer).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import heapq
import socket
import time
from array import array
from collections import deque
from itertools import repeat
from operator import countOf, mul
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

from ._digest import Digest, entry_hash
from ._keys import DIGEST_EXCLUDE_LIMIT, DIGEST_P1, DIGEST_P2
from ._model import Allow, Ban, BanRecord, Clear, Disallow, Entry, StreamEvent, Unban
from ._packed import AddressStore, BulkLoad, addresses_of, seconds_of
from ._targets import normalize_peer

_RBloom: Any
try:
    from rbloom import Bloom as _RBloom
except ImportError:  # pragma: no cover - the pure-Python prefilter is tested directly
    _RBloom = None

if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Iterable, Iterator, Sequence

__all__ = ["BLOOM_RATE", "COMPACT_BLOOM_RATE", "BanCache", "CacheMode", "Kind"]

_AF_INET: Final = socket.AF_INET
_AF_INET6: Final = socket.AF_INET6
_pton: Final = socket.inet_pton
_from_bytes: Final = int.from_bytes
_BUCKET_MS: Final = 1000
#: The expiry wheel is rebuilt when its stale items exceed what is held by this much.
_WHEEL_SLACK: Final = 1024
#: The bloom filter's false-positive rate at capacity (capacity = 1.125 x the
#: entries at a build): 14.5 bits per entry at capacity, ~1.8 bytes per entry.
BLOOM_RATE: Final = 0.002
#: Compact mode's rate: its filter only spares a miss the packed lookup, and
#: memory is what the mode is for (1.35 bytes per entry instead of 1.8; a
#: false positive costs a lookup, ~1 µs, so ~10 ns on the average miss).
COMPACT_BLOOM_RATE: Final = 0.01
_UNKNOWN: Final[Any] = object()
#: Bloom mode reloads when it knows more targets exactly (~150 bytes each)
#: than this, or than 1/64 of its filter's capacity (~2.5 bytes per filter
#: entry at most: the memory the mode is chosen to save stays saved).
_KNOWN_MIN: Final = 65_536

try:
    _libc: Any = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _malloc_trim = _libc.malloc_trim
except (OSError, AttributeError):  # not glibc
    _malloc_trim = None


def _trim() -> None:
    """Give the heap a bulk load freed back to the OS (glibc keeps it otherwise:
    a million-row bootstrap left ~50 MB of free heap in the process's RSS)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


Kind: TypeAlias = Literal["ban", "allow"]
CacheMode: TypeAlias = Literal["full", "compact", "bloom"]


def _pack_due(store: AddressStore) -> bool:
    """The overlay is worth packing: over 4096 changes and an eighth of the index."""
    return len(store.overlay) > max(4096, len(store.index) >> 3)


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


class _HashBits:
    """The prefilter when rbloom is not installed: one bit per hash, 16 bits per entry.

    About 6% false positives (rbloom: 0.2% in the same memory, and faster).
    """

    __slots__ = ("bits", "mask")

    def __init__(self, capacity: int, rate: float = 0.0) -> None:
        size = 1 << max(16, (capacity * 16 - 1).bit_length())
        self.mask = size - 1
        self.bits = bytearray(size >> 3)

    def add(self, text: str) -> None:
        h = hash(text) & self.mask
        self.bits[h >> 3] |= 1 << (h & 7)

    def update(self, texts: Iterable[str]) -> None:
        for text in texts:
            self.add(text)

    def __contains__(self, text: object) -> bool:
        h = hash(text) & self.mask
        return bool(self.bits[h >> 3] >> (h & 7) & 1)

    @property
    def size_in_bits(self) -> int:
        return len(self.bits) * 8

    def copy(self) -> _HashBits:
        new = _HashBits.__new__(_HashBits)
        new.mask, new.bits = self.mask, bytearray(self.bits)
        return new


_Filter: Any = _HashBits if _RBloom is None else _RBloom


class _Prefilter:
    """The bloom filter in front of a table's exact addresses, and when to rebuild it.

    It holds the text of every exact target stored since it was built
    (removed ones too: they cost false positives until the next rebuild).
    """

    __slots__ = ("added", "capacity", "filter", "known_max", "stale")

    def __init__(self, capacity: int, *, room: float = 0.125, rate: float = BLOOM_RATE) -> None:
        self.capacity = max(capacity + int(capacity * room), 1024)
        self.filter: Any = _Filter(self.capacity, rate)
        #: Bloom mode reloads when it knows more targets exactly than this.
        self.known_max = max(_KNOWN_MIN, self.capacity >> 6)
        #: Texts added since the build (a new target counts once).
        self.added = 0
        #: Of those, targets removed since.
        self.stale = 0

    @property
    def worn(self) -> bool:
        """Over capacity, or a third of it stale: the false positives have grown."""
        return self.added > self.capacity or 3 * self.stale > self.capacity

    def moved(self, added: int) -> _Prefilter:
        """A copy made now, holding *added* texts (see ``BanCache._install``)."""
        new = _Prefilter.__new__(_Prefilter)
        new.capacity = self.capacity + 0  # a new int, made now
        new.known_max = self.known_max + 0
        new.filter = self.filter.copy()
        new.added = added
        new.stale = 0
        return new


class _Table:
    """Exact addresses plus CIDR networks of one kind (bans or allowlist)."""

    __slots__ = (
        "bloom_only", "count16", "exact", "filter16", "nets", "prefilter", "store", "v4",
        "v4_lengths",
        "v6", "v6_lengths",
    )  # fmt: skip

    def __init__(self, compact: bool = False, *, bloom_only: bool = False) -> None:
        #: Exact IPv4 addresses, packed (see banbus._packed).
        self.store = AddressStore(compact)
        #: Other exact targets (IPv6 addresses) -> entry.  Bloom mode: every
        #: exact target this node knows exactly (events since the build,
        #: confirmed lookups); None = known absent.
        self.exact: dict[str, Entry | None] = {}
        #: Bloom mode: exact addresses are only in the prefilter and ``exact``.
        self.bloom_only = bloom_only
        self.prefilter: _Prefilter | None = None
        #: CIDR target text -> entry (the authoritative map for networks).
        self.nets: dict[str, Entry] = {}
        #: prefix length -> {network >> host_bits: target text}
        self.v4: dict[int, dict[int, str]] = {}
        self.v6: dict[int, dict[int, str]] = {}
        #: Prefix lengths in use, longest first (so a lookup finds the most specific).
        self.v4_lengths: list[int] = []
        self.v6_lengths: list[int] = []
        #: For each /16, a bit per prefix length of the IPv4 networks that
        #: overlap it (allocated with the first network, in place: the cache
        #: binds this very array).  A lookup probes only those lengths.
        self.filter16 = array("Q")
        #: /16 << 6 | prefix length -> how many networks of that length overlap it.
        self.count16: dict[int, int] = {}

    def __len__(self) -> int:
        if self.bloom_only:
            # What the load put in the filter, corrected by what is known since
            # (exact but for the filter's false positives among the known).
            assert self.prefilter is not None
            held = self.prefilter.filter
            known = sum((e is not None) - (t in held) for t, e in self.exact.items())
            return self.prefilter.added + known + len(self.nets)
        return len(self.exact) + len(self.nets) + len(self.store)

    def get(self, target: str) -> Entry | None:
        if "/" in target:
            return self.nets.get(target)
        if not self.bloom_only and ":" not in target:
            return self.store.get(target)
        return self.exact.get(target)

    def expires_of(self, target: str) -> int | None:
        """The stored expiry (ms, 0 = permanent) of exactly *target*, or None."""
        entry = self.get(target)
        return None if entry is None else entry.expires

    @property
    def bloom_rate(self) -> float:
        """The false-positive rate of this table's filter at capacity."""
        return COMPACT_BLOOM_RATE if self.store.compact else BLOOM_RATE

    def contains_exact(self, ip: str) -> bool:
        if self.bloom_only:
            return self.exact.get(ip) is not None
        return ip in self.store if ":" not in ip else ip in self.exact

    def put(self, target: str, entry: Entry) -> Entry | None:
        """Store *entry*; return the entry it replaces (None: *target* is new)."""
        if "/" in target:
            before = self.nets.get(target)
            self.nets[target] = entry
            if before is None:
                self._index_net(target, 1)
            return before
        prefilter = self.prefilter
        if not self.bloom_only and ":" not in target:
            # Not in the filter: not in the index either (a merge adds to
            # both, and counts what it adds to the filter).
            fresh = prefilter is not None and target not in prefilter.filter
            return self.store.put(target, entry, fresh=fresh)
        before = self.exact.get(target)
        self.exact[target] = entry
        # Bloom mode: the filter stays what the load made it (known targets
        # are looked up in ``exact`` first), so that a reload can tell the
        # targets it held then from false positives added since.
        if before is None and not self.bloom_only:
            self.store.feed([target])  # the store's filter is this table's (see _bind)
        return before

    def remove(self, target: str) -> Entry | None:
        if "/" in target:
            before = self.nets.pop(target, None)
            if before is not None:
                self._index_net(target, -1)
            return before
        if not self.bloom_only and ":" not in target:
            before = self.store.pop(target)
        elif self.bloom_only:
            before = self.exact.get(target)
            self.exact[target] = None
        else:
            before = self.exact.pop(target, None)
        if before is not None and self.prefilter is not None and not self.bloom_only:
            self.prefilter.stale += 1
        return before

    def _index_net(self, target: str, delta: int) -> None:
        split = _split(target)
        assert split is not None
        version, plen, network = split
        tables = self.v4 if version == 4 else self.v6
        key = network >> ((32 if version == 4 else 128) - plen)
        if delta > 0:
            tables.setdefault(plen, {})[key] = target
        else:
            table = tables[plen]
            del table[key]
            if not table:
                del tables[plen]
        if version == 4:
            self._mark16(network, plen, delta)
        self._lengths()

    def _mark16(self, network: int, plen: int, delta: int) -> None:
        first = network >> 16
        last = first if plen >= 16 else first + (1 << (16 - plen)) - 1
        filt, counts = self.filter16, self.count16
        if not filt:
            filt.frombytes(bytes(65536 * filt.itemsize))
        bit = 1 << plen
        for slot in range(first, last + 1):
            key = slot << 6 | plen
            count = counts.get(key, 0) + delta
            if count:
                counts[key] = count
                filt[slot] |= bit
            else:
                del counts[key]
                filt[slot] &= ~bit

    def _lengths(self) -> None:
        self.v4_lengths[:] = sorted(self.v4, reverse=True)
        self.v6_lengths[:] = sorted(self.v6, reverse=True)

    def match_v4(self, value: int) -> str | None:
        """The most specific network containing the IPv4 *value*, or None."""
        if not self.filter16:
            return None
        lengths = self.filter16[value >> 16]  # the lengths present in its /16
        v4 = self.v4
        while lengths:
            plen = lengths.bit_length() - 1
            target = v4[plen].get(value >> (32 - plen))
            if target is not None:
                return target
            lengths ^= 1 << plen
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
        if self.contains_exact(ip):
            yield ip
        try:
            value = _from_bytes(_pton(_AF_INET, ip))
        except (OSError, ValueError):
            try:
                value = _from_bytes(_pton(_AF_INET6, ip))
            except (OSError, ValueError):
                return
            for plen in self.v6_lengths:
                target = self.v6[plen].get(value >> (128 - plen))
                if target is not None:
                    yield target
            return
        if self.v4_lengths:
            lengths = self.filter16[value >> 16]
            while lengths:
                plen = lengths.bit_length() - 1
                target = self.v4[plen].get(value >> (32 - plen))
                if target is not None:
                    yield target
                lengths ^= 1 << plen

    def targets(self) -> list[str]:
        """Every target held (a list: safe to iterate while changing)."""
        out = [t for t, e in self.exact.items() if e is not None]
        out += self.nets
        out += self.store.keys()
        return out

    def items(self) -> Iterator[tuple[str, Entry]]:
        for target, entry in list(self.exact.items()):
            if entry is not None:
                yield target, entry
        yield from list(self.nets.items())
        yield from self.store.items()

    def build_prefilter(self, extra: Sequence[str] = (), *, held: bool = True) -> None:
        """(Re)build the prefilter from *extra* texts, and what is held (*held*;
        the dict-held exact targets are always added).

        Rebuilt for growth (*held*), it gets room to double; a load sizes it
        for what it loads (1/8 more).  The packed addresses go in a chunk of
        texts at a time, not as one list of a million strings.
        """
        texts = [t for t, e in self.exact.items() if e is not None]
        texts += extra
        count = len(texts) + (len(self.store) if held else 0)
        prefilter = _Prefilter(count, room=1.0 if held else 0.125, rate=self.bloom_rate)
        add = prefilter.filter.update
        add(texts)
        if held:
            for chunk in self.store.key_chunks():
                add(chunk)
        prefilter.added = count
        self.prefilter = prefilter


class BanCache:
    """Bans and allowlist of one namespace, answering ``is_banned`` without I/O.

    :param clock: returns the current *server* time in milliseconds (the node
        passes its offset-corrected clock; tests pass a fake).
    :param mode: ``"full"`` (default: every record exact, ~40 bytes per IPv4
        ban), ``"compact"`` (IPv4 bans keep only their expiry, rounded up to
        the second: ~10 bytes each; ``lookup`` returns no reason/origin/seq
        for them) or ``"bloom"`` (exact addresses are held only in a bloom
        filter, ~2 bytes each: a "maybe" is confirmed by *confirm*).
    :param compact: the older spelling of ``mode="compact"``.
    :param digest: keep the view's digest (:mod:`banbus._digest`) up to date
        for anti-entropy; off, changes are not tracked.  Not in bloom mode.
    :param confirm: bloom mode: called with an address the filter may hold
        and this node does not know exactly; the node looks it up in Redis and
        stores the answer (:meth:`confirmed`).
    """

    __slots__ = (
        "_allow",
        "_bans",
        "_bloom",
        "_clock",
        "_confirm_cb",
        "_digest",
        "_dirty_a",
        "_dirty_b",
        "_filter",
        "_generation",
        "_known",
        "_mode",
        "_recent",
        "_stored",
        "_strings",
        "_track",
        "_v4_lengths",
        "_v6_lengths",
        "_wheel",
        "_wheel_heap",
        "_wheel_limit",
        "_wheel_size",
        "reload_wanted",
    )  # fmt: skip

    def __init__(
        self,
        clock: Callable[[], int],
        *,
        mode: CacheMode | None = None,
        compact: bool = False,
        digest: bool = False,
        confirm: Callable[[str], None] | None = None,
    ) -> None:
        if mode is None:
            mode = "compact" if compact else "full"
        if mode not in ("full", "compact", "bloom"):
            raise ValueError(f"cache mode must be 'full', 'compact' or 'bloom', not {mode!r}")
        if mode == "bloom" and _RBloom is None:
            raise ImportError("cache='bloom' needs rbloom: pip install 'banbus[bloom]'")
        self._mode: CacheMode = mode
        self._clock = clock
        self._bans = _Table(mode == "compact", bloom_only=mode == "bloom")
        self._bans.build_prefilter()
        self._allow = _Table()
        self._confirm_cb = confirm
        #: Bloom mode: the targets known exactly (events and confirmations
        #: since the load) grew large: the node reloads from the record.
        self.reload_wanted = False
        # Bound once: the hot path reads these attributes, never chains them.
        self._bind()
        #: expiry second -> ([ban targets], [allow targets]) due in it; swept by
        #: expire().  Targets in the packed stores are not here (they sweep
        #: themselves, see _packed).
        self._wheel: dict[int, tuple[list[str], list[str]]] = {}
        self._wheel_heap: list[int] = []
        #: Targets in the wheel, stale ones included, and when to look at that
        #: again (see _bound_wheel).
        self._wheel_size = 0
        self._wheel_limit = _WHEEL_SLACK
        #: Interned reason/origin strings: a million bans share a handful.
        self._strings: dict[str, str] = {}
        digest = digest and mode != "bloom"
        self._track = digest
        #: Bumped by replace() and clear(): a recompute() in progress gives up.
        self._generation = 0
        #: The digest of the tables, as of the last fold (None: unknown, see
        #: recompute()); the dirty maps hold, for each target changed since,
        #: its entry then (None: absent).
        self._digest: Digest | None = Digest() if digest else None
        self._dirty_b: dict[str, Entry | None] | None = {} if digest else None
        self._dirty_a: dict[str, Entry | None] | None = {} if digest else None

    def _bind(self) -> None:
        bans = self._bans
        assert bans.prefilter is not None
        self._bloom = bans.prefilter.filter
        bans.store.prefilter = bans.prefilter
        #: What the bloom filter does not hold (yet): the store's recent changes
        #: (until merged), or in bloom mode every target known exactly.
        self._recent = bans.exact if bans.bloom_only else bans.store.overlay
        #: A maybe of the filter: its exact entry, or (not there) its expiry in
        #: the packed store (bloom mode: a confirmation asked for).
        self._known = bans.exact
        self._stored = self._ask if bans.bloom_only else bans.store.expires_of
        self._filter = bans.filter16
        self._v4_lengths = bans.v4_lengths
        self._v6_lengths = bans.v6_lengths

    @property
    def mode(self) -> CacheMode:
        return self._mode

    # -- hot path ------------------------------------------------------------------

    def is_banned(self, ip: str) -> bool:
        """True if *ip* (as a socket reports it) is banned and not allowlisted.

        Bloom mode: an address the filter may hold and this node does not
        know exactly answers False until its confirmation arrives (the node
        then treats it as a new ban: live connections from it are cut).
        """
        if ip in self._bloom or ip in self._recent:
            entry = self._known.get(ip, _UNKNOWN)
            if entry is _UNKNOWN:
                expires = self._stored(ip)
            else:
                expires = None if entry is None else entry.expires
            if expires is not None:
                if not expires or expires > self._clock():
                    return not self._allowed(ip)
                # Expired, not swept yet: a network may still cover the address.
        if self._v4_lengths:
            try:
                packed = _pton(_AF_INET, ip)
            except (OSError, ValueError):
                return self._slow(ip)
            if self._filter[packed[0] << 8 | packed[1]]:
                target = self._bans.match_v4(_from_bytes(packed))
                return target is not None and self._confirm(target, ip)
            return False
        if ":" in ip:
            return self._slow(ip)
        return False

    def _ask(self, ip: str) -> None:
        """Bloom mode: a maybe this node does not know: have it confirmed (the
        answer arrives through :meth:`confirmed`); not banned until then."""
        if self._confirm_cb is not None and normalize_peer(ip) == ip:
            self._confirm_cb(ip)

    def _slow(self, ip: str) -> bool:
        """IPv6, IPv4-mapped, zone ids and non-canonical text."""
        peer = normalize_peer(ip)
        if peer != ip:
            return self.is_banned(peer)
        if self._v6_lengths:
            try:
                value = _from_bytes(_pton(_AF_INET6, ip))
            except (OSError, ValueError):
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
        if not (allow.store.count or allow.exact or allow.nets):  # len(), without its call
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

    # -- bloom mode ------------------------------------------------------------------

    def pending(self, ip: str) -> bool:
        """Bloom mode: True if *ip* may be banned and this node does not know exactly
        (``await node.check(ip)`` asks Redis).  Always False in the exact modes."""
        table = self._bans
        return table.bloom_only and ip in self._bloom and ip not in table.exact

    def confirmed(self, ip: str, entry: Entry | None) -> bool:
        """Bloom mode: store what the record holds for exactly *ip* (None: not
        banned); True if that is an active ban (connections from *ip* must go)."""
        table = self._bans
        if ip in table.exact:  # an event got there first: it is newer
            return False
        table.exact[ip] = entry
        if entry is None or (entry.expires and entry.expires <= self._clock()):
            table.exact[ip] = None
            return False
        if entry.expires:
            self._wheel_add(True, ip, entry.expires)
        self._check_wear()
        return not self._allowed(ip)

    def _check_wear(self) -> None:
        table = self._bans
        prefilter = table.prefilter
        assert prefilter is not None
        if table.bloom_only:
            # The filter takes no additions and a removal only makes its target
            # known: it does not wear, the known targets grow.
            if len(table.exact) > prefilter.known_max:
                self.reload_wanted = True
        elif prefilter.worn and table.store.growing is None:
            # (A growth in progress replaces it soon: the old filter, over
            # capacity, answers with more false positives meanwhile, none
            # false negative.)
            table.build_prefilter()
            self._bind()

    # -- queries ---------------------------------------------------------------------

    def lookup(self, ip: str) -> BanRecord | None:
        """The ban covering *ip* (exact first, then the most specific network).

        None if *ip* is not banned, the ban expired, or *ip* is allowlisted.
        (Bloom mode: exact bans only as far as this node knows them.)
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
        """Every active record of *kind* (a snapshot; safe to iterate while applying).

        Bloom mode: the networks and the exact bans this node knows exactly.
        """
        table = self._bans if kind == "ban" else self._allow
        now = self._clock()
        for target, entry in table.items():
            if not entry.expires or entry.expires > now:
                yield self._record(target, entry, kind)

    @staticmethod
    def _record(target: str, entry: Entry, kind: Kind) -> BanRecord:
        return BanRecord(target, entry.expires, entry.reason, entry.origin, entry.seq, kind)

    @property
    def ban_count(self) -> int:
        """Bans held (including expired ones not reclaimed yet; bloom mode: approximate)."""
        return len(self._bans)

    def allow_targets(self) -> set[str]:
        """The targets on the allowlist (expired ones not yet swept included)."""
        return set(self._allow.targets())

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

    def memory(self) -> dict[str, int]:
        """Bytes held in the packed arrays and the bloom filter (not the objects)."""
        store = self._bans.store
        prefilter = self._bans.prefilter
        arrays = sum(a.buffer_info()[1] * a.itemsize for a in (
            store.index, store.expires, store.seqs, store.reasons, store.origins))  # fmt: skip
        return {
            "packed": arrays,
            "bloom": 0 if prefilter is None else prefilter.filter.size_in_bits // 8,
            "overlay": len(store.overlay),
            "known": len(self._bans.exact),
        }

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
        before = table.remove(target)
        dirty = self._dirty_b if ban else self._dirty_a
        if dirty is not None and target not in dirty:
            dirty[target] = before
        if ban and before is not None:
            self._check_wear()
        return before is not None

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
        if expires and expires <= (self._clock() if now is None else now):
            self._remove(ban, target)
            return False
        table = self._bans if ban else self._allow
        strings = self._strings
        if len(strings) < 65536:
            reason = strings.setdefault(reason, reason)
            origin = strings.setdefault(origin, origin)
        before = table.put(target, Entry(expires, reason, origin, seq))
        dirty = self._dirty_b if ban else self._dirty_a
        if dirty is not None and target not in dirty:
            dirty[target] = before
        if expires and ("/" in target or ":" in target or table.bloom_only):
            self._wheel_add(ban, target, expires)
        if ban and before is None:
            prefilter = table.prefilter
            if prefilter is not None and (prefilter.added > prefilter.capacity or table.bloom_only):
                self._check_wear()
        return ban

    def store_address(
        self,
        ban: bool,
        target: str,
        expires: int,
        reason: str,
        origin: str,
        seq: int,
        now: int,
    ) -> bool:
        """:meth:`apply` of a ban or allowlist entry for *target*, a canonical IPv4
        address: the follower's per-event fast path (``_store`` and
        ``AddressStore.put`` inlined, without the checks an address never needs).
        """
        table = self._bans if ban else self._allow
        prefilter = table.prefilter
        if prefilter is None or (expires and expires <= now):
            return self._store(ban, target, expires, reason, origin, seq, now)
        store = table.store
        if store.compact and not table.bloom_only:
            entry = Entry(-(-expires // 1000) * 1000)
        else:
            strings = self._strings
            if len(strings) < 65536:
                reason = strings.setdefault(reason, reason)
                origin = strings.setdefault(origin, origin)
            entry = Entry(expires, reason, origin, seq)
        if table.bloom_only:  # known exactly from now on (no digest in bloom mode)
            exact = table.exact
            before = exact.get(target)
            exact[target] = entry
            if expires:
                self._wheel_add(ban, target, expires)
            if before is None and len(exact) > prefilter.known_max:
                self._check_wear()
            return ban
        overlay = store.overlay
        before = overlay.get(target, _UNKNOWN)
        if before is _UNKNOWN:
            # Not in the filter: not in the index either (a merge adds to both).
            before = store.shadow(target) if target in prefilter.filter else None
        overlay[target] = entry
        if before is None:
            store.count += 1
        if expires and (not store.earliest or expires < store.earliest):
            store.earliest = expires
        if len(overlay) > store.limit:
            store.merge()
        dirty = self._dirty_b if ban else self._dirty_a
        if dirty is not None and target not in dirty:
            dirty[target] = before
        if before is None and ban and prefilter.added > prefilter.capacity:
            self._check_wear()
        return ban

    def store_bans(
        self,
        targets: Sequence[str],
        expires: Sequence[int],
        reasons: Sequence[str],
        origins: Sequence[str],
        seqs: Sequence[int],
        earliest: int,
        now: int,
    ) -> None:
        """:meth:`store_address` of a burst's bans, column by column: distinct
        canonical IPv4 addresses, none expired at *now*, *earliest* the
        earliest non-zero expiry (0: none).  The same records result as from
        storing them one by one; the bookkeeping may differ in when it runs
        (the overlay may pass its limit by the batch before the merge, a worn
        filter is rebuilt after the batch, interning stops a batch early)."""
        table = self._bans
        prefilter = table.prefilter
        assert prefilter is not None
        store = table.store
        entries: list[Entry]
        if store.compact and not table.bloom_only:
            entries = list(map(Entry, map(mul, seconds_of(expires), repeat(1000))))
        else:
            strings = self._strings
            if len(strings) + 2 * len(targets) <= 65536:
                reasons = list(map(strings.setdefault, reasons, reasons))
                origins = list(map(strings.setdefault, origins, origins))
            entries = list(map(Entry, expires, reasons, origins, seqs))
        if table.bloom_only:  # known exactly from now on (no digest in bloom mode)
            exact = table.exact
            # (Absent, or known absent: what makes the per-event path look at wear.)
            fresh = None in map(exact.get, targets)
            exact.update(zip(targets, entries, strict=True))
            if earliest:
                # (A rebuild of the wheel meanwhile holds the batch already: the
                # repeats are stale items, which the wheel tolerates and bounds.)
                for target, at in zip(targets, expires, strict=True):
                    if at:
                        self._wheel_add(True, target, at)
            if fresh and len(exact) > prefilter.known_max:
                self._check_wear()
            return
        overlay = store.overlay
        befores: list[Entry | None] = list(map(overlay.get, targets, repeat(_UNKNOWN)))
        unknown = countOf(befores, _UNKNOWN)
        if unknown:
            # Not in the filter: not in the index either (a merge adds to both).
            held = list(map(prefilter.filter.__contains__, targets))
            if any(held) or unknown < len(befores):
                shadow = store.shadow
                befores = [(shadow(t) if h else None) if b is _UNKNOWN else b
                           for t, h, b in zip(targets, held, befores, strict=True)]  # fmt: skip
            else:
                befores = [None] * len(befores)
        overlay.update(zip(targets, entries, strict=True))
        added = countOf(befores, None)
        store.count += added
        if earliest and (not store.earliest or earliest < store.earliest):
            store.earliest = earliest
        if len(overlay) > store.limit:
            store.merge()
        dirty = self._dirty_b
        if dirty is not None:
            deque(map(dirty.setdefault, targets, befores), 0)  # consumed in C
        if added and prefilter.added > prefilter.capacity:
            self._check_wear()

    def _wheel_add(self, ban: bool, target: str, expires: int) -> None:
        bucket = expires // _BUCKET_MS
        due = self._wheel.get(bucket)
        if due is None:
            due = self._wheel[bucket] = ([], [])
            heapq.heappush(self._wheel_heap, bucket)
        due[0 if ban else 1].append(target)
        self._wheel_size += 1
        if self._wheel_size > self._wheel_limit:
            self._bound_wheel()

    def _bound_wheel(self) -> None:
        """Re-stores and removals leave stale items in the wheel: keep it within
        twice what is held (rebuilt when it is not: amortised O(1) per store)."""
        limit = 2 * (self._wheel_held()) + _WHEEL_SLACK
        if self._wheel_size > limit:
            self._rebuild_wheel()
            limit = 2 * (self._wheel_held()) + _WHEEL_SLACK
        self._wheel_limit = limit

    def _wheel_held(self) -> int:
        return sum(len(t.exact) + len(t.nets) for t in (self._bans, self._allow))

    def _rebuild_wheel(self) -> None:
        wheel: dict[int, tuple[list[str], list[str]]] = {}
        size = 0
        for index, table in enumerate((self._bans, self._allow)):
            for source in (table.exact, table.nets):
                for target, entry in source.items():
                    if entry is not None and entry.expires:
                        wheel.setdefault(entry.expires // _BUCKET_MS, ([], []))[index].append(
                            target
                        )
                        size += 1
        self._wheel = wheel
        self._wheel_heap = list(wheel)
        heapq.heapify(self._wheel_heap)
        self._wheel_size = size

    def bulk_load(self, count: int, *, newly: bool = True) -> BulkLoad:
        """A container for about *count* bans, filled page by page by a snapshot
        and given to :meth:`replace` (with the same *newly*)."""
        table = self._bans
        return BulkLoad(
            table.store.compact,
            _Prefilter(count, rate=table.bloom_rate),
            keep=not table.bloom_only,
            # Only bloom mode finds the newly banned among the texts (the
            # exact modes find them in the store built).
            texts=table.bloom_only and newly,
            now=self._clock(),
        )

    def replace(
        self,
        bans: BulkLoad | Iterable[tuple[str, Entry]],
        allows: Iterable[tuple[str, Entry]],
        *,
        newly: bool = True,
    ) -> list[str]:
        """Swap in a full snapshot (bootstrap/resync); return targets newly banned.

        The new tables are built aside and swapped in one step, so ``is_banned``
        never sees a half-loaded state.  The digest is unknown afterwards until
        :meth:`recompute` has run.  *newly* False: the caller does not need
        the list (a bootstrap), [] is returned.
        """
        fresh = BanCache(self._clock, mode=self._mode, confirm=self._confirm_cb)
        fresh._strings = self._strings
        now = self._clock()
        for target, entry in allows:
            fresh.put("allow", target, entry, now)
        if isinstance(bans, BulkLoad):
            texts = fresh._install(bans, now)
            loaded = bans.count
        else:
            texts = fresh._load_bans(bans, now)
            loaded = len(texts)
        if loaded >= 50_000:  # a big load: give its freed heap back (a small one has little)
            _trim()
        found: list[str] = []
        if newly:
            old = self._bans
            if self._mode == "bloom":
                if isinstance(bans, BulkLoad) and bans.texts is None:
                    raise ValueError("this bulk load was made with newly=False")
                # Not newly banned: what this node knew banned, and the maybes
                # of the last load (a connection from one was confirmed when
                # it was accepted).  Everything else may have live connections.
                known = old.exact
                held = old.prefilter.filter if old.prefilter is not None else ()
                found = [t for t in texts if t not in held or known.get(t, _UNKNOWN) is None]
                # IPv6 addresses are known exactly, in both views.
                found += [t for t, e in fresh._bans.exact.items()
                          if e is not None and known.get(t) is None]  # fmt: skip
                found += [t for t in fresh._bans.nets if t not in old.nets]
            elif not len(old):
                found = fresh._bans.targets()
            else:
                held = set(old.targets())  # one pass, not a store lookup per target
                found = [t for t in fresh._bans.targets() if t not in held]
        track, generation = self._track, self._generation
        for name in self.__slots__:
            setattr(self, name, getattr(fresh, name))
        self._track = track
        self._generation = generation + 1
        return found

    def _load_bans(self, bans: Iterable[tuple[str, Entry]], now: int) -> list[str]:
        """Bulk :meth:`put` for bootstrap: the same rules, column by column for a
        million rows.  Returns the exact targets loaded (their texts)."""
        table = self._bans
        rows = [(t, e) for t, e in bans if not e.expires or e.expires > now]
        others = [(t, e) for t, e in rows if "/" in t or ":" in t]
        if others:
            rows = [(t, e) for t, e in rows if "/" not in t and ":" not in t]
        texts = [t for t, _ in rows]
        if len(set(texts)) != len(texts):  # HSCAN may return a field twice
            rows = list(dict(rows).items())
            texts = [t for t, _ in rows]
        if not table.bloom_only:
            blob = b"".join(map(_pton, repeat(_AF_INET), texts))
            table.store.load(addresses_of(blob), [e for _, e in rows])
        for target, entry in others:  # networks, IPv6: put() interns their texts
            self.put("ban", target, entry, now)
        table.build_prefilter(texts, held=False)
        self._bind()
        return texts

    def _install(self, bulk: BulkLoad, now: int) -> list[str]:
        """Install what a snapshot put in *bulk*; return the exact IPv4 texts (if
        it kept them; [] otherwise)."""
        table = self._bans
        if bulk.keep:
            store = bulk.finish()
            store.last_sweep = table.store.last_sweep
            table.store = store
        # Its objects made now, as the store's are (see BulkLoad.finish): the
        # filter was made before the scan, where the scan's objects then went.
        table.prefilter = bulk.prefilter.moved(bulk.count)
        bulk.prefilter = None
        self._bind()
        for target, entry in bulk.others:  # networks, IPv6 (expired ones are dropped)
            self.put("ban", target, entry, now)
        return [] if bulk.texts is None else bulk.texts

    def settle(self) -> None:
        """Pack recent changes when there are enough of them, and grow a filter
        nearing its capacity: :meth:`settle_steps` all at once."""
        for _ in self.settle_steps():
            pass

    @property
    def settle_due(self) -> bool:
        """:meth:`settle` has work to do (cheap to ask)."""
        return any(_pack_due(t.store) for t in (self._bans, self._allow)) or self._growth_due()

    def _growth_due(self) -> bool:
        bans = self._bans
        prefilter = bans.prefilter
        # Nearly full (or worn): grow it now rather than mid-burst.  (Not at
        # once after a load, which leaves an eighth of it free: a node that
        # loaded a million bans keeps a filter sized for them.)
        return (
            not bans.bloom_only
            and prefilter is not None
            and bans.store.growing is None
            and (
                16 * prefilter.added > 15 * prefilter.capacity
                or 4 * prefilter.stale > prefilter.capacity
            )
        )

    def settle_steps(self, chunk: int = 20_000) -> Iterator[None]:
        """:meth:`settle`, a bounded piece of work per step; the node runs a step
        per event-loop iteration once it has caught up with the stream.

        An event burst is absorbed in the stores' overlays and packed after
        it: the digest's bookkeeping first, *chunk* changes per step (cheaper
        while the targets are still in the overlays), then the merge (one
        step: a sort), then the growth of a filter the packing filled
        (:meth:`grow_steps`).  Events applied meanwhile wait in the overlays;
        lookups are exact throughout.
        """
        if any(_pack_due(t.store) for t in (self._bans, self._allow)):
            todo = self.pending_changes
            while todo > 0 and self._digest is not None and self.pending_changes:
                self._fold(chunk)
                todo -= chunk
                yield
            for table in (self._bans, self._allow):  # as they are now (a reload replaces them)
                if _pack_due(table.store):
                    table.store.merge()
        if self._growth_due():
            yield from self.grow_steps()

    def grow_steps(self, chunk: int = 65_536) -> Iterator[None]:
        """Rebuild the bans' bloom filter with room to double, *chunk* packed
        addresses per step (a million take ~0.4 s: in one go, a stall).

        The old filter serves until the new one is complete.  Meanwhile a
        merge adds what it packs to both (``AddressStore.growing``), as does a
        new IPv6 target; what stays in the overlay is looked up there.  Gives
        up if the filter or the store is replaced meanwhile (a reload, a
        rebuild for wear).
        """
        table = self._bans
        store, old = table.store, table.prefilter
        if table.bloom_only or old is None or store.growing is not None:
            return
        exact = [t for t, e in table.exact.items() if e is not None]
        index = store.index  # a merge makes a new array: this one stays as it is
        new = _Prefilter(len(exact) + len(store), room=1.0, rate=table.bloom_rate)
        new.filter.update(exact)
        new.added = len(exact) + len(index)
        store.growing = new
        try:
            for start in range(0, len(index), chunk):
                yield
                if (
                    self._bans is not table
                    or table.store is not store
                    or table.prefilter is not old
                ):
                    return
                new.filter.update(store.texts_of(index[start : start + chunk]))
        finally:
            store.growing = None
        table.prefilter = new
        self._bind()

    def clear(self) -> None:
        """Drop everything (the digest of an empty view is known: zero)."""
        self.replace((), (), newly=False)
        if self._track:
            self._digest = Digest()
            self._dirty_b, self._dirty_a = {}, {}

    # -- expiry ------------------------------------------------------------------------

    def next_expiry(self) -> int | None:
        """Server ms at which :meth:`expire` next has work, or None.

        A packed store's expired entries wait for its next sweep (see
        ``sweep_interval``): not before then (a time in the past here had the
        node's expiry task spin until the sweep was allowed).
        """
        due = [(self._wheel_heap[0] + 1) * _BUCKET_MS] if self._wheel_heap else []
        now = None
        for table in (self._bans, self._allow):
            store = table.store
            if not store.earliest:
                continue
            wait = store.sweep_interval - (time.monotonic() - store.last_sweep)
            if wait > 0:
                now = self._clock() if now is None else now
                due.append(max(store.earliest, now + int(wait * 1000)))
            else:
                due.append(store.earliest)
        return min(due) if due else None

    def expire(self, now: int | None = None, *, force: bool = False) -> int:
        """Drop every entry expired at *now* (server ms); return how many.

        The packed stores are swept at most every ``sweep_interval`` seconds
        (a sweep is O(n)) unless *force*; until then their expired entries
        answer as absent but hold memory.  See :meth:`expire_steps`.
        """
        steps = self.expire_steps(now, force=force, stepped=False)
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]

    def expire_steps(
        self, now: int | None = None, *, force: bool = False, stepped: bool = True
    ) -> Generator[None, None, int]:
        """:meth:`expire`, the packed stores swept in steps of bounded work
        (*stepped*; the node's expiry task runs a step per loop iteration).
        A sweep that a merge overtakes gives up and comes again later."""
        if now is None:
            now = self._clock()
        heap, wheel = self._wheel_heap, self._wheel
        dropped = 0
        while heap and (heap[0] + 1) * _BUCKET_MS <= now:
            due = wheel.pop(heapq.heappop(heap))
            self._wheel_size -= len(due[0]) + len(due[1])
            for ban, table, targets in ((True, self._bans, due[0]), (False, self._allow, due[1])):
                for target in targets:
                    entry = table.get(target)
                    if entry is not None and entry.expires and entry.expires <= now:
                        self._remove(ban, target)
                        dropped += 1
        clock = time.monotonic()
        for ban, table in ((True, self._bans), (False, self._allow)):
            store = table.store
            if not store.earliest or store.earliest > now:
                continue
            if not force and clock - store.last_sweep < store.sweep_interval:
                continue
            if stepped:
                swept = yield from store.sweep_steps(now)
                if swept is None or table is not (self._bans if ban else self._allow):
                    continue  # overtaken by a merge, or the table replaced: later
                gone = swept
            else:
                gone = store.sweep(now)
            dropped += len(gone)
            dirty = self._dirty_b if ban else self._dirty_a
            prefilter = table.prefilter
            if prefilter is not None:
                prefilter.stale += len(gone)
            if dirty is not None:
                for target, entry in gone:
                    dirty.setdefault(target, entry)
        if dropped:
            self._check_wear()
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
        # Every source captured before the first yield: what was there when this started.
        sources: list[tuple[str, Iterator[tuple[str, int]]]] = []
        for kind, table in (("ban", self._bans), ("allow", self._allow)):
            listed = [(t, e.expires) for t, e in table.exact.items() if e is not None]
            listed += [(t, e.expires) for t, e in table.nets.items()]
            sources.append((kind, iter(listed)))
            sources.append((kind, table.store.expiries()))
        d1 = d2 = n = 0
        done = 0
        for kind, items in sources:
            for target, expires in items:
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
            expires_of = table.expires_of
            while dirty and budget:
                budget -= 1
                target, before = dirty.popitem()
                new = expires_of(target)
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
        unknown (see :meth:`recompute`), when more than
        ``DIGEST_EXCLUDE_LIMIT`` entries would be left out, or when a packed
        store holds such entries and may not be swept yet (see
        :attr:`AddressStore.sweep_interval`): the comparison waits.
        """
        if self._digest is None:
            return None
        for table in (self._bans, self._allow):
            store = table.store
            if store.earliest and store.earliest <= cutoff:
                # Half an interval more than the node's expiry task waits: its
                # sweep, in steps, comes first; this one would be in one go.
                if time.monotonic() - store.last_sweep < 1.5 * store.sweep_interval:
                    return None
        self.expire(cutoff, force=True)
        d1, d2, n = self._fold()
        last = cutoff // _BUCKET_MS
        heap = self._wheel_heap
        seen: set[tuple[bool, str]] = set()
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
                for target in items:
                    if (ban, target) in seen:
                        continue
                    seen.add((ban, target))
                    if len(seen) > DIGEST_EXCLUDE_LIMIT * 2:
                        return None
                    table = self._bans if ban else self._allow
                    expires = table.expires_of(target)
                    if expires and expires <= cutoff:
                        h1, h2 = entry_hash("ban" if ban else "allow", target, expires)
                        d1, d2, n = d1 - h1, d2 - h2, n - 1
        return Digest(d1 % DIGEST_P1, d2 % DIGEST_P2, n)
