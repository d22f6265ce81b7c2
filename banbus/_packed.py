"""Exact IPv4 addresses in packed arrays, not objects.

Theory of operation
-------------------

A million bans held as Python objects cost ~270 bytes each (a ``str``, an
``Entry``, dict and set slots).  :class:`AddressStore` keeps them in flat
arrays instead:

* ``index`` — a sorted ``array('Q')`` of ``address << 32 | payload``.  In
  compact mode the payload is the expiry in whole seconds (rounded up), and
  that is all that is kept: **8 bytes per address**.  In full mode it is a row
  of the record arrays ``expires`` (ms), ``seqs``, ``reasons`` and
  ``origins`` (indexes into one table of distinct texts, which repeat
  heavily): **32 bytes per address**, and the whole record comes back exact.
* ``directory`` — where each /16 starts in ``index`` (65,537 offsets), so a
  lookup bisects a few entries, not a million.
* ``overlay`` — changes since ``index`` was built (address -> entry, None =
  removed), looked at first.  It is merged into a new ``index`` when it grows
  past half of it (amortised O(1) per change; a merge is a sort of a sorted
  run plus the new keys, done in C).

The hot path never comes here for a miss: the cache's bloom filter answers
"certainly not" first (see :mod:`banbus._cache`).

Expired entries are answered as absent at once (every read checks the
expiry); their memory is reclaimed by :meth:`sweep`, an O(n) rebuild that the
cache runs at most every :attr:`sweep_interval` seconds.
"""

from __future__ import annotations

import socket
import time
from array import array
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Final

from ._model import Entry

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["AddressStore"]

_M32: Final = 0xFFFFFFFF
#: The overlay is merged when it holds more than this, or a quarter of the index.
_OVERLAY_MIN: Final = 65_536
_TEXTS_MAX: Final = 1 << 31
_MISSING: Final[Any] = object()


