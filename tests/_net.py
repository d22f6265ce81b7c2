"""Loopback helpers for the supervisor/integration tests: tiny HTTP/1.1 server and client.

Every client binds a distinct 127.0.0.x source address, so a test can ban one
"attacker" and check that its neighbours are untouched.
"""

from __future__ import annotations

import asyncio
import socket
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from banbus import Node

EOF_TIMEOUT = 10.0


class ConnectionGone(Exception):
    """The server closed (or reset) the connection instead of answering."""


def _status_and_length(head: bytes) -> tuple[int, int, bool]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
        elif name.strip().lower() == "connection" and value.strip().lower() == "close":
            close = True
    return status, length, close


class HTTPClient:
    """One keep-alive HTTP/1.1 connection from a chosen source address."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int, source: str) -> HTTPClient:
        reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
        return cls(reader, writer)

    async def get(
        self, path: str = "/", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, bool]:
        """Send one request; return (status, body, server said close)."""
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        try:
            self.writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode())
            await self.writer.drain()
            head = await self.reader.readuntil(b"\r\n\r\n")
            status, length, close = _status_and_length(head)
            body = await self.reader.readexactly(length) if length else b""
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            raise ConnectionGone(repr(exc)) from exc
        return status, body, close

    async def wait_closed(self, timeout: float = EOF_TIMEOUT) -> bytes:
        """Wait until the server closes or resets; return what arrived before that."""
        data = b""
        with anyio.fail_after(timeout):
            while True:
                try:
                    chunk = await self.reader.read(65536)
                except (ConnectionError, OSError):
                    return data
                if not chunk:
                    return data
                data += chunk

    async def aclose(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def refused(host: str, port: int, source: str, timeout: float = EOF_TIMEOUT) -> bool:
    """Connect and send a request: True if the server drops it without an answer."""
    try:
        client = await HTTPClient.open(host, port, source)
    except (ConnectionError, OSError):
        return True
    try:
        try:
            await client.get("/")
        except ConnectionGone:
            return True
        return False
    finally:
        await client.aclose()


async def http_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A minimal keep-alive HTTP/1.1 server handler: 200 with the path as body."""
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            path = head.split(b" ", 2)[1]
            body = b"ok " + path
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
    except ConnectionError:
        return
    finally:
        writer.close()


@asynccontextmanager
async def streams_server(
    node: Node,
    host: str = "127.0.0.1",
    *,
    dual_stack: bool = False,
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]] = http_handler,
    **options: Any,
) -> AsyncIterator[int]:
    """An ``asyncio.start_server`` HTTP server protected by *node*; yields its port."""
    sock = listening_socket(host, dual_stack=dual_stack)
    server = await asyncio.start_server(node.protect(handler, **options), sock=sock)
    try:
        yield sock.getsockname()[1]
    finally:
        server.close()
        # Handlers of still-open keep-alive connections end when their
        # transports close (close_clients: 3.13+).
        for transport in list(getattr(server, "_clients", ()) or ()):
            transport.abort()
        await server.wait_closed()


def listening_socket(host: str = "127.0.0.1", *, dual_stack: bool = False) -> socket.socket:
    """A bound, listening TCP socket on a free port (``dual_stack``: ``::`` with V6ONLY=0)."""
    if dual_stack:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::", 0))
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
    sock.listen(512)
    sock.setblocking(False)
    return sock


async def sync_marker(writer: Node, reader: Node) -> None:
    """Wait until *reader* applied everything *writer* published so far.

    Bans a documentation address (TEST-NET-1) and waits for its sequence
    number: the stream is ordered, so earlier events (an unban …) are in.
    """
    record = await writer.ban("192.0.2.1", ttl=60, reason="test marker")
    await reader.wait_for_seq(record.seq)


@asynccontextmanager
async def uvicorn_server(
    app: Any, node: Node | None = None, *, dual_stack: bool = False, **protocol: Any
) -> AsyncIterator[int]:
    """Serve *app* with uvicorn on a pre-bound socket; with *node*, the banbus protocol.

    The socket listens before uvicorn starts, so clients can connect at once
    (the kernel queues them): no start-up polling.
    """
    import uvicorn

    import banbus.uvicorn

    sock = listening_socket(dual_stack=dual_stack)
    config = uvicorn.Config(
        app,
        http=banbus.uvicorn.http_protocol(node, "h11", **protocol) if node is not None else "h11",
        ws="websockets-sansio",
        lifespan="off",
        log_config=None,
        log_level="critical",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        try:
            yield sock.getsockname()[1]
        finally:
            server.should_exit = True
    sock.close()
