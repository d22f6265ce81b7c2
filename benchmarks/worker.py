"""A benchmark child process: ``python benchmarks/worker.py MODE [options]``.

Long-running modes (``node``, ``floor``, ``poll``, ``pubsub``) print one JSON
line when ready, then answer JSON-line commands read from stdin until
``{"cmd": "quit"}`` or EOF.  One-shot modes (``rawread``, ``hiredisread``,
``hscan``, ``bootstrap``, ``cache``, ``memory``) print their result as a
single JSON line and exit.

Servers listen on 127.0.0.1 only.  Every server writes one byte (``+``) to a
new connection once it is registered, so a client knows when a ban can cut
it.  ``node`` protects its server with ``node.protect`` (banbus's connection
supervisor); the other modes use :class:`Tracker`, a plain dict of
transports keyed by peer address — the minimal code any server would need.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import struct
import sys
import time
from typing import TYPE_CHECKING, Any

from _common import Resp, now_ns, pack, raise_fd_limit

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

_LINGER_RST = struct.pack("ii", 1, 0)


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def rst_abort(transport: asyncio.BaseTransport) -> None:
    """Abort with a TCP RST, as banbus's supervisor does."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    transport.abort()  # type: ignore[attr-defined]


class Tracker:
    """Live connections by peer address; ``cut(target)`` aborts the covered ones."""

    def __init__(self) -> None:
        self.by_ip: dict[str, dict[asyncio.BaseTransport, None]] = {}

    def add(self, ip: str, transport: asyncio.BaseTransport) -> None:
        self.by_ip.setdefault(ip, {})[transport] = None

    def discard(self, ip: str, transport: asyncio.BaseTransport) -> None:
        bucket = self.by_ip.get(ip)
        if bucket is not None:
            bucket.pop(transport, None)
            if not bucket:
                del self.by_ip[ip]

    def cut(self, target: str) -> int:
        if "/" not in target:
            bucket = self.by_ip.pop(target, None)
            for transport in bucket or ():
                rst_abort(transport)
            return len(bucket or ())
        address, _, prefix = target.partition("/")
        plen = int(prefix)
        first = int.from_bytes(socket.inet_aton(address), "big")
        last = first | ((1 << (32 - plen)) - 1)
        cut = 0
        for ip in list(self.by_ip):
            value = int.from_bytes(socket.inet_aton(ip), "big")
            if first <= value <= last:
                for transport in self.by_ip.pop(ip):
                    rst_abort(transport)
                    cut += 1
        return cut


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Keep-alive connection: say we are registered, then wait for the peer or a cut."""
    writer.write(b"+")
    try:
        while await reader.read(4096):
            pass
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


def tracked(
    tracker: Tracker,
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ip = writer.get_extra_info("peername")[0]
        tracker.add(ip, writer.transport)
        try:
            await handle(reader, writer)
        finally:
            tracker.discard(ip, writer.transport)

    return handler


async def start_server(handler: Any) -> asyncio.Server:
    return await asyncio.start_server(handler, "127.0.0.1", 0, backlog=4096)


async def command_loop(handlers: dict[str, Callable[..., Awaitable[dict[str, Any]]]]) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        message = json.loads(line)
        name = message.pop("cmd")
        if name == "quit":
            return
        try:
            reply = await handlers[name](**message)
        except Exception as exc:
            reply = {"error": f"{name}: {exc!r}"}
        emit(reply)


# -- node: a banbus.Node serving keep-alive connections ------------------------------------


async def node_mode(args: argparse.Namespace) -> None:
    import banbus

    raise_fd_limit()
    record_all = True
    sentinel: str | None = None
    sentinel_seen = asyncio.Event()
    sentinel_ns = 0
    pre: dict[str, int] = {}
    post: dict[str, int] = {}

    def first(target: str) -> None:
        # Registered before the supervisor: the moment the ban landed here.
        nonlocal sentinel_ns
        if record_all:
            pre.setdefault(target, now_ns())
        elif target == sentinel:  # (the clock read only then: this runs per event)
            sentinel_ns = now_ns()
            sentinel_seen.set()

    def last(target: str) -> None:
        # Registered after the supervisor: the moment it finished cutting.
        if record_all:
            post.setdefault(target, now_ns())

    node = banbus.Node(args.redis, node_id=args.node_id, namespace=args.ns, block_ms=args.block_ms,
                       cache=args.cache)  # fmt: skip
    node.subscribe(first)
    async with node:
        tracker: Tracker | None = None
        if args.cut == "supervisor":
            server = await start_server(node.protect(handle))
        else:
            tracker = Tracker()
            node.subscribe(tracker.cut)
            server = await start_server(tracked(tracker))
        node.subscribe(last)

        async def dump() -> dict[str, Any]:
            out = {"pre": dict(pre), "post": dict(post)}
            pre.clear()
            post.clear()
            return out

        async def record(all: bool = True, target: str | None = None) -> dict[str, Any]:
            nonlocal record_all, sentinel, sentinel_ns
            record_all, sentinel, sentinel_ns = all, target, 0
            sentinel_seen.clear()
            return {}

        async def wait_sentinel(wait: float = 60.0) -> dict[str, Any]:
            await asyncio.wait_for(sentinel_seen.wait(), wait)
            return {"t": sentinel_ns, "stats": stats_dict()}

        def stats_dict() -> dict[str, Any]:
            import msgspec

            out: dict[str, Any] = msgspec.structs.asdict(node.statistics())
            out["supervisor"] = msgspec.structs.asdict(node.supervisor.statistics())
            out["cache"] = node.cache.memory()
            return out

        async def stats() -> dict[str, Any]:
            return stats_dict()

        profiler: list[Any] = []

        async def profile(start: bool = True) -> dict[str, Any]:
            """Start (or stop and write) a pyinstrument profile of this node
            (``BENCH_PROFILE_DIR`` must be set)."""
            if start:
                profiler[:] = [_profiler(async_mode="disabled")]
            elif profiler:
                _profile_done(profiler.pop(), f"node-{args.node_id}")
            return {}

        async def missing(targets: list[str]) -> dict[str, Any]:
            return {"missing": sum(1 for t in targets if not node.is_banned(t))}

        async def wait_seq(seq: int, wait: float = 30.0) -> dict[str, Any]:
            await asyncio.wait_for(node.wait_for_seq(seq), wait)
            return {"last_seq": node.statistics().last_seq}

        async def ban(target: str, ttl: int = 3600, reason: str = "bench") -> dict[str, Any]:
            t0 = now_ns()
            record = await node.ban(target, ttl, reason)
            return {"t0": t0, "seq": record.seq}

        emit(
            {
                "ready": True,
                "port": server.sockets[0].getsockname()[1],
                "cut": args.cut,
                "pid": os.getpid(),
            }
        )
        await command_loop(
            {
                "dump": dump,
                "record": record,
                "wait_sentinel": wait_sentinel,
                "stats": stats,
                "profile": profile,
                "missing": missing,
                "wait_seq": wait_seq,
                "ban": ban,
            }
        )
        server.close()


# -- fleet: many following nodes in one process (fan-out cost) ---------------------------------


async def fleet_mode(args: argparse.Namespace) -> None:
    """``--count`` banbus nodes that only follow (``--read-from`` primary or replica)."""
    import contextlib

    import banbus

    async with contextlib.AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                banbus.Node(args.redis, node_id=f"{args.node_id}-{k}", namespace=args.ns,
                            block_ms=args.block_ms, read_from=args.read_from)
            )
            for k in range(args.count)
        ]  # fmt: skip

        async def wait_seq(seq: int, wait: float = 60.0) -> dict[str, Any]:
            for node in nodes:
                await asyncio.wait_for(node.wait_for_seq(seq), wait)
            return {"max_lag_ms": max(n.statistics().max_lag_ms for n in nodes)}

        async def stats() -> dict[str, Any]:
            return {
                "reading_from": sorted({n.statistics().reading_from for n in nodes}),
                "resyncs": sum(n.statistics().resyncs for n in nodes),
            }

        emit({"ready": True, "pid": os.getpid()})
        await command_loop({"wait_seq": wait_seq, "stats": stats})


# -- floor: XREAD BLOCK with hiredis, no banbus code -------------------------------------------


class FloorReader(Resp):
    """Reads a stream in ``data_received`` and cuts the connections each entry names."""

    def start(
        self, key: str, field: str, cursor: str, cut: Callable[[str], object], times: dict[str, int]
    ) -> None:
        self.key, self.field, self.cursor = key, field, cursor
        self.cut, self.times = cut, times
        self.on_reply = self._on_xread
        self._next()

    def _next(self) -> None:
        assert self.transport is not None
        self.transport.write(pack("XREAD", "BLOCK", 1000, "STREAMS", self.key, self.cursor))

    def _on_xread(self, reply: Any) -> None:
        if reply is not None and not isinstance(reply, Exception):
            for entry_id, fields in reply[0][1]:
                value = fields[fields.index(self.field) + 1]
                t = now_ns()
                self.cut(value)
                self.times.setdefault(value, t)
                self.cursor = entry_id
        if self.transport is not None:
            self._next()


async def floor_mode(args: argparse.Namespace) -> None:
    raise_fd_limit()
    tracker = Tracker()
    times: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    from _common import redis_host_port

    host, port = redis_host_port(args.redis)
    probe = await Resp.open(args.redis)
    newest = await probe.call("XREVRANGE", args.key, "+", "-", "COUNT", 1)
    probe.close()
    cursor = newest[0][0] if newest else "0-0"
    _, reader = await loop.create_connection(FloorReader, host, port)
    reader.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader.start(args.key, args.field, cursor, tracker.cut, times)
    server = await start_server(tracked(tracker))

    async def dump() -> dict[str, Any]:
        out = {"pre": dict(times), "post": {}}
        times.clear()
        return out

    emit({"ready": True, "port": server.sockets[0].getsockname()[1], "pid": os.getpid()})
    await command_loop({"dump": dump})
    server.close()


# -- poll: a bouncer that polls a Redis set every interval ---------------------------------------


async def poll_mode(args: argparse.Namespace) -> None:
    import redis.asyncio as aioredis

    tracker = Tracker()
    times: dict[str, int] = {}
    seen: set[str] = set()
    client = aioredis.Redis.from_url(args.redis, decode_responses=True)
    seen.update(await client.smembers(args.key))

    async def poller() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for tick in range(1, 10**7):
            members = await client.smembers(args.key)
            for ip in members.difference(seen):
                t = now_ns()
                tracker.cut(ip)
                times[ip] = t
                seen.add(ip)
            await asyncio.sleep(max(0.0, start + tick * args.interval - loop.time()))

    task = asyncio.create_task(poller())
    server = await start_server(tracked(tracker))

    async def dump() -> dict[str, Any]:
        out = {"pre": dict(times), "post": {}}
        times.clear()
        return out

    emit({"ready": True, "port": server.sockets[0].getsockname()[1], "pid": os.getpid()})
    await command_loop({"dump": dump})
    task.cancel()
    server.close()
    await client.aclose()


# -- pubsub: a fire-and-forget subscriber that reconnects --------------------------------------


async def pubsub_mode(args: argparse.Namespace) -> None:
    import redis.asyncio as aioredis
    import redis.exceptions as redis_errors

    received: set[str] = set()
    subscribed = asyncio.Event()
    counters = {"subscribes": 0, "errors": 0}

    async def subscriber() -> None:
        # What a typical user writes: listen, and on an error resubscribe after a
        # short jittered pause (the same first backoff as banbus's reader).
        for _ in range(10_000):
            client = aioredis.Redis.from_url(
                args.redis, decode_responses=True, client_name=args.name
            )
            try:
                pubsub = client.pubsub()
                await pubsub.subscribe(args.channel)
                async for message in pubsub.listen():
                    if message["type"] == "subscribe":
                        counters["subscribes"] += 1
                        subscribed.set()
                    elif message["type"] == "message":
                        received.add(message["data"])
            except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError):
                counters["errors"] += 1
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(0.05 * random.uniform(0.5, 1.0))

    task = asyncio.create_task(subscriber())
    await asyncio.wait_for(subscribed.wait(), 30)

    async def count(targets: list[str]) -> dict[str, Any]:
        return {"missing": sum(1 for t in targets if t not in received), **counters}

    emit({"ready": True, "pid": os.getpid()})
    await command_loop({"count": count})
    task.cancel()


# -- one-shot modes -----------------------------------------------------------------------------


def rawread_mode(args: argparse.Namespace) -> dict[str, Any]:
    """The burst read with a bare redis-py XREAD loop (hiredis parser, decoded)."""
    import redis

    client = redis.Redis.from_url(args.redis, decode_responses=True)
    cursor, n = args.start, 0
    t0 = time.perf_counter()
    while n < args.expect:
        reply = client.xread({args.key: cursor}, count=args.count)
        if not reply:
            break
        entries = reply[0][1]
        n += len(entries)
        cursor = entries[-1][0]
    seconds = time.perf_counter() - t0
    client.close()
    return {"events": n, "seconds": seconds}


async def hiredisread_mode(args: argparse.Namespace) -> dict[str, Any]:
    """The burst read with the lean hiredis Protocol client: the transport's own ceiling."""
    conn = await Resp.open(args.redis)
    cursor, n = args.start, 0
    t0 = time.perf_counter()
    while n < args.expect:
        reply = await conn.call("XREAD", "COUNT", args.count, "STREAMS", args.key, cursor)
        if not reply:
            break
        entries = reply[0][1]
        n += len(entries)
        cursor = entries[-1][0]
    seconds = time.perf_counter() - t0
    conn.close()
    return {"events": n, "seconds": seconds}


