"""``banbus demo``: a scanner's probes counted across nodes, one ban, every node cuts it.

Three nodes share one Redis; each serves HTTP/1.1 keep-alive through
``asyncio.start_server`` + ``node.protect``.  A fourth server checks bans only
at accept, like most servers do.  A scanner from 127.0.0.2 replays real probe
paths over one keep-alive connection per server.  Every node reports each
probe (``node.report(ip, "scan")``); Redis counts them across nodes and the
report that crosses the built-in ``scan`` policy creates the ban.  The demo
prints the counting, the crossing, when each node cut its connection, and how
the accept-only server kept answering.

Exit status: 0 when every banbus node cut the scanner and refused its
reconnection, 1 otherwise, 2 when Redis could not be set up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

import anyio
from redis.exceptions import RedisError

from ._exceptions import BanbusError
from ._node import Node
from ._servers import EmbeddedRedis, RedisProcess, redis_server_binary

if TYPE_CHECKING:
    from ._supervisor import TrackedConnection

__all__ = ["main", "run_demo"]

SCANNER_IP = "127.0.0.2"
#: Paths real scanners probe (from public honeypot logs).
PROBES = (
    "/.env",
    "/vendor/phpunit/phpunit/src/Util/PHP/eval-stdin.php",
    "/wp-content/mysql.sql",
    "/wp-json/wp/v2/users",
    "/.git/config",
    "/cgi-bin/luci/;stok=/locale",
    "/phpmyadmin/index.php",
    "/actuator/env",
    "/server-status",
    "/backup.zip",
)
#: The built-in ``scan`` policy bans at this many probes (counted across nodes).
THRESHOLD = 3
#: Pause between two probes on one connection.
PACE = 0.025
#: How long the accept-only server is watched after the ban.
AFTER = 1.0


class _Style:
    def __init__(self, color: bool) -> None:
        self.color = color

    def _wrap(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def bold(self, text: str) -> str:
        return self._wrap("1", text)

    def dim(self, text: str) -> str:
        return self._wrap("2", text)

    def red(self, text: str) -> str:
        return self._wrap("31", text)

    def green(self, text: str) -> str:
        return self._wrap("32", text)

    def yellow(self, text: str) -> str:
        return self._wrap("33", text)

    def cyan(self, text: str) -> str:
        return self._wrap("36", text)


@dataclass
class _Target:
    name: str
    port: int = 0
    banbus: bool = True
    answered: int = 0
    answered_after_ban: int = 0
    #: perf_counter when the server cut the connection / the scanner saw it.
    server_cut: float | None = None
    client_cut: float | None = None
    how: str = ""
    refused_again: bool | None = None
    probes: list[tuple[float, str, int]] = field(default_factory=list)


@dataclass
class _Clock:
    ban_at: float | None = None
    ban_seq: int = 0
    published_at: float | None = None
    decided: tuple[float, str, str] | None = None
    ban_done: anyio.Event = field(default_factory=anyio.Event)
    #: (perf_counter, node, count, path) of every probe reported before the ban.
    counted: list[tuple[float, str, int, str]] = field(default_factory=list)


def _response(status: int, reason: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _serve_http(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    on_probe: Any = None,
) -> None:
    """A tiny keep-alive HTTP/1.1 server: 404 for everything but ``/``."""
    peer = writer.get_extra_info("peername")[0]
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            parts = head.split(b" ", 2)
            path = parts[1].decode("latin-1") if len(parts) > 1 else "/"
            if path == "/":
                writer.write(_response(200, "OK", b"hello\n"))
            else:
                writer.write(_response(404, "Not Found", b"not found\n"))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            if path != "/" and on_probe is not None:
                await on_probe(peer, path)
    finally:
        writer.close()


def _source_is_usable() -> bool:
    import socket

    try:
        with socket.socket() as sock:
            sock.bind((SCANNER_IP, 0))
    except OSError:
        return False
    return True


async def _request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, host: str
) -> bytes:
    """One keep-alive GET; the response head (the body is read and dropped)."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return head


