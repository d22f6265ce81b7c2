"""Auto-ban: what reporting costs, and how fast a crossing cuts.

* ``autoban_crossing_p50/p99_ms``: ``FCALL banbus_report`` that crosses a
  policy (threshold 1) → a keep-alive client of another node sees the cut,
  interleaved with the same measurement for a plain ``FCALL banbus_ban``
  (``bench_propagation``'s sample, 2 node processes).
* ``report_per_s_distinct``: one node, 64 tasks reporting 10k distinct
  addresses (below the threshold: every report is counted in Redis), against
  the same calls made with a bare redis-py client (the library alone).
* ``report_per_s_hot``: the same node, 64 tasks reporting one address
  (a shadow policy, so it is never banned): same-tick reports merge.
* ``report_banned_ns``: a report for an address already banned (no round
  trip), against ``is_banned``.
* ``report_redis_us``: Redis CPU per ``banbus_report`` call (``INFO
  commandstats``), against ``banbus_ban``'s in the same run.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import anyio
import redis.asyncio as aioredis
from _common import Resp, Result, Worker, percentile, stop_workers
from bench_deploy import _node_workers
from bench_propagation import System, issuer, run_interleaved, summary

import banbus
from banbus._keys import namespace_keys
from banbus._library import ensure_library

if TYPE_CHECKING:
    from _context import Context

TASKS = 64


async def _fcall_stats(client: aioredis.Redis) -> tuple[int, int]:
    info = await client.info("commandstats")
    stat = info.get("cmdstat_fcall", {})
    return int(stat.get("calls", 0)), int(stat.get("usec", 0))


async def run_crossing(ctx: Context) -> list[Result]:
    """A crossing report → RST on another node, side by side with a plain ban."""
    n = 300 if ctx.quick else 1000
    ns = {kind: ctx.ns(f"autoban{kind}") for kind in ("ban", "report")}
    admin = aioredis.Redis.from_url(ctx.url)
    await ensure_library(admin)
    key = namespace_keys(ns["report"]).function_key
    await admin.fcall("banbus_policy", 1, key, "SET", "crossing", "THRESHOLD", 1,  # type: ignore[misc]
                      "WINDOW", 60, "TTL", 3600)  # fmt: skip
    await admin.aclose()
    workers: list[Worker] = []
    resps: list[Resp] = []
    systems: list[System] = []
    try:
        for block, kind in enumerate(("ban", "report"), start=130):
            nodes = await _node_workers(ctx.url, ns[kind], f"ab{kind}")
            workers += nodes
            resp = await Resp.open(ctx.url, name=f"bench-autoban-{kind}")
            resps.append(resp)
            key = namespace_keys(ns[kind]).function_key
            if kind == "ban":
                issue = issuer(resp, "FCALL", "banbus_ban", 1, key, args_after=(3600, "bench"))
            else:
                issue = issuer(resp, "FCALL", "banbus_report", 1, key, args_after=("crossing",))
            systems.append(System(kind, nodes[1].ready["port"], issue, n, block,
                                  spacing=ctx.spacing))  # fmt: skip
        await run_interleaved(systems, seed=ctx.seed + 130)
    finally:
        for resp in resps:
            resp.close()
        await stop_workers(workers)
    ban, report = systems[0].close_ms(), systems[1].close_ms()
    for system in systems:
        ctx.log(summary(f"  {system.name}", system.close_ms()) + f" lost={system.lost}")
    return [
        Result(
            f"autoban_crossing_p{p}_ms",
            percentile(report, p),
            "ms",
            percentile(ban, p),
            f"a plain FCALL banbus_ban p{p}, same run",
        )
        for p in (50, 99)
    ]


async def run_reports(ctx: Context) -> list[Result]:
    count = 2_000 if ctx.quick else 10_000
    ns = ctx.ns("autobanrate")
    key = namespace_keys(ns).function_key
    admin = aioredis.Redis.from_url(ctx.url)
    bare = aioredis.Redis.from_url(ctx.url, max_connections=TASKS + 8)
    results: list[Result] = []
    try:
        await ensure_library(admin)
        await admin.fcall("banbus_policy", 1, key, "SET", "bench", "THRESHOLD", 1000,  # type: ignore[misc]
                          "WINDOW", 3600, "TTL", 60)  # fmt: skip
        await admin.fcall("banbus_policy", 1, key, "SET", "hot", "THRESHOLD", 1000,  # type: ignore[misc]
                          "WINDOW", 3600, "TTL", 60, "SHADOW", 1)  # fmt: skip
        addresses = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(count)]

        async def spread(call: Any, items: list[str]) -> float:
            started = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for t in range(TASKS):
                    tg.start_soon(_each, call, items[t::TASKS])
            return time.perf_counter() - started

        async def bare_report(ip: str) -> None:
            await bare.fcall("banbus_report", 1, key, ip, "bench", "ORIGIN", "bare")  # type: ignore[misc]

        async with banbus.Node(ctx.url, namespace=ns, node_id="rep", never_ban=[]) as node:

            async def node_report(ip: str) -> None:
                await node.report(ip, "bench")

            # Alternate bare / node twice; keep the better of each.
            bare_s, node_s = [], []
            for round_ in range(2):
                fresh = [a.replace("10.", f"{11 + round_}.", 1) for a in addresses]
                bare_s.append(await spread(bare_report, fresh))
                mine = [a.replace("10.", f"{20 + round_}.", 1) for a in addresses]
                calls, usec = await _fcall_stats(admin)
                node_s.append(await spread(node_report, mine))
                calls2, usec2 = await _fcall_stats(admin)
            report_us = (usec2 - usec) / max(1, calls2 - calls)
            node_rate, bare_rate = count / min(node_s), count / min(bare_s)
            ctx.log(f"  distinct: node {node_rate:,.0f}/s, bare FCALL {bare_rate:,.0f}/s "
                    f"({TASKS} tasks, {count:,} addresses)")  # fmt: skip
            bare_note = "bare redis-py FCALL banbus_report, same concurrency"
            results.append(
                Result("report_per_s_distinct", node_rate, "reports/s", bare_rate, bare_note)
            )
            hot = ["198.51.100.77"] * count
            trips = node.statistics().report_round_trips
            hot_s = await spread(node_report, hot)
            hot_trips = node.statistics().report_round_trips - trips
            ctx.log(f"  hot address: {count / hot_s:,.0f}/s in {hot_trips:,} round trips")
            results.append(Result("report_per_s_hot", count / hot_s, "reports/s", node_rate,
                                  "distinct addresses (vs)"))  # fmt: skip
            record = await node.ban("198.51.100.88", ttl=600)
            await node.wait_for_seq(record.seq)
            n = 20_000
            started = time.perf_counter_ns()
            for _ in range(n):
                await node.report("198.51.100.88", "bench")
            banned_ns = (time.perf_counter_ns() - started) / n
            started = time.perf_counter_ns()
            for _ in range(n):
                node.is_banned("198.51.100.88")
            hit_ns = (time.perf_counter_ns() - started) / n
            results.append(Result("report_banned_ns", banned_ns, "ns", hit_ns,
                                   "is_banned hit (the check it makes)"))  # fmt: skip
        # Redis CPU of a plain ban, same run.
        calls, usec = await _fcall_stats(admin)
        pipe = bare.pipeline(transaction=False)
        for ip in addresses[:2000]:
            pipe.fcall("banbus_ban", 1, key, ip.replace("10.", "14.", 1), 60)  # type: ignore[misc]
        await pipe.execute()
        calls2, usec2 = await _fcall_stats(admin)
        ban_us = (usec2 - usec) / max(1, calls2 - calls)
        ctx.log(f"  Redis CPU: banbus_report {report_us:.1f} µs, banbus_ban {ban_us:.1f} µs")
        results.append(Result("report_redis_us", report_us, "µs", ban_us,
                              "FCALL banbus_ban, same run"))  # fmt: skip
    finally:
        await bare.aclose()
        await admin.aclose()
    return results


async def _each(call: Any, items: list[str]) -> None:
    for item in items:
        await call(item)
