"""The cache modes: the packed address store, the bulk load, the prefilter, bloom mode."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import math
import random
import socket
import sys
from array import array
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import banbus._follower
import banbus._packed
from banbus import Node
from banbus._cache import BanCache, _HashBits
from banbus._model import Ban, Entry, Unban
from banbus._packed import AddressStore, BulkLoad, sort_keys

from ._helpers import eventually, keys, nodes

if TYPE_CHECKING:
    from collections.abc import Callable

    import redis.asyncio as aioredis

    from banbus._servers import RedisProcess

NOW = 1_800_000_000_000

_values = st.integers(min_value=0, max_value=40)  # few addresses: many collisions


def _shape(expires: int, *, compact: bool) -> int:
    """An expiry as the store keeps it (compact: rounded up to the second)."""
    return -(-expires // 1000) * 1000 if compact else expires


def _text(value: int) -> str:
    """The address of a small *value*, one per /12 (spread over the directory)."""
    return str(ipaddress.IPv4Address(value << 20))


def _host(value: int) -> str:
    """The address of a small *value*, in one /24 (the follower tests' targets)."""
    return f"198.51.100.{value}"


def _records(cache: BanCache, kind: str = "ban") -> list[object]:
    """A cache's records of *kind*, by target (to compare two caches)."""
    return sorted(cache.records(kind), key=lambda r: r.target)  # type: ignore[arg-type]


def _loaded(compact: bool, expiries: dict[int, int]) -> tuple[AddressStore, dict[str, int]]:
    """A store loaded with the addresses of *expiries*' values, and its dict model."""
    store = AddressStore(compact)
    store.load([v << 20 for v in expiries], [Entry(e, "r", "o", 1) for e in expiries.values()])
    return store, {_text(v): _shape(e, compact=compact) for v, e in expiries.items()}


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["put", "pop", "merge", "sweep"]),
            _values,
            st.sampled_from([0, 1_500, 60_000]),
        ),
        max_size=60,
    ),
    compact=st.booleans(),
    preload=st.lists(_values, max_size=20, unique=True),
)
def test_store_behaves_like_a_dict(
    ops: list[tuple[str, int, int]], compact: bool, preload: list[int]
) -> None:
    """Whatever the mix of writes, merges and sweeps: the store answers as a dict would
    (compact: expiry rounded up to the second)."""
    now = NOW
    shape = partial(_shape, compact=compact)
    text = _text
    store, model = _loaded(compact, {v: NOW + 3_600_000 for v in preload})
    for op, value, ttl in ops:
        address = text(value)
        if op == "put":
            expires = now + ttl if ttl else 0
            before = store.put(address, Entry(expires, "why", "me", 7))
            assert (before is None) == (address not in model)
            model[address] = shape(expires)
        elif op == "pop":
            gone = store.pop(address)
            assert (gone is None) == (address not in model)
            model.pop(address, None)
        elif op == "merge":
            store.merge()
        else:
            now += ttl
            for v, _ in store.sweep(now):
                assert model.pop(v) <= now
        for v in {address, *model}:
            assert store.expires_of(v) == model.get(v)
            assert (v in store) == (v in model)
        assert len(store) == len(model)
        assert sorted(store.keys()) == sorted(model)
    if not compact:
        for v, entry in store.items():
            assert entry.expires == model[v]
            assert entry.reason in ("r", "why")


@settings(max_examples=150, deadline=None)
@given(
    events=st.lists(
        st.tuples(
            st.sampled_from(["ban", "allow", "unban"]),
            st.integers(min_value=0, max_value=30),
            st.sampled_from([0, -5_000, 1_500, 60_000]),
        ),
        max_size=80,
    ),
    mode=st.sampled_from(["full", "compact", "bloom"]),
    preload=st.lists(st.integers(min_value=0, max_value=30), max_size=10, unique=True),
)
def test_the_followers_fast_path_stores_what_apply_stores(
    events: list[tuple[str, int, int]], mode: str, preload: list[int]
) -> None:
    """``store_address`` (the follower's per-event path, ``_store`` inlined) leaves
    the cache exactly as :meth:`BanCache.apply` does, in every mode."""
    from banbus._model import Allow

    clock = [NOW]
    caches = []
    for _ in range(2):
        cache = BanCache(lambda: clock[0], mode=mode, digest=mode != "bloom")  # type: ignore[arg-type]
        cache.replace([(_host(v), Entry(NOW + 3_600_000, "list", "n0", 1)) for v in preload], [])
        caches.append(cache)
    fast, slow = caches
    for seq, (op, value, ttl) in enumerate(events, 2):
        target, expires = _host(value), NOW + ttl if ttl else 0
        if op == "unban":
            fast.apply(Unban(target=target, seq=seq))
            slow.apply(Unban(target=target, seq=seq))
            continue
        cls = Ban if op == "ban" else Allow
        slow.apply(cls(target=target, expires=expires, reason="r", origin="o", seq=seq), NOW)
        fast.store_address(op == "ban", target, expires, "r", "o", seq, NOW)

    for kind in ("ban", "allow"):
        assert _records(fast, kind) == _records(slow, kind)
    for value in range(31):
        assert fast.is_banned(_host(value)) == slow.is_banned(_host(value))
    assert fast.ban_count == slow.ban_count and fast.allow_count == slow.allow_count
    if mode != "bloom":
        assert fast.digest(NOW) == slow.digest(NOW)
    fast.settle()
    slow.settle()
    assert _records(fast) == _records(slow)
    clock[0] = NOW + 3_700_000  # everything timed has expired: the same is swept
    assert fast.expire(force=True) == slow.expire(force=True)
    assert fast.ban_count == slow.ban_count and _records(fast) == _records(slow)


def _ban_entry(i: int, seq: int, target: str, expires: int, *, op: str = "ban") -> list[object]:
    """A stream entry as XREAD gives it, in the function library's layout."""
    fields = ["op", op, "target", target, "expires", str(expires), "reason", f"r{i % 3}",
              "origin", "n1", "eid", f"n1.{i:016x}", "seq", str(seq)]  # fmt: skip
    return [f"{1_700_000_000_000 + i}-0", fields]


def _followers(mode: str, preload: list[str]) -> list[Node]:
    """Two nodes' follower set-ups (not started), one taking the column path for
    any batch, the other never, with the same preloaded view."""
    import redis.asyncio as aioredis

    nodes_: list[Node] = []
    later = 0
    for _ in range(2):
        node = Node("redis://127.0.0.1:1", node_id="x", cache=mode)  # never connects
        node._build(aioredis.Redis(port=1), spawn=lambda *args: None)
        later = later or node._clock.now() + 3_600_000
        node._cache.replace([(t, Entry(later, "list", "n0", 1)) for t in preload], [])
        for _ in node._cache.recompute():  # the digest known, so that it is compared
            pass
        if mode == "bloom":  # reloads wanted after a few known targets, not 64k
            prefilter = node._cache._bans.prefilter
            assert prefilter is not None
            prefilter.known_max = 3
        assert node._follower is not None
        node._follower.reset("1-0", 10, "e1")
        nodes_.append(node)
    return nodes_