def _seconds(expires: int) -> int:
    """Expiry ms -> whole seconds, rounded up (0 stays permanent)."""
    return -(-expires // 1000)


class AddressStore:
    """IPv4 address (int) -> :class:`~banbus._model.Entry`, in packed arrays."""

    __slots__ = (
        "compact", "count", "directory", "earliest", "expires", "index", "last_sweep", "limit",
        "origins", "overlay", "reasons", "seqs", "shadowed", "text_ids", "texts",
    )  # fmt: skip

    def __init__(self, compact: bool = False) -> None:
        self.compact = compact
        self.index = array("Q")
        self.directory = array("I", bytes(65537 * array("I").itemsize))
        self.expires = array("q")
        self.seqs = array("q")
        self.reasons = array("I")
        self.origins = array("I")
        self.texts: list[str] = [""]
        self.text_ids: dict[str, int] = {"": 0}
        self.overlay: dict[int, Entry | None] = {}
        #: Overlay keys that are in the index too (a merge must filter the index).
        self.shadowed = 0
        #: The overlay is merged when it holds more than this.
        self.limit = _OVERLAY_MIN
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
        """Seconds between sweeps: a sweep costs O(n), so at most ~1% of a core."""
        return max(2.0, len(self.index) / 250_000)

    # -- reads ---------------------------------------------------------------------------

    def _position(self, value: int) -> int:
        """Position of *value* in ``index``, or -1."""
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

    def _entry_at(self, i: int) -> Entry:
        payload = self.index[i] & _M32
        if self.compact:
            return Entry(payload * 1000)
        texts = self.texts
        return Entry(
            self.expires[payload],
            texts[self.reasons[payload]],
            texts[self.origins[payload]],
            self.seqs[payload],
        )

    def get(self, value: int) -> Entry | None:
        """The entry of the address *value* (expired or not), or None."""
        entry = self.overlay.get(value, _MISSING)
        if entry is not _MISSING:
            return entry  # type: ignore[no-any-return]
        i = self._position(value)
        return None if i < 0 else self._entry_at(i)

    def expires_of(self, value: int) -> int | None:
        """The expiry (ms, 0 = permanent) of *value*, or None if absent."""
        entry = self.overlay.get(value, _MISSING)
        if entry is not _MISSING:
            return None if entry is None else entry.expires
        i = self._position(value)
        if i < 0:
            return None
        payload = self.index[i] & _M32
        return payload * 1000 if self.compact else self.expires[payload]

    def __contains__(self, value: int) -> bool:
        entry = self.overlay.get(value, _MISSING)
        if entry is not _MISSING:
            return entry is not None
        return self._position(value) >= 0

    def items(self) -> Iterator[tuple[int, Entry]]:
        """Every (address, entry), overlay first (safe to iterate while changing)."""
        return self.snapshot()

    def snapshot(self) -> Iterator[tuple[int, Entry]]:
        """Every (address, entry) as of this call, even if the store changes while
        the iterator is consumed (merges build new arrays; rows are never rewritten)."""
        overlay = dict(self.overlay)
        index, compact, texts = self.index, self.compact, self.texts
        exps, seqs, reasons, origins = self.expires, self.seqs, self.reasons, self.origins

        def rows() -> Iterator[tuple[int, Entry]]:
            for value, entry in overlay.items():
                if entry is not None:
                    yield value, entry
            for x in index:
                value = x >> 32
                if value in overlay:
                    continue
                r = x & _M32
                if compact:
                    yield value, Entry(r * 1000)
                else:
                    yield value, Entry(exps[r], texts[reasons[r]], texts[origins[r]], seqs[r])

        return rows()

    def keys(self) -> list[int]:
        overlay = self.overlay
        out = [v for v, e in overlay.items() if e is not None]
        out += (
            [x >> 32 for x in self.index if x >> 32 not in overlay]
            if overlay
            else [x >> 32 for x in self.index]
        )
        return out

    # -- writes --------------------------------------------------------------------------

    def put(self, value: int, entry: Entry, *, fresh: bool = False) -> Entry | None:
        """Store *entry* for *value*; return the entry it replaces (None: new).

        *fresh*: the caller knows *value* is not in the index (its bloom filter
        said so), which spares the lookup.  Compact: only the expiry is kept,
        rounded up to the second, from now on.
        """
        if self.compact:
            entry = Entry(-(-entry.expires // 1000) * 1000)
        overlay = self.overlay
        before = overlay.get(value, _MISSING)
        if before is _MISSING and fresh:
            before = None
        elif before is _MISSING:
            i = self._position(value)
            before = None if i < 0 else self._entry_at(i)
            self.shadowed += i >= 0
        overlay[value] = entry
        if before is None:
            self.count += 1
        expires = entry.expires
        if expires and (not self.earliest or expires < self.earliest):
            self.earliest = expires
        if len(overlay) > self.limit:
            self.merge()
        return before  # type: ignore[no-any-return]

    def pop(self, value: int) -> Entry | None:
        """Remove *value*; return its entry, or None if it was absent."""
        overlay = self.overlay
        before = overlay.get(value, _MISSING)
        if before is _MISSING:
            i = self._position(value)
            if i < 0:
                return None
            before = self._entry_at(i)
            overlay[value] = None
            self.shadowed += 1
        elif before is None:
            return None
        elif self._position(value) >= 0:
            overlay[value] = None
        else:
            del overlay[value]
        self.count -= 1
        return before  # type: ignore[no-any-return]

    def _append_rows(self, entries: list[Entry]) -> None:
        """Append the records of *entries* as rows, column by column."""
        self.expires.extend([e.expires for e in entries])
        self.seqs.extend([e.seq for e in entries])
        text, ids = self._text, self.text_ids
        for e in entries:  # the distinct texts first (a handful, usually)
            if e.reason not in ids:
                text(e.reason)
            if e.origin not in ids:
                text(e.origin)
        self.reasons.extend([ids[e.reason] for e in entries])
        self.origins.extend([ids[e.origin] for e in entries])

    def _text(self, text: str) -> int:
        ids = self.text_ids
        i = ids.get(text)
        if i is None:
            i = ids[text] = len(self.texts)
            self.texts.append(text)
        return i

    def load(self, values: list[int], entries: list[Entry]) -> None:
        """Fill an empty store: the addresses *values* (distinct) and their entries
        (bootstrap), column by column."""
        assert not self.index and not self.overlay
        expires = [e.expires for e in entries]
        self.earliest = min(filter(None, expires), default=0)
        if self.compact:
            vals = [v << 32 | -(-x // 1000) for v, x in zip(values, expires, strict=True)]
        else:
            row = len(self.expires)
            vals = [v << 32 | i for i, v in enumerate(values, row)]
            self._append_rows(entries)
        vals.sort()
        self.index = array("Q", vals)
        self.limit = max(_OVERLAY_MIN, len(vals))
        self.count = len(vals)
        self._directory()

    def merge(self, now: int | None = None) -> list[tuple[int, Entry]]:
        """Fold the overlay into a new index; with *now*, also drop the entries
        expired at *now* (server ms) and return them."""
        overlay = self.overlay
        index = self.index
        expired: list[tuple[int, Entry]] = []
        if self.compact:
            if now is None:
                vals = (
                    [x for x in index if x >> 32 not in overlay]
                    if self.shadowed
                    else index.tolist()
                )
            else:
                limit = now // 1000  # expired: 0 < seconds * 1000 <= now
                vals = []
                keep = vals.append
                for x in index:
                    s = x & _M32
                    if s and s <= limit:
                        if x >> 32 not in overlay:
                            expired.append((x >> 32, Entry(s * 1000)))
                    elif x >> 32 not in overlay:
                        keep(x)
            for value, entry in overlay.items():
                if entry is None:
                    continue
                if now is not None and entry.expires and entry.expires <= now:
                    expired.append((value, entry))
                    continue
                vals.append(value << 32 | -(-entry.expires // 1000))
        else:
            exps = self.expires
            if now is None:
                vals = (
                    [x for x in index if x >> 32 not in overlay]
                    if self.shadowed
                    else index.tolist()
                )
            else:
                vals = []
                keep = vals.append
                for x in index:
                    e = exps[x & _M32]
                    if e and e <= now:
                        if x >> 32 not in overlay:
                            expired.append((x >> 32, self._entry_at_payload(x & _M32)))
                    elif x >> 32 not in overlay:
                        keep(x)
            live = [
                (value, entry)
                for value, entry in overlay.items()
                if entry is not None and (now is None or not entry.expires or entry.expires > now)
            ]
            if now is not None:
                expired += [
                    (v, e) for v, e in overlay.items() if e is not None and e.expires
                    and e.expires <= now
                ]  # fmt: skip
            vals += [value << 32 | i for i, (value, _) in enumerate(live, len(exps))]
            self._append_rows([entry for _, entry in live])
        vals.sort()
        self.index = array("Q", vals)
        self.overlay = {}
        self.shadowed = 0
        self.limit = max(_OVERLAY_MIN, len(vals))
        self.count = len(vals)
        if not self.compact and len(self.expires) > 2 * len(vals) + _OVERLAY_MIN:
            self._compact_rows()
        if now is not None:
            self.earliest = self._earliest()
        self._directory()
        return expired

    def sweep(self, now: int) -> list[tuple[int, Entry]]:
        """Drop every entry expired at *now*; return them (address, entry)."""
        self.last_sweep = time.monotonic()
        if not self.earliest or self.earliest > now:
            return []
        return self.merge(now)

    def _entry_at_payload(self, row: int) -> Entry:
        texts = self.texts
        return Entry(self.expires[row], texts[self.reasons[row]], texts[self.origins[row]],
                     self.seqs[row])  # fmt: skip

    def _earliest(self) -> int:
        if self.compact:
            seconds = [x & _M32 for x in self.index]
            return min(filter(None, seconds), default=0) * 1000
        exps = self.expires
        return min(filter(None, [exps[x & _M32] for x in self.index]), default=0)

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
        index = self.index
        d = self.directory
        if not index:
            d[:] = array("I", bytes(65537 * d.itemsize))
            return
        d[:] = array("I", [bisect_left(index, top << 48) for top in range(65537)])

    def clear(self) -> None:
        self.__init__(self.compact)  # type: ignore[misc]


class BulkLoad:
    """The exact IPv4 bans of a snapshot, put into columns page by page.

    ``_snapshot`` feeds each HSCAN page to :meth:`page` while Redis pages the
    next one, so a bootstrap's work mostly overlaps the scan; the cache then
    installs the columns (:meth:`AddressStore.install`).  Targets other than
    dotted-quad addresses go to ``others``.
    """

    __slots__ = ("keep", "keys", "others", "prefilter", "store", "texts")

    def __init__(self, compact: bool, prefilter: Any, *, keep: bool = True) -> None:
        self.store = AddressStore(compact)
        #: False (bloom mode): only the texts and the filter, no columns.
        self.keep = keep
        #: address << 32 | payload (see AddressStore.index), in sorted runs.
        self.keys: list[int] = []
        self.texts: list[str] = []
        self.others: list[tuple[str, Entry]] = []
        #: A bloom filter being filled (None: addresses are not kept in one here).
        self.prefilter = prefilter

    def page(self, texts: list[str], values: list[int], entries: list[Entry]) -> None:
        """Add canonical IPv4 addresses: their *texts*, ints and entries."""
        store = self.store
        start = len(self.texts)
        if not self.keep:
            run = []
        elif store.compact:
            run = [v << 32 | -(-e.expires // 1000) for v, e in zip(values, entries, strict=True)]
        else:
            run = [v << 32 | i for i, v in enumerate(values, start)]
            store._append_rows(entries)
        earliest = min(filter(None, [e.expires for e in entries]), default=0)
        if earliest and (not store.earliest or earliest < store.earliest):
            store.earliest = earliest
        run.sort()
        self.keys += run
        self.texts += texts
        if self.prefilter is not None:
            self.prefilter.filter.update(texts)
            self.prefilter.added += len(texts)

    def __iter__(self) -> Iterator[tuple[str, Entry]]:
        """(target, entry) of every row (the exact IPv4 ones rebuilt from the columns)."""
        yield from self.others
        store = self.store
        by_value = {x >> 32: x for x in self.keys}
        for text in self.texts:
            x = by_value[int.from_bytes(socket.inet_aton(text), "big")]
            payload = x & _M32
            if store.compact:
                yield text, Entry(payload * 1000)
            else:
                yield text, store._entry_at_payload(payload)

    def targets(self) -> list[str]:
        return [t for t, _ in self.others] + self.texts

    def finish(self) -> AddressStore:
        """The store, with its index (duplicate rows — HSCAN may repeat a field —
        resolved: the last one wins)."""
        store = self.store
        keys = self.keys
        if len(set(self.texts)) != len(self.texts):
            last: dict[int, int] = {}
            for x in keys:
                last[x >> 32] = x
            keys = list(last.values())
        keys.sort()
        store.index = array("Q", keys)
        store.limit = max(_OVERLAY_MIN, len(keys))
        store.count = len(keys)
        store._directory()
        self.keys = []
        return store
