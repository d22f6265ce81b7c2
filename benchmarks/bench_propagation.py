"""Propagation: ban issued → keep-alive client of another node sees the connection cut.

One harness for every system compared: the coordinator (this process) holds a
keep-alive client connected from a fresh loopback source address
(127.B.x.y) to a server in a child process, waits until the server has
registered it, pauses, then issues the ban and timestamps the moment the
client sees EOF/RST.  Both timestamps are taken here, with
``perf_counter_ns``.  Samples are sparse (one ban in flight at a time) and the
systems are interleaved in a shuffled order, so drift on a shared machine
hits them alike:

* ``banbus``: ``FCALL banbus_ban`` from the coordinator (as an operator or any
  banbus client) → N banbus nodes; the client is connected to node B, whose
  server is wrapped with ``node.protect``.
* ``banbus_nodeban``: the same, but the ban is ``await node.ban(...)`` in
  node A (t0 taken in node A just before the call; CLOCK_MONOTONIC is shared).
* ``floor``: ``XADD`` of a one-field entry → a hiredis ``XREAD BLOCK`` reader
  in another process that aborts the connection: no banbus code anywhere.
* ``floor_fcall``: ``FCALL banbus_ban`` (the Lua function) → the same bare
  hiredis reader: isolates the server-side cost of the function library.
* ``poll``: ``SADD`` to a set that a bouncer process polls every second
  (CrowdSec "stream mode" style); bans are issued concurrently here because a
  poll interval dwarfs everything else.

Each node also timestamps the moment the ban landed in its cache (a ban
listener registered before the supervisor's); the coordinator reads them back
for ``propagation_all_nodes`` (max over nodes).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from _common import (
    Resp,
    Result,
    Worker,
    command,
    now_ns,
    open_client,
    percentile,
    redis_cpu_seconds,
    source_ip,
    start_workers,
    stop_workers,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from _context import Context


@dataclass
class System:
    name: str
    port: int
    issue: Callable[[str], tuple[int | None, Awaitable[Any]]]
    count: int
    block: int
    #: Workers that timestamp arrivals (for "every node has it").
    reporters: list[Worker] = field(default_factory=list)
    #: The worker whose server the client is connected to (for the per-hop split).
    server: Worker | None = None
    spacing: float = 0.005
    #: (source ip, t0 ns, closed ns or 0)
    samples: list[tuple[str, int, int]] = field(default_factory=list)

    def close_ms(self) -> list[float]:
        return [(t1 - t0) / 1e6 for _, t0, t1 in self.samples if t1]

    @property
    def lost(self) -> int:
        return sum(1 for _, _, t1 in self.samples if not t1)


def hops(system: System, dumps: dict[int, dict[str, Any]]) -> str:
    """p50 of each hop on the client's server: ban → landed, landed → cut done, → client EOF."""
    if system.server is None:
        return ""
    dump = dumps[system.server.pid]
    arrive, cut, tail = [], [], []
    for ip, t0, t1 in system.samples:
        pre, post = dump["pre"].get(ip), dump["post"].get(ip)
        if pre is None or not t1:
            continue
        arrive.append((pre - t0) / 1e6)
        if post is not None:
            cut.append((post - pre) / 1e6)
        tail.append((t1 - (post or pre)) / 1e6)
    parts = [f"ban→landed p50 {percentile(arrive, 50):.3f} p99 {percentile(arrive, 99):.3f}"]
    if cut:
        parts.append(f"supervisor p50 {percentile(cut, 50):.3f}")
    parts.append(f"→client EOF p50 {percentile(tail, 50):.3f} p99 {percentile(tail, 99):.3f}")
    return f"  {system.name} hops (ms): " + "; ".join(parts)


async def _one_sample(system: System, i: int, timeout: float) -> None:
    ip = source_ip(system.block, i)
    client = await open_client(system.port, ip)
    await asyncio.sleep(system.spacing * random.uniform(0.75, 1.25))
    t0, pending = system.issue(ip)
    closed = 0
    try:
        closed = await asyncio.wait_for(asyncio.shield(client.closed), timeout)
    except TimeoutError:
        client.close()
    reply = await asyncio.wait_for(pending, timeout)
    if t0 is None:
        t0 = int(reply["t0"])
    system.samples.append((ip, t0, closed))


