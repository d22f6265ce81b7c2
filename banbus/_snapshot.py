"""Snapshots: load the whole record, exactly, while writes go on.

Theory of operation
-------------------

A snapshot is taken in four steps; bootstrap and every resync are the same:

1. **Watermark.**  ``banbus_state`` returns the library's head — the id and
   seq of the last event it wrote — and the epoch, atomically.
2. **Scan.**  ``HSCAN`` pages through ``{ns}:bans`` and ``{ns}:allow``
   (pipelined: Redis pages the next batch while this one is decoded).  The
   scan may see writes made after the watermark, in any mix.
3. **Install.**  The entries replace the view in one step (``is_banned``
   never sees a half-loaded state); the follower moves to the watermark and
   the publisher re-bases its pending writes (see ``_publisher``).
4. **Catch-up.**  The follower replays the stream from the watermark up to
   the head as it is *after* the scan.  Every event carries the resulting
   state of its target (e.g. the merged expiry), so replaying events the scan
   already saw changes nothing, and the result is exactly the record as of
   that head.  Catch-up stops there — not when the stream is quiet, which
   under sustained writes may be never; the steady-state reader goes on.

Malformed record values and non-canonical targets (hand-written ``HSET``)
are logged, counted and skipped; they never fail a snapshot.
"""

from __future__ import annotations

import socket
from array import array
from itertools import repeat
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import anyio
import msgspec

from ._follower import valid_target
from ._model import Entry, entries_decoder, entry_decoder
from ._packed import _expires_of, addresses_of, earliest_of
from ._targets import STRICT_PTON

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._clock import ServerClock
    from ._keys import Keys
    from ._packed import BulkLoad
    from ._resp import ReaderConnection

__all__ = ["Snapshot", "take"]

_AF_INET: Final = socket.AF_INET
_pton: Final = socket.inet_pton
_ntop: Final = socket.inet_ntop


class Snapshot(NamedTuple):
    """The record as read, and the watermark it is exact from."""

    head_id: str
    seq: int
    epoch: str
    bans: BulkLoad | list[tuple[str, Entry]]
    allows: list[tuple[str, Entry]]


async def take(
    conn: ReaderConnection,
    keys: Keys,
    *,
    clock: ServerClock,
    scan_count: int,
    skip: Callable[[str, str], None],
    timeout: float = 120.0,
    bulk: Callable[[int], BulkLoad] | None = None,
) -> Snapshot:
    """Steps 1 and 2: the watermark, then the whole record.

    :param skip: called ``(what, why)`` for each malformed entry skipped.
    :param bulk: makes the container the bans go into, given their number
        (``HLEN``; the cache's ``bulk_load``), so that each page is put in
        columns while Redis pages the next.
    :raises TimeoutError: a round trip took longer than *timeout* seconds (a
        silent server must not hang the reader).
    """
    sent = clock.local()
    with anyio.fail_after(timeout):
        state = await conn.call("FCALL_RO", "banbus_state", 1, keys.function_key)
    clock.observe(int(state[3]), sent, clock.local())
    into = None
    if bulk is not None:
        with anyio.fail_after(timeout):
            into = bulk(int(await conn.call("HLEN", keys.bans)))
    bans = await _scan(conn, keys.bans, scan_count, skip, timeout, into, clock.now())
    allows = await _scan(conn, keys.allow, scan_count, skip, timeout)
    return Snapshot(str(state[0]), int(state[1]), str(state[2] or ""), bans, allows)


async def _scan(
    conn: ReaderConnection,
    key: str,
    count: int,
    skip: Callable[[str, str], None],
    timeout: float,
    into: BulkLoad | None = None,
    now: int = 0,
) -> Any:
    """The entries of the hash *key*: a list of (target, entry), or *into*
    filled (expired entries left out there)."""
    out: list[tuple[str, Entry]] = [] if into is None else into.others
    ntop, pton, af, strict = _ntop, _pton, _AF_INET, STRICT_PTON
    future = conn.call("HSCAN", key, "0", "COUNT", count)
    while True:
        with anyio.fail_after(timeout):
            cursor, flat = await future
        if cursor != "0":
            # Pipelined: Redis pages the next batch while we decode this one.
            future = conn.call("HSCAN", key, cursor, "COUNT", count)
        targets = flat[0::2]
        values = flat[1::2]
        entries: list[Any]
        try:
            entries = entries_decoder.decode("[" + ",".join(values) + "]")
            if len(entries) != len(values):  # a value with a top-level comma
                raise msgspec.DecodeError("value count mismatch")
        except (msgspec.DecodeError, msgspec.ValidationError):
            entries = [_decode_one(key, t, v, skip) for t, v in zip(targets, values, strict=True)]
        else:
            if into is not None and strict and _clean_page(targets, entries, into, now):
                if cursor == "0":
                    return into
                continue
        append = out.append
        texts: list[str] = []
        addresses: list[bytes] = []
        rows: list[Entry] = []
        for target, entry in zip(targets, entries, strict=True):
            if entry is None:
                continue
            try:
                # The common case: a canonical IPv4 address, checked without parsing.
                packed = pton(af, target)
                if strict or ntop(af, packed) == target:
                    if into is None:
                        append((target, entry))
                    elif not entry.expires or entry.expires > now:
                        texts.append(target)
                        addresses.append(packed)
                        rows.append(entry)
                    continue
            except (OSError, ValueError):
                pass
            if valid_target(target):
                append((target, entry))
            else:
                skip(f"record {key}[{target!r}]", "not a canonical target")
        if into is not None:
            into.page(texts, addresses_of(b"".join(addresses)), rows)
        if cursor == "0":
            return out if into is None else into


def _clean_page(targets: list[str], entries: list[Entry], into: BulkLoad, now: int) -> bool:
    """The common page — canonical IPv4 addresses only, none expired — column by
    column instead of row by row (``map`` in C, no Python frame per row);
    False (nothing done) for any other page."""
    try:
        blob = b"".join(map(_pton, repeat(_AF_INET), targets))
    except (OSError, ValueError):
        return False
    expires = array("q", map(_expires_of, entries))
    earliest = earliest_of(expires)
    if earliest and earliest <= now:
        return False
    into.page(targets, addresses_of(blob), entries, expires, earliest)
    return True


def _decode_one(key: str, target: str, value: str, skip: Callable[[str, str], None]) -> Any:
    try:
        return entry_decoder.decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        skip(f"record {key}[{target!r}]", str(exc))
        return None