async def _scan(target: _Target, clock: _Clock, stop: anyio.Event) -> None:
    """One keep-alive connection, probing every PACE; stops at EOF/RST or *stop*."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", target.port,
                                                       local_addr=(SCANNER_IP, 0))  # fmt: skip
    except OSError as exc:
        target.how = f"connect failed: {exc}"
        return
    try:
        i = 0
        while not stop.is_set():
            path = PROBES[i % len(PROBES)]
            i += 1
            sent = time.perf_counter()
            try:
                head = await _request(reader, writer, path, "demo")
            except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
                target.client_cut = time.perf_counter()
                target.how = "reset" if isinstance(exc, ConnectionResetError) else "closed"
                return
            now = time.perf_counter()
            target.answered += 1
            if clock.ban_at is not None and sent > clock.ban_at:
                target.answered_after_ban += 1
            target.probes.append((now, path, int(head.split(b" ", 2)[1])))
            # Pause, but keep listening: a cut while idle is seen at once.
            with anyio.move_on_after(PACE):
                try:
                    data = await reader.read(1)
                except (ConnectionError, OSError):
                    data = b""
                    target.how = "reset"
                if not data:
                    target.client_cut = time.perf_counter()
                    target.how = target.how or "closed"
                    return
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def _refused(port: int) -> bool:
    """A fresh connection from the scanner: True if dropped without an answer."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                       local_addr=(SCANNER_IP, 0))  # fmt: skip
    except OSError:
        return True
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: demo\r\n\r\n")
        with anyio.fail_after(5):
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")
        return False
    except (asyncio.IncompleteReadError, ConnectionError, OSError, TimeoutError):
        return True
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


def _redis_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    for word in out.stdout.split():
        if word.startswith("v="):
            return word[2:]
    return ""


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    if abs(ms) < 10:
        return f"{ms:+.2f} ms"
    if abs(ms) < 100:
        return f"{ms:+.1f} ms"
    return f"{ms:+.0f} ms"


async def run_demo(
    redis_url: str | None, *, out: TextIO | None = None, color: bool | None = None
) -> int:
    """Run the demo against *redis_url* (or a server started for it); return the exit status."""
    out = sys.stdout if out is None else out
    if color is None:
        color = out.isatty() and not os.environ.get("NO_COLOR")
    s = _Style(color)

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    say(
        s.bold("banbus demo") + " — a scanner's probes counted across nodes, one ban, "
        "every node cuts it"
    )
    say()
    if not _source_is_usable():
        say(s.red(f"cannot bind the scanner's source address {SCANNER_IP}"))
        say("  (the demo needs a Linux-style loopback that answers on all of 127.0.0.0/8)")
        return 2
    server: RedisProcess | EmbeddedRedis | None = None
    try:
        if redis_url is not None:
            where = f"{redis_url} (from --redis; the demo uses a throwaway namespace)"
        elif (binary := redis_server_binary()) is not None:
            server = RedisProcess(binary=binary).start()
            redis_url = server.url
            version = _redis_version(binary)
            name = os.path.basename(binary) + (f" {version}" if version else "")
            where = f"{name} on 127.0.0.1:{server.port} (started for this demo)"
        else:
            server = EmbeddedRedis().start()
            redis_url = server.url
            where = (f"embedded fakeredis on 127.0.0.1:{server.port} "
                     "(no redis-server on PATH; pass --redis URL for a real one)")  # fmt: skip
    except RuntimeError as exc:
        say(s.red(f"cannot start a Redis server: {exc}"))
        return 2
    try:
        return await _run(redis_url, where, s, say)
    finally:
        if server is not None:
            server.close()


