"""One CIDR ban covering 10k open connections.

The coordinator opens 10k keep-alive connections to a banbus node (server
wrapped with ``node.protect``), each from its own loopback address inside one
/18, then bans that /18 with ``FCALL banbus_ban`` and times the moment the
last client sees EOF/RST.  The node also reports its own share: the time
from the ban landing in its cache to the supervisor returning (a ban listener
registered before the supervisor's and one after it).

Before the CIDR ban, bans of *unrelated* addresses measure what the supervisor
costs per ban while tracking 10k connections (issue 3: <= 50 µs).

Floor: the same 10k connections to a bare hiredis ``XREAD`` reader whose
server keeps a plain dict of transports; an ``XADD`` naming the /18 makes it
scan its connections and abort the covered ones.
"""

from __future__ import annotations

import asyncio
import select
import socket
import time
from typing import TYPE_CHECKING, Any

from _common import (
    Resp,
    Result,
    Worker,
    command,
    now_ns,
    pack,
    percentile,
    redis_host_port,
    source_ip,
    start_workers,
    stop_workers,
)

if TYPE_CHECKING:
    from _context import Context

CONNECTIONS = 10_000


class EpollClients:
    """*n* keep-alive connections driven by a bare ``epoll`` loop (no asyncio).

    Cheap per event (a few µs), so the time until the last one sees the cut
    is the server's, not the client's.  Connections from 127.<block>.0.0/18,
    one address each; at most *window* unregistered at a time, so the
    server's accept backlog never overflows.
    """

    def __init__(
        self, port: int, block: int, n: int, *, window: int = 500, timeout: float = 60.0
    ) -> None:
        self.epoll = select.epoll()
        self.socks: dict[int, socket.socket] = {}
        self.closed_ns: list[int] = []
        waiting: set[int] = set()
        deadline = time.monotonic() + timeout
        i = 0
        while i < n or waiting:
            while i < n and len(waiting) < window:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.bind((source_ip(block, i), 0))
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", port))
                self.socks[sock.fileno()] = sock
                waiting.add(sock.fileno())
                self.epoll.register(sock.fileno(), select.EPOLLIN)
                i += 1
            for fd, _ in self.epoll.poll(0.5):
                if fd in waiting and self.socks[fd].recv(1) == b"+":
                    waiting.discard(fd)
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {i - len(waiting)} of {n} connections registered")

    def wait_cut(self, timeout: float) -> None:
        """Record when each connection sees EOF/RST, until all did or *timeout*."""
        deadline = time.monotonic() + timeout
        while self.socks and time.monotonic() < deadline:
            for fd, _ in self.epoll.poll(0.2):
                sock = self.socks.get(fd)
                if sock is None:
                    continue
                try:
                    data = sock.recv(64)
                except OSError:
                    data = b""
                if not data:
                    self.closed_ns.append(now_ns())
                    self.epoll.unregister(fd)
                    del self.socks[fd]
                    sock.close()

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()
        self.socks.clear()
        self.epoll.close()


def cut_all(
    clients: EpollClients, url: str, ban: tuple[Any, ...], timeout: float = 30.0
) -> tuple[int, float, int]:
    """Send *ban* to Redis; return (t0, seconds until the last client saw the cut, cut)."""
    try:
        with socket.create_connection(redis_host_port(url)) as redis:
            redis.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            payload = pack(*ban)
            t0 = now_ns()
            redis.sendall(payload)
            clients.wait_cut(timeout)
            redis.recv(4096)
    finally:
        clients.close()
    closed = clients.closed_ns
    return t0, (max(closed) - t0) / 1e9 if closed else float("nan"), len(closed)


