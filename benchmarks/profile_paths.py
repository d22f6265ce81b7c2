"""Profile banbus's own hot paths in-process: where the time goes, per event.

    python benchmarks/profile_paths.py apply [--n 100000]
    python benchmarks/profile_paths.py bootstrap [--n 300000]
    python benchmarks/profile_paths.py is_banned

``apply``: 100k bans are written with pipelined FCALLs and read back with a
lean hiredis client (decoded as the node's reader gets them); then
the node's follower (``Follower.apply``: decode, validate, apply) runs over the
entries of the replies, first
timed, then under cProfile.  ``bootstrap``: ``async with Node(...)`` on a
namespace of *n* bans, timed, then under cProfile.  ``is_banned``: the steps
of a lookup timed one by one on a 1M + 1k cache.

Starts its own redis-server on a free loopback port (``banbus._servers``).
cProfile inflates small calls; read its percentages as a ranking, and the
timed runs (no profiler) for the real cost.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import random
import sys
import time
from typing import Any

from _common import Resp, pipeline
from bench_apply import ban_commands, load_library
from bench_cache import build, exact_value, ip_of, time_per_call


def top(profile: cProfile.Profile, n: int = 14) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:n]  # type: ignore[attr-defined]
    lines = [f"{'own %':>6} {'cum %':>6} {'calls':>9}  function"]
    for (path, line, name), (_, calls, tottime, cumtime, _) in rows:
        where = f"{path.rsplit('/', 2)[-2]}/{path.rsplit('/', 1)[-1]}:{line}" if line else ""
        lines.append(
            f"{tottime / total:6.1%} {cumtime / total:6.1%} {calls:9d}  {name} {where}".rstrip()
        )
    return "\n".join(lines)


async def read_all(url: str, key: str, batch: int = 2000) -> list[Any]:
    conn = await Resp.open(url)
    replies, cursor = [], "0-0"
    for _ in range(10**6):
        reply = await conn.call("XREAD", "COUNT", batch, "STREAMS", key, cursor)
        if not reply:
            break
        replies.append(reply)
        cursor = reply[0][1][-1][0]
    conn.close()
    return replies


async def profile_apply(url: str, n: int) -> None:
    import banbus

    await load_library(url)
    pipeline(url, [("HSET", "{p}:config", "maxlen", 10 * n)])
    pipeline(url, ban_commands("p", 0, n), batch=10_000)
    t0 = time.perf_counter()
    replies = await read_all(url, "{p}:log")
    read_s = time.perf_counter() - t0
    print(f"read {n:,} entries with a lean hiredis XREAD loop: {n / read_s:,.0f} events/s")
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    best = 0.0
    for _ in range(3):
        node = banbus.Node(url, node_id="x", namespace="p")
        node._build(client, spawn=lambda *args: None)
        apply = node._follower.apply  # type: ignore[union-attr]
        t0 = time.perf_counter()
        for reply in replies:
            apply(reply[0][1])
        best = max(best, n / (time.perf_counter() - t0))
        assert node.statistics().events_applied == n
    print(f"Follower.apply alone: {best:,.0f} events/s = {1e6 / best:.2f} µs/event")
    print(f"=> serial read + apply bound: {1 / (read_s / n + 1 / best):,.0f} events/s\n")
    node = banbus.Node(url, node_id="x", namespace="p")
    node._build(client, spawn=lambda *args: None)
    apply = node._follower.apply  # type: ignore[union-attr]
    profile = cProfile.Profile()
    profile.enable()
    for reply in replies:
        apply(reply[0][1])
    profile.disable()
    print(top(profile))
    await client.aclose()


async def profile_bootstrap(url: str, n: int) -> None:
    import banbus

    await load_library(url)
    t0 = time.perf_counter()
    pipeline(url, ban_commands("b", 0, n), batch=10_000)
    print(f"{n:,} bans written in {time.perf_counter() - t0:.1f} s")
    for _ in range(2):
        t0 = time.perf_counter()
        async with banbus.Node(url, node_id="b", namespace="b") as node:
            seconds = time.perf_counter() - t0
            assert node.statistics().bans_active == n
        print(f"bootstrap: {seconds:.3f} s = {seconds / n * 1e6:.2f} µs/ban")
    profile = cProfile.Profile()
    profile.enable()
    async with banbus.Node(url, node_id="b", namespace="b"):
        profile.disable()
    print(top(profile, 18))


def profile_is_banned() -> None:
    from banbus import Node
    from banbus._cache import _AF_INET, _pton

    node = Node("redis://127.0.0.1:1/0", node_id="bench")
    cache = node.cache
    exact, _ = build(cache, 1_000_000, 1000)
    cache.settle()  # as a node does once idle
    exact_set = set(exact)
    misses = [ip_of(exact_value(i)) for i in range(2_000_000, 2_100_000)]
    misses = [ip for ip in misses if ip not in exact_set and not cache.is_banned(ip)]
    # Random order over the whole table, as in run.py: a hit's cost is mostly
    # cache misses (dict slot, key string, Entry, expiry int).
    hits = random.Random(3).sample(exact, 100_000)
    filt = cache._filter
    bloom = cache._bloom
    store = cache._bans.store
    clock = cache._clock

    def noop(ip: str) -> None:
        return None

    steps = {
        "call overhead (a no-op function)": (noop, misses),
        "ip in bloom filter (1M)": (bloom.__contains__, misses),
        "packed store: expiry of a hit": (store.expires_of, hits),
        "inet_pton(AF_INET, ip)": (lambda ip: _pton(_AF_INET, ip), misses),
        "pton + /16 bitmap probe": (
            lambda ip: filt[(p := _pton(_AF_INET, ip))[0] << 8 | p[1]],
            misses,
        ),
        "is_banned, miss": (cache.is_banned, misses),
        "clock() (server ms)": (lambda ip: clock(), hits),
        "_stored(ip) (hit: the expiry from the packed store)": (cache._stored, hits),
        "_allowed(ip) (empty allowlist)": (cache._allowed, hits),
        "is_banned, exact hit": (cache.is_banned, hits),
    }
    print(f"{'ns/call':>8}  step (best of 5, fresh strings)")
    for label, (function, queries) in steps.items():
        print(f"{time_per_call(function, queries, 5):8.0f}  {label}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["apply", "bootstrap", "is_banned"])
    parser.add_argument("--n", type=int, default=0, help="bans (apply 100k, bootstrap 300k)")
    args = parser.parse_args(argv)
    if args.what == "is_banned":
        profile_is_banned()
        return 0
    from banbus._servers import RedisProcess

    with RedisProcess() as server:
        if args.what == "apply":
            asyncio.run(profile_apply(server.url, args.n or 100_000))
        else:
            asyncio.run(profile_bootstrap(server.url, args.n or 300_000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