async def _run(redis_url: str, where: str, s: _Style, say: Any) -> int:
    namespace = "demo-" + uuid.uuid4().hex[:8]
    targets = [_Target(f"node{i}") for i in (1, 2, 3)]
    control = _Target("accept-only", banbus=False)
    clock = _Clock()
    probes_seen: dict[str, int] = {}
    t_start = time.perf_counter()

    try:
        async with contextlib.AsyncExitStack() as stack:
            # The scanner comes from loopback (127.0.0.2), which nodes never
            # auto-ban by default: this demo lifts that.
            nodes = [
                await stack.enter_async_context(
                    Node(
                        redis_url, namespace=namespace, node_id=t.name, block_ms=1000, never_ban=[]
                    )
                )
                for t in targets
            ]

            def prober(node: Node) -> Any:
                async def on_probe(peer: str, path: str) -> None:
                    probes_seen[peer] = probes_seen.get(peer, 0) + 1
                    at = time.perf_counter()
                    report = await node.report(peer, "scan", detail=path)
                    if report.status in ("counted", "banned"):
                        clock.counted.append((at, node.node_id, report.count, path))
                    if report.banned is None:
                        return
                    clock.decided = (at, path, node.node_id)
                    clock.ban_at = at
                    clock.published_at = time.perf_counter()
                    clock.ban_seq = report.banned.seq
                    clock.ban_done.set()

                return on_probe

            for node, target in zip(nodes, targets, strict=True):

                def watcher(conn: TrackedConnection, target: _Target = target) -> None:
                    if conn.peer == SCANNER_IP and target.server_cut is None:
                        target.server_cut = conn.cut_at

                node.supervisor.watch(watcher)

                async def handler(
                    reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter,
                    probe: Any = prober(node),  # noqa: B008 (one per node, bound now)
                ) -> None:
                    await _serve_http(reader, writer, probe)

                srv = await asyncio.start_server(node.protect(handler), "127.0.0.1", 0)
                stack.push_async_callback(_close_server, srv)
                target.port = srv.sockets[0].getsockname()[1]

            node3 = nodes[2]

            async def accept_only(
                reader: asyncio.StreamReader, writer: asyncio.StreamWriter
            ) -> None:
                if node3.is_banned(writer.get_extra_info("peername")[0]):
                    writer.close()
                    return
                await _serve_http(reader, writer)

            srv = await asyncio.start_server(accept_only, "127.0.0.1", 0)
            stack.push_async_callback(_close_server, srv)
            control.port = srv.sockets[0].getsockname()[1]

            say(f"  {s.dim('redis  ')}  {where}")
            ports = "   ".join(f"{t.name} :{t.port}" for t in targets)
            say(f"  {s.dim('nodes  ')}  {ports}")
            say(
                f"  {s.dim('       ')}  "
                + s.dim("HTTP/1.1 keep-alive: asyncio.start_server(node.protect(handler))")
            )
            say(
                f"  {s.dim('control')}  accept-only :{control.port}"
                + s.dim("   the same server, checking node.is_banned() only at accept")
            )
            say(
                f"  {s.dim('scanner')}  {SCANNER_IP}, one keep-alive connection per server, "
                f"a probe every {PACE * 1000:.0f} ms"
            )
            scan = next(p for p in await nodes[0].policies() if p.kind == "scan")
            policy = (f"scan: {scan.threshold} probes for missing files within "
                      f"{scan.window // 60} min, counted across all nodes in Redis")  # fmt: skip
            say(f"  {s.dim('policy ')}  {policy}")
            say(f"  {s.dim('       ')}  " + s.dim("each node: await node.report(ip, 'scan')"))
            say()

            stop = anyio.Event()
            with anyio.fail_after(12):
                async with anyio.create_task_group() as tg:
                    for t in [*targets, control]:
                        tg.start_soon(_scan, t, clock, stop)
                    with anyio.move_on_after(6):
                        await clock.ban_done.wait()
                    if clock.ban_at is not None:
                        # Watch the accept-only server keep answering for a while.
                        await anyio.sleep(max(0.0, clock.ban_at + AFTER - time.perf_counter()))
                    stop.set()

            if clock.ban_at is None:
                say(s.red("no report banned the scanner (no probes got through?)"))
                return 1
            for t in [*targets, control]:
                t.refused_again = await _refused(t.port)
    except (OSError, anyio.BrokenResourceError) as exc:
        say(s.red(f"demo failed: {type(exc).__name__}: {exc}"))
        return 2
    finally:
        with contextlib.suppress(Exception):
            await _drop_namespace(redis_url, namespace)

    return _report(targets, control, clock, s, say, t_start)