async def run_interleaved(
    systems: list[System], *, seed: int = 1, timeout: float = 5.0, alternate: bool = False
) -> None:
    """Run every system's samples in one sequential schedule: shuffled, or alternating."""
    schedule = [(s, i) for s in systems for i in range(s.count)]
    if alternate:
        schedule.sort(key=lambda item: item[1])
    else:
        random.Random(seed).shuffle(schedule)
    for system, i in schedule:
        await _one_sample(system, i, timeout)


async def dump_all(workers: list[Worker]) -> dict[int, dict[str, Any]]:
    """Each worker's arrival timestamps (and clear them there)."""
    return {w.pid: await w.request("dump") for w in workers}


def arrivals_ms(system: System, dumps: dict[int, dict[str, Any]]) -> list[float]:
    """Per sample, the latest arrival over the system's reporters (ms after the ban)."""
    out = []
    for ip, t0, _ in system.samples:
        times = [dumps[w.pid]["pre"].get(ip) for w in system.reporters]
        if all(times):
            out.append((max(times) - t0) / 1e6)  # type: ignore[type-var]
        else:
            out.append(float("inf"))
    return out


def issuer(
    resp: Resp, *args_before: Any, args_after: tuple[Any, ...] = ()
) -> Callable[[str], tuple[int | None, Awaitable[Any]]]:
    def issue(ip: str) -> tuple[int | None, Awaitable[Any]]:
        t0 = now_ns()
        return t0, resp.call(*args_before, ip, *args_after)

    return issue


def node_issuer(worker: Worker) -> Callable[[str], tuple[int | None, Awaitable[Any]]]:
    def issue(ip: str) -> tuple[int | None, Awaitable[Any]]:
        return None, asyncio.ensure_future(worker.request("ban", target=ip, ttl=3600))

    return issue


def fcall(ns: str) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    return ("FCALL", "banbus_ban", 1, ns), (3600, "bench")


async def node_workers(ctx: Context, ns: str, n: int, tag: str) -> list[Worker]:
    return await start_workers(
        [
            (
                f"{tag}-node{k}",
                "node",
                ["--redis", ctx.url, "--ns", ns, "--node-id", f"{tag}-{chr(65 + k)}"],
            )
            for k in range(n)
        ]
    )


async def floor_workers(
    ctx: Context, key: str, n: int, tag: str, field: str = "ip"
) -> list[Worker]:
    command(ctx.url, "XADD", key, "*", field, "init")  # the stream exists; readers start at it
    return await start_workers(
        [
            (f"{tag}-floor{k}", "floor", ["--redis", ctx.url, "--key", key, "--field", field])
            for k in range(n)
        ]
    )


def summary(name: str, values: list[float]) -> str:
    return (
        f"{name}: n={len(values)} p50={percentile(values, 50):.3f} "
        f"p90={percentile(values, 90):.3f} p99={percentile(values, 99):.3f} "
        f"max={max(values, default=float('nan')):.3f} ms"
    )


# -- 1 + 2: propagation with 4 nodes, against the floors --------------------------------------


def r(
    name: str,
    values: list[float],
    q: float,
    base: list[float] | None,
    base_name: str,
    target: tuple[str, float] | None = None,
    note: str = "",
) -> Result:
    """A latency Result: percentile *q* of *values*, against the same percentile of *base*."""
    baseline = percentile(base, q) if base else None
    return Result(name, percentile(values, q), "ms", baseline, base_name, target, note)


