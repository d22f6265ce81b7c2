"""The hot path and the memory of the local cache — pure, no Redis.

``is_banned``: a :class:`banbus._cache.BanCache` loaded through ``put`` with
1M exact IPv4 bans (1 h TTLs spread over an hour) and 1k CIDR bans over 10
prefix lengths, queried with fresh ``str`` objects (as a socket returns them:
hash not cached) in random order:

* ``miss``: random addresses that are not banned (most are filtered by the
  /16 bitmap; the share that is not is printed);
* ``hit``: banned addresses (exact);
* ``cidr_miss``: the worst miss — addresses inside a /16 that some network
  overlaps, covered by none, so every prefix length is probed;
* ``cidr_hit``: addresses covered by a network.

Baseline: what a straightforward implementation does — ``ipaddress``
parsing, a set of exact addresses, then a linear scan of the networks.
Also a plain ``str in set`` at 1M entries, the floor of any exact lookup.

Memory: RSS (``/proc/self/statm``) before/after filling a fresh cache with 1M
bans in a fresh process; the target strings are created inside the window
(they are what the cache keeps), the loop's temporaries are gone by the end.
"""

from __future__ import annotations

import gc
import ipaddress
import os
import random
import socket
import sys
import time
from array import array
from typing import TYPE_CHECKING, Any

from _common import Result, Worker

if TYPE_CHECKING:
    from collections.abc import Callable

    from _context import Context

