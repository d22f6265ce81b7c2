"""Deploying: propagation through Sentinel and Cluster, failover time, fan-out cost.

* ``topologies``: the propagation sample of ``bench_propagation`` (a ban →
  a keep-alive client of another node sees the cut) for one server, a
  Sentinel-managed primary (1 replica, 3 Sentinels) and a 3×2 Redis Cluster
  (the nodes given the URL of a node that does *not* serve the slot),
  interleaved in one shuffled schedule.
* ``failover``: SIGKILL of the primary → a ban node A queued right after it
  is on node B.  Split into the server's share (until the replica answers
  ``ROLE`` as a master) and banbus's (from there to node B).  Sentinel with
  ``down-after-milliseconds 500``, Cluster with ``cluster-node-timeout
  1000``; banbus with its defaults.
* ``fanout``: Redis CPU (``INFO CPU``, idle use removed) per ban while 0 or
  16 nodes follow, at 100 and 1,000 bans/s (one ban at a time, no
  pipelining: each one wakes every reader); and the same with the 16 reading
  from the replica (``read_from="replica"``), where the primary pays only for
  the write and its replication.  From these: how many following nodes one
  server sustains at each rate with a whole core (``1e6 / (rate × µs per ban
  per node)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from _common import (
    Resp,
    Result,
    Worker,
    command,
    percentile,
    redis_cpu_seconds,
    start_workers,
    stop_workers,
)
from bench_propagation import System, issuer, run_interleaved, summary
from redis.crc import key_slot

import banbus
from banbus._keys import namespace_keys
from banbus._library import LIBRARY_CODE
from banbus._servers import RedisCluster, RedisProcess, SentinelGroup

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from _context import Context


def _url(port: int) -> str:
    return f"redis://127.0.0.1:{port}/0"


async def _node_workers(url: str, ns: str, tag: str) -> list[Worker]:
    return await start_workers(
        [
            (f"{tag}-node{k}", "node", ["--redis", url, "--ns", ns, "--node-id", f"{tag}-{k}"])
            for k in range(2)
        ]
    )


# -- topologies ---------------------------------------------------------------------------------


async def run_topologies(ctx: Context) -> list[Result]:
    n = 300 if ctx.quick else 1000
    workers: list[Worker] = []
    resps: list[Resp] = []
    with SentinelGroup() as group, RedisCluster() as cluster:
        ns = {kind: ctx.ns(f"deploy{kind}") for kind in ("server", "sentinel", "cluster")}
        owner = cluster.owner(key_slot(namespace_keys(ns["cluster"]).log.encode()))
        stranger = next(node for node in cluster.nodes if node is not owner)
        where = {
            "server": (ctx.url, ctx.url),
            "sentinel": (group.url, _url(group.primary_port())),
            "cluster": (stranger.url, owner.url),
        }
        systems: list[System] = []
        try:
            for block, (kind, (url, primary)) in enumerate(where.items(), start=110):
                nodes = await _node_workers(url, ns[kind], f"dep{kind}")
                workers += nodes
                resp = await Resp.open(primary, name=f"bench-deploy-{kind}")
                resps.append(resp)
                key = namespace_keys(ns[kind]).function_key
                issue = issuer(resp, "FCALL", "banbus_ban", 1, key, args_after=(3600, "bench"))
                systems.append(
                    System(kind, nodes[1].ready["port"], issue, n, block, spacing=ctx.spacing)
                )
            await run_interleaved(systems, seed=ctx.seed + 110)
        finally:
            for resp in resps:
                resp.close()
            await stop_workers(workers)
    results: list[Result] = []
    server = systems[0].close_ms()
    for system in systems:
        values = system.close_ms()
        ctx.log(summary(f"  {system.name}", values) + f" lost={system.lost}")
        for p in (50, 99):
            results.append(
                Result(
                    f"deploy_{system.name}_p{p}_ms",
                    percentile(values, p),
                    "ms",
                    percentile(server, p),
                    f"one server p{p}, same run",
                )
            )
    return results


# -- failover -----------------------------------------------------------------------------------


async def _is_master(client: aioredis.Redis) -> bool:
    try:
        role = await client.execute_command("ROLE")
    except Exception:
        return False
    return bool(role and role[0] in (b"master", "master"))


async def _one_failover(
    url: str,
    primary: RedisProcess,
    replica: RedisProcess,
    ns: str,
    announced: Callable[[], Awaitable[bool]],
) -> tuple[float, float, float]:
    """Seconds from the kill until the replica is a master, until the Sentinels /
    the cluster say so, and until the ban node A queued is on node B."""
    async with (
        banbus.Node(url, namespace=ns, node_id="a") as a,
        banbus.Node(url, namespace=ns, node_id="b") as b,
    ):
        warm = await a.ban("198.51.100.1")
        await asyncio.wait_for(b.wait_for_seq(warm.seq), 10)
        probe = aioredis.Redis(port=replica.port, socket_timeout=1)
        try:
            t0 = time.perf_counter()
            primary.stop()
            await a.ban("203.0.113.77", reason="queued during the failover")
            promoted = told = 0.0
            while not b.is_banned("203.0.113.77"):
                if not promoted and await _is_master(probe):
                    promoted = time.perf_counter() - t0
                if promoted and not told and await announced():
                    told = time.perf_counter() - t0
                await asyncio.sleep(0.005)
                if time.perf_counter() - t0 > 60:
                    raise TimeoutError("no failover within 60 s")
            seen = time.perf_counter() - t0
        finally:
            await probe.aclose()
    return promoted or seen, told or seen, seen


async def run_failover(ctx: Context) -> list[Result]:
    rounds = 3 if ctx.quick else 5
    results: list[Result] = []
    for kind in ("sentinel", "cluster"):
        times: list[tuple[float, float, float]] = []
        for r in range(rounds):
            ns = f"failover{r}"
            if kind == "sentinel":
                with SentinelGroup() as group:
                    old = group.primary_port()
                    sentinels = [aioredis.Redis(port=s.port) for s in group.sentinels]

                    async def switched(
                        sentinels: list[aioredis.Redis] = sentinels, old: int = old
                    ) -> bool:
                        # Any Sentinel naming the new primary: what a client can learn.
                        for s in sentinels:
                            with contextlib.suppress(Exception):
                                addr = await s.sentinel_get_master_addr_by_name(group.service)
                                if addr and int(addr[1]) != old:
                                    return True
                        return False

                    try:
                        times.append(await _one_failover(
                            group.url, group.server(old), group.replicas[0], ns, switched
                        ))  # fmt: skip
                    finally:
                        for s in sentinels:
                            await s.aclose()
            else:
                with RedisCluster() as cluster:
                    owner = cluster.owner(key_slot(namespace_keys(ns).log.encode()))
                    replica = cluster.replicas_of(owner)[0]

                    async def promoted() -> bool:
                        return True  # the promoted replica itself answers CLUSTER SHARDS

                    times.append(await _one_failover(cluster.url, owner, replica, ns, promoted))
            last = times[-1]
            ctx.log(f"  {kind} failover {r}: replica promoted {last[0]:.3f} s, announced "
                    f"{last[1]:.3f} s, ban on the other node {last[2]:.3f} s")  # fmt: skip
        promoted = statistics.median(t[0] for t in times)
        told = statistics.median(t[1] for t in times)
        seen = statistics.median(t[2] for t in times)
        share = statistics.median(t[2] - t[1] for t in times)
        config = "down-after 500 ms" if kind == "sentinel" else "node-timeout 1000 ms"
        results += [
            Result(f"failover_{kind}_s", seen, "s", promoted,
                   f"replica promoted ({config}), median of {rounds}"),
            Result(f"failover_{kind}_announced_s", told, "s", None,
                   "the Sentinels name the new primary" if kind == "sentinel"
                   else "= promoted (the cluster map is the replica's)"),
            Result(f"failover_{kind}_banbus_share_s", share, "s", None,
                   "announced → the queued ban on the other node"),
        ]  # fmt: skip
    return results


# -- fan-out ------------------------------------------------------------------------------------


async def _cpu_rate(urls: list[str], seconds: float) -> list[float]:
    """Each server's CPU seconds per second, idle, over *seconds*."""
    before = [redis_cpu_seconds(u) for u in urls]
    await asyncio.sleep(seconds)
    return [(redis_cpu_seconds(u) - b) / seconds for u, b in zip(urls, before, strict=True)]