def hscan_mode(args: argparse.Namespace) -> dict[str, Any]:
    """Page through a hash with a bare redis-py HSCAN loop (the bootstrap's transfer floor)."""
    import redis

    client = redis.Redis.from_url(args.redis, decode_responses=True)
    t0 = time.perf_counter()
    n = 0
    cursor = 0
    for _ in range(10**7):
        cursor, page = client.hscan(args.key, cursor, count=args.count)
        n += len(page)
        if cursor == 0:
            break
    seconds = time.perf_counter() - t0
    client.close()
    return {"entries": n, "seconds": seconds}


async def bootstrap_mode(args: argparse.Namespace) -> dict[str, Any]:
    """Time ``async with Node(...)`` — connect, load check, bootstrap — for a new node."""
    import banbus

    profiler = _profiler()
    t0 = time.perf_counter()
    node = banbus.Node(args.redis, node_id=args.node_id, namespace=args.ns, cache=args.cache)
    async with node:
        seconds = time.perf_counter() - t0
        _profile_done(profiler, "bootstrap")
        bans = node.statistics().bans_active
    return {"seconds": seconds, "bans": bans}


def _profiler(**options: Any) -> Any:
    """A started pyinstrument profiler if ``BENCH_PROFILE_DIR`` is set, else None."""
    if not os.environ.get("BENCH_PROFILE_DIR"):
        return None
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005, **options)
    profiler.start()
    return profiler


