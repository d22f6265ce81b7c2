"""Exact IPv4 addresses in packed arrays, not objects.

Theory of operation
-------------------

A million bans held as Python objects cost ~270 bytes each (a ``str``, an
``Entry``, dict and set slots).  :class:`AddressStore` keeps them in flat
arrays instead:

* ``index`` — an ``array('Q')`` of ``address << 32 | payload``, sorted.  In
  compact mode the payload is the expiry in whole seconds (rounded up), and
  that is all that is kept: **8 bytes per address**.  In full mode it is a row
  of the record arrays ``expires`` (ms), ``seqs``, ``reasons`` and
  ``origins`` (indexes into one table of distinct texts, which repeat
  heavily): **32 bytes per address**, and the whole record comes back exact.
* ``directory`` — where each /16 starts in ``index`` (65,537 offsets), so a
  lookup bisects a few entries, not a million.
* ``overlay`` — changes since ``index`` was built (address *text* -> entry,
  None = removed: an event costs no parsing), looked at first.  It is merged
  into a new ``index`` when it outgrows it (amortised O(1) per change; a
  merge is a sort of a sorted run plus the new keys, done in C).

The hot path never comes here for a miss: the cache's bloom filter answers
"certainly not" first (see :mod:`banbus._cache`).

Expired entries are answered as absent at once (every read checks the
expiry); their memory is reclaimed by :meth:`sweep`, an O(n) rebuild that the
cache runs at most every :attr:`sweep_interval` seconds.
"""

from __future__ import annotations

import socket
import sys
import time
from array import array
from bisect import bisect_left, bisect_right
from collections import Counter
from itertools import accumulate, chain, compress, repeat
from operator import (
    add,
    and_,
    attrgetter,
    countOf,
    floordiv,
    ge,
    gt,
    mod,
    not_,
    rshift,
    sub,
)
from typing import TYPE_CHECKING, Any, Final

from ._model import Entry

if TYPE_CHECKING:
    from collections.abc import Generator, Iterable, Iterator, Sequence

__all__ = ["AddressStore"]

_M32: Final = 0xFFFFFFFF
_AF_INET: Final = socket.AF_INET
_pton: Final = socket.inet_pton
_ntop: Final = socket.inet_ntop
_from_bytes: Final = int.from_bytes
#: The overlay is merged when it holds more than this and more than the index
#: (or, smaller, when the node is idle: see BanCache.settle).
_OVERLAY_MIN: Final = 262_144
_MISSING: Final[Any] = object()
#: Where the address (high) and payload (low) halves of an index key sit in
#: the key's two 32-bit words in memory.
_HI, _LO = (1, 0) if sys.byteorder == "little" else (0, 1)
_expires_of: Final = attrgetter("expires")
_seq_of: Final = attrgetter("seq")
_reason_of: Final = attrgetter("reason")
_origin_of: Final = attrgetter("origin")
if array("I").itemsize != 4:  # pragma: no cover - every platform CPython runs on
    raise ImportError("banbus needs a 4-byte array('I')")


def addresses_of(blob: bytes) -> array[int]:
    """The IPv4 addresses in *blob* (packed network order, as ``inet_pton`` gives
    them, concatenated) as ints, without an int object per address."""
    out = array("I", blob)
    if _HI:  # little-endian: the words are big-endian in the blob
        out.byteswap()
    return out


#: From this many entries, the directory is found by bisecting (see _directory).
_BISECT_FROM: Final = 400_000
#: sort_keys sorts positions in chunks of this many bits (2**24: 16.7M addresses).
_CHUNK_BITS: Final = 24
_LITTLE: Final = sys.byteorder == "little"


def _byte(k: int, width: int) -> int:
    """Where byte *k* (0: the least significant) of a native *width*-byte value is."""
    return k if _LITTLE else width - 1 - k


def _patterns(addresses: array[int], low: int | bytes | bytearray) -> array[float]:
    """Sort keys for *addresses*, sorted: doubles whose bit patterns are
    ``address << 24 | low``, where *low* is the address's position (*low*,
    *low* + 1, ... below 2**24) or, given as bytes (native 32-bit words below
    2**24, one per address), anything the caller wants back (see _codes).

    With a constant top byte (see below), such a double is positive, normal
    and finite, and such doubles order as their bit patterns do; CPython
    compares doubles twice as fast as 64-bit ints (a million: ~0.22 s
    against ~0.42 s).  The patterns are put together with strided slices of
    bytes (in C: no int object per address).
    """
    m = len(addresses)
    if isinstance(low, int):
        if low + m > 1 << 24:
            raise ValueError("positions past 2**24 do not fit a sort key")
        low = array("I", range(low, low + m)).tobytes()
    raw = addresses.tobytes()
    pattern = bytearray(8 * m)
    for k in range(3):
        pattern[_byte(k, 8) :: 8] = low[_byte(k, 4) :: 4]
    for k in range(4):
        pattern[_byte(3 + k, 8) :: 8] = raw[_byte(k, 4) :: 4]
    # A constant top byte: exponent 0x100-0x10f, never a subnormal double
    # (which a process with denormals-are-zero set, as some -ffast-math
    # extensions leave it, would compare as equal) nor NaN or infinity.
    pattern[_byte(7, 8) :: 8] = b"\x10" * m
    return array("d", sorted(array("d", pattern)))