async def run_close(ctx: Context) -> list[Result]:
    n = ctx.samples
    ns = ctx.ns("close")
    ns_floor = ctx.ns("floorfcall")
    floor_key = "{" + ctx.ns("floor") + "}:stream"
    floor4_key = "{" + ctx.ns("floor4") + "}:stream"
    workers: list[Worker] = []
    resp = await Resp.open(ctx.url, name="bench-issuer")
    try:
        nodes = await node_workers(ctx, ns, 4, "close")
        workers += nodes
        floor = await floor_workers(ctx, floor_key, 1, "close")
        workers += floor
        floor4 = await floor_workers(ctx, floor4_key, 4, "close4")
        workers += floor4
        ffloor = await floor_workers(ctx, "{" + ns_floor + "}:log", 1, "closef", field="target")
        workers += ffloor

        def banbus(count: int, block: int) -> System:
            b_args = fcall(ns)
            issue = issuer(resp, *b_args[0], args_after=b_args[1])
            return System(
                "banbus",
                nodes[1].ready["port"],
                issue,
                count,
                block,
                reporters=nodes,
                server=nodes[1],
            )

        def plain(name: str, workers: list[Worker], key: str, count: int, block: int) -> System:
            issue = issuer(resp, "XADD", key, "MAXLEN", "~", 10000, "*", "ip")
            return System(
                name,
                workers[min(1, len(workers) - 1)].ready["port"],
                issue,
                count,
                block,
                reporters=workers,
                server=workers[min(1, len(workers) - 1)],
            )

        f_args = fcall(ns_floor)
        few = max(100, n // 3)
        systems = [
            banbus(n, 10),
            plain("floor", floor, floor_key, n, 11),
            plain("floor4", floor4, floor4_key, few, 12),
            System(
                "floor_fcall",
                ffloor[0].ready["port"],
                issuer(resp, *f_args[0], args_after=f_args[1]),
                few,
                13,
                reporters=ffloor,
                server=ffloor[0],
            ),
            System(
                "banbus_nodeban",
                nodes[1].ready["port"],
                node_issuer(nodes[0]),
                few,
                14,
                reporters=nodes,
                server=nodes[1],
            ),
        ]
        for system in systems:
            system.spacing = ctx.spacing
        await run_interleaved(systems, seed=ctx.seed)
        dumps = await dump_all(workers)
        # Warm: the same without the idle pause, banbus and floor alternating (so
        # the other nodes finish the previous ban during a floor sample): what
        # the software path costs without the wake-up and cold-cache penalties
        # of an idle machine.
        warm = [banbus(n, 15), plain("floor", floor, floor_key, n, 16)]
        for system in warm:
            system.spacing = 0.0
        await run_interleaved(warm, alternate=True)
        warm_dumps = await dump_all(workers)
        stats = [await w.request("stats") for w in nodes]
    finally:
        resp.close()
        await stop_workers(workers)

    by = {s.name: s for s in systems}
    all_nodes = arrivals_ms(by["banbus"], dumps)
    all_nodes_nb = arrivals_ms(by["banbus_nodeban"], dumps)
    all_floor4 = arrivals_ms(by["floor4"], dumps)
    ctx.cdf["banbus (4 nodes)"] = by["banbus"].close_ms()
    ctx.cdf["floor XADD→XREAD"] = by["floor"].close_ms()
    ctx.cdf["floor, 4 readers"] = by["floor4"].close_ms()
    ctx.cdf["floor FCALL→XREAD"] = by["floor_fcall"].close_ms()
    ctx.cdf["banbus node.ban()"] = by["banbus_nodeban"].close_ms()
    ctx.log(f"  sparse (idle pause {ctx.spacing * 1e3:.0f} ms ±25% before each ban):")
    for s in systems:
        ctx.log(summary(f"  {s.name} close", s.close_ms()) + f" lost={s.lost}")
        ctx.log(hops(s, dumps))
    ctx.log(summary("  banbus all 4 nodes", all_nodes))
    ctx.log(summary("  banbus node.ban() all 4 nodes", all_nodes_nb))
    ctx.log(summary("  floor all 4 readers", all_floor4))
    ctx.log("  warm (no pause):")
    for s in warm:
        ctx.log(summary(f"  {s.name} close", s.close_ms()) + f" lost={s.lost}")
        ctx.log(hops(s, warm_dumps))
    ctx.log(f"  node B: resyncs={stats[1]['resyncs']} supervisor={stats[1].get('supervisor')}")
    ctx.propagation4 = by["banbus"]

    bc, fc, f4 = by["banbus"].close_ms(), by["floor"].close_ms(), by["floor4"].close_ms()
    ffc, nbc = by["floor_fcall"].close_ms(), by["banbus_nodeban"].close_ms()
    wb, wf = warm[0].close_ms(), warm[1].close_ms()
    lost = sum(s.lost for s in systems if s.name.startswith("banbus")) + warm[0].lost
    floor_name = "floor_xadd_xread_p{}_ms"
    return [
        r("floor_xadd_xread_p50_ms", fc, 50, None, "", note="hiredis Protocol, 2 processes"),
        r("floor_xadd_xread_p99_ms", fc, 99, None, ""),
        r("propagation_close_p50_ms", bc, 50, fc, floor_name.format(50), ("<=", 0.5)),
        r("propagation_close_p99_ms", bc, 99, fc, floor_name.format(99), ("<=", 1.5)),
        Result(
            "propagation_close_ratio_p50",
            percentile(bc, 50) / percentile(fc, 50),
            "x",
            target=("<=", 1.5),
            note="propagation_close_p50 / floor p50",
        ),
        r("propagation_all_nodes_p99_ms", all_nodes, 99, fc, floor_name.format(99)),
        r(
            "floor4_xadd_xread_p50_ms",
            f4,
            50,
            fc,
            floor_name.format(50),
            note="the same floor with 4 reader processes, client on one",
        ),
        r("floor4_xadd_xread_p99_ms", f4, 99, fc, floor_name.format(99)),
        r(
            "floor_fcall_xread_p50_ms",
            ffc,
            50,
            fc,
            floor_name.format(50),
            note="FCALL banbus_ban (Lua) instead of XADD, same bare reader",
        ),
        r(
            "propagation_close_nodeban_p50_ms",
            nbc,
            50,
            bc,
            "propagation_close_p50_ms",
            note="ban issued with node.ban() in node A",
        ),
        r("propagation_close_nodeban_p99_ms", nbc, 99, bc, "propagation_close_p99_ms"),
        r(
            "propagation_close_warm_p50_ms",
            wb,
            50,
            wf,
            "floor_warm_p50_ms",
            ("<=", 0.5),
            note="no idle pause between samples",
        ),
        r("propagation_close_warm_p99_ms", wb, 99, wf, "floor_warm_p99_ms", ("<=", 1.5)),
        r("floor_warm_p50_ms", wf, 50, None, ""),
        r("floor_warm_p99_ms", wf, 99, None, ""),
        Result("propagation_close_lost", float(lost), "samples", target=("<=", 0)),
    ]


# -- 3a: polling a set every second -------------------------------------------------------------


async def run_poll(ctx: Context) -> list[Result]:
    key = "{" + ctx.ns("poll") + "}:bans"
    n = 150 if ctx.quick else 600
    resp = await Resp.open(ctx.url, name="bench-poll-issuer")
    workers = await start_workers(
        [("poll", "poll", ["--redis", ctx.url, "--key", key, "--interval", "1.0"])]
    )
    port = workers[0].ready["port"]
    pending: list[tuple[int, Any]] = []
    rng = random.Random(ctx.seed)
    try:
        for i in range(n):
            client = await open_client(port, source_ip(20, i))
            t0 = now_ns()
            resp.call("SADD", key, source_ip(20, i))
            pending.append((t0, client))
            await asyncio.sleep(rng.uniform(0.010, 0.030))
        deadline = asyncio.get_running_loop().time() + 3.0
        for _, client in pending:
            left = deadline - asyncio.get_running_loop().time()
            if left > 0:
                try:
                    await asyncio.wait_for(asyncio.shield(client.closed), left)
                except TimeoutError:
                    pass
            client.close()
    finally:
        resp.close()
        await stop_workers(workers)
    values = [(c.closed_ns - t0) / 1e6 for t0, c in pending if c.closed_ns]
    ctx.cdf["poll 1 s"] = values
    ctx.log(summary("  poll_1s", values) + f" lost={len(pending) - len(values)}")
    banbus = ctx.cdf.get("banbus (4 nodes)")
    return [
        r("poll_1s_p50_ms", values, 50, banbus, "propagation_close_p50_ms"),
        r("poll_1s_p99_ms", values, 99, banbus, "propagation_close_p99_ms"),
    ]


# -- 9: 1, 4, 16 nodes -------------------------------------------------------------------------


async def cpu_per_event(
    url: str, issue: Callable[[str], tuple[int | None, Awaitable[Any]]], block: int, count: int
) -> float:
    """Redis CPU (µs) per ban over *count* spaced bans, readers attached, idle CPU removed."""
    idle_start, t_idle = redis_cpu_seconds(url), time.perf_counter()
    await asyncio.sleep(0.5)
    idle_rate = (redis_cpu_seconds(url) - idle_start) / (time.perf_counter() - t_idle)
    before, t_start = redis_cpu_seconds(url), time.perf_counter()
    for i in range(count):
        _, pending = issue(source_ip(block, i))
        await pending
        await asyncio.sleep(0.002)
    await asyncio.sleep(0.05)
    used = redis_cpu_seconds(url) - before - idle_rate * (time.perf_counter() - t_start)
    return used / count * 1e6


async def run_scaling(ctx: Context) -> list[Result]:
    results: list[Result] = []
    n = 100 if ctx.quick else 300
    cpu_n = 200 if ctx.quick else 500
    for count in (1, 4, 16):
        ns = ctx.ns(f"scale{count}")
        key = "{" + ctx.ns(f"scalefloor{count}") + "}:stream"
        resp = await Resp.open(ctx.url, name="bench-scale-issuer")
        workers: list[Worker] = []
        try:
            nodes = await node_workers(ctx, ns, count, f"s{count}")
            workers += nodes
            floors = await floor_workers(ctx, key, count, f"s{count}")
            workers += floors
            target = nodes[min(1, count - 1)]
            b_args = fcall(ns)
            spacing = ctx.spacing if count < 16 else max(ctx.spacing, 0.015)
            banbus = System(
                "banbus",
                target.ready["port"],
                issuer(resp, *b_args[0], args_after=b_args[1]),
                n,
                30 + count,
                spacing=spacing,
            )
            floor = System(
                "floor",
                floors[min(1, count - 1)].ready["port"],
                issuer(resp, "XADD", key, "MAXLEN", "~", 10000, "*", "ip"),
                n,
                50 + count,
                spacing=spacing,
            )
            if count == 4 and ctx.propagation4 is not None:
                banbus.count = 0  # measured in run_close, in this same run
            await run_interleaved([banbus, floor], seed=ctx.seed + count)
            if count == 4 and ctx.propagation4 is not None:
                banbus = ctx.propagation4
            cpu_b = await cpu_per_event(
                ctx.url, issuer(resp, *b_args[0], args_after=b_args[1]), 70 + count, cpu_n
            )
            cpu_f = await cpu_per_event(
                ctx.url,
                issuer(resp, "XADD", key, "MAXLEN", "~", 10000, "*", "ip"),
                90 + count,
                cpu_n,
            )
        finally:
            resp.close()
            await stop_workers(workers)
        bc, fc = banbus.close_ms(), floor.close_ms()
        ctx.log(summary(f"  {count} nodes banbus", bc) + f" lost={banbus.lost}")
        ctx.log(summary(f"  {count} readers floor", fc))
        ctx.log(f"  {count} nodes: redis cpu {cpu_b:.1f} µs/ban (floor XADD {cpu_f:.1f})")
        results += [
            Result(
                f"nodes_scaling_{count}_p50_ms",
                percentile(bc, 50),
                "ms",
                percentile(fc, 50),
                f"floor p50, {count} readers",
            ),
            Result(
                f"nodes_scaling_{count}_p99_ms",
                percentile(bc, 99),
                "ms",
                percentile(fc, 99),
                f"floor p99, {count} readers",
            ),
            Result(
                f"nodes_scaling_{count}_redis_cpu_us_per_ban",
                cpu_b,
                "µs",
                cpu_f,
                f"XADD, {count} readers",
            ),
        ]
    return results