async def _paced(resp: Resp, key: str, rate: int, count: int, start: int) -> tuple[int, float]:
    """*count* bans at *rate* per second, one at a time; returns the last seq and the
    elapsed seconds."""
    t0 = time.perf_counter()
    last: Any = None
    for i in range(count):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        j = start + i
        last = resp.call("FCALL", "banbus_ban", 1, key, f"10.{j >> 16 & 255}.{j >> 8 & 255}."
                         f"{j & 255}", 3600, "fanout")  # fmt: skip
    reply = await last
    return int(reply[0]), time.perf_counter() - t0


async def run_fanout(ctx: Context) -> list[Result]:
    followers = 16
    per_process = 4
    seconds = {100: 3.0 if ctx.quick else 6.0, 1000: 2.0 if ctx.quick else 4.0}
    results: list[Result] = []
    with SentinelGroup() as group:
        primary_url = _url(group.primary_port())
        replica_url = _url(group.replicas[0].port)
        urls = [primary_url, replica_url]
        command(primary_url, "FUNCTION", "LOAD", "REPLACE", LIBRARY_CODE)
        resp = await Resp.open(primary_url, name="bench-fanout")
        start = 0
        cost: dict[tuple[int, str], tuple[float, float]] = {}
        idles: dict[str, list[float]] = {}
        try:
            for setup in ("none", "primary", "replica"):
                ns = f"fanout-{setup}"
                key = namespace_keys(ns).function_key
                await resp.call("FCALL", "banbus_ban", 1, key, "192.0.2.1", 3600, "init")
                workers: list[Worker] = []
                if setup != "none":
                    workers = await start_workers(
                        [
                            (f"fleet-{setup}-{k}", "fleet",
                             ["--redis", group.url, "--ns", ns, "--node-id", f"f{setup}{k}",
                              "--count", str(per_process), "--read-from", setup])
                            for k in range(followers // per_process)
                        ]
                    )  # fmt: skip
                try:
                    if workers:
                        where = (await workers[0].request("stats"))["reading_from"]
                        ctx.log(f"  fan-out {setup}: {followers} nodes read from {where}")
                    idle = await _cpu_rate(urls, 2.0)
                    for rate, span in seconds.items():
                        count = int(rate * span)
                        before = [redis_cpu_seconds(u) for u in urls]
                        seq, elapsed = await _paced(resp, key, rate, count, start)
                        start += count
                        lags = [await w.request("wait_seq", seq=seq) for w in workers]
                        used = [
                            redis_cpu_seconds(u) - b - i * elapsed
                            for u, b, i in zip(urls, before, idle, strict=True)
                        ]
                        per_ban = (used[0] / count * 1e6, used[1] / count * 1e6)
                        cost[(rate, setup)] = per_ban
                        max_lag = max((x.get("max_lag_ms", 0.0) for x in lags), default=0.0)
                        ctx.log(
                            f"  fan-out {setup} @ {rate}/s: primary {per_ban[0]:.1f} µs/ban, "
                            f"replica {per_ban[1]:.1f} µs/ban, achieved {count / elapsed:.0f}/s, "
                            f"max node lag {max_lag:.1f} ms"
                        )
                    idles[setup] = idle
                    ctx.log(f"  idle: primary {idle[0] * 1e3:.2f} ms/s, "
                            f"replica {idle[1] * 1e3:.2f} ms/s")  # fmt: skip
                finally:
                    await stop_workers(workers)
        finally:
            resp.close()
    for rate in seconds:
        base_p, base_r = cost[(rate, "none")]
        on_primary = (cost[(rate, "primary")][0] - base_p) / followers
        on_replica = (cost[(rate, "replica")][1] - base_r) / followers
        primary_write = cost[(rate, "replica")][0]
        results += [
            Result(f"fanout_{rate}_us_per_ban_per_node", on_primary, "µs", None,
                   f"Redis CPU per ban per following node, {rate} bans/s"),
            Result(f"fanout_{rate}_replica_us_per_ban_per_node", on_replica, "µs", on_primary,
                   "the same, nodes reading from the replica (vs primary)"),
            Result(f"fanout_{rate}_primary_us_per_ban_replica_reads", primary_write, "µs", base_p,
                   "primary CPU per ban when all nodes read from the replica (vs no node)"),
            # A whole core, less what the writes themselves cost it.
            Result(f"fanout_{rate}_nodes_per_core", (1e6 / rate - base_p) / on_primary, "nodes",
                   None, f"nodes one primary sustains at {rate} bans/s with a whole core"),
            Result(f"fanout_{rate}_nodes_per_replica_core", (1e6 / rate - base_r) / on_replica,
                   "nodes", None, f"nodes one replica sustains at {rate} bans/s, a whole core"),
        ]  # fmt: skip
    idle_node = (idles["primary"][0] - idles["none"][0]) / followers * 1e6
    results.append(Result("fanout_idle_us_per_node_s", idle_node, "µs", None,
                          "Redis CPU per second per idle following node"))  # fmt: skip
    return results