def _profile_done(profiler: Any, name: str) -> None:
    if profiler is None:
        return
    profiler.stop()
    path = os.path.join(os.environ["BENCH_PROFILE_DIR"], f"{name}-{os.getpid()}.txt")
    with open(path, "w") as f:
        f.write(profiler.output_text(unicode=False, color=False, show_all=False))


def cache_mode(args: argparse.Namespace) -> dict[str, Any]:
    import bench_cache

    return bench_cache.measure_is_banned(args.n, args.nets, quick=args.quick)


def memory_mode(args: argparse.Namespace) -> dict[str, Any]:
    import bench_cache

    return bench_cache.measure_memory(args.n, kind=args.kind)


# -- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "mode",
        choices=[
            "node",
            "fleet",
            "floor",
            "poll",
            "pubsub",
            "rawread",
            "hiredisread",
            "hscan",
            "bootstrap",
            "cache",
            "memory",
        ],
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--ns", default="banbus")
    parser.add_argument("--node-id", default=f"bench-{os.getpid()}")
    parser.add_argument("--cut", choices=["supervisor", "listener"], default="supervisor")
    parser.add_argument("--block-ms", type=int, default=2000)
    parser.add_argument("--key", default="")
    parser.add_argument("--field", default="ip")
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--channel", default="bench")
    parser.add_argument("--name", default="bench-pubsub")
    parser.add_argument("--start", default="0-0")
    parser.add_argument("--expect", type=int, default=0)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--nets", type=int, default=1000)
    parser.add_argument("--kind", default="bancache")
    parser.add_argument("--cache", choices=["full", "compact", "bloom"], default="full")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--read-from", choices=["primary", "replica"], default="primary")
    args = parser.parse_args(argv)

    long_running = {
        "node": node_mode,
        "fleet": fleet_mode,
        "floor": floor_mode,
        "poll": poll_mode,
        "pubsub": pubsub_mode,
    }
    if args.mode in long_running:
        asyncio.run(long_running[args.mode](args))
        return 0
    one_shot: dict[str, Callable[[argparse.Namespace], Any]] = {
        "rawread": rawread_mode,
        "hiredisread": lambda a: asyncio.run(hiredisread_mode(a)),
        "hscan": hscan_mode,
        "bootstrap": lambda a: asyncio.run(bootstrap_mode(a)),
        "cache": cache_mode,
        "memory": memory_mode,
    }
    try:
        emit(one_shot[args.mode](args))
    except Exception as exc:
        emit({"error": repr(exc)})
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