#: Kinds of stream entry: the column path takes a batch only of the first.
_KINDS = ["ban"] * 12 + ["ban-expired", "ban-permanent", "allow", "unban", "bad-name", "bad-digits",
                         "not-canonical", "network", "seq-gap", "seq-repeat"]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    batches=st.lists(
        st.lists(st.tuples(st.sampled_from(_KINDS), st.integers(0, 12)), min_size=1, max_size=12),
        min_size=1,
        max_size=5,
    ),
    mode=st.sampled_from(["full", "compact", "bloom"]),
    preload=st.lists(st.integers(0, 12), max_size=6, unique=True),
)
def test_the_column_path_applies_what_the_per_event_path_applies(
    batches: list[list[tuple[str, int]]], mode: str, preload: list[int]
) -> None:
    """Batch after batch of stream entries (bans mostly; now and then an entry
    the column path must refuse, a repeated target, a seq out of order): the
    follower that tries the column path for every batch ends each exactly
    where the per-event one does: the return value, position, statistics,
    notifications, records, digest, and what a settle and a sweep leave."""

    columns, events = _followers(mode, [_host(v) for v in preload])
    heard: list[list[str]] = [[], []]
    for node, out in zip((columns, events), heard, strict=True):
        node.subscribe(out.append)
    now = columns._clock.now()
    seq, i, took = 10, 0, 0
    for batch in batches:
        entries = []
        for kind, value in batch:
            i += 1
            seq += kind != "seq-repeat"
            seq += kind == "seq-gap"
            target = {"not-canonical": f"198.51.100.0{value}",
                      "network": f"198.51.{value}.0/24"}.get(kind, _host(value))  # fmt: skip
            # (Far from now: the two nodes read the clock at different times.)
            expires = {"ban-expired": now - 60_000, "ban-permanent": 0}.get(
                kind, now + 60_000 * (value + 1)
            )
            op = {"allow": "allow", "unban": "unban"}.get(kind, "ban")
            entry = _ban_entry(i, seq, target, expires, op=op)
            fields: list[str] = entry[1]  # type: ignore[assignment]
            if kind == "bad-name":
                fields[4] = "expiry"
            elif kind == "bad-digits":
                fields[5] = "\u0661" + fields[5]  # an Arabic-Indic digit: isdigit() but not ASCII
            entries.append(entry)
        results = []
        for node, threshold in ((columns, 1), (events, 10**9)):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(banbus._follower, "_COLUMNS_FROM", threshold)
                follower = node._follower
                assert follower is not None
                before = follower.stats["applied"]
                results.append(follower.apply(json.loads(json.dumps(entries))))
                took += threshold == 1 and follower.stats["applied"] - before == len(entries)
        assert results[0] == results[1]
        a, b = columns._follower, events._follower
        assert a is not None and b is not None
        assert (a.seq, a.cursor, a.last_id, a.anomaly) == (b.seq, b.cursor, b.last_id, b.anomaly)
        assert a.stats == b.stats
        assert columns._cache.reload_wanted == events._cache.reload_wanted
        if not results[0]:  # an anomaly stops the chain: the node would judge, then go on
            a.skip_anomaly()
            b.skip_anomaly()
            seq = a.seq
    event("the column path took a batch" if took else "it took none")
    assert heard[0] == heard[1]
    x, y = columns._cache, events._cache

    for kind in ("ban", "allow"):
        assert _records(x, kind) == _records(y, kind)
    assert x.ban_count == y.ban_count and x.allow_count == y.allow_count
    for value in range(13):
        assert x.is_banned(_host(value)) == y.is_banned(_host(value))
    if mode != "bloom":
        assert x.digest(now) == y.digest(now) is not None
    x.settle()
    y.settle()
    assert _records(x) == _records(y)
    assert x.expire(now + 3_600_000 * 24, force=True) == y.expire(now + 3_600_000 * 24, force=True)
    assert _records(x) == _records(y)