def _report(
    targets: list[_Target],
    control: _Target,
    clock: _Clock,
    s: _Style,
    say: Any,
    t_start: float,
) -> int:
    assert clock.ban_at is not None
    t0 = clock.ban_at
    rows: list[tuple[float, str, str]] = []
    first = min((p[0] for t in targets for p in t.probes), default=t0)
    rows.append((first, "scanner", f"first probe answered ({PROBES[0]}), on all four servers"))
    decider = clock.decided[2] if clock.decided is not None else "?"
    for at, who, count, path in clock.counted:
        # Every report counted before the crossing one, by the count Redis
        # gave it: under load, one may have been sent after the crossing one
        # (the nodes report concurrently) and still have been counted first.
        if count < THRESHOLD:
            counted = f"probe {path} reported: {count}/{THRESHOLD} cluster-wide"
            rows.append((at, who, s.dim(counted)))
    issued = (s.bold(f"probe #{THRESHOLD} crosses the policy: ban {SCANNER_IP} created")
              + s.dim("   (that node.report() call)"))  # fmt: skip
    rows.append((t0, decider, issued))
    for t in targets:
        if t.server_cut is not None:
            rows.append((t.server_cut, t.name, s.green("open connection cut (RST)")))
        if t.client_cut is not None:
            rows.append((t.client_cut, "scanner", s.dim(f"sees the {t.how} from {t.name}")))
    if clock.published_at is not None:
        acked = f"report() returns the ban (event seq {clock.ban_seq}), enforced here"
        rows.append((clock.published_at, decider, s.dim(acked)))
    still = f"still answering the scanner: {control.answered_after_ban} probes since the ban"
    rows.append((t0 + AFTER, control.name, s.yellow(still)))
    rows.sort(key=lambda r: r[0])

    say(s.bold("  timeline") + s.dim("   0 = the report that crossed the policy"))
    for at, who, what in rows:
        say(f"  {_ms(at - t0):>11}  {s.cyan(f'{who:<11}')}  {what}")
    say()

    say(
        s.bold("  scanner's view")
        + s.dim(f"   one keep-alive connection per server, from {SCANNER_IP}")
    )
    header = (
        f"{'server':<12} {'answered':>8} {'sent after ban':>15}   {'open connection':<20} reconnect"
    )
    say("  " + s.dim(header))
    ok = True
    for t in [*targets, control]:
        if t.banbus:
            ok = ok and t.server_cut is not None and t.client_cut is not None
            ok = ok and bool(t.refused_again)
        if t.server_cut is not None:
            state = s.green(f"{'cut at ' + _ms(t.server_cut - t0):<20}")
        elif t.client_cut is not None:
            state = s.yellow(f"{'closed at ' + _ms(t.client_cut - t0):<20}")
        else:
            state = s.red(f"{'still open':<20}")
        again = s.green("refused") if t.refused_again else s.red("accepted")
        after = f"{t.answered_after_ban:>15}"
        after = s.red(after) if t.answered_after_ban > 1 else after
        say(f"  {t.name:<12} {t.answered:>8} {after}   {state} {again}")
    say(
        s.dim("  (a probe sent in the instant before the ban reached a node may still be answered)")
    )
    say()
    cuts = [t.server_cut - t0 for t in targets if t.server_cut is not None]
    if ok:
        say(
            s.green("  ✓ ")
            + f"all 3 banbus nodes cut the scanner within {max(cuts) * 1000:.2f} ms "
            "of the ban,"
        )
        say(
            f"    while the accept-only server answered {control.answered_after_ban} more probes "
            f"in {AFTER:.0f} s on its open connection."
        )
    else:
        say(s.red("  ✗ banbus did not cut the scanner on every node (see above)."))
    say(s.dim(f"  finished in {time.perf_counter() - t_start:.1f} s"))
    return 0 if ok else 1


async def _close_server(server: asyncio.Server) -> None:
    server.close()
    await server.wait_closed()


async def _drop_namespace(redis_url: str, namespace: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        # Every key of the namespace: the record, the stream, and the auto-ban
        # counters, policies and strikes.
        doomed = [k async for k in client.scan_iter(match=f"{{{namespace}}}:*", count=1000)]
        if doomed:
            await client.delete(*doomed)
    finally:
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    """``banbus demo [--redis URL] [--no-color]``."""
    parser = argparse.ArgumentParser(
        prog="banbus demo",
        description="Three banbus nodes, a scanner on keep-alive connections: its probes are "
        "counted across the nodes, one report crosses the policy and bans it, and every node "
        "cuts it within milliseconds.",
    )
    parser.add_argument("--redis", metavar="URL", default=os.environ.get("BANBUS_REDIS_URL"),
                        help="use this Redis, in a namespace of its own, deleted afterwards "
                        "(env BANBUS_REDIS_URL; default: start redis-server on a free port, "
                        "else an embedded fakeredis)")  # fmt: skip
    parser.add_argument("--no-color", action="store_true", help="plain output")
    args = parser.parse_args(argv)
    color = False if args.no_color else None
    try:
        return anyio.run(lambda: run_demo(args.redis, color=color))
    except KeyboardInterrupt:
        return 130
    except (BanbusError, RedisError, OSError) as exc:
        print(f"banbus demo: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