PREFIX_LENGTHS = (12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
#: Multiplier of a bijection on 32-bit ints (odd): spreads consecutive i over the space.
_SPREAD = 2654435761


def ip_of(value: int) -> str:
    return f"{value >> 24 & 255}.{value >> 16 & 255}.{value >> 8 & 255}.{value & 255}"


def exact_value(i: int) -> int:
    """The i-th banned address (distinct for distinct i, spread over 1.0.0.0–223.x)."""
    value = (i * _SPREAD) & 0xFFFFFFFF
    return (value % (222 << 24)) + (1 << 24)


def fresh(strings: list[str]) -> list[str]:
    """New str objects with the same text (no cached hash), as sockets deliver them."""
    return [s.encode().decode() for s in strings]


def time_per_call(function: Callable[[str], object], queries: list[str], repeats: int) -> float:
    """Best over *repeats* of the mean ns per call, with fresh strings each time.

    The minimum, as ``timeit`` advises: on a shared machine the slower runs
    measure the neighbours, not the code.
    """
    samples = []
    for _ in range(repeats):
        batch = fresh(queries)
        gc.collect()
        t0 = time.perf_counter_ns()
        for ip in batch:
            function(ip)
        samples.append((time.perf_counter_ns() - t0) / len(batch))
    return min(samples)


def build(
    cache: Any, n: int, n_nets: int, seed: int = 7
) -> tuple[list[str], list[tuple[int, int]]]:
    """Load *n* exact bans and *n_nets* networks into *cache* through ``put``."""
    from banbus._model import Entry

    now = cache._clock()
    rng = random.Random(seed)
    nets: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    per = n_nets // len(PREFIX_LENGTHS)
    for plen in PREFIX_LENGTHS:
        made = 0
        while made < per:
            value = rng.randrange(1 << 24, 224 << 24)
            value &= ~((1 << (32 - plen)) - 1) & 0xFFFFFFFF
            if (value, plen) in seen:
                continue
            seen.add((value, plen))
            nets.append((value, plen))
            cache.put("ban", f"{ip_of(value)}/{plen}", Entry(now + 3_600_000, "scan", "n1", 0))
            made += 1
    for i in range(n):
        cache.put(
            "ban",
            ip_of(exact_value(i)),
            Entry(now + 60_000 + (i % 3600) * 1000, "scanner", "n1", i),
        )
    return [ip_of(exact_value(i)) for i in range(n)], nets


def measure_is_banned(n: int, n_nets: int, *, quick: bool) -> dict[str, Any]:
    from banbus import Node

    # A node that is never entered (no I/O): its cache is the one is_banned reads,
    # with the node's own offset-corrected clock.
    node = Node("redis://127.0.0.1:1/0", node_id="bench")
    cache = node.cache
    t0 = time.perf_counter()
    exact, nets = build(cache, n, n_nets)
    cache.settle()  # pack the recent changes, as a node does once idle
    build_s = time.perf_counter() - t0
    exact_set = set(exact)
    rng = random.Random(11)
    networks = [(value, (value | ((1 << (32 - plen)) - 1))) for value, plen in nets]

    def covered(value: int) -> bool:
        return any(lo <= value <= hi for lo, hi in networks)

    filt = cache._filter
    q = 50_000 if quick else 200_000
    miss: list[str] = []
    while len(miss) < q:
        value = rng.randrange(1 << 24, 224 << 24)
        ip = ip_of(value)
        if ip not in exact_set and (not filt[value >> 16] or not covered(value)):
            miss.append(ip)
    marked = sum(1 for ip in miss if filt[int(ipaddress.IPv4Address(ip)) >> 16])
    hit = rng.sample(exact, q)
    cidr_miss: list[str] = []
    cidr_hit: list[str] = []
    marked16 = [i for i in range(65536) if filt[i]]
    while len(cidr_miss) < q or len(cidr_hit) < q // 5:
        value = rng.choice(marked16) << 16 | rng.randrange(65536)
        ip = ip_of(value)
        if ip in exact_set:
            continue
        if covered(value):
            if len(cidr_hit) < q // 5:
                cidr_hit.append(ip)
        elif len(cidr_miss) < q:
            cidr_miss.append(ip)

    # The baseline: ipaddress parsing + a set + a linear scan of the networks.
    naive_nets = [ipaddress.IPv4Network(f"{ip_of(v)}/{p}") for v, p in nets]

    def naive(ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        if str(address) in exact_set:
            return True
        return any(address in net for net in naive_nets)

    assert not any(cache.is_banned(ip) for ip in miss[:1000])
    assert all(cache.is_banned(ip) for ip in hit[:1000])
    assert not any(cache.is_banned(ip) for ip in cidr_miss[:1000])
    assert all(cache.is_banned(ip) for ip in cidr_hit[:1000])

    repeats = 3 if quick else 5
    is_banned = cache.is_banned
    contains = exact_set.__contains__
    out: dict[str, Any] = {
        "build_s": build_s,
        "miss_marked_share": marked / len(miss),
        "marked16": len(marked16),
        "set_lookup_ns": time_per_call(contains, miss, repeats),
        "set_lookup_hit_ns": time_per_call(contains, hit, repeats),
        "miss_ns": time_per_call(is_banned, miss, repeats),
        "hit_ns": time_per_call(is_banned, hit, repeats),
        "cidr_miss_ns": time_per_call(is_banned, cidr_miss, repeats),
        "cidr_hit_ns": time_per_call(is_banned, cidr_hit, repeats),
        "node_miss_ns": time_per_call(node.is_banned, miss, repeats),
    }
    few = 1000 if quick else 3000
    out["naive_miss_ns"] = time_per_call(naive, miss[:few], 1)
    out["naive_hit_ns"] = time_per_call(naive, hit[: few * 10], repeats)
    out["naive_cidr_miss_ns"] = time_per_call(naive, cidr_miss[:few], 1)
    out["naive_cidr_hit_ns"] = time_per_call(naive, cidr_hit[:few], 1)
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    from banbus._cache import _trim as trim

    trim()


def _rows(n: int, now: int, start: int = 0) -> list[Any]:
    from banbus._model import Entry

    return [
        (ip_of(exact_value(i)), Entry(now + 60_000 + (i % 3600) * 1000, "scanner", "n1", i))
        for i in range(start, start + n)
    ]


def _cidr_rows(n: int, now: int) -> list[Any]:
    """*n* distinct networks: IPv4 /16–/32 and IPv6 /32–/128, mixed."""
    from banbus._model import Entry

    rng = random.Random(3)
    out: dict[str, Any] = {}
    while len(out) < n:
        if rng.random() < 0.7:
            plen = rng.choice((16, 20, 22, 24, 24, 24, 26, 28, 30, 32))
            net = ipaddress.IPv4Network((rng.randrange(1 << 24, 224 << 24) >> (32 - plen)
                                         << (32 - plen), plen))  # fmt: skip
        else:
            plen = rng.choice((32, 48, 56, 64, 64, 96, 128))
            value = (0x2001 << 112 | rng.getrandbits(112)) >> (128 - plen) << (128 - plen)
            net = ipaddress.IPv6Network((value, plen))
        out[str(net)] = Entry(now + 3_600_000, "list", "n1", 0)
    return list(out.items())


def measure_memory(n: int, *, kind: str) -> dict[str, Any]:
    """RSS per entry, and lookups, of one holder of *n* bans loaded as a bootstrap loads them.

    *kind*: a cache mode (``full``, ``compact``, ``bloom``; ``bancache`` is
    ``full``), or a baseline: ``set`` (``set[str]``), ``setint`` (``set[int]``),
    ``rbloom`` (the bloom library alone, same capacity and rate as the cache's);
    ``cidr100k``: a full cache of 100k networks only (lookup cost).  The rows
    are made inside the window and freed before the second reading (as a
    snapshot's are), and glibc's free heap is trimmed before both readings.
    """
    from banbus._cache import BLOOM_RATE, BanCache
    from banbus._snapshot import _clean_page  # (imported before the first reading)

    now = 1_700_000_000_000
    mode = "full" if kind in ("bancache", "cidr100k") else kind
    if mode in ("full", "compact", "bloom"):  # warm up whatever a first load allocates
        BanCache(lambda: now, mode=mode).replace(_rows(1000, now), [])  # type: ignore[arg-type]
    gc.collect()
    _trim()
    before = rss_bytes()
    holder: Any
    if kind == "set":
        holder = {ip_of(exact_value(i)) for i in range(n)}
    elif kind == "setint":
        holder = {exact_value(i) for i in range(n)}
    elif kind == "rbloom":
        import rbloom

        holder = rbloom.Bloom(n + n // 8, BLOOM_RATE)
        holder.update(ip_of(exact_value(i)) for i in range(n))
    elif kind == "cidr100k":
        holder = BanCache(lambda: now, mode=mode)  # type: ignore[arg-type]
        rows = _cidr_rows(n, now)
        t0 = time.perf_counter()
        holder.replace(rows, [], newly=False)
        load_s = time.perf_counter() - t0
        del rows
    else:
        # As a bootstrap loads them: pages of 10,000 decoded rows into the
        # cache's bulk load (see banbus._snapshot), then installed.
        holder = BanCache(lambda: now, mode=mode)  # type: ignore[arg-type]
        # Timings kept in an array: a float made during the load and kept
        # (the running sum, the last start time, the loop's last int) would
        # sit in a memory arena of the load's short-lived objects and keep it,
        # a megabyte, in the reading (measured: 1-3 such arenas).
        clock = array("d", [0.0, 0.0])  # [start of the step, seconds so far]
        bulk = holder.bulk_load(n, newly=False)
        for start in range(0, n, 10_000):
            page = _rows(min(10_000, n - start), now, start)
            clock[0] = time.perf_counter()
            texts = [t for t, _ in page]
            if not _clean_page(texts, [e for _, e in page], bulk, now):
                raise AssertionError("a page of fresh IPv4 bans took the row-by-row path")
            clock[1] += time.perf_counter() - clock[0]
            del page, texts
        del start
        clock[0] = time.perf_counter()
        holder.replace(bulk, [], newly=False)
        clock[1] += time.perf_counter() - clock[0]
        del bulk
    gc.collect()
    _trim()
    after = rss_bytes()
    out: dict[str, Any] = {"bytes_per_entry": (after - before) / n, "entries": n}
    rng = random.Random(5)
    banned = {exact_value(i) for i in range(n)} if kind != "cidr100k" else set()
    probes = [ip_of(v) for v in (rng.randrange(1 << 24, 224 << 24) for _ in range(200_000))
              if v not in banned]  # fmt: skip
    if kind in ("set", "rbloom"):
        check = holder.__contains__
    elif kind == "setint":

        def check(ip: str) -> bool:
            return int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big") in holder
    else:
        out["load_s"] = clock[1] if kind != "cidr100k" else load_s
        check = holder.is_banned
        probes = [p for p in probes if not holder.is_banned(p)]
    out["miss_ns"] = time_per_call(check, probes, 5)
    if kind == "bloom":
        out["filter_bytes_per_entry"] = holder.memory()["bloom"] / n
    if kind in ("bloom", "rbloom"):
        bloom = holder._bloom if kind == "bloom" else holder
        out["false_positive_rate"] = sum(p in bloom for p in probes) / len(probes)
    if kind in ("full", "bancache", "compact", "set", "setint"):
        hits = [ip_of(exact_value(rng.randrange(n))) for _ in range(50_000)]
        out["hit_ns"] = time_per_call(check, hits, 3)
    return out


async def run_is_banned(ctx: Context) -> list[Result]:
    n = 1_000_000
    worker = await Worker.start(
        "cache",
        "cache",
        "--n",
        str(n),
        "--nets",
        "1000",
        *(["--quick"] if ctx.quick else []),
        timeout=600,
    )
    r = worker.ready
    await worker.stop()
    ctx.log(
        f"  1M exact + 1k CIDR ({len(PREFIX_LENGTHS)} lengths) built in {r['build_s']:.1f} s; "
        f"{r['marked16']} /16s marked; {r['miss_marked_share']:.1%} of random misses "
        f"walk the prefix tables"
    )
    ctx.log("  " + ", ".join(f"{k}={v:.0f}" for k, v in r.items() if k.endswith("_ns")))
    return [
        Result("set_lookup_ns", r["set_lookup_ns"], "ns", note="plain `str in set`, 1M, miss"),
        Result(
            "is_banned_miss_ns",
            r["miss_ns"],
            "ns",
            r["naive_miss_ns"],
            "ipaddress + linear CIDR scan",
            ("<=", 600),
        ),
        Result("is_banned_hit_ns", r["hit_ns"], "ns", r["naive_hit_ns"], "ipaddress + set"),
        Result(
            "is_banned_cidr_miss_ns",
            r["cidr_miss_ns"],
            "ns",
            r["naive_cidr_miss_ns"],
            "ipaddress + linear CIDR scan",
        ),
        Result(
            "is_banned_cidr_hit_ns",
            r["cidr_hit_ns"],
            "ns",
            r["naive_cidr_hit_ns"],
            "ipaddress + linear CIDR scan",
        ),
        Result(
            "is_banned_miss_via_node_ns",
            r["node_miss_ns"],
            "ns",
            r["miss_ns"],
            "is_banned_miss_ns",
            note="node.is_banned (one more method call)",
        ),
    ]


async def run_memory(ctx: Context) -> list[Result]:
    n = 100_000 if ctx.quick else 1_000_000
    big = 1_000_000 if ctx.quick else 10_000_000
    out: dict[str, Any] = {}
    runs = [(k, n) for k in ("full", "compact", "bloom", "set", "setint", "rbloom")]
    runs += [("full", big), ("compact", big), ("bloom", big), ("cidr100k", 100_000)]
    small = n // 10  # a third point per mode for the plot of memory against entries
    runs += [(k, small) for k in ("full", "compact", "bloom", "set", "setint", "rbloom")]
    for kind, size in runs:
        # The cache modes at the main size: three processes, the median of
        # their RSS per entry (a process's allocator state varies it by 1-3 MB:
        # memory arenas its load's short-lived objects shared with others).
        repeat = 3 if size == n and kind in ("full", "compact", "bloom") else 1
        readings = []
        for _ in range(repeat):
            worker = await Worker.start(
                f"memory-{kind}-{size}", "memory", "--n", str(size), "--kind", kind, timeout=900
            )
            readings.append(worker.ready)
            await worker.stop()
        readings.sort(key=lambda reading: reading["bytes_per_entry"])
        r = readings[len(readings) // 2]
        if repeat > 1:
            r["bytes_per_entry_runs"] = [x["bytes_per_entry"] for x in readings]
        out[kind if size == n or kind == "cidr100k" else f"{kind}@{size}"] = r
        if kind != "cidr100k":
            ctx.memory.setdefault(kind, []).append((size, r["bytes_per_entry"]))
        ctx.log(f"  {kind} x {size:,}: " + ", ".join(
            f"{k}={v:.4g}" for k, v in r.items() if isinstance(v, float))
            + ("" if repeat == 1 else "; B/entry in the three processes: "
               + ", ".join(f"{x:.2f}" for x in r["bytes_per_entry_runs"])))  # fmt: skip
    full, compact, bloom = out["full"], out["compact"], out["bloom"]
    plain = out["set"]
    label = "1M" if n == 1_000_000 else f"{n:,}"
    return [
        Result("memory_bytes_per_ban", full["bytes_per_entry"], "B", plain["bytes_per_entry"],
               f"plain set of {label} str", ("<=", 100),
               note="cache='full': every record exact (loaded as a bootstrap loads it)"),
        Result("memory_bytes_per_ban_compact", compact["bytes_per_entry"], "B",
               plain["bytes_per_entry"], f"plain set of {label} str", ("<=", 12),
               note="cache='compact': exact, expiry rounded up to the second"),
        Result("memory_bytes_per_ban_bloom", bloom["bytes_per_entry"], "B",
               out["rbloom"]["bytes_per_entry"], "rbloom alone, same capacity",
               note="cache='bloom': the filter only; maybes confirmed in Redis (RSS: "
               "with ~1-2 MB of the process's heap, whatever the size; see the 10M row)"),
        Result("bloom_filter_bytes_per_entry", bloom["filter_bytes_per_entry"], "B",
               out["rbloom"]["bytes_per_entry"], "rbloom alone (RSS), same capacity",
               ("<=", 2.0), note=f"cache='bloom': the filter's own size, {label} entries"),
        Result("memory_bytes_per_ban_setint", out["setint"]["bytes_per_entry"], "B",
               plain["bytes_per_entry"], f"plain set of {label} str",
               note="baseline: set[int] of the addresses"),
        Result("memory_bytes_per_ban_10m", out[f"full@{big}"]["bytes_per_entry"], "B",
               full["bytes_per_entry"], f"cache='full' at {label}",
               note=f"cache='full' at {big:,} bans"),
        Result("memory_bytes_per_ban_compact_10m", out[f"compact@{big}"]["bytes_per_entry"],
               "B", compact["bytes_per_entry"], f"cache='compact' at {label}"),
        Result("memory_bytes_per_ban_bloom_10m", out[f"bloom@{big}"]["bytes_per_entry"], "B",
               bloom["bytes_per_entry"], f"cache='bloom' at {label}",
               ("<=", 2.5) if big >= 10_000_000 else None,
               note=f"RSS at {big:,} entries, the size bloom mode is for"),
        Result("is_banned_miss_full_ns", full["miss_ns"], "ns", plain["miss_ns"],
               "`str in set`, same run", ("<=", 1.5 * plain["miss_ns"]),
               note="exact bans only (the is_banned benchmark adds 1k networks)"),
        Result("is_banned_hit_full_ns", full["hit_ns"], "ns", plain["hit_ns"],
               "`str in set` hit, same run"),
        Result("is_banned_miss_compact_ns", compact["miss_ns"], "ns", full["miss_ns"],
               "cache='full', same bans", ("<=", 600)),
        Result("is_banned_hit_compact_ns", compact["hit_ns"], "ns", full["hit_ns"],
               "cache='full', same bans"),
        Result("is_banned_miss_bloom_ns", bloom["miss_ns"], "ns", out["rbloom"]["miss_ns"],
               "rbloom `in` alone"),
        Result("bloom_false_positive_rate", bloom["false_positive_rate"], "ratio",
               out["rbloom"]["false_positive_rate"], "rbloom alone, same capacity",
               note="share of random non-banned addresses answered 'maybe'"),
        Result("set_int_lookup_ns", out["setint"]["miss_ns"], "ns", plain["miss_ns"],
               "`str in set`", note="baseline: inet_pton + int in set[int]"),
        Result("is_banned_cidr100k_miss_ns", out["cidr100k"]["miss_ns"], "ns",
               plain["miss_ns"], "`str in set`", ("<=", 1000),
               note="100k networks, IPv4 /16–/32 and IPv6 /32–/128, no exact bans"),
        Result("bootstrap_load_1m_s", full["load_s"], "s", compact["load_s"],
               "cache='compact' load", note="replace() of a decoded 1M snapshot, no I/O"),
    ]  # fmt: skip


if __name__ == "__main__":  # pragma: no cover - handy for profiling one part
    print(measure_is_banned(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000, 1000, quick=True))
