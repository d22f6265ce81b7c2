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
import sys
import time
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


def measure_memory(n: int, *, kind: str) -> dict[str, Any]:
    """RSS per entry of a BanCache (``bancache``, ``compact``) or a plain set of str (``set``)."""
    from banbus._cache import BanCache
    from banbus._model import Entry

    now = 1_700_000_000_000
    gc.collect()
    before = rss_bytes()
    if kind == "set":
        holder: Any = {ip_of(exact_value(i)) for i in range(n)}
    else:
        holder = BanCache(lambda: now, compact=kind == "compact")
        for i in range(n):
            holder.put(
                "ban",
                ip_of(exact_value(i)),
                Entry(now + 60_000 + (i % 3600) * 1000, "scanner", "n1", i),
            )
    gc.collect()
    after = rss_bytes()
    size = len(holder) if kind == "set" else holder.ban_count
    miss_ns = 0.0
    if kind != "set":
        rng = random.Random(5)
        probes = [ip_of(rng.getrandbits(32)) for _ in range(200_000)]
        probes = [p for p in probes if not holder.is_banned(p)]
        check = holder.is_banned
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter_ns()
            for p in probes:
                check(p)
            best = min(best, (time.perf_counter_ns() - t) / len(probes))
        miss_ns = best
    return {
        "miss_ns": miss_ns,
        "bytes_per_entry": (after - before) / n,
        "entries": size,
        "rss_before": before,
        "rss_after": after,
    }


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
    n = 1_000_000
    out = {}
    for kind in ("bancache", "compact", "set"):
        worker = await Worker.start(
            f"memory-{kind}", "memory", "--n", str(n), "--kind", kind, timeout=600
        )
        out[kind] = worker.ready
        await worker.stop()
    ctx.log(f"  BanCache: {out['bancache']}\n  compact: {out['compact']}\n  set: {out['set']}")
    return [
        Result(
            "memory_bytes_per_ban",
            out["bancache"]["bytes_per_entry"],
            "B",
            out["set"]["bytes_per_entry"],
            "plain set of 1M str",
            ("<=", 100),
        ),
        Result(
            "memory_bytes_per_ban_compact",
            out["compact"]["bytes_per_entry"],
            "B",
            out["set"]["bytes_per_entry"],
            "plain set of 1M str",
            ("<=", 100),
            note="Node(compact=True): exact IPv4 as int -> expiry second",
        ),
        Result(
            "is_banned_miss_compact_ns",
            out["compact"]["miss_ns"],
            "ns",
            out["bancache"]["miss_ns"],
            "default mode, same 1M bans",
            ("<=", 600),
        ),
    ]


if __name__ == "__main__":  # pragma: no cover - handy for profiling one part
    print(measure_is_banned(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000, 1000, quick=True))