#: Compact mode's sort keys carry the expiry itself (whole seconds) as its
#: offset from a base, 1 to this (0: permanent): see _codes.
_CODE_MAX: Final = (1 << 24) - 1
#: bytes.translate table: 0 stays 0, any other byte becomes 1.
_NONZERO: Final = bytes(1) + b"\x01" * 255


def _words(data: bytes | bytearray) -> int:
    """Native 32-bit words as one big int, each in its own 32 bits of it (in
    memory order on little-endian machines, reversed on big-endian ones):
    adding ``c * w``, where each word of *w* is 0 or 1, adds *c* to the words
    where *w* has 1, all at once, in C (no carry crosses a word while each
    sum fits 32 bits)."""
    return int.from_bytes(data, sys.byteorder)


def _fold(data: bytes | bytearray) -> bytes:
    """The four bytes of each 4-byte word of *data* ORed together, a byte per
    word (0: the word is 0), with big ints, in C."""
    m = len(data) // 4
    fold = 0
    for k in range(4):
        fold |= int.from_bytes(data[k::4], "little")
    return fold.to_bytes(m, "little")


def _nonzero(data: bytes | bytearray) -> int:
    """The native 32-bit words of *data* that are not 0, as 1s (see _words)."""
    flags = bytearray(len(data))
    flags[_byte(0, 4) :: 4] = _fold(data).translate(_NONZERO)
    return _words(flags)


def _codes(seconds: array[int], base: int) -> bytes:
    """The sort-key codes of compact payloads *seconds* (each 0, permanent, or
    in ``base + 1 .. base + _CODE_MAX``): ``s - base``, and 0 for 0; as native
    32-bit words.  A million in ~10 ms (big ints, see _words), so the index
    is read off the sorted keys with no gather of payloads by position."""
    raw = seconds.tobytes()
    return (_words(raw) - base * _nonzero(raw)).to_bytes(len(raw), sys.byteorder)


def _decoded(codes: bytes | bytearray, base: int) -> bytes:
    """The inverse of :func:`_codes`."""
    return (_words(codes) + base * _nonzero(codes)).to_bytes(len(codes), sys.byteorder)


def _keys_of(
    ordered: array[float],
    payloads: array[int] | None,
    base: int = 0,
    *,
    codes_from: int | None = None,
) -> array[int]:
    """The index keys (``address << 32 | payload``) of the sorted patterns
    *ordered* (see :func:`_patterns`) of positions *base* + 0, 1, ...: the
    payload is the position if *payloads* is None, else ``payloads[position]``;
    with *codes_from*, the patterns hold codes, not positions, and the payload
    is the expiry coded (see :func:`_codes`, from that base)."""
    m = len(ordered)
    raw = ordered.tobytes()
    # Written in place, at its exact size (an array made from bytes is made
    # 1/16 larger, half a megabyte per million that would stay).
    out = array("Q", [0]) * m
    keys = memoryview(out).cast("B")
    for k in range(4):  # the address
        keys[_byte(4 + k, 8) :: 8] = raw[_byte(3 + k, 8) :: 8]
    where = bytearray(4 * m)
    for k in range(3):
        where[_byte(k, 4) :: 4] = raw[_byte(k, 8) :: 8]
    if codes_from is not None:
        got: bytes | bytearray = _decoded(where, codes_from)
    elif payloads is None and not base:
        got = where
    elif payloads is None:  # past 2**24 addresses
        got = array("I", map(add, array("I", where), repeat(base))).tobytes()
    else:
        part = payloads[base : base + m] if base else payloads
        # Via a list, 60% faster than an array grown from an iterator.  (The
        # per-page columns are grown from iterators: a list's ints, alive
        # together page after page, left 1-2 MB more of memory arenas resident
        # after a million-ban load.  Here nothing that stays is made while the
        # million ints live: ``out`` was made before them.)
        got = array("I", list(map(part.__getitem__, array("I", where)))).tobytes()
    for k in range(4):
        keys[_byte(k, 8) :: 8] = got[_byte(k, 4) :: 4]
    keys.release()
    return out


def _merged(first: array[int], second: array[int]) -> array[int]:
    """The sorted index keys *first* and *second* merged (as ints)."""
    if len(first) < len(second):
        first, second = second, first
    n, k = len(first), len(second)
    out = array("Q", [0]) * (n + k)  # made before the ints (see above)
    if k > n >> 6:  # a sort of two runs, ~0.1 s per million
        memoryview(out)[:] = array("Q", sorted(chain(first, second)))
        return out
    # A few: each put where it goes (a bisect), the others copied between.
    into, source = memoryview(out), memoryview(first)
    lo = 0
    for j, key in enumerate(second):
        at = bisect_right(first, key, lo)
        into[lo + j : at + j] = source[lo:at]
        into[at + j] = key
        lo = at
    into[lo + k :] = source[lo:]
    return out


