"""banbus benchmark suite: banbus side by side with the floor and the usual alternatives.

    python benchmarks/run.py [--quick] [--json PATH] [--plot PATH] [--redis URL]
                             [--only NAME,...] [--list]

Starts its own ``redis-server`` on a free loopback port unless ``--redis`` is
given (only ``{bench<id>-*}`` keys are touched there, and deleted afterwards).
Prints a markdown table (metric, value, unit, floor/baseline, ratio) on
stdout, progress and details on stderr.  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from typing import TYPE_CHECKING

import bench_apply
import bench_autoban
import bench_cache
import bench_cut
import bench_deploy
import bench_operating
import bench_propagation
import bench_reconnect
from _common import Result, command, drop_namespace, fmt_num, raise_fd_limit
from _context import Context

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable


#: name -> (function, what it measures); run in this order.
BENCHES: dict[str, tuple[Callable[[Context], Awaitable[list[Result]]], str]] = {
    "propagation": (
        bench_propagation.run_close,
        "ban → EOF on another node (4 nodes), all nodes, vs XADD→XREAD floor",
    ),
    "poll": (bench_propagation.run_poll, "a bouncer polling a Redis set every 1 s"),
    "reconnect": (bench_reconnect.run, "bans lost across a reader reconnect: pub/sub vs banbus"),
    "is_banned": (bench_cache.run_is_banned, "is_banned hit/miss, 1M exact + 1k CIDR"),
    "memory": (bench_cache.run_memory, "RSS per ban at 1M bans"),
    "apply": (bench_apply.run_apply, "events/s one node applies from a 100k burst"),
    "bootstrap": (bench_apply.run_bootstrap, "a new node joining a namespace with 1M bans"),
    "cut": (bench_cut.run, "one CIDR ban covering 10k open connections"),
    "supervisor": (
        bench_cut.run_local,
        "bench_supervisor.py: the same cut, ban on the serving node",
    ),
    "scaling": (bench_propagation.run_scaling, "propagation p99 and Redis CPU, 1/4/16 nodes"),
    "topologies": (
        bench_deploy.run_topologies,
        "propagation through one server, Sentinel and Cluster, same run",
    ),
    "failover": (bench_deploy.run_failover, "primary killed → a queued ban on another node"),
    "fanout": (bench_deploy.run_fanout, "Redis CPU per ban per following node, primary/replica"),
    "crossing": (
        bench_autoban.run_crossing,
        "a report crossing a policy → RST on another node, vs a plain ban",
    ),
    "reports": (bench_autoban.run_reports, "reports/s (distinct, hot, banned), Redis CPU"),
    "import": (bench_operating.run_import, "banbus import of a 100k-line blocklist"),
    "agent": (
        bench_operating.run_agent,
        "banbus agent in a network namespace: ban → reset of a plain server, nft load",
    ),
}


async def run_all(ctx: Context, names: list[str]) -> tuple[list[Result], dict[str, float]]:
    results: list[Result] = []
    durations: dict[str, float] = {}
    for name in names:
        function, what = BENCHES[name]
        ctx.log(f"## {name}: {what}")
        start = time.perf_counter()
        try:
            results += await function(ctx)
        except Exception:
            ctx.log(traceback.format_exc())
            results.append(Result(f"{name}_failed", math.nan, "", note="see stderr"))
        finally:
            for namespace in ctx.namespaces:
                drop_namespace(ctx.url, namespace)
            ctx.namespaces.clear()
        durations[name] = time.perf_counter() - start
        ctx.log(f"   ({durations[name]:.1f} s)")
    return results, durations


def _ratio(value: float) -> str:
    """Two decimals, or two significant digits below 0.1 (never a bare 0.00)."""
    if value == 0 or value >= 0.1:
        return f"{value:.2f}"
    return f"{value:.2g}"


def markdown(results: list[Result]) -> str:
    lines = ["| metric | value | unit | floor/baseline | ratio |", "|---|---:|---|---|---:|"]
    for r in results:
        base = "" if r.baseline is None else f"{fmt_num(r.baseline)} ({r.baseline_name})"
        ratio = "" if r.ratio is None else _ratio(r.ratio)
        lines.append(f"| `{r.name}` | {fmt_num(r.value)} | {r.unit} | {base} | {ratio} |")
    return "\n".join(lines)


def target_lines(results: list[Result]) -> list[str]:
    out = []
    for r in results:
        met = r.met()
        if met is None:
            continue
        assert r.target is not None
        mark = "met" if met else "MISSED"
        out.append(
            f"- {mark}: `{r.name}` = {fmt_num(r.value)} {r.unit} "
            f"(target {r.target[0]} {fmt_num(r.target[1])})"
        )
    return out


def plot_memory(path: str, memory: dict[str, list[tuple[int, float]]]) -> None:
    """RSS bytes per entry against entries, one line per cache mode and baseline."""
    import matplotlib.pyplot as plt

    labels = {"full": "cache='full'", "compact": "cache='compact'", "bloom": "cache='bloom'",
              "set": "set[str]", "setint": "set[int]", "rbloom": "rbloom alone"}  # fmt: skip
    fig, ax = plt.subplots(figsize=(8, 5))
    for kind, points in memory.items():
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                label=labels.get(kind, kind))  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("entries (log scale)")
    ax.set_ylabel("RSS bytes per entry (log scale)")
    ax.set_title("Memory per ban against entries: banbus cache modes and plain baselines")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot(path: str, cdf: dict[str, list[float]]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install 'banbus[plot]'); skipped", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, values in cdf.items():
        if not values:
            continue
        data = sorted(values)
        ys = [(i + 1) / len(data) for i in range(len(data))]
        ax.step(data, ys, where="post", label=f"{label} (n={len(data)})")
    ax.set_xscale("log")
    ax.set_xlabel("ban issued → keep-alive connection cut (ms, log scale)")
    ax.set_ylabel("fraction of samples")
    ax.set_title("Propagation latency CDF: banbus vs XADD→XREAD floor vs 1 s polling")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="banbus benchmarks (see benchmarks/README.md)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="benchmarks: " + ", ".join(BENCHES),
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, < 2 minutes")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument(
        "--plot",
        metavar="PATH",
        help="write a latency CDF (PNG, matplotlib); with the memory benchmark, also "
        "<PATH stem>-memory.png: bytes per ban against entries",
    )
    parser.add_argument("--redis", metavar="URL", help="use this server instead of starting one")
    parser.add_argument("--only", metavar="NAME,...", help="run only these benchmarks")
    parser.add_argument(
        "--spacing-ms",
        type=float,
        default=5.0,
        help="idle pause before each propagation sample (default 5 ms)",
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)

    if args.list:
        for name, (_, what) in BENCHES.items():
            print(f"{name:12} {what}")
        return 0
    names = list(BENCHES)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHES]
        if unknown:
            parser.error(
                f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}"
            )
        names = [n for n in BENCHES if n in names]

    raise_fd_limit()
    os.environ.setdefault("BENCH_LOG_DIR", tempfile.mkdtemp(prefix="banbus-bench-"))
    server = None
    if args.redis:
        url = args.redis
    else:
        from banbus._servers import RedisProcess

        server = RedisProcess().start()
        url = server.url
    start = time.perf_counter()
    try:
        version = command(url, "INFO", "SERVER")
        redis_version = next(
            (
                line.split(":", 1)[1]
                for line in version.splitlines()
                if line.startswith("redis_version:")
            ),
            "?",
        )
        ctx = Context(
            url=url, quick=args.quick, run_id=str(os.getpid()), spacing=args.spacing_ms / 1000
        )
        ctx.log(
            f"# banbus benchmarks ({'quick' if args.quick else 'full'}) on {machine()}, "
            f"Redis {redis_version} at {url}; load average {loadavg()}"
        )
        results, durations = asyncio.run(run_all(ctx, names))
    finally:
        if server is not None:
            server.close()
    elapsed = time.perf_counter() - start

    print(markdown(results))
    print()
    lines = target_lines(results)
    if lines:
        print("Targets:")
        print("\n".join(lines))
    notes = [f"- `{r.name}`: {r.note}" for r in results if r.note]
    if notes:
        print("\nNotes:")
        print("\n".join(notes))
    print(f"\nload average at the end: {loadavg()} (1, 5, 15 min)")
    print(
        f"\n{'quick' if args.quick else 'full'} run: {elapsed:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in durations.items())
        + ")"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_json() for r in results], f, indent=2)
            f.write("\n")
    if args.plot and plot(args.plot, ctx.cdf):
        print(f"plot: {args.plot}", file=sys.stderr)
        if ctx.memory:
            memory_path = args.plot.removesuffix(".png").removesuffix("-cdf") + "-memory.png"
            plot_memory(memory_path, ctx.memory)
            print(f"plot: {memory_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
