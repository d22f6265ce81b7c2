"""The pieces of the compose playground, runnable anywhere: protected nodes and a scanner.

::

    python -m banbus.playground node --name node1 --port 8080              # asyncio streams
    python -m banbus.playground node --name node3 --port 8080 --uvicorn    # uvicorn + ASGI
    python -m banbus.playground scan node1:8080 node2:8080 node3:8080

A *node* is a small HTTP/1.1 keep-alive server protected by a
:class:`banbus.Node`: ``/`` answers 200; any other path is a probe — answered
404 and reported as ``scan`` (the built-in policy bans at the third probe,
counted across every node).  ``--uvicorn`` serves an ASGI app through uvicorn
with :class:`~banbus.asgi.BanMiddleware` (``scanner_trap=True`` reports the
well-known probe paths) and the connection-level integration.  Each node logs
the bans it applies and the connections it cuts (``banbus.events``).

The *scanner* opens one keep-alive connection per target and probes each
every 25 ms with paths real scanners use, until the connection is cut or
``--duration`` runs out; it prints, per target, how many probes were answered
and how the connection ended, and exits 0 when every target cut it.

``compose/compose.yaml`` runs three nodes (two on streams, one on uvicorn),
the scanner, Redis and the CLI with these commands; the test suite runs the
same commands as processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from typing import Any

import anyio

from ._demo import PROBES, _request, _serve_http
from .asgi import BanMiddleware

__all__ = ["main"]

log = logging.getLogger("banbus.playground")


async def _streams_node(node: Any, host: str, port: int, ready: Any) -> None:
    async def probe(peer: str, path: str) -> None:
        with contextlib.suppress(Exception):  # a report that fails never stops serving
            await node.report(peer, "scan", detail=path)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _serve_http(reader, writer, probe)  # the demo's server: 404 is a probe

    server = await asyncio.start_server(node.protect(handler), host, port)
    async with server:
        ready()
        await server.serve_forever()


async def _uvicorn_node(node: Any, host: str, port: int, ready: Any) -> None:
    import uvicorn

    import banbus.uvicorn

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b"hello\n" if scope["path"] == "/" else b"not found\n"
        status = 200 if scope["path"] == "/" else 404
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain")]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})

    config = uvicorn.Config(
        BanMiddleware(app, node, scanner_trap=True),
        http=banbus.uvicorn.http_protocol(node, "h11", scanner_trap=True),
        host=host, port=port, lifespan="off", log_level="warning",
    )  # fmt: skip
    server = uvicorn.Server(config)
    # Listening before uvicorn starts: clients can connect at once (queued).
    sock = socket.create_server((host, port), reuse_port=False)
    ready()
    await server.serve([sock])


async def run_node(args: argparse.Namespace) -> int:
    from . import Node

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("banbus.events").setLevel(logging.INFO)
    never_ban = [] if args.ban_loopback else ["127.0.0.0/8", "::1"]
    async with Node(args.redis, namespace=args.namespace, node_id=args.name,
                    never_ban=never_ban) as node:  # fmt: skip
        serve = _uvicorn_node if args.uvicorn else _streams_node
        kind = "uvicorn + BanMiddleware" if args.uvicorn else "asyncio streams"

        def ready() -> None:
            print(f"{args.name} listening on {args.host}:{args.port} ({kind})", flush=True)

        await serve(node, args.host, args.port, ready)
    return 0


async def _probe(target: str, source: str | None, duration: float) -> tuple[int, str]:
    host, _, port = target.rpartition(":")
    try:
        reader, writer = await asyncio.open_connection(
            host, int(port), local_addr=(source, 0) if source else None
        )
    except OSError as exc:
        return 0, f"could not connect ({exc})"
    answered = 0
    deadline = time.monotonic() + duration
    try:
        for i in range(1_000_000):
            if time.monotonic() > deadline:
                return answered, "still open"
            path = PROBES[i % len(PROBES)]
            try:
                await _request(reader, writer, path, host)
            except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
                how = "reset" if isinstance(exc, ConnectionResetError) else "closed"
                return answered, f"cut ({how})"
            answered += 1
            await asyncio.sleep(0.025)
        return answered, "still open"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def run_scan(args: argparse.Namespace) -> int:
    results: dict[str, tuple[int, str]] = {}

    async def one(target: str) -> None:
        results[target] = await _probe(target, args.source, args.duration)

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        for target in args.targets:
            tg.start_soon(one, target)
    ok = True
    for target in args.targets:
        answered, how = results[target]
        ok = ok and how.startswith("cut")
        print(f"{target:<24} {answered:>4} probes answered, then {how}")
    verdict = "cut on every node" if ok else "NOT cut everywhere"
    print(f"scanner {verdict} in {time.monotonic() - started:.2f} s", flush=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m banbus.playground",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("node", help="a protected HTTP server")
    p.add_argument("--name", required=True)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--uvicorn", action="store_true", help="uvicorn + BanMiddleware")
    p.add_argument(
        "--redis", default=os.environ.get("BANBUS_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    p.add_argument("--namespace", default=os.environ.get("BANBUS_NAMESPACE", "banbus"))
    p.add_argument("--ban-loopback", action="store_true",
                   help="let loopback clients be auto-banned (a scanner on 127.0.0.x)")  # fmt: skip
    p = sub.add_parser("scan", help="probe every target until it cuts the connection")
    p.add_argument("targets", nargs="+", metavar="HOST:PORT")
    p.add_argument("--source", help="bind to this source address (e.g. 127.0.0.2)")
    p.add_argument("--duration", type=float, default=10.0, help="give up after this long")
    args = parser.parse_args(argv)
    try:
        return anyio.run(run_node if args.command == "node" else run_scan, args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a playground: one line, not a traceback
        print(f"playground: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