def sort_keys(addresses: array[int], payloads: array[int] | None = None) -> array[int]:
    """``address << 32 | payload`` for each address, sorted by address; the
    payload is the address's position if *payloads* is None (a row of a
    store's columns, filled in the same order).  Equal addresses come in
    their order in *addresses*, except past 2**24 addresses with *payloads*:
    then in payload order (the chunks are merged as ints)."""
    n = len(addresses)
    span = 1 << _CHUNK_BITS
    if n <= span:
        return _keys_of(_patterns(addresses, 0), payloads)
    out = array("Q")
    for start in range(0, n, span):
        out += _keys_of(_patterns(addresses[start : start + span], 0), payloads, start)
    return array("Q", sorted(out))  # sorted runs: the sort merges them


def _alive(expiries: Iterable[int], limit: int, span: int) -> Iterator[bool]:
    """For each expiry (0: permanent; *span*: 1 << bits of its type), whether it is
    alive at *limit* (same unit): permanent or later, i.e. (e - 1) mod span >= limit.
    In C: no Python frame per entry (a sweep of a million took 0.6 s row by row)."""
    return map(ge, map(mod, map(sub, expiries, repeat(1)), repeat(span)), repeat(limit))


def _repeats(words: bytes) -> bool:
    """Whether two adjacent 4-byte words of *words* are equal.  With big ints and
    bytes, in C: the words XORed with their successors, then the four bytes
    of each result ORed together; a zero byte is an equal pair (a million
    words: ~20 ms; comparing them in a map, ~40 ms)."""
    n = len(words) // 4 - 1
    if n < 1:
        return False
    xor = int.from_bytes(words[:-4], "little") ^ int.from_bytes(words[4:], "little")
    return b"\0" in _fold(xor.to_bytes(4 * n, "little"))


def earliest_of(expires: Sequence[int]) -> int:
    """The earliest non-zero expiry (0: none), in C."""
    low = min(expires, default=0)
    return low if low else min(filter(None, expires), default=0)


def seconds_of(expires: Iterable[int]) -> array[int]:
    """The expiries (ms) rounded up to whole seconds (the compact payload), in C."""
    return array("I", map(floordiv, map(add, expires, repeat(999)), repeat(1000)))