async def run(ctx: Context) -> list[Result]:
    ns = ctx.ns("cut")
    floor_key = "{" + ctx.ns("cutfloor") + "}:stream"
    command(ctx.url, "XADD", floor_key, "*", "ip", "init")
    n = CONNECTIONS
    resp = await Resp.open(ctx.url, name="bench-cut")
    workers: list[Worker] = []
    try:
        workers = await start_workers(
            [
                ("cut-node", "node", ["--redis", ctx.url, "--ns", ns, "--node-id", "cut"]),
                ("cut-floor", "floor", ["--redis", ctx.url, "--key", floor_key]),
            ]
        )
        node, floor = workers
        # banbus: first unrelated bans while 10k are tracked, then the /18
        clients = await asyncio.to_thread(EpollClients, node.ready["port"], 80, n)
        stats = await node.request("stats")
        ctx.log(f"  {stats['supervisor']['tracked']} connections tracked by the node")
        unrelated = [f"127.90.0.{i + 1}" for i in range(50)]
        for ip in unrelated:
            await resp.call("FCALL", "banbus_ban", 1, ns, ip, 3600, "bench")
            await asyncio.sleep(0.002)
        target = "127.80.0.0/18"
        t0, cut_s, cut_n = await asyncio.to_thread(
            cut_all, clients, ctx.url, ("FCALL", "banbus_ban", 1, ns, target, 3600, "bench")
        )
        await asyncio.sleep(0.05)
        dump = await node.request("dump")
        stats = await node.request("stats")
        unrelated_us = [
            (dump["post"][ip] - dump["pre"][ip]) / 1e3
            for ip in unrelated
            if ip in dump["post"] and ip in dump["pre"]
        ]
        node_s = (dump["post"][target] - dump["pre"][target]) / 1e9
        arrive_s = (dump["pre"][target] - t0) / 1e9
        # floor
        fclients = await asyncio.to_thread(EpollClients, floor.ready["port"], 82, n)
        ftarget = "127.82.0.0/18"
        _, fcut_s, fcut_n = await asyncio.to_thread(
            cut_all, fclients, ctx.url, ("XADD", floor_key, "*", "ip", ftarget)
        )
    finally:
        resp.close()
        await stop_workers(workers)
    ctx.log(
        f"  banbus: {cut_n}/{n} cut in {cut_s:.3f} s (ban reached the node after "
        f"{arrive_s * 1e3:.2f} ms; supervisor {node_s * 1e3:.1f} ms; "
        f"cut_network={stats['supervisor']['cut_network']})"
    )
    ctx.log(f"  floor: {fcut_n}/{n} cut in {fcut_s:.3f} s")
    ctx.log(
        f"  unrelated ban with {n} tracked: supervisor p50 "
        f"{percentile(unrelated_us, 50):.1f} µs, max {max(unrelated_us):.1f} µs"
    )
    if cut_n != n:
        raise RuntimeError(f"only {cut_n} of {n} connections were cut")
    return [
        Result(
            "cut_10k_cidr_s", cut_s, "s", fcut_s, "bare reader + dict of transports", ("<=", 0.3)
        ),
        Result("cut_10k_cidr_node_s", node_s, "s", note="supervisor time inside the node"),
        Result(
            "supervisor_unrelated_ban_us",
            percentile(unrelated_us, 50),
            "µs",
            target=("<=", 50),
            note=f"p50 over {len(unrelated_us)} bans, {n} tracked",
        ),
    ]


async def run_local(ctx: Context) -> list[Result]:
    """The supervisor's own benchmark (``bench_supervisor.py``), reused as is.

    Different set-up from :func:`run`: the ban is ``node.ban()`` on the serving
    node itself (applied locally before the FCALL), the server is an
    ``asyncio.Protocol`` server wrapped with ``supervisor.protocol``, the 10k
    clients run in a subprocess; unrelated-ban costs are timed by calling the
    supervisor's callback directly.
    """
    import bench_supervisor

    r = await bench_supervisor.bench(ctx.url, CONNECTIONS, 3 if ctx.quick else 5)
    ctx.log(f"  bench_supervisor: {r}")
    return [
        Result(
            "cut_10k_cidr_local_s",
            r["clients_saw_rst_s"],
            "s",
            r["supervisor_s"],
            "supervisor's own cut time",
            ("<=", 0.3),
            note="bench_supervisor.py: node.ban() on the serving node",
        ),
        Result("supervisor_unrelated_exact_us", r["unrelated_exact_us"], "µs", target=("<=", 50)),
        Result("supervisor_unrelated_cidr_us", r["unrelated_cidr_us"], "µs", target=("<=", 50)),
    ]
