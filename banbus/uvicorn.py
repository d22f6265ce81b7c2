"""uvicorn at the connection level: idle keep-alive connections are cut on ban too.

ASGI middleware never sees a keep-alive connection between two requests, so a
banned scanner idling on one would keep it.  uvicorn accepts a custom HTTP
protocol class; :func:`http_protocol` returns one that registers every
connection's transport with the node's supervisor::

    import uvicorn
    import banbus.uvicorn
    from banbus.asgi import BanMiddleware

    config = uvicorn.Config(
        BanMiddleware(app, node),
        http=banbus.uvicorn.http_protocol(node),
        host="0.0.0.0", port=8080,
    )
    await uvicorn.Server(config).serve()

With ``scanner_trap=True`` a connection that sends malformed HTTP (uvicorn
answers it 400) is reported as an offense of kind ``scan`` by its direct
peer — unless that peer is one of *trusted_proxies*.

A banned peer is refused at accept (the transport is aborted before a byte is
read); when a ban lands, every covered connection — idle, mid-request,
streaming, or upgraded to a websocket — is aborted at once (TCP RST).  The
peer is the direct TCP peer: forwarded headers are the middleware's business.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.h11_impl import H11Protocol

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Iterable

    from ._node import Node
    from ._supervisor import Mode, TrackedConnection

__all__ = ["config", "http_protocol"]

log = logging.getLogger("banbus")


def _base_class(base: str | type[asyncio.Protocol]) -> type[Any]:
    if not isinstance(base, str):
        return base
    if base == "auto":
        try:
            import httptools  # type: ignore[import-not-found]  # noqa: F401
        except ImportError:
            base = "h11"
        else:
            base = "httptools"
    if base == "h11":
        return H11Protocol
    if base == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    raise ValueError(f"base must be 'auto', 'h11', 'httptools' or a protocol class, not {base!r}")


def http_protocol(
    node: Node,
    base: str | type[asyncio.Protocol] = "auto",
    *,
    listener: str | None = "uvicorn",
    mode: Mode | None = None,
    scanner_trap: bool = False,
    trap_kind: str = "scan",
    trusted_proxies: Iterable[str] = (),
) -> type[asyncio.Protocol]:
    """A uvicorn HTTP protocol class whose connections the node's supervisor cuts on ban.

    Pass it as ``uvicorn.Config(http=...)``.

    :param base: ``"h11"``, ``"httptools"``, ``"auto"`` (httptools when
        installed) or a uvicorn HTTP protocol class to extend.
    :param listener: the listener name connections are tracked under.
    :param mode: ``"abort"`` (RST) or ``"close"``; default: the supervisor's.
    :param scanner_trap: report malformed HTTP as an offense of *trap_kind*.
    :param trusted_proxies: peers never reported (they are never auto-banned
        either).
    """
    parent = _base_class(base)
    supervisor = node.supervisor
    if isinstance(trusted_proxies, str):
        trusted_proxies = (trusted_proxies,)
    if trusted_proxies:
        node.exempt(*trusted_proxies)
    reports: set[asyncio.Task[Any]] = set()

    async def report(peer: str) -> None:
        try:
            await node.report(peer, trap_kind, detail="malformed HTTP")
        except Exception as exc:  # never let a report fail the server
            log.warning("banbus: scanner trap: cannot report %s: %s", peer, exc)

    class BanbusHTTPProtocol(parent):  # type: ignore[misc, valid-type]
        _banbus: TrackedConnection | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            # Registered after uvicorn's own setup, so its connection_lost
            # (called after an abort) finds everything in place.
            self._banbus = supervisor.track_transport(transport, listener=listener, mode=mode)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._banbus is not None:
                self._banbus.untrack()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._banbus is not None and self._banbus.cut:
                return  # refused or cut: never parse what is still buffered
            super().data_received(data)

        def send_400_response(self, msg: str) -> None:
            super().send_400_response(msg)
            if scanner_trap and self._banbus is not None and self._banbus.state == "tracked":
                import asyncio

                task = asyncio.get_running_loop().create_task(report(self._banbus.peer))
                reports.add(task)
                task.add_done_callback(reports.discard)

        def handle_websocket_upgrade(self, event: Any) -> None:
            super().handle_websocket_upgrade(event)
            # The transport now belongs to the websocket protocol: keep the
            # connection tracked until that protocol loses it.
            handle = self._banbus
            ws = self.transport.get_protocol()
            if handle is None or ws is self:
                return
            lost = ws.connection_lost

            def connection_lost(exc: Exception | None) -> None:
                handle.untrack()
                lost(exc)

            ws.connection_lost = connection_lost

    BanbusHTTPProtocol.__qualname__ = BanbusHTTPProtocol.__name__ = f"Banbus{parent.__name__}"
    return BanbusHTTPProtocol


def config(app: Any, node: Node, *, base: str = "auto", **kwargs: Any) -> Any:
    """A ``uvicorn.Config`` for *app* with the banbus HTTP protocol (kwargs go to Config)."""
    import uvicorn

    return uvicorn.Config(app, http=http_protocol(node, base), **kwargs)
