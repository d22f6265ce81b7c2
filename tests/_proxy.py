"""A TCP proxy in front of Redis that a test can break on purpose (loopback only).

Each proxied connection is tagged by its role: ``"replica"`` when it comes
from the source address given as *replica_source* (a replica's replication
link: ``redis-server --bind-source-addr``), ``"reader"`` when the client
names itself ``banbus-reader:…`` in its first bytes (the node's reader
connection does), ``"client"`` otherwise (redis-py: the node's writes).
A test can then, for one role or for all:

* :meth:`Proxy.hold` — stop forwarding in one or both directions while
  keeping the TCP connections open (a half-open link, a slow reply);
  :meth:`Proxy.release` lets the held bytes through;
* :meth:`Proxy.cut` — reset the connections; :meth:`Proxy.refuse` also
  refuses new ones until :meth:`Proxy.accept` (a partition).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Literal

Role = Literal["reader", "client", "replica"]
Direction = Literal["up", "down"]


class _Link:
    def __init__(
        self, proxy: Proxy, client: asyncio.StreamWriter, server: asyncio.StreamWriter
    ) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.role: Role | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def flowing(self, direction: Direction) -> asyncio.Event:
        return self.proxy._gate(self.role or "client", direction)

    async def pump(self, reader: asyncio.StreamReader, direction: Direction) -> None:
        writer = self.server if direction == "up" else self.client
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if self.role is None and direction == "up":
                    self.role = "reader" if b"banbus-reader" in data else "client"
                    self.proxy._roles_seen.add(self.role)
                await self.flowing(direction).wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.abort()

    def abort(self) -> None:
        for writer in (self.client, self.server):
            with contextlib.suppress(Exception):
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                writer.transport.abort()
        self.proxy._links.discard(self)


class Proxy:
    """``async with Proxy(host, port) as proxy: Node(proxy.url, …)``."""

    def __init__(self, host: str, port: int, *, replica_source: str | None = None) -> None:
        self.target = (host, port)
        self.replica_source = replica_source
        self._links: set[_Link] = set()
        self._gates: dict[tuple[Role, Direction], asyncio.Event] = {}
        self._refusing = False
        self._roles_seen: set[Role] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _gate(self, role: Role, direction: Direction) -> asyncio.Event:
        gate = self._gates.get((role, direction))
        if gate is None:
            gate = self._gates[(role, direction)] = asyncio.Event()
            gate.set()
        return gate

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for gate in self._gates.values():
            gate.set()
        for link in list(self._links):
            link.abort()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        link = _Link(self, writer, up_writer)
        peer = writer.get_extra_info("peername")
        if self.replica_source is not None and peer and peer[0] == self.replica_source:
            link.role = "replica"
            self._roles_seen.add("replica")
        self._links.add(link)
        await asyncio.gather(link.pump(reader, "up"), link.pump(up_reader, "down"))

    # -- faults ----------------------------------------------------------------------

    def hold(self, role: Role | None = None, direction: Direction | None = None) -> None:
        """Stop forwarding (bytes wait in the proxy; connections stay open)."""
        for r in (role,) if role else ("reader", "client", "replica"):
            for d in (direction,) if direction else ("up", "down"):
                self._gate(r, d).clear()  # type: ignore[arg-type]

    def release(self, role: Role | None = None, direction: Direction | None = None) -> None:
        for r in (role,) if role else ("reader", "client", "replica"):
            for d in (direction,) if direction else ("up", "down"):
                self._gate(r, d).set()  # type: ignore[arg-type]

    def cut(self, role: Role | None = None) -> None:
        """Reset the open connections (of *role*)."""
        for link in list(self._links):
            if role is None or link.role == role:
                link.abort()

    def refuse(self) -> None:
        """Reset every connection and refuse new ones (a partition)."""
        self._refusing = True
        self.cut()

    def accept(self) -> None:
        self._refusing = False

    def connections(self, role: Role | None = None) -> int:
        return sum(1 for link in self._links if role is None or link.role == role)
