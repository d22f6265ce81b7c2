"""Throughput of the reader (apply a 100k burst) and of bootstrap (join a 1M namespace).

Apply: a node is started on an empty namespace and frozen with ``SIGSTOP``;
a burst of 100k bans is written with pipelined ``FCALL banbus_ban``; the node
is resumed with ``SIGCONT`` and timestamps the moment it applies the last
one (a ban listener; ``CLOCK_MONOTONIC`` is shared with the coordinator).
That is the reader catching up: ``XREAD COUNT <batch>`` round trips, decode,
validate, apply.  Baselines, on the same entries: a bare redis-py ``XREAD``
loop (sync client, hiredis parser, ``decode_responses=True``) and the same
loop with a lean hiredis ``asyncio.Protocol`` client (the transport's ceiling).

Bootstrap: the namespace is filled with pipelined ``FCALL banbus_ban`` (1M in
the full run, 100k with ``--quick``); then a fresh process times ``async with
Node(...)`` (connect, library check, watermark, HSCAN of the record, decode,
cache build, stream replay from the watermark).  Baseline: a bare redis-py
``HSCAN`` loop over the same hash, no decoding.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import TYPE_CHECKING, Any

from _common import Result, Worker, command, now_ns, percentile, pipeline
from bench_cache import exact_value, ip_of

if TYPE_CHECKING:
    from collections.abc import Iterator

    from _context import Context


async def load_library(url: str) -> None:
    import redis.asyncio as aioredis

    from banbus._library import ensure_library

    client = aioredis.Redis.from_url(url)
    try:
        await ensure_library(client)
    finally:
        await client.aclose()


#: A realistic node id: a Kubernetes pod name and a pid (40 characters).
LONG_NODE_ID = "mail-frontend-7d9f8b6c5d-x2k4q-1234567.a"


def ban_commands(
    ns: str, start: int, n: int, node_id: str | None = None
) -> Iterator[tuple[Any, ...]]:
    """FCALLs as ``redis-cli`` would send them, or (*node_id*) as a node does:
    with ``ORIGIN <node id>`` and ``EID <node id>.<16 hex>``."""
    for i in range(start, start + n):
        extra: tuple[Any, ...] = ()
        if node_id is not None:
            extra = ("ORIGIN", node_id, "EID", f"{node_id}.{i:016x}")
        yield ("FCALL", "banbus_ban", 1, ns, ip_of(exact_value(i)), 86400, "bench", *extra)


def populate(url: str, ns: str, start: int, n: int, node_id: str | None = None) -> float:
    """Write *n* bans with pipelined FCALLs; return the seconds it took."""
    t0 = time.perf_counter()
    pipeline(url, ban_commands(ns, start, n, node_id), batch=10_000)
    return time.perf_counter() - t0


async def bare_read(ctx: Context, what: str, key: str, start: str, n: int) -> float:
    """Events/s of a bare reader (``rawread``, ``hiredisread``) over *n* entries after *start*."""
    w = await Worker.start(f"apply-{what}", what, "--redis", ctx.url, "--key", key,
                           "--start", start, "--expect", str(n), timeout=120)  # fmt: skip
    rate: float = w.ready["events"] / w.ready["seconds"]
    await w.stop()
    return rate


def last_id(url: str, key: str) -> str:
    newest = command(url, "XREVRANGE", key, "+", "-", "COUNT", 1)
    return newest[0][0] if newest else "0-0"


#: The cache modes, each in its own node process (the names in ``--json``).
MODES = ("full", "compact", "bloom")


def _suffix(mode: str) -> str:
    return "" if mode == "full" else f"_{mode}"


async def run_apply(ctx: Context) -> list[Result]:
    ns = ctx.ns("apply")
    key = "{" + ns + "}:log"
    n = 100_000
    rounds = 1 if ctx.quick else 5
    await load_library(ctx.url)
    command(ctx.url, "HSET", "{" + ns + "}:config", "maxlen", 10_000_000)
    nodes: dict[str, Worker] = {}
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    paired: dict[str, list[float]] = {mode: [] for mode in MODES}
    long_rates: list[float] = []
    raw: list[float] = []
    lean: list[float] = []
    raw_long: list[float] = []
    try:
        for mode in MODES:
            nodes[mode] = await Worker.start(f"apply-node-{mode}", "node", "--redis", ctx.url,
                                             "--ns", ns, "--node-id", f"apply-{mode}",
                                             "--block-ms", "60000", "--cache", mode)  # fmt: skip
        for r in range(2 * rounds):
            long_id = r >= rounds
            start = r * n
            sentinel = ip_of(exact_value(start + n - 1))
            before_stats = {}
            for mode, node in nodes.items():
                await node.request("record", all=False, target=sentinel)
                before_stats[mode] = await node.request("stats")
            before = last_id(ctx.url, key)
            for node in nodes.values():
                os.kill(node.pid, signal.SIGSTOP)
            try:
                write_s = await asyncio.to_thread(
                    populate, ctx.url, ns, start, n, LONG_NODE_ID if long_id else None
                )
            except BaseException:
                for node in nodes.values():
                    os.kill(node.pid, signal.SIGCONT)
                raise
            ctx.log(
                f"  round {r + 1}{' (40-character node id)' if long_id else ''}: burst written "
                f"in {write_s:.1f} s ({n / write_s:,.0f} FCALL/s)"
            )
            # One node at a time, the others frozen: each applies the same burst
            # alone, right after a bare redis-py loop reads it (the machine's
            # speed drifts: each node is compared with the read next to it).
            for mode, node in nodes.items():
                bare = await bare_read(ctx, "rawread", key, before, n)
                (raw_long if long_id else raw).append(bare)
                t0 = now_ns()
                os.kill(node.pid, signal.SIGCONT)
                reply = await node.request("wait_sentinel", wait=120.0, timeout=130.0)
                rate = n / ((reply["t"] - t0) / 1e9)
                if long_id and mode == "full":
                    long_rates.append(rate)
                elif not long_id:
                    rates[mode].append(rate)
                    paired[mode].append(rate / bare)
                packed = (before_stats[mode]["cache"], reply["stats"]["cache"])
                ctx.log(
                    f"    {mode}: {rate:,.0f} events/s, bare redis-py XREAD just before: "
                    f"{bare:,.0f} ({rate / bare:.2f}x); overlay before/after: "
                    f"{packed[0]['overlay']:,}/{packed[1]['overlay']:,}"
                )
            if not long_id:
                lean.append(await bare_read(ctx, "hiredisread", key, before, n))
        stats = {mode: await node.request("stats") for mode, node in nodes.items()}
    finally:
        for node in nodes.values():
            await node.stop()
    for mode, st in stats.items():
        ctx.log(
            f"  node {mode}: applied={st['events_applied']} skipped={st['events_skipped']} "
            f"resyncs={st['resyncs']} reconnects={st['reconnects']}; against the read just "
            f"before it: {', '.join(f'{x:.2f}' for x in paired[mode])}x "
            f"(median {percentile(paired[mode], 50):.2f}x)"
        )
    ctx.log(
        f"  redis-py XREAD: {', '.join(f'{x:,.0f}' for x in raw)} events/s; "
        f"hiredis Protocol XREAD: {', '.join(f'{x:,.0f}' for x in lean)} events/s; "
        f"redis-py XREAD of the 40-character-id entries: "
        f"{', '.join(f'{x:,.0f}' for x in raw_long)} events/s"
    )
    bare = percentile(raw, 50)
    return [
        *(
            Result(
                f"apply_events_per_s{_suffix(mode)}",
                percentile(rates[mode], 50),
                "events/s",
                bare,
                "bare redis-py XREAD loop",
                (">=", 0.8 * bare),
                note=f"cache={mode!r}; target: 0.8x the bare loop, same run (median of "
                f"the runs against the bare read just before each: "
                f"{percentile(paired[mode], 50):.2f}x)",
            )
            for mode in MODES
        ),
        Result(
            "apply_events_per_s_long_id",
            percentile(long_rates, 50),
            "events/s",
            percentile(raw_long, 50),
            "bare redis-py XREAD loop, same entries",
            note=f"events from a node with a {len(LONG_NODE_ID)}-character id "
            "(ORIGIN and EID as a node writes them)",
        ),
        Result(
            "xread_hiredis_events_per_s",
            percentile(lean, 50),
            "events/s",
            bare,
            "bare redis-py XREAD loop",
            note="lean hiredis Protocol XREAD, no decoding: the transport ceiling",
        ),
    ]


async def run_bootstrap(ctx: Context) -> list[Result]:
    ns = ctx.ns("boot")
    n = 100_000 if ctx.quick else 1_000_000
    label = "100k" if ctx.quick else "1m"
    await load_library(ctx.url)
    write_s = await asyncio.to_thread(populate, ctx.url, ns, 0, n)
    ctx.log(f"  {n:,} bans written in {write_s:.1f} s ({n / write_s:,.0f} FCALL/s)")
    runs: dict[str, list[float]] = {mode: [] for mode in MODES}
    paired: dict[str, list[float]] = {mode: [] for mode in MODES}
    scans: list[float] = []
    # Interleaved, and each node right after a bare loop over the same hash:
    # the machine's speed drifts, so each is also compared with the read
    # next to it.
    for k in range(1 if ctx.quick else 5):
        for mode in MODES:
            w = await Worker.start("hscan", "hscan", "--redis", ctx.url, "--key",
                                   "{" + ns + "}:bans", "--count", "10000",
                                   timeout=300)  # fmt: skip
            scans.append(w.ready["seconds"])
            await w.stop()
            w = await Worker.start(f"boot{k}-{mode}", "bootstrap", "--redis", ctx.url, "--ns", ns,
                                   "--node-id", f"boot{k}-{mode}", "--cache", mode,
                                   timeout=300)  # fmt: skip
            if w.ready["bans"] != n:
                raise RuntimeError(f"bootstrap ({mode}) found {w.ready['bans']} bans, expected {n}")
            runs[mode].append(w.ready["seconds"])
            paired[mode].append(w.ready["seconds"] / scans[-1])
            await w.stop()
    ctx.log(
        "  bootstrap runs: "
        + "; ".join(f"{mode} {', '.join(f'{x:.2f}' for x in runs[mode])} s" for mode in MODES)
        + f"; bare redis-py HSCAN: {', '.join(f'{x:.2f}' for x in scans)} s"
    )
    ctx.log(
        "  against the bare loop just before each: "
        + "; ".join(
            f"{mode} {', '.join(f'{x:.2f}' for x in paired[mode])}x "
            f"(median {percentile(paired[mode], 50):.2f}x)"
            for mode in MODES
        )
    )
    hscan_s = percentile(scans, 50)
    return [
        Result(
            f"bootstrap_{label}{_suffix(mode)}_s",
            percentile(runs[mode], 50),
            "s",
            hscan_s,
            "bare redis-py HSCAN loop",
            ("<=", 1.3 * hscan_s),
            note=f"cache={mode!r}; target: 1.3x the bare loop, same run (median of the "
            f"runs against the bare loop just before each: {percentile(paired[mode], 50):.2f}x)",
        )
        for mode in MODES
    ]