class AddressStore:
    """IPv4 address (dotted-quad text) -> :class:`~banbus._model.Entry`, in packed arrays."""

    __slots__ = (
        "compact",
        "count",
        "directory",
        "earliest",
        "expires",
        "growing",
        "index",
        "last_sweep",
        "limit",
        "origins",
        "overlay",
        "prefilter",
        "reasons",
        "seqs",
        "shadowed",
        "text_ids",
        "texts",
    )  # fmt: skip

    def __init__(self, compact: bool = False) -> None:
        self.compact = compact
        self.index = array("Q")
        self.directory = array("I")  # built with the index (see _directory)
        self.expires = array("q")
        self.seqs = array("q")
        self.reasons = array("I")
        self.origins = array("I")
        self.texts: list[str] = [""]
        self.text_ids: dict[str, int] = {"": 0}
        #: Address text -> entry (None: removed), changes since the index was built.
        self.overlay: dict[str, Entry | None] = {}
        #: Overlay keys that are in the index too (a merge must filter the index).
        self.shadowed = 0
        #: The overlay is merged when it holds more than this.
        self.limit = _OVERLAY_MIN
        #: The bloom filter in front of this store (the cache's ``_Prefilter``):
        #: a merge adds the overlay's addresses to it, and counts them (until
        #: then the hot path looks at the overlay itself).
        self.prefilter: Any = None
        #: A filter being built to replace it (see ``BanCache.grow_steps``): a
        #: merge adds to both.
        self.growing: Any = None
        #: Addresses held (expired ones not swept yet included).
        self.count = 0
        #: No entry expires before this (server ms; 0: none expires).  A lower
        #: bound: removed entries may have set it.
        self.earliest = 0
        self.last_sweep = 0.0

    def __len__(self) -> int:
        return self.count

    @property
    def sweep_interval(self) -> float:
        """Seconds between sweeps: 20 s at 1M entries.  A sweep costs O(n): per
        million, ~0.25 s of CPU (compact) to ~0.4 s (full), so ~1-2% of a core."""
        return max(2.0, len(self.index) / 50_000)

    # -- reads ---------------------------------------------------------------------------

    def _position(self, value: int) -> int:
        """Position of the address int *value* in ``index``, or -1."""
        index = self.index
        if not index:
            return -1
        top = value >> 16
        lo = self.directory[top]
        hi = self.directory[top + 1]
        if lo == hi:
            return -1
        i = bisect_left(index, value << 32, lo, hi)
        if i < hi and index[i] >> 32 == value:
            return i
        return -1

    def _find(self, text: str) -> int:
        """Position of the address *text* in ``index``, or -1."""
        if not self.index:
            return -1
        try:
            return self._position(_from_bytes(_pton(_AF_INET, text)))
        except (OSError, ValueError):  # not an IPv4 address: not here
            return -1

    def _entry_at(self, i: int) -> Entry:
        return self._entry_at_payload(self.index[i] & _M32)

    def get(self, text: str) -> Entry | None:
        """The entry of the address *text* (expired or not), or None."""
        entry = self.overlay.get(text, _MISSING)
        if entry is not _MISSING:
            return entry  # type: ignore[no-any-return]
        i = self._find(text)
        return None if i < 0 else self._entry_at(i)

    def expires_of(self, text: str) -> int | None:
        """The expiry (ms, 0 = permanent) of *text*, or None if absent.

        ``_find`` and ``_position`` inlined: this is ``is_banned``'s hit path.
        """
        entry = self.overlay.get(text, _MISSING)
        if entry is not _MISSING:
            return None if entry is None else entry.expires
        index = self.index
        if not index:
            return None
        try:
            value = _from_bytes(_pton(_AF_INET, text))
        except (OSError, ValueError):
            return None
        directory = self.directory
        top = value >> 16
        hi = directory[top + 1]
        i = bisect_left(index, value << 32, directory[top], hi)
        if i == hi:
            return None
        x = index[i]
        if x >> 32 != value:
            return None
        return (x & _M32) * 1000 if self.compact else self.expires[x & _M32]

    def __contains__(self, text: str) -> bool:
        entry = self.overlay.get(text, _MISSING)
        if entry is not _MISSING:
            return entry is not None
        return self._find(text) >= 0

    def items(self) -> Iterator[tuple[str, Entry]]:
        """Every (address text, entry), overlay first, as of this call, even if the
        store changes while the iterator is consumed (merges build new arrays;
        rows are never rewritten)."""
        overlay = dict(self.overlay)
        index, compact, texts = self.index, self.compact, self.texts
        exps, seqs, reasons, origins = self.expires, self.seqs, self.reasons, self.origins

        def rows() -> Iterator[tuple[str, Entry]]:
            for text, entry in overlay.items():
                if entry is not None:
                    yield text, entry
            for x in index:
                text = _ntop(_AF_INET, (x >> 32).to_bytes(4, "big"))
                if text in overlay:
                    continue
                r = x & _M32
                if compact:
                    yield text, Entry(r * 1000)
                else:
                    yield text, Entry(exps[r], texts[reasons[r]], texts[origins[r]], seqs[r])

        return rows()

    def expiries(self) -> Iterator[tuple[str, int]]:
        """Every (address text, expiry ms) as of this call (see :meth:`items`):
        what the digest needs, without building entries."""
        overlay = dict(self.overlay)
        index, compact, exps = self.index, self.compact, self.expires
        ntop, af = _ntop, _AF_INET

        def rows() -> Iterator[tuple[str, int]]:
            for text, entry in overlay.items():
                if entry is not None:
                    yield text, entry.expires
            for x in index:
                text = ntop(af, (x >> 32).to_bytes(4, "big"))
                if text not in overlay:
                    r = x & _M32
                    yield text, r * 1000 if compact else exps[r]

        return rows()

    @staticmethod
    def texts_of(keys: Iterable[int]) -> list[str]:
        """The address texts of index keys."""
        ntop, af = _ntop, _AF_INET
        return [ntop(af, (x >> 32).to_bytes(4, "big")) for x in keys]

    def key_chunks(self, size: int = 65_536) -> Iterator[list[str]]:
        """The address texts held (as :meth:`keys`), *size* at a time."""
        overlay = self.overlay
        yield [t for t, e in overlay.items() if e is not None]
        index = self.index
        for start in range(0, len(index), size):
            texts = self.texts_of(index[start : start + size])
            yield [t for t in texts if t not in overlay] if overlay else texts

    def keys(self) -> list[str]:
        """The address texts held."""
        overlay = self.overlay
        out = [t for t, e in overlay.items() if e is not None]
        base = self.texts_of(self.index)
        out += [t for t in base if t not in overlay] if overlay else base
        return out

    # -- writes --------------------------------------------------------------------------

    def put(self, text: str, entry: Entry, *, fresh: bool = False) -> Entry | None:
        """Store *entry* for the address *text*; return the entry it replaces (None: new).

        *fresh*: the caller knows *text* is not in the index (its bloom filter
        said so), which spares the lookup.  Compact: only the expiry is kept,
        rounded up to the second, from now on.
        """
        if self.compact:
            entry = Entry(-(-entry.expires // 1000) * 1000)
        overlay = self.overlay
        before = overlay.get(text, _MISSING)
        if before is _MISSING:
            before = None if fresh else self.shadow(text)
        overlay[text] = entry
        if before is None:
            self.count += 1
        expires = entry.expires
        if expires and (not self.earliest or expires < self.earliest):
            self.earliest = expires
        if len(overlay) > self.limit:
            self.merge()
        return before  # type: ignore[no-any-return]

    def feed(self, texts: list[str]) -> None:
        """Add *texts* to the filter in front of this store and to one being grown
        (see ``BanCache.grow_steps``), counted."""
        for prefilter in (self.prefilter, self.growing):
            if prefilter is not None:
                prefilter.filter.update(texts)
                prefilter.added += len(texts)

    def shadow(self, text: str) -> Entry | None:
        """The index's entry for the address *text* (None: not there), which an
        overlay entry is about to shadow (the caller puts it)."""
        i = self._find(text)
        if i < 0:
            return None
        self.shadowed += 1
        return self._entry_at(i)

    def pop(self, text: str) -> Entry | None:
        """Remove the address *text*; return its entry, or None if it was absent."""
        overlay = self.overlay
        before = overlay.get(text, _MISSING)
        if before is _MISSING:
            i = self._find(text)
            if i < 0:
                return None
            before = self._entry_at(i)
            overlay[text] = None
            self.shadowed += 1
        elif before is None:
            return None
        elif self._find(text) >= 0:
            overlay[text] = None
        else:
            del overlay[text]
        self.count -= 1
        return before  # type: ignore[no-any-return]

    def _append_rows(self, entries: Sequence[Entry], expires: array[int] | None = None) -> None:
        """Append the records of *entries* as rows, column by column (C loops:
        ``map`` over attribute getters, no Python frame per row)."""
        self.expires.extend(array("q", map(_expires_of, entries)) if expires is None else expires)
        self.seqs.extend(array("q", map(_seq_of, entries)))
        self._append_texts(self.reasons, entries, _reason_of)
        self._append_texts(self.origins, entries, _origin_of)

    def _append_texts(self, column: array[int], entries: Sequence[Entry], field: Any) -> None:
        """Append the text ids of *field* of *entries* to *column*.  The distinct
        texts are a handful; a page of bans from one source often has one."""
        if not entries:
            return
        first = field(entries[0])
        text = self._text
        if countOf(map(field, entries), first) == len(entries):  # one text: no hashing per row
            column.extend(array("I", [text(first)]) * len(entries))
            return
        values = list(map(field, entries))
        for new in set(values) - self.text_ids.keys():
            text(new)
        column.extend(array("I", map(self.text_ids.__getitem__, values)))

    def _text(self, text: str) -> int:
        ids = self.text_ids
        i = ids.get(text)
        if i is None:
            i = ids[text] = len(self.texts)
            self.texts.append(text)
        return i

    def load(self, values: Sequence[int], entries: Sequence[Entry]) -> None:
        """Fill an empty store with the addresses *values* and their entries, column
        by column (a repeated address: see :meth:`_set_index`)."""
        assert not self.index and not self.overlay and not self.expires
        expires = array("q", map(_expires_of, entries))
        self.earliest = earliest_of(expires)
        self._set_index(sort_keys(array("I", values), self._payloads(entries, expires)))

    def _payloads(self, entries: Sequence[Entry], expires: array[int]) -> array[int] | None:
        """The index payloads of *entries* appended (in order) to what the store is
        being loaded with: in compact mode their expiries in seconds; in full
        mode None, their records appended as rows (the payload is the row, the
        position: see :func:`sort_keys`)."""
        if self.compact:
            return seconds_of(expires)
        self._append_rows(entries, expires)
        return None

    def _set_index(self, index: array[int]) -> None:
        """Make *index* (``address << 32 | payload``, sorted by address) the index.

        An address may come twice (HSCAN returns a field twice when the hash
        is rehashed during the scan): of its keys, the one with the largest
        payload is kept.  In full mode that is the row read last; in compact
        mode the latest expiry, a permanent ban counting as earliest.  Keeping
        either is right: a value that changed between the two reads was
        changed by a write after the snapshot's watermark, which the catch-up
        replays.
        """
        if _repeats(array("I", index.tobytes())[_HI::2].tobytes()):
            last = {x >> 32: x for x in sorted(index)}
            index = array("Q", last.values())
        self.index = index
        self.limit = max(_OVERLAY_MIN, len(index))
        self.count = len(index)
        self._directory()

    def merge(self, now: int | None = None) -> list[tuple[str, Entry]]:
        """Fold the overlay into a new index; with *now*, also drop the entries
        expired at *now* (server ms) and return them (address text, entry)."""
        pton, af, from_bytes = _pton, _AF_INET, _from_bytes
        overlay: dict[int, Entry | None] = (
            {from_bytes(pton(af, t)): e for t, e in self.overlay.items()}
            if self.shadowed or now is not None
            else {}
        )
        index = self.index
        gone: list[tuple[int, Entry]] = []
        compact = self.compact
        exps = self.expires
        # Which index entries stay, in C (map, compress: no Python frame per
        # entry; a sweep of a million took 0.6 s row by row): the overlay
        # decides for the addresses it holds.
        free = (
            list(map(not_, map(overlay.__contains__, map(rshift, index, repeat(32)))))
            if overlay
            else []
        )
        earliest = 0
        if now is None:
            vals = list(compress(index, free)) if overlay else index.tolist()
        else:
            payloads = array("I", index.tobytes())[_LO::2]
            if compact:  # the payload is the expiry, in seconds
                alive: list[Any] = list(_alive(payloads, now // 1000, 1 << 32))
                stay = list(map(and_, alive, free)) if overlay else alive
                earliest = min(filter(None, compress(payloads, stay)), default=0) * 1000
            else:
                # Row by row (in order: the rows of the index are all over the
                # columns), a byte per row, then a byte per entry.
                live_rows = bytes(_alive(exps, now, 1 << 63))
                alive = list(map(live_rows.__getitem__, payloads))
                stay = list(map(and_, alive, free)) if overlay else alive
                # A lower bound (rows no entry points at any more count too).
                earliest = min(filter(None, compress(exps, live_rows)), default=0)
            dead = map(and_, map(not_, alive), free) if overlay else map(not_, alive)
            gone = [(x >> 32, self._entry_at_payload(x & _M32)) for x in compress(index, dead)]
            vals = list(compress(index, stay))
        if overlay or now is not None:
            live = [
                (value, entry)
                for value, entry in overlay.items()
                if entry is not None and (now is None or not entry.expires or entry.expires > now)
            ]
        else:  # nothing shadowed: every overlay entry is a new address (or None)
            live = [(from_bytes(pton(af, t)), e) for t, e in self.overlay.items() if e is not None]
        if now is not None:
            gone += [
                (v, e) for v, e in overlay.items() if e is not None and e.expires
                and e.expires <= now
            ]  # fmt: skip
        if compact:
            vals += [value << 32 | -(-entry.expires // 1000) for value, entry in live]
        else:
            vals += [value << 32 | i for i, (value, _) in enumerate(live, len(exps))]
            self._append_rows([entry for _, entry in live])
        vals.sort()
        self.index = array("Q", vals)
        self.feed([t for t, e in self.overlay.items() if e is not None])
        self.overlay.clear()  # the same dict: the cache's hot path holds it
        self.shadowed = 0
        self.limit = max(_OVERLAY_MIN, len(vals))
        self.count = len(vals)
        if not compact and len(self.expires) > 2 * len(vals) + _OVERLAY_MIN:
            self._compact_rows()
        if now is not None:
            self.earliest = min(filter(None, [earliest, *(e.expires for _, e in live)]), default=0)
        self._directory()
        ntop = _ntop
        return [(ntop(af, v.to_bytes(4, "big")), e) for v, e in gone]

    def sweep(self, now: int) -> list[tuple[str, Entry]]:
        """Drop every entry expired at *now*; return them (address text, entry).

        Folds the overlay in too (a merge), in one go.  See :meth:`sweep_steps`.
        """
        self.last_sweep = time.monotonic()
        if not self.earliest or self.earliest > now:
            return []
        return self.merge(now)

    def sweep_steps(
        self, now: int, chunk: int = 65_536
    ) -> Generator[None, None, list[tuple[str, Entry]] | None]:
        """Drop the index entries expired at *now*, *chunk* entries per step (a
        sweep of ten million in one go stalled a node's event loop for 3.4 s);
        return them (address text, entry), or None if a merge replaced the
        index meanwhile (nothing was dropped: sweep again later).

        The overlay stays as it is: it still decides for the addresses it
        holds (an index entry it shadows just goes, uncounted).
        """
        if not self.earliest or self.earliest > now:
            self.last_sweep = time.monotonic()
            return []
        index = self.index
        compact, exps = self.compact, self.expires
        kept: list[array[int]] = []
        dead: list[int] = []
        earliest = 0
        live = b""
        if not compact:
            # Full mode: a byte per row first, reading the rows in order (the
            # index's rows are all over the column: its entries' expiries
            # read one by one were a cache miss each, 7 s for ten million).
            flags = bytearray()
            for start in range(0, len(exps), 4 * chunk):
                if start:
                    yield
                    if self.index is not index:
                        return None
                rows = exps[start : start + 4 * chunk]
                part_flags = bytes(_alive(rows, now, 1 << 63))
                first = min(filter(None, compress(rows, part_flags)), default=0)
                if first and (not earliest or first < earliest):
                    earliest = first  # a lower bound: rows nothing points at count too
                flags += part_flags
            live = bytes(flags)
            del flags
        for start in range(0, len(index), chunk):
            if start or not compact:
                yield
                if self.index is not index:
                    return None
            part = index[start : start + chunk]
            payloads = array("I", part.tobytes())[_LO::2]
            alive: list[Any]  # bools, or a byte per entry (0 or 1)
            if compact:  # the payload is the expiry, in seconds
                alive = list(_alive(payloads, now // 1000, 1 << 32))
                first = min(filter(None, compress(payloads, alive)), default=0) * 1000
                if first and (not earliest or first < earliest):
                    earliest = first
            else:
                alive = list(map(live.__getitem__, payloads))
            kept.append(array("Q", compress(part, alive)))
            dead += compress(part, map(not_, alive))
        yield
        if self.index is not index:
            return None
        # The swap, in one step.
        new = array("Q")
        for part in kept:
            new += part
        overlay = self.overlay
        gone: list[tuple[str, Entry]] = []
        ntop, af = _ntop, _AF_INET
        for x in dead:
            text = ntop(af, (x >> 32).to_bytes(4, "big"))
            if text in overlay:
                self.shadowed -= 1  # the overlay decides for it; not in the index any more
            else:
                gone.append((text, self._entry_at_payload(x & _M32)))
        self.index = new
        self.count -= len(gone)
        self.limit = max(_OVERLAY_MIN, len(new))
        pending = [e.expires for e in overlay.values() if e is not None and e.expires]
        self.earliest = min(filter(None, [earliest, *pending]), default=0)
        if not compact and len(exps) > 2 * len(new) + _OVERLAY_MIN:
            self._compact_rows()
        self._directory()
        self.last_sweep = time.monotonic()
        return gone

    def _entry_at_payload(self, row: int) -> Entry:
        if self.compact:
            return Entry(row * 1000)
        texts = self.texts
        return Entry(self.expires[row], texts[self.reasons[row]], texts[self.origins[row]],
                     self.seqs[row])  # fmt: skip

    def _compact_rows(self) -> None:
        """Drop the record rows nothing points at any more (renumbers rows)."""
        index = self.index
        rows = [x & _M32 for x in index]
        exps, seqs, reasons, origins = self.expires, self.seqs, self.reasons, self.origins
        self.expires = array("q", [exps[r] for r in rows])
        self.seqs = array("q", [seqs[r] for r in rows])
        self.reasons = array("I", [reasons[r] for r in rows])
        self.origins = array("I", [origins[r] for r in rows])
        self.index = array("Q", [x >> 32 << 32 | i for i, x in enumerate(index)])

    def _directory(self) -> None:
        """directory[t] = where the /16 *t* starts in the index."""
        index = self.index
        if not index:
            self.directory = array("I")
            return
        n = len(index)
        if n > _BISECT_FROM:  # bisecting 65,537 times is cheaper than counting
            # Each from where the last ended, within a few times the mean /16
            # (a third of the compares of a bisect of the whole index).
            width = 4 * (n >> 16) + 64
            starts = array("I", [0]) * 65537
            lo = 0
            for t in range(1, 65537):
                key = t << 48
                hi = lo + width
                lo = bisect_left(index, key, lo, hi if hi < n and index[hi] >= key else n)
                starts[t] = lo
        else:
            get = Counter([x >> 48 for x in index]).get
            starts = array("I", accumulate((get(t, 0) for t in range(65536)), initial=0))
        self.directory = starts


class BulkLoad:
    """The exact IPv4 bans of a snapshot, put into columns page by page.

    ``_snapshot`` feeds each HSCAN page to :meth:`page` while Redis pages the
    next one, so a bootstrap's work mostly overlaps the scan; the cache then
    installs the store :meth:`finish` makes (``BanCache.replace``).  Targets other than
    dotted-quad addresses go to ``others``.
    """

    __slots__ = (
        "addresses",
        "coded",
        "keep",
        "others",
        "payloads",
        "prefilter",
        "runs",
        "store",
        "tally",
        "texts",
    )  # fmt: skip

    def __init__(
        self,
        compact: bool,
        prefilter: Any,
        *,
        keep: bool = True,
        texts: bool = True,
        now: int = 0,
    ) -> None:
        self.store = AddressStore(compact)
        #: False (bloom mode): only the filter (and the texts), no columns.
        self.keep = keep
        #: The addresses, in the order added (packed: no int object per row
        #: while the scan goes on), sorted by :meth:`finish`.
        self.addresses = array("I")
        #: Compact mode: their expiries in seconds (full mode: rows of ``store``).
        self.payloads = array("I")
        #: Each page's addresses sorted (see ``_patterns``), one run after the
        #: other: the final sort only merges them, and a page is sorted while
        #: Redis pages the next.  None: too many addresses (see sort_keys).
        self.runs: array[float] | None = array("d")
        #: Compact mode: the same, but carrying the expiry (see _codes) instead
        #: of the position: the index is read off them with no gather.  Those
        #: whose expiry is outside the load's window go to ``runs``.
        self.coded: array[float] | None = array("d")
        #: The addresses' texts, if asked for (None: not kept).
        self.texts: list[str] | None = [] if texts else None
        #: The earliest non-zero expiry, the number of addresses, and (compact
        #: mode) the base of the codes and whether it is fixed yet (see
        #: _code), in an array rather than int attributes: an int made while a
        #: page's objects live would keep one of their memory arenas from
        #: being freed.
        self.tally = array("q", [0, 0, max(0, now // 1000 - 60), 0])
        self.others: list[tuple[str, Entry]] = []
        #: A bloom filter being filled (None: addresses are not kept in one here).
        self.prefilter = prefilter

    def page(
        self,
        texts: list[str],
        addresses: array[int] | Sequence[int],
        entries: Sequence[Entry],
        expires: array[int] | None = None,
        earliest: int | None = None,
    ) -> None:
        """Add canonical IPv4 addresses: their *texts*, their ints (an ``array('I')``:
        see :func:`addresses_of`) and entries (and the entries' expiries,
        ``array('q')``, and the earliest non-zero one, if the caller has them)."""
        tally = self.tally
        if self.keep:
            if expires is None:
                expires = array("q", map(_expires_of, entries))
            if earliest is None:
                earliest = earliest_of(expires)
            if not isinstance(addresses, array):
                addresses = array("I", addresses)
            start = len(self.addresses)
            self.addresses.extend(addresses)
            payloads = self.store._payloads(entries, expires)
            if payloads is not None:
                self.payloads.extend(payloads)
            if self.runs is not None and len(self.addresses) > 1 << _CHUNK_BITS:
                self.runs = self.coded = None
            if self.runs is not None:
                if payloads is None:
                    self.runs.extend(_patterns(addresses, start))
                else:
                    self._code(addresses, payloads, start, earliest)
            if earliest and (not tally[0] or earliest < tally[0]):
                tally[0] = earliest
        tally[1] += len(texts)
        if self.texts is not None:
            self.texts += texts
        if self.prefilter is not None:
            # Page by page.  (A few pages at a time would fill a 1.8 MB filter
            # from warmer CPU caches, ~70 ms instead of ~140 per million; but
            # the texts kept meanwhile left 2-3 MB of memory arenas resident.)
            self.prefilter.filter.update(texts)

    def _code(self, addresses: array[int], seconds: array[int], start: int, earliest: int) -> None:
        """Compact mode: sort a page into ``coded``, each address with its expiry
        (*seconds*), if it fits the window of the load's base (see _codes);
        the others (bans of more than ~190 days) into ``runs``, each with its
        position (*start*, *start* + 1, ...): if there are more than a few,
        the whole page."""
        assert self.runs is not None and self.coded is not None
        tally = self.tally
        first = -(-earliest // 1000)  # the earliest second that is not 0
        if first and not tally[3]:  # the first expiry: the base is fixed
            # A minute before the load's time, *now* (a snapshot leaves the
            # expired out: all come later) or, if more than a few of this
            # page's expiries fall outside the window from there, before its
            # earliest one (a load of long bans, or no *now*).
            base = tally[2]
            beyond = countOf(map(gt, seconds, repeat(base + _CODE_MAX)), True)
            if first <= base or beyond > len(seconds) >> 6:
                base = max(0, first - 60)
            tally[2], tally[3] = base, 1
        base = tally[2]
        m = len(seconds)
        if first > base or not first:
            codes = _codes(seconds, base)
            top = codes[_byte(3, 4) :: 4]  # 0 where the code fits the sort key
            outside = m - top.count(0)
            if not outside:
                self.coded.extend(_patterns(addresses, codes))
                return
            if outside <= m >> 6:  # a few: those by position, the others by code
                kept, kept_codes, far = array("I"), bytearray(), array("I")
                flags = top.translate(_NONZERO)
                lo, at = 0, flags.find(1)
                while at >= 0:
                    kept += addresses[lo:at]
                    kept_codes += codes[4 * lo : 4 * at]
                    far.append(at)
                    lo, at = at + 1, flags.find(1, at + 1)
                kept += addresses[lo:]
                kept_codes += codes[4 * lo :]
                self.coded.extend(_patterns(kept, kept_codes))
                where = array("I", [start + i for i in far])
                self.runs.extend(
                    _patterns(array("I", map(addresses.__getitem__, far)), where.tobytes())
                )
                return
        self.runs.extend(_patterns(addresses, start))

    @property
    def count(self) -> int:
        """Addresses added (a repeated one counts twice)."""
        return self.tally[1]

    def targets(self) -> list[str]:
        """Every target added (before :meth:`finish`)."""
        out = [t for t, _ in self.others]
        if self.texts is not None:
            return out + self.texts
        ntop, af = _ntop, _AF_INET
        return out + [ntop(af, x.to_bytes(4, "big")) for x in self.addresses]

    def finish(self) -> AddressStore:
        """The store, with its index (a repeated address: see ``AddressStore._set_index``).

        Made now, once the scan's objects are gone, with copies of the
        columns at their exact size: the objects that live on are made where
        nothing short-lived was, so the memory arenas the scan used are freed
        whole (a small object that outlives a page of rows, made while they
        lived, would keep a 1 MiB arena of them resident).

        In compact mode most keys are read off ``coded`` (the expiry is in
        the sort key: no gather of payloads by position, ~0.1 s less per
        million); those of pages that did not fit the codes' window come from
        ``runs`` and are merged in as ints.
        """
        built = self.store
        payloads = self.payloads if built.compact else None
        if self.runs is None:
            keys = sort_keys(self.addresses, payloads)
        else:
            keys = _keys_of(array("d", sorted(self.runs)), payloads)  # a merge of runs
            if self.coded:
                coded = _keys_of(array("d", sorted(self.coded)), None, codes_from=self.tally[2])
                keys = _merged(coded, keys) if keys else coded
        self.addresses, self.payloads = array("I"), array("I")
        self.runs, self.coded = array("d"), array("d")
        store = AddressStore(built.compact)
        store._set_index(keys)
        del keys
        if not built.compact:
            store.expires = array("q", built.expires)
            store.seqs = array("q", built.seqs)
            store.reasons = array("I", built.reasons)
            store.origins = array("I", built.origins)
            store.texts, store.text_ids = built.texts, built.text_ids
        store.earliest = self.tally[0]
        self.store = store
        return store
