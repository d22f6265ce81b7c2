"""Closing a connection on behalf of the supervisor: abort (TCP RST) or graceful close.

Theory of operation
-------------------

A cut must take effect at once and must not wait for the peer, so the default
``"abort"`` mode makes the kernel drop the connection: ``SO_LINGER`` is set to
``(on, 0 seconds)`` and the socket is closed (``transport.abort()`` for asyncio
transports).  The peer gets a TCP RST and the kernel drops unsent data.
``"close"`` mode is a plain ``close()``: pending writes are flushed, then FIN.

Closers run synchronously inside the callback that applied a ban and may be
called for thousands of connections in one loop, so :class:`_TransportCloser`
resolves everything (socket, bound method) once, when the connection is
tracked.  Every helper tolerates a socket that is already closed: a cut can
race the peer's own hang-up.

An anyio stream closes asynchronously, so its closer only arms the RST and
stops the handler; :func:`_aclose_stream` closes the stream once the handler
has unwound.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

import anyio

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from anyio.abc import AsyncResource

__all__ = ["Mode", "abort_transport"]

#: How a cut closes a connection: ``"abort"`` (TCP RST, unsent data dropped) or
#: ``"close"`` (graceful FIN after pending writes).
Mode: TypeAlias = Literal["abort", "close"]
_MODES: Final = ("abort", "close")

#: ``struct linger {int l_onoff; int l_linger;}`` = (1, 0): close() sends RST.
_LINGER_RST: Final = struct.pack("ii", 1, 0)
_SOL_SOCKET: Final = socket.SOL_SOCKET
_SO_LINGER: Final = socket.SO_LINGER


def _set_rst(sock: Any) -> None:
    """Make close() send a TCP RST (``SO_LINGER`` on, 0 seconds); a no-op for None."""
    if sock is None:
        return
    try:
        sock.setsockopt(_SOL_SOCKET, _SO_LINGER, _LINGER_RST)
    except (OSError, AttributeError, ValueError):
        pass  # already closed, or not a TCP socket


def _shutdown_socket(sock: Any) -> None:
    """Shut both directions of *sock*: its owner's next I/O fails (already closed: no-op)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def abort_transport(transport: asyncio.BaseTransport) -> None:
    """Abort *transport* so that the peer gets a TCP RST right away."""
    _TransportCloser(transport, "abort")()


class _TransportCloser:
    """Closer of a tracked transport; resolves the socket once, at track time.

    Cutting 10k connections at once is a loop over this, so it avoids
    per-call lookups.

    :param mode: ``"abort"`` (RST, when the transport can abort) or ``"close"``.
    :param on_cut: also called after the transport was closed.
    """

    __slots__ = ("_close", "_on_cut", "_sock")

    def __init__(
        self,
        transport: asyncio.BaseTransport,
        mode: Mode,
        on_cut: Callable[[], object] | None = None,
    ) -> None:
        abort = getattr(transport, "abort", None)
        if mode == "abort" and abort is not None:
            self._sock = transport.get_extra_info("socket")
            self._close: Callable[[], object] = abort
        else:
            self._sock = None
            self._close = transport.close
        self._on_cut = on_cut

    def __call__(self) -> None:
        if self._sock is not None:
            _set_rst(self._sock)
        self._close()
        if self._on_cut is not None:
            self._on_cut()


async def _aclose_stream(stream: AsyncResource) -> None:
    """Close a cut anyio stream without waiting on the peer, even inside a cancelled scope."""
    with anyio.CancelScope(shield=True):
        await anyio.aclose_forcefully(stream)
