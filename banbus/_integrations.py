"""Server integrations: asyncio and anyio connections tracked by a supervisor.

Theory of operation
-------------------

Every integration is :meth:`Supervisor.track <banbus.Supervisor.track>` plus
a closer that fits the server's connection object, and an untrack when the
connection ends:

* :func:`track_transport` — any asyncio transport; the closer aborts it
  (RST) or closes it (:class:`~banbus._transports._TransportCloser`);
* :func:`protect` — an ``asyncio.start_server`` handler ``(reader, writer)``
  (its transport is tracked) or an anyio ``listener.serve()`` handler
  ``(stream)`` (the handler runs in a cancel scope the closer cancels);
* :func:`protocol` — an ``asyncio.Protocol`` factory; each protocol is
  wrapped in a proxy that tracks in ``connection_made`` and untracks in
  ``connection_lost``.

A banned peer is *refused*: tracking it calls the closer at once, and the
handler or inner protocol never sees the connection.

The race that matters is a handler that bans its own peer: the closer then
runs synchronously *inside that handler's task* (``node.ban()`` applies the
ban locally before it returns).  Aborting a transport is harmless there (the
handler sees EOF on its next read), but cancelling an anyio handler would
interrupt the ban's publication: its closer compares :func:`_current_task`
with the task serving the connection and, when they match, shuts the socket
down instead, so the handler finishes the ban and its next I/O fails.
:mod:`banbus.asgi` makes the same check.
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import SocketAttribute

from ._transports import _aclose_stream, _set_rst, _shutdown_socket, _TransportCloser

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from anyio.abc import ByteStream

    from ._connections import TrackedConnection
    from ._supervisor import Supervisor
    from ._transports import Mode

__all__ = ["protect", "protocol", "track_transport"]


def _current_task() -> object:
    """The running asyncio task, or None outside of one (a plain callback)."""
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


def track_transport(
    supervisor: Supervisor,
    transport: asyncio.BaseTransport,
    *,
    listener: str | None = None,
    mode: Mode | None = None,
    on_cut: Callable[[], object] | None = None,
) -> TrackedConnection:
    """Track an asyncio transport (see :meth:`Supervisor.track_transport`)."""
    mode = mode or supervisor.mode
    peername = transport.get_extra_info("peername")
    sockname = transport.get_extra_info("sockname")
    ip = peername[0] if isinstance(peername, tuple) and peername else ""
    port = sockname[1] if isinstance(sockname, tuple) and len(sockname) > 1 else None

    closer = _TransportCloser(transport, mode, on_cut)
    return supervisor.track(ip, closer, port=port, listener=listener, mode=mode)


def protect(
    supervisor: Supervisor,
    handler: Callable[..., Awaitable[object]],
    *,
    listener: str | None = None,
    mode: Mode | None = None,
) -> Callable[..., Awaitable[None]]:
    """Wrap a connection handler (see :meth:`Supervisor.protect`)."""

    @functools.wraps(handler)
    async def protected(*args: Any) -> None:
        if len(args) == 2:
            await _serve_asyncio(supervisor, handler, args[0], args[1], listener, mode)
        elif len(args) == 1:
            await _serve_anyio(supervisor, handler, args[0], listener, mode)
        else:
            raise TypeError(
                "a protected handler takes (reader, writer) for asyncio.start_server "
                f"or (stream) for anyio listeners, not {len(args)} arguments"
            )

    return protected


async def _serve_asyncio(
    supervisor: Supervisor,
    handler: Callable[..., Awaitable[object]],
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    listener: str | None,
    mode: Mode | None,
) -> None:
    conn = supervisor.track_transport(writer.transport, listener=listener, mode=mode)
    if conn.cut:
        writer.close()  # already aborted; releases the writer
        return
    try:
        await handler(reader, writer)
    finally:
        conn.untrack()


async def _serve_anyio(
    supervisor: Supervisor,
    handler: Callable[..., Awaitable[object]],
    stream: ByteStream,
    listener: str | None,
    mode: Mode | None,
) -> None:
    mode = mode or supervisor.mode
    remote = stream.extra(SocketAttribute.remote_address, None)
    ip = remote[0] if isinstance(remote, tuple) else ""
    port = stream.extra(SocketAttribute.local_port, None)
    raw = stream.extra(SocketAttribute.raw_socket, None)
    scope = anyio.CancelScope()
    task = _current_task()

    def closer() -> None:
        if mode == "abort":
            _set_rst(raw)
        if _current_task() is task and raw is not None:
            # The handler itself is banning its peer: cancelling it now
            # would interrupt the ban's publication.  Shut the socket
            # instead; the handler's next I/O fails.
            _shutdown_socket(raw)
        else:
            scope.cancel()

    conn = supervisor.track(ip, closer, port=port, listener=listener, mode=mode)
    try:
        if conn.tracked:
            with scope:
                await handler(stream)
    finally:
        conn.untrack()
        if conn.cut:
            await _aclose_stream(stream)


def protocol(
    supervisor: Supervisor,
    factory: Callable[[], asyncio.BaseProtocol],
    *,
    listener: str | None = None,
    mode: Mode | None = None,
) -> Callable[[], asyncio.BaseProtocol]:
    """Wrap an ``asyncio.Protocol`` factory (see :meth:`Supervisor.protocol`)."""

    def make() -> asyncio.BaseProtocol:
        inner = factory()
        if isinstance(inner, asyncio.BufferedProtocol):
            return _GuardedBufferedProtocol(supervisor, inner, listener, mode)
        return _GuardedProtocol(supervisor, inner, listener, mode)  # type: ignore[arg-type]

    return make


class _GuardedProtocol(asyncio.Protocol):
    """Proxy protocol: tracks the transport, forwards everything to the inner one."""

    def __init__(
        self,
        supervisor: Supervisor,
        inner: asyncio.Protocol,
        listener: str | None,
        mode: Mode | None,
    ) -> None:
        self._supervisor = supervisor
        self._inner = inner
        self._listener = listener
        self._mode = mode
        self._conn: TrackedConnection | None = None

    @property
    def inner(self) -> asyncio.BaseProtocol:
        """The wrapped protocol."""
        return self._inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        conn = self._supervisor.track_transport(transport, listener=self._listener,
                                                mode=self._mode)  # fmt: skip
        self._conn = conn
        if not conn.cut:
            self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self._conn
        if conn is None or conn.refused:
            return  # the inner protocol never saw this connection
        conn.untrack()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()


class _GuardedBufferedProtocol(_GuardedProtocol, asyncio.BufferedProtocol):
    _inner: asyncio.BufferedProtocol  # type: ignore[assignment]

    def __init__(
        self,
        supervisor: Supervisor,
        inner: asyncio.BufferedProtocol,
        listener: str | None,
        mode: Mode | None,
    ) -> None:
        super().__init__(supervisor, inner, listener, mode)  # type: ignore[arg-type]

    def get_buffer(self, sizehint: int) -> Any:
        return self._inner.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._inner.buffer_updated(nbytes)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()