def test_a_bloom_batch_of_bans_of_targets_known_absent_asks_for_the_reload() -> None:
    """Bloom mode: unbans of loaded targets make them known (absent) without a
    look at wear; a batch of bans of just those then grows nothing, but the
    per-event path looks at wear for each and asks for the reload (more
    targets known than known_max): so must the column path (from a review)."""
    loaded = [f"10.1.0.{i}" for i in range(banbus._follower._COLUMNS_FROM)]
    columns, events = _followers("bloom", loaded)
    now = columns._clock.now()
    unbans = [[f"{1_700_000_000_000 + i}-0",
               ["op", "unban", "target", t, "origin", "n1", "eid", f"n1.{i:x}", "seq", str(11 + i)]]
              for i, t in enumerate(loaded)]  # fmt: skip
    n = len(loaded)
    bans = [_ban_entry(n + i, 11 + n + i, t, now + 60_000) for i, t in enumerate(loaded)]
    for node, threshold in ((columns, 1), (events, 10**9)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(banbus._follower, "_COLUMNS_FROM", threshold)
            follower = node._follower
            assert follower is not None
            assert follower.apply(json.loads(json.dumps(unbans)))
            assert not node._cache.reload_wanted  # an unban does not look
            assert follower.apply(json.loads(json.dumps(bans)))
            assert node._cache.reload_wanted
            assert follower.stats["applied"] == 2 * n


def test_a_clean_batch_takes_the_column_path_and_anything_pending_keeps_it_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch of bans as a burst brings them takes the column path (one
    ``store_bans``); one with an own write pending on any target, or a
    forged id known, takes the per-event path; so does a batch below
    _COLUMNS_FROM."""
    (node,) = _followers("full", [])[:1]
    follower = node._follower
    assert follower is not None
    now = node._clock.now()
    calls: list[int] = []
    store_bans = BanCache.store_bans

    def spy(cache: BanCache, *args: Any) -> None:
        calls.append(len(args[0]))
        store_bans(cache, *args)

    monkeypatch.setattr(BanCache, "store_bans", spy)
    n = banbus._follower._COLUMNS_FROM
    seq = [10]

    def batch(k: int, start: int) -> list[list[object]]:
        out = [_ban_entry(start + j, seq[0] + 1 + j, f"10.0.{start // 250}.{j}", now + 60_000)
               for j in range(k)]  # fmt: skip
        seq[0] += k
        return out

    assert follower.apply(batch(n, 0))
    assert calls == [n]
    assert follower.apply(batch(n - 1, 1000))  # too few to bother
    assert calls == [n]
    node._publisher.slots_b["192.0.2.1"] = None  # type: ignore[assignment]
    assert follower.apply(batch(n, 2000))
    del node._publisher.slots_b["192.0.2.1"]
    follower.forged(f"{1_700_000_000_000 + 3000 + n - 1}-0")  # the batch's last entry
    assert follower.apply(batch(n, 3000))
    assert calls == [n]
    assert follower.stats["applied"] == 4 * n - 2 and node._cache.ban_count == 4 * n - 2
    assert follower.stats["skipped"] == 1


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["put", "put", "put", "pop", "step", "step", "step", "step", "merge"]),
            _values,
            st.integers(min_value=0, max_value=4_000),
        ),
        max_size=80,
    ),
    compact=st.booleans(),
    preload=st.lists(_values, max_size=30, unique=True),
)
def test_a_sweep_in_steps_drops_only_expired_entries_whatever_happens_between(
    ops: list[tuple[str, int, int]], compact: bool, preload: list[int]
) -> None:
    """Puts, removals and merges land between the steps of a sweep: it drops only
    entries expired at its *now* that nothing rewrote, gives up if a merge
    overtook it, and the store's count and keys stay exact throughout."""
    now = NOW + 2_000
    shape = partial(_shape, compact=compact)
    text = _text
    store, model = _loaded(compact, {v: NOW + 1_000 * (v % 4) for v in preload})
    sweep = store.sweep_steps(now, chunk=4)
    for op, value, ttl in ops:
        address = text(value)
        if op == "put":
            store.put(address, Entry(NOW + ttl if ttl else 0, "why", "me", 7))
            model[address] = shape(NOW + ttl if ttl else 0)
        elif op == "pop":
            store.pop(address)
            model.pop(address, None)
        elif op == "merge":
            store.merge()
        else:
            try:
                next(sweep)
            except StopIteration as stop:
                for target, entry in stop.value or ():
                    assert 0 < model.pop(target) <= now  # expired at its now, not rewritten
                    assert 0 < entry.expires <= now
                sweep = store.sweep_steps(now, chunk=4)  # and another
        for v in map(text, range(41)):
            assert store.expires_of(v) == model.get(v)
        assert len(store) == len(model)
        assert sorted(store.keys()) == sorted(model)


#: Addresses at the edges of the sort key's bytes and of its double's exponent.
_EDGES = [0, 1, 255, 256, 2**24 - 1, 2**24, 2**28 - 1, 2**28, 2**31 - 1, 2**31, 2**32 - 1]
_addresses = st.lists(
    st.one_of(st.sampled_from(_EDGES), st.integers(0, 2**32 - 1)),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(addresses=_addresses, chunk_bits=st.sampled_from([2, 3, 24]), data=st.data())
def test_sort_keys_sorts_by_address_and_keeps_each_payload(
    addresses: list[int], chunk_bits: int, data: st.DataObject
) -> None:
    """The index keys come out sorted by address (the float sort orders as the ints
    would, extremes included), each with its own payload, equal addresses in
    the order given (within a chunk of 2**chunk_bits; chunk_bits 24 is the
    real one), and the same keys whether made by one sort or by merging
    per-page runs (BulkLoad)."""
    given_payloads = data.draw(st.lists(st.integers(0, 2**32 - 1), min_size=len(addresses),
                                        max_size=len(addresses)))  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(banbus._packed, "_CHUNK_BITS", chunk_bits)
        for payloads in (None, array("I", given_payloads)):
            got = sort_keys(array("I", addresses), payloads)
            pairs = [(x >> 32, x & 0xFFFFFFFF) for x in got]
            values = list(range(len(addresses))) if payloads is None else given_payloads
            assert [a for a, _ in pairs] == sorted(addresses)
            assert sorted(pairs) == sorted(zip(addresses, values, strict=True))
            if payloads is None or len(addresses) <= 1 << chunk_bits:  # stable
                stable = sorted(range(len(addresses)), key=addresses.__getitem__)
                assert pairs == [(addresses[i], values[i]) for i in stable]


def test_sort_keys_uses_every_byte_of_the_position_and_normal_doubles() -> None:
    """Positions up to 2**24 - 1 come back whole (all three bytes), the sort keys
    of the extreme addresses are positive normal doubles (no subnormal, which
    a denormals-are-zero CPU mode would compare as 0), and a sort of 70,000
    addresses equals the sort of their ints."""
    addresses = array("I", [2**32 - 1, 0, 2**28, 2**28 - 1, 1])
    start = 2**24 - len(addresses)
    ordered = banbus._packed._patterns(addresses, start)
    assert all(sys.float_info.min <= x < math.inf for x in ordered)
    keys = banbus._packed._keys_of(ordered, None, 0)
    expected = sorted((a, start + i) for i, a in enumerate(addresses))
    assert [(x >> 32, x & 0xFFFFFFFF) for x in keys] == expected
    with pytest.raises(ValueError):
        banbus._packed._patterns(addresses, start + 1)
    rng = random.Random(12)
    many = array("I", [rng.getrandbits(32) for _ in range(70_000)])
    assert list(sort_keys(many)) == sorted(a << 32 | i for i, a in enumerate(many))


@pytest.mark.parametrize("case", ["dense", "sparse", "edges"])
def test_the_directory_by_bisection_equals_the_directory_by_counting(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The directory of a big index (each /16 bisected from where the last ended,
    within a window) equals the one counted: a /16 fuller than the window,
    long empty stretches, the last /16."""
    rng = random.Random(case)
    if case == "dense":  # a few /16s, one with far more than the window's width
        values = [10 << 24 | rng.getrandbits(16) for _ in range(3_000)]
        values += [rng.getrandbits(32) for _ in range(500)]
    elif case == "sparse":
        values = [rng.getrandbits(32) for _ in range(2_000)]
    else:
        values = [0, 1, 2**16 - 1, 2**16, 2**32 - 2**16, 2**32 - 1, *range(2**32 - 300, 2**32 - 1)]
    values = sorted(set(values))
    entries = [Entry(NOW)] * len(values)
    counted = AddressStore(compact=True)
    counted.load(values, entries)
    monkeypatch.setattr(banbus._packed, "_BISECT_FROM", 0)
    bisected = AddressStore(compact=True)
    bisected.load(values, entries)
    assert bisected.directory == counted.directory
    assert all(bisected.expires_of(str(ipaddress.IPv4Address(v))) == NOW for v in values)


@settings(max_examples=300, deadline=None)
@given(words=st.lists(st.integers(0, 2**32 - 1) | st.sampled_from([0, 1, 256, 2**24]), max_size=12))
def test_repeats_finds_adjacent_equal_words(words: list[int]) -> None:
    raw = array("I", words).tobytes()
    assert banbus._packed._repeats(raw) == any(a == b for a, b in itertools.pairwise(words))


#: Expiries (ms after NOW; 0: permanent) around the compact codes' window: a
#: load that knows NOW codes seconds from NOW - 60 s up to ~194 days later
#: (see _codes); the rest go by position.
_WINDOW = banbus._packed._CODE_MAX * 1000
_EXPIRIES = [0, 1, 999, 1000, 86_400_000, _WINDOW - 61_000, _WINDOW - 60_000, _WINDOW - 59_000,
             10 * _WINDOW, -60_000, -59_000, -NOW + 1]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    pages=st.lists(
        st.lists(
            st.tuples(
                st.sampled_from(_EDGES) | st.integers(0, 2**32 - 1),
                st.sampled_from(_EXPIRIES) | st.integers(-NOW + 1, 20 * _WINDOW),
            ),
            max_size=12,
        ),
        max_size=6,
    ),
    compact=st.booleans(),
    chunk_bits=st.sampled_from([3, 24]),
    knows_now=st.booleans(),
)
def test_a_bulk_load_keeps_one_value_of_each_address_and_every_expiry_exact(
    pages: list[list[tuple[int, int]]], compact: bool, chunk_bits: int, knows_now: bool
) -> None:
    """Page by page (sorted runs, merged at the end; or past 2**chunk_bits
    addresses, one sort of them all), each address keeps one of the values
    given for it (HSCAN may return a field twice): in full mode the last; in
    compact mode the latest expiry, a permanent one losing to any other.
    Compact mode sorts a page by expiry codes if the page fits the codes'
    window, else by position; its expiries come back to the second either
    way, with or without the load's time."""
    code_max = banbus._packed._CODE_MAX
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(banbus._packed, "_CHUNK_BITS", chunk_bits)
        bulk = BulkLoad(compact, None, texts=False, now=NOW if knows_now else 0)
        given: dict[int, list[Entry]] = {}
        row = 0
        base = NOW // 1000 - 60 if knows_now else 0
        fixed = False
        for page in pages:
            entries = []
            for value, after in page:
                row += 1
                entry = Entry(NOW + after if after else 0, f"r{row % 3}", "o", row)
                given.setdefault(value, []).append(entry)
                entries.append(entry)
            before = len(bulk.coded or ()), len(bulk.runs or ())
            bulk.page([str(ipaddress.IPv4Address(v)) for v, _ in page], [v for v, _ in page],
                      entries)  # fmt: skip
            if not compact or bulk.runs is None:
                assert not bulk.coded
                continue
            # Which path the page took: the codes if it fits the window (from a
            # minute before the load's time or, if the first expiries do not
            # fit there, before them), else its positions.
            seconds = [-(-e.expires // 1000) for e in entries if e.expires]
            if seconds and not fixed:
                fixed = True
                beyond = sum(x > base + code_max for x in seconds)
                if min(seconds) <= base or beyond > len(page) >> 6:
                    base = max(0, min(seconds) - 60)
            outside = sum(1 for x in seconds if x > base + code_max)
            if any(x <= base for x in seconds) or outside > len(page) >> 6:
                went = (0, len(page))
            else:  # a few outside the window: those alone by position
                went = (len(page) - outside, outside)
            after_page = len(bulk.coded or ()), len(bulk.runs)
            assert (after_page[0] - before[0], after_page[1] - before[1]) == went
        assert (bulk.runs is None) == (row > 1 << chunk_bits)
        store = bulk.finish()
    assert len(store) == len(given)
    for value, entries in given.items():
        entry = store.get(str(ipaddress.IPv4Address(value)))
        assert entry is not None
        if compact:
            seconds = [-(-e.expires // 1000) for e in entries]
            assert entry == Entry(max(seconds) * 1000)
        else:
            assert entry == entries[-1]


@settings(max_examples=300, deadline=None)
@given(first=st.lists(st.integers(0, 2**64 - 1), max_size=300), few=st.integers(0, 12),
       data=st.data())  # fmt: skip
def test_merged_keys_equal_a_sort_of_both(first: list[int], few: int, data: st.DataObject) -> None:
    """Index keys merged: a few into many (a bisect each) or as a sort of two runs."""
    keys = (
        st.sampled_from(first) | st.integers(0, 2**64 - 1) if first else st.integers(0, 2**64 - 1)
    )
    second = data.draw(st.lists(keys, min_size=few,
                                max_size=few if data.draw(st.booleans()) else 300))  # fmt: skip
    got = banbus._packed._merged(array("Q", sorted(first)), array("Q", sorted(second)))
    assert list(got) == sorted(first + second)


@settings(max_examples=300, deadline=None)
@given(
    base=st.integers(0, 2**32 - 1 - banbus._packed._CODE_MAX),
    offsets=st.lists(st.sampled_from([0, 1, 2, 255, 256, 2**16, banbus._packed._CODE_MAX])
                     | st.integers(0, banbus._packed._CODE_MAX), max_size=20),
)  # fmt: skip
def test_expiry_codes_fit_the_sort_key_and_come_back_whole(base: int, offsets: list[int]) -> None:
    """Each expiry in base + 1 .. base + _CODE_MAX codes to 1 .. _CODE_MAX (it fits
    the sort key's low 24 bits), 0 (permanent) to 0, and decodes to itself,
    every byte of it (big ints and byte lanes, in either byte order)."""
    seconds = array("I", [base + x if x else 0 for x in offsets])
    codes = array("I", banbus._packed._codes(seconds, base))
    assert list(codes) == offsets
    assert banbus._packed._decoded(codes.tobytes(), base) == seconds.tobytes()
    flags = banbus._packed._nonzero(seconds.tobytes()).to_bytes(4 * len(seconds), sys.byteorder)
    assert list(array("I", flags)) == [1 if s else 0 for s in seconds]


@pytest.mark.parametrize("far", [0, 1, 15, 16, 1000])
def test_a_page_with_a_few_long_bans_sorts_only_those_by_position(far: int) -> None:
    """A page of 1,000 where *far* bans last longer than the codes' window: up to
    1/64 of the page, those alone go by position (the rest by code), beyond
    that the whole page; the store is exact either way, repeated addresses
    included (each keeps its latest expiry)."""
    rng = random.Random(far)
    day = 86_400_000
    values = [rng.getrandbits(32) for _ in range(1000)]
    values[10:20] = values[500:510]  # repeated in the same page
    ttls = [rng.choice([0, 60_000, 30 * day]) for _ in values]
    for i in rng.sample(range(1000), far):
        ttls[i] = rng.choice([200 * day, 3650 * day])
    bulk = BulkLoad(True, None, texts=False, now=NOW)
    entries = [Entry(NOW + t if t else 0) for t in ttls]
    bulk.page([str(ipaddress.IPv4Address(v)) for v in values], values, entries)
    assert bulk.runs is not None and bulk.coded is not None
    by_position = far if far <= 1000 >> 6 else 1000
    assert (len(bulk.coded), len(bulk.runs)) == (1000 - by_position, by_position)
    latest: dict[int, int] = {}
    for v, e in zip(values, entries, strict=True):
        latest[v] = max(latest.get(v, 0), -(-e.expires // 1000))
    store = bulk.finish()
    assert len(store) == len(latest) == 990
    assert all(
        store.get(str(ipaddress.IPv4Address(v))) == Entry(x * 1000) for v, x in latest.items()
    )


def test_bulk_load_keeps_the_last_of_a_repeated_field_and_equals_a_list_load() -> None:
    pages = [
        [("203.0.113.7", Entry(0, "a", "n1", 1)), ("198.51.100.1", Entry(NOW + 5_000))],
        [("203.0.113.7", Entry(NOW + 9_000, "b", "n2", 2)), ("10.0.0.0/8", Entry(0))],
    ]
    for mode in ("full", "compact"):
        by_list = BanCache(lambda: NOW, mode=mode)  # type: ignore[arg-type]
        by_list.replace([row for page in pages for row in page], [])
        by_bulk = BanCache(lambda: NOW, mode=mode)  # type: ignore[arg-type]
        bulk = by_bulk.bulk_load(4)
        for page in pages:
            v4 = [(t, e) for t, e in page if "/" not in t]
            bulk.others += [(t, e) for t, e in page if "/" in t]
            bulk.page(
                [t for t, _ in v4],
                [int(ipaddress.IPv4Address(t)) for t, _ in v4],
                [e for _, e in v4],
            )
        assert isinstance(bulk, BulkLoad)
        assert sorted(bulk.targets()) == sorted(t for p in pages for t, _ in p)
        by_bulk.replace(bulk, [])
        assert _records(by_bulk) == _records(by_list), mode
        assert by_bulk.entry("ban", "203.0.113.7") == by_list.entry("ban", "203.0.113.7")
        assert by_bulk.is_banned("10.1.2.3") and by_bulk.is_banned("198.51.100.1")
        assert by_bulk.ban_count == 3


@pytest.mark.parametrize("mode", ["full", "compact"])
def test_a_load_keeps_a_filter_sized_for_it_and_growth_doubles_it(mode: str) -> None:
    """A bulk load sizes the bloom filter for what it loads: the node's first idle
    moment must not rebuild it (it did: 3.5x the memory, and a stall of a pass
    over every address).  Growth past 15/16 of it rebuilds at twice the size,
    when the new addresses are packed (a burst does not rebuild it)."""
    cache = BanCache(lambda: NOW, mode=mode)  # type: ignore[arg-type]
    loaded = [str(ipaddress.IPv4Address(0x0A000000 + 7 * i)) for i in range(20_000)]
    bulk = cache.bulk_load(len(loaded), newly=False)
    bulk.page(loaded, [int(ipaddress.IPv4Address(t)) for t in loaded], [Entry(0)] * len(loaded))
    cache.replace(bulk, [], newly=False)
    size, bloom = cache.memory()["bloom"], cache._bloom
    cache.settle()
    assert cache._bloom is bloom and cache.memory()["bloom"] == size
    added = [str(ipaddress.IPv4Address(0x0B000000 + i)) for i in range(5_000)]
    for target in added:
        cache.put("ban", target, Entry(0))
    assert cache._bloom is bloom  # new addresses wait in the overlay, not in the filter
    cache.settle()  # packs them: the filter would be over 15/16 full
    assert cache._bloom is not bloom
    assert 1.8 * size < cache.memory()["bloom"] < 2.3 * size
    assert all(cache.is_banned(t) for t in loaded + added)
    assert cache.ban_count == len(loaded) + len(added)


def test_merges_in_a_burst_grow_the_filter_and_lose_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A burst larger than the overlay's limit is merged mid-burst, filling the
    filter past its capacity: the next new ban rebuilds it, and nothing is lost."""
    import banbus._packed

    monkeypatch.setattr(banbus._packed, "_OVERLAY_MIN", 512)
    cache = BanCache(lambda: NOW)
    targets = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(20_000)]
    capacities = set()
    for t in targets:
        cache.store_address(True, t, NOW + 60_000, "r", "o", 1, NOW)
        assert cache._bans.prefilter is not None
        capacities.add(cache._bans.prefilter.capacity)
    assert len(capacities) > 3  # grown several times, in the burst
    assert all(cache.is_banned(t) for t in targets)
    assert cache.ban_count == len(targets)
    outsiders = [f"192.0.{i >> 8}.{i & 255}" for i in range(5_000)]
    assert sum(o in cache._bloom for o in outsiders) < 50  # still a filter, not "all"


@pytest.mark.parametrize("mode", ["full", "compact"])
def test_a_filter_grown_in_steps_loses_nothing_changed_meanwhile(mode: str) -> None:
    """Between the steps of a growth, bans land in the overlay, get packed (a
    merge, a sweep), IPv6 targets go in the dict: the grown filter, swapped in
    at the end, holds everything (a filter's false negative would let a banned
    address through)."""
    clock = [NOW]
    cache = BanCache(lambda: clock[0], mode=mode)  # type: ignore[arg-type]
    loaded = [str(ipaddress.IPv4Address(0x0A000000 + 3 * i)) for i in range(150_000)]
    bulk = cache.bulk_load(len(loaded), newly=False)
    bulk.page(loaded, [int(ipaddress.IPv4Address(t)) for t in loaded],
              [Entry(NOW + 5_000 if i % 10 == 0 else 0) for i in range(len(loaded))])  # fmt: skip
    cache.replace(bulk, [], newly=False)
    old = cache._bloom
    added = [str(ipaddress.IPv4Address(0x0B000000 + i)) for i in range(20_000)]
    for target in added:
        cache.put("ban", target, Entry(0))
    cache._bans.store.merge()  # packed, as settle_steps() does first
    assert cache.settle_due and cache._bloom is old  # the filter is over 15/16 full
    later = [str(ipaddress.IPv4Address(0x0C000000 + i)) for i in range(6_000)]
    v6 = [f"2001:db8::{i:x}" for i in range(300)]
    steps = cache.grow_steps(chunk=16_384)
    for i, _ in enumerate(steps):  # 11 steps: 170k addresses, 16k at a time
        assert cache._bloom is old  # swapped only when complete
        for target in later[i * 600 : (i + 1) * 600]:
            cache.put("ban", target, Entry(0))
        for target in v6[i * 30 : (i + 1) * 30]:
            cache.put("ban", target, Entry(0))
        if i == 3:
            cache._bans.store.merge()  # packed mid-growth
        if i == 5:
            clock[0] = NOW + 6_000
            cache.expire(force=True)  # a sweep: a merge with expiry
    assert i == 10
    assert cache._bloom is not old and not cache.settle_due
    held = [t for i, t in enumerate(loaded) if i % 10] + added + later + v6
    missing = [t for t in held if t not in cache._bloom and t not in cache._recent]
    assert not missing, (len(missing), missing[:3])
    assert all(cache.is_banned(t) for t in held)
    assert not any(cache.is_banned(t) for i, t in enumerate(loaded) if i % 10 == 0)
    assert cache._bans.prefilter is not None and cache._bans.prefilter.capacity >= 2 * 170_000


@pytest.mark.parametrize("mode", ["full", "compact"])
def test_settling_in_steps_keeps_the_digest_exact_under_new_events(mode: str) -> None:
    """The digest bookkeeping is folded a chunk per step while events keep coming
    (bans, re-bans, unbans between the steps): at the end the digest is the one
    computed from scratch, and every ban is answered."""
    from banbus._digest import Digest, entry_hash

    cache = BanCache(lambda: NOW, mode=mode, digest=True)  # type: ignore[arg-type]
    first = [str(ipaddress.IPv4Address(0x0A000000 + i)) for i in range(12_000)]
    for i, target in enumerate(first):
        cache.store_address(True, target, NOW + 60_000 + i, "r", "o", i, NOW)
    assert cache.settle_due
    steps = 0
    for i, _ in enumerate(cache.settle_steps(chunk=1_000)):
        steps += 1
        target = first[(i * 37) % len(first)]
        cache.store_address(True, target, NOW + 90_000, "r", "o", 99, NOW)  # a re-ban
        cache.apply(Unban(target=first[(i * 53 + 1) % len(first)]))
        cache.store_address(True, f"11.0.{i >> 8}.{i & 255}", 0, "r", "o", 1, NOW)  # new
    assert steps >= 12  # the fold took a dozen steps, the growth a few more
    assert not cache._bans.store.overlay or len(cache._bans.store.overlay) < 100
    expected = Digest()
    for target in cache._bans.targets():
        expires = cache._bans.expires_of(target)
        assert expires is not None
        expected = expected.add(entry_hash("ban", target, expires))
    assert cache.digest(0) == expected
    assert all(cache.is_banned(t) for t in cache._bans.targets())


def test_next_expiry_waits_for_the_sweep_a_packed_store_may_run() -> None:
    """Expired packed entries wait for the store's next sweep: next_expiry() must
    not name a time in the past meanwhile (the node's expiry task spun on it)."""
    clock = [NOW]
    cache = BanCache(lambda: clock[0], mode="compact")
    cache.replace([(f"10.0.0.{i}", Entry(NOW + 1_000)) for i in range(10)], [])
    clock[0] = NOW + 2_000
    cache.expire(force=True)  # a sweep now: the next one is sweep_interval away
    cache.put("ban", "10.0.1.1", Entry(NOW + 2_500))
    cache._bans.store.merge()
    clock[0] = NOW + 3_000  # 10.0.1.1 has expired; the sweep may not run yet
    due = cache.next_expiry()
    assert due is not None and due > clock[0]
    assert cache.expire() == 0 and not cache.is_banned("10.0.1.1")


def test_a_growth_gives_up_when_the_table_is_replaced() -> None:
    cache = BanCache(lambda: NOW)
    for i in range(5_000):
        cache.put("ban", str(ipaddress.IPv4Address(0x0A000000 + i)), Entry(0))
    cache._bans.store.merge()
    assert cache.settle_due
    steps = cache.grow_steps(chunk=1_000)
    next(steps)
    cache.replace([("192.0.2.1", Entry(0))], [])  # a reload
    assert list(steps) == []
    assert cache.is_banned("192.0.2.1") and cache.ban_count == 1
    assert cache._bans.store.growing is None


def test_the_pure_python_prefilter_has_no_false_negatives() -> None:
    bits = _HashBits(1000)
    texts = [f"192.0.2.{i}" for i in range(256)] + [f"2001:db8::{i:x}" for i in range(500)]
    bits.update(texts)
    assert all(t in bits for t in texts)
    outsiders = [f"198.51.{i >> 8}.{i & 255}" for i in range(20_000)]
    assert sum(t in bits for t in outsiders) < 0.2 * len(outsiders)  # a filter, not "all"


def test_bloom_mode_asks_for_maybes_and_knows_events_exactly() -> None:
    asked: list[str] = []
    now = [NOW]
    cache = BanCache(lambda: now[0], mode="bloom", confirm=asked.append)
    cache.replace([("203.0.113.7", Entry(0)), ("203.0.113.8", Entry(NOW + 1_000))], [])
    assert cache.memory()["packed"] == 0  # addresses are in the filter only
    assert not cache.is_banned("203.0.113.7")  # a maybe: not known yet
    assert asked == ["203.0.113.7"]
    assert cache.pending("203.0.113.7") and not cache.pending("192.0.2.1")
    assert not cache.is_banned("192.0.2.1") and asked == ["203.0.113.7"]  # certainly not
    assert cache.confirmed("203.0.113.7", Entry(0, "scan"))  # connections must go
    assert cache.is_banned("203.0.113.7") and not cache.pending("203.0.113.7")
    # Events are exact at once, confirmations arriving after them are ignored.
    cache.apply(Unban(target="203.0.113.7"))
    assert not cache.is_banned("203.0.113.7")
    assert not cache.confirmed("203.0.113.7", Entry(0))
    assert not cache.is_banned("203.0.113.7")
    cache.apply(Ban(target="192.0.2.9", expires=NOW + 2_000))
    assert cache.is_banned("192.0.2.9")
    now[0] = NOW + 2_000
    assert not cache.is_banned("192.0.2.9")  # expiry is exact for known entries
    assert not cache.confirmed("203.0.113.8", Entry(NOW + 1_000))  # expired on arrival
    assert cache.lookup("::ffff:192.0.2.9") is None


def test_bloom_mode_keeps_its_filter_and_reloads_when_the_known_targets_grow() -> None:
    cache = BanCache(lambda: NOW, mode="bloom")
    cache.replace([(f"203.0.113.{i}", Entry(0)) for i in range(10)], [])
    bloom, bits = cache._bloom, cache.memory()["bloom"]
    added = [f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}" for i in range(70_000)]
    for i, target in enumerate(added):
        cache.apply(Ban(target=target))
        if i == 2_000:  # past the filter's capacity (1024): the filter took none of them
            assert not cache.reload_wanted
            assert cache._bloom is bloom and cache.memory()["bloom"] == bits
            assert all(cache.is_banned(t) for t in added[:2_000])
    assert cache.reload_wanted  # 70k known targets: time to load them into a filter


def test_a_bloom_reload_counts_as_newly_banned_what_the_last_load_did_not_hold() -> None:
    """Events must not blur the filter: an address the last load did not hold
    may have a live connection (it was accepted without a confirmation).  With
    events added to the filter, one of them made it a false positive and the
    reload that banned it did not report it: its connection stayed open."""
    cache = BanCache(lambda: NOW, mode="bloom", confirm=lambda ip: None)
    cache.replace([("203.0.113.1", Entry(0))], [])
    candidates = [f"198.51.{i >> 8}.{i & 255}" for i in range(1, 4_000)]
    candidates = [c for c in candidates if c not in cache._bloom]
    assert all(not cache.is_banned(c) for c in candidates)  # certainly not: accepted
    for i in range(5_000):  # a burst of other bans, over the filter's capacity
        cache.apply(Ban(target=f"10.0.{i >> 8}.{i & 255}"))
    # On the old code most candidates had become false positives by now.
    blurred = [c for c in candidates if c in cache._bloom] or candidates
    newly = cache.replace(
        [("203.0.113.1", Entry(0)), ("2001:db8::1", Entry(0)),
         *((c, Entry(0)) for c in blurred)],
        [],
    )  # fmt: skip
    assert set(blurred) <= set(newly)
    assert "2001:db8::1" in newly  # an IPv6 address too (it was left out)
    assert "203.0.113.1" not in newly  # held by the last load: not new


def test_exact_modes_rebuild_the_filter_as_they_grow_without_losing_anything() -> None:
    for mode in ("full", "compact"):
        cache = BanCache(lambda: NOW, mode=mode)  # type: ignore[arg-type]
        targets = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(150_000)]
        for t in targets:
            cache.apply(Ban(target=t, expires=NOW + 60_000))
        assert all(cache.is_banned(t) for t in targets[::97])  # from the overlay
        cache.settle()  # packed, into a filter grown for them
        assert cache._bans.prefilter is not None and cache._bans.prefilter.capacity >= 150_000
        assert not cache._bans.store.overlay
        assert all(cache.is_banned(t) for t in targets[::97])
        assert not cache.is_banned("192.0.2.1")


@pytest.mark.anyio
async def test_a_compact_bootstrap_knows_every_expiry_to_the_second(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    """Bans of every length, mixed within the scan's pages and across them: a
    compact node's bootstrap (sort keys carrying the expiry for bans of up to
    ~190 days, by position for the rest) knows each expiry to the second, as
    the full node's exact one rounded up; a repeated bootstrap (a resync)
    too."""
    day = 86_400
    ttls = [0, 60, 3600, 100 * day, 193 * day, 195 * day, 400 * day, 3650 * day]
    async with nodes(redis_url, namespace, 1) as (a,):
        for i in range(150):
            await a.ban(f"10.{i % 7}.{i}.{i % 5}", ttls[i * 7 % len(ttls)])
        async with (
            Node(redis_url, namespace=namespace, node_id="full", scan_count=16) as full,
            Node(redis_url, namespace=namespace, node_id="small", cache="compact",
                 scan_count=16) as small,
        ):  # fmt: skip
            exact = {r.target: r.expires for r in full.bans()}
            assert len(exact) == 150
            assert sorted({bool(e) for e in exact.values()}) == [False, True]
            want = {t: -(-e // 1000) * 1000 for t, e in exact.items()}
            assert {r.target: r.expires for r in small.bans()} == want
            record = small.lookup("10.6.6.1")
            assert record is not None and record.expires == want["10.6.6.1"]
            resyncs = small.statistics().resyncs
            await admin.set(f"{{{namespace}}}:epoch", "reset")  # the record was replaced
            await eventually(lambda: small.statistics().resyncs > resyncs, 10.0, "a resync")
            assert {r.target: r.expires for r in small.bans()} == want


# -- bloom mode on a real node -----------------------------------------------------------


@pytest.mark.anyio
async def test_bloom_node_confirms_against_redis_and_cuts_a_connection_it_accepted(
    redis_url: str, namespace: str
) -> None:
    """The ban is in the record before the bloom node starts (it holds only the filter):
    a connection from that address is accepted, confirmed, and cut; check() is exact."""
    async with nodes(redis_url, namespace, 1) as (a,):
        await a.ban("127.0.0.41", reason="loaded")
        await a.ban("203.0.113.9")
        async with Node(redis_url, namespace=namespace, node_id="bloom", cache="bloom") as b:
            assert b.statistics().cache_mode == "bloom"
            assert await b.check("203.0.113.9")
            assert not await b.check("192.0.2.77")
            closed = anyio.Event()

            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await reader.read()  # until the supervisor aborts the transport
                closed.set()

            server = await asyncio.start_server(b.protect(handle), "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            client = socket.socket()
            client.bind(("127.0.0.41", 0))
            client.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(client, ("127.0.0.1", port))
                with anyio.fail_after(10):
                    await closed.wait()
            finally:
                client.close()
                server.close()
            stats = b.statistics()
            assert stats.bloom_confirmed_banned >= 2  # 203.0.113.9 and 127.0.0.41
            assert b.is_banned("127.0.0.41")
            assert b.supervisor.statistics().cut >= 1
            # An unban and a new ban arrive as events: exact without a lookup.
            before = b.statistics().bloom_confirmations
            assert await a.unban("127.0.0.41")
            record = await a.ban("198.51.100.3")  # after the unban: waiting for it is enough
            await b.wait_for_seq(record.seq)
            assert not b.is_banned("127.0.0.41") and b.is_banned("198.51.100.3")
            assert await b.check("198.51.100.3")
            assert b.statistics().bloom_confirmations == before


@pytest.mark.anyio
async def test_bloom_node_reloads_when_asked_and_rejects_a_state_file(
    redis_url: str, namespace: str
) -> None:
    with pytest.raises(ValueError, match="state_file"):
        Node(redis_url, cache="bloom", state_file="/tmp/x")
    with pytest.raises(ValueError, match="not both"):
        Node(redis_url, cache="bloom", compact=True)
    async with nodes(redis_url, namespace, 1) as (a,):
        await a.ban("203.0.113.5")
        async with Node(redis_url, namespace=namespace, node_id="bloom", cache="bloom",
                        block_ms=100) as b:  # fmt: skip
            b.cache.reload_wanted = True
            await eventually(lambda: b.statistics().resyncs == 1, 10.0, "reload")
            assert b.statistics().bloom_reloads == 1
            assert await b.check("203.0.113.5")


@pytest.mark.anyio
async def test_a_node_grows_its_filter_after_a_burst_in_the_background(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    """A burst packed once the node caught up fills the filter: the node grows it
    in steps (grow_steps, a step per loop iteration), and every ban holds."""
    targets = [str(ipaddress.IPv4Address(0x0A000000 + i)) for i in range(6_000)]
    async with nodes(redis_url, namespace, 1) as (a,):
        await a.ban("192.0.2.1")  # the namespace and its library exist
        async with Node(redis_url, namespace=namespace, node_id="b", block_ms=100) as b:
            assert b.cache._bans.prefilter is not None
            first = b.cache._bans.prefilter
            pipe = admin.pipeline(transaction=False)
            for target in targets:
                pipe.fcall("banbus_ban", 1, keys(namespace).log, target, 0, "burst")  # type: ignore[no-untyped-call]
            await pipe.execute()
            await eventually(lambda: b.statistics().bans_active == len(targets) + 1, 10.0, "all")

            def grown() -> bool:
                cache = b.cache
                prefilter = cache._bans.prefilter
                if prefilter is first or prefilter is None or prefilter.capacity < len(targets):
                    return False
                return not cache.settle_due and cache._bans.store.growing is None

            await eventually(grown, 10.0, "the filter grown")
            assert all(b.is_banned(t) for t in targets)
            assert all(t in b.cache._bloom or t in b.cache._recent for t in targets)
            assert b.statistics().resyncs == 0


@pytest.mark.anyio
async def test_a_bloom_reload_cuts_the_live_connection_of_an_address_it_bans(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    """A ban that reaches a bloom node through a reload rather than as an event
    (here a hand-written record entry) is checked against the live connections:
    the last load's filter did not hold the address, so the reload reports it as
    newly banned; it is confirmed in Redis and its connection is cut."""
    async with nodes(redis_url, namespace, 1) as (a,):
        await a.ban("203.0.113.5")
        async with Node(redis_url, namespace=namespace, node_id="bloom", cache="bloom",
                        block_ms=100) as b:  # fmt: skip
            closed = anyio.Event()

            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await reader.read()  # until the supervisor aborts the transport
                closed.set()

            server = await asyncio.start_server(b.protect(handle), "127.0.0.1", 0)
            client = socket.socket()
            client.bind(("127.0.0.46", 0))
            client.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(
                    client, ("127.0.0.1", server.sockets[0].getsockname()[1])
                )
                await eventually(lambda: b.supervisor.statistics().tracked == 1, 10.0, "tracked")
                assert not b.is_banned("127.0.0.46")
                await admin.hset(
                    keys(namespace).bans, "127.0.0.46", json.dumps([0, "hand", "cli", 0])
                )
                b.cache.reload_wanted = True
                with anyio.fail_after(10):
                    await closed.wait()
            finally:
                client.close()
                server.close()
            stats = b.statistics()
            assert stats.resyncs == 1 and stats.bloom_reloads == 1
            assert stats.bloom_confirmed_banned >= 1
            assert b.supervisor.statistics().cut == 1
            assert b.is_banned("127.0.0.46")


@pytest.mark.real_redis
@pytest.mark.anyio
async def test_bloom_node_counts_a_maybe_it_cannot_confirm_as_banned(
    redis_factory: Callable[..., RedisProcess], namespace: str
) -> None:
    """Redis gone: check() answers a maybe as banned (and says so in the counters);
    a certain "no" needs no Redis."""
    proc = redis_factory()
    async with nodes(proc.url, namespace, 1) as (a,):
        await a.ban("203.0.113.70")
    async with Node(proc.url, namespace=namespace, node_id="bloom", cache="bloom",
                    backoff=(0.02, 0.1), heartbeat_interval=0) as b:  # fmt: skip
        proc.stop()
        assert await b.check("203.0.113.70")
        assert not await b.check("192.0.2.200")
        stats = b.statistics()
        assert stats.bloom_unconfirmed == 1 and stats.bloom_confirmations == 0


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.booleans(),  # add or remove
            st.integers(min_value=0, max_value=2**32 - 1),
            st.sampled_from([8, 12, 15, 16, 17, 20, 24, 28, 31]),
        ),
        max_size=40,
    ),
    probes=st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=30),
)
def test_networks_match_a_linear_scan(ops: list[tuple[bool, int, int]], probes: list[int]) -> None:
    """The per-/16 masks of prefix lengths find the most specific network, as a scan
    of every network held does, whatever was added and removed."""
    cache = BanCache(lambda: NOW)
    held: set[ipaddress.IPv4Network] = set()
    for add, value, plen in ops:
        net = ipaddress.IPv4Network((value >> (32 - plen) << (32 - plen), plen))
        if add:
            cache.apply(Ban(target=str(net)))
            held.add(net)
        else:
            cache.apply(Unban(target=str(net)))
            held.discard(net)
    inside = [int(net.network_address) + (v % net.num_addresses) for net, v in
              zip(sorted(held, key=str), probes, strict=False)]  # fmt: skip
    for value in [*probes, *inside]:
        address = ipaddress.IPv4Address(value)
        covering = [net for net in held if address in net]
        expected = max(covering, key=lambda n: n.prefixlen) if covering else None
        record = cache.lookup(str(address))
        assert (record.target if record else None) == (str(expected) if expected else None)
        assert cache.is_banned(str(address)) == bool(covering)


@pytest.mark.parametrize("mode", ["full", "compact"])
def test_digest_leaves_out_packed_entries_expired_at_the_cutoff(mode: str) -> None:
    """The packed stores sweep themselves; a digest at a cutoff past some expiries
    equals the digest of what outlives it, or waits (None) while a sweep may not run."""
    from banbus._digest import Digest, entry_hash

    now = [NOW]
    cache = BanCache(lambda: now[0], mode=mode, digest=True)  # type: ignore[arg-type]
    rows = [(f"198.51.100.{i}", Entry(NOW + 1_000 * (i % 5 + 1))) for i in range(50)]
    rows += [(f"203.0.113.{i}", Entry(0)) for i in range(20)]
    cache.replace(rows, [])
    list(cache.recompute())
    cache.apply(Ban(target="192.0.2.1", expires=NOW + 10_000))  # in the overlay
    now[0] = NOW + 3_000
    cutoff = NOW + 3_000
    digest = cache.digest(cutoff)
    expected = Digest()
    for target, entry in [*rows, ("192.0.2.1", Entry(NOW + 10_000))]:
        if not entry.expires or entry.expires > cutoff:
            expected = expected.add(entry_hash("ban", target, entry.expires))
    assert digest == expected
    assert cache.ban_count == 20 + 20 + 1  # the 30 expired at the cutoff were swept
    now[0] = NOW + 4_000
    cache.apply(Ban(target="192.0.2.2", expires=NOW + 4_500))
    assert cache.digest(NOW + 4_000) is None  # swept a moment ago: the comparison waits
