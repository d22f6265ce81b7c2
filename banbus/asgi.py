"""ASGI middleware: refuse banned clients on every request, cut in-flight ones on ban.

::

    from banbus.asgi import BanMiddleware

    app = BanMiddleware(app, node, trusted_proxies=("10.0.0.0/8",))

* Every HTTP request and websocket handshake is checked (keep-alive
  connections included): a banned client gets ``403`` with
  ``Connection: close`` (a websocket handshake is refused with 403).
* Every in-flight call is tracked by the node's supervisor: when a ban for the
  client lands, the app's call is cancelled — a request still being handled is
  answered 403, a streaming response is cut off (the server sees an incomplete
  response and drops the connection) and a websocket is closed with code 1008
  (policy violation).
* The client address comes from the one forwarded header the proxy writes
  (``X-Forwarded-For`` by default, or ``Forwarded``, RFC 7239, with
  ``forwarded_header="forwarded"``), and only when the direct peer is one of
  *trusted_proxies*; the client is the rightmost hop that is not a trusted
  proxy.  The other header is never read.

* With ``scanner_trap=True``, requests for paths no real site serves —
  probes for known vulnerabilities (:data:`DEFAULT_TRAP_PATTERNS`) — are
  answered 404 without reaching the app and reported as offenses of kind
  ``scan`` (:meth:`banbus.Node.report`): with the default ``scan`` policy a
  scanner is banned, and cut on every node, a few probes in.  Trusted
  proxies are never reported for their clients' requests.

ASGI middleware only runs while a request is in flight: an *idle* keep-alive
connection is invisible to it.  With uvicorn, add the connection-level
integration (:mod:`banbus.uvicorn`) so idle connections are cut too.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any, TypeAlias

import anyio

from ._integrations import _current_task
from ._targets import normalize_peer

if TYPE_CHECKING:
    from ._node import Node

__all__ = ["DEFAULT_TRAP_PATTERNS", "BanMiddleware", "ClientBanned", "client_address"]

log = logging.getLogger("banbus")

#: Paths scanners probe and no real site serves (regular expressions searched
#: in the request path, case-insensitively).  Pass your own list as
#: ``scanner_trap=[...]`` — a WordPress site must drop the ``wp-`` ones.
DEFAULT_TRAP_PATTERNS: tuple[str, ...] = (
    # PHPUnit's remote code execution (CVE-2017-9841), under any prefix:
    # /vendor/…, /lib/vendor/…, /laravel/vendor/…, /www/vendor/…, /admin/vendor/…
    r"/vendor/phpunit/phpunit/src/util/php/eval-stdin\.php",
    r"/\.env(?:\.[\w.-]+)?$",  # secrets: /.env, /api/.env, /.env.production
    r"/\.git/(?:config|head|index)$",
    r"/\.aws/credentials$",
    r"/wp-login\.php$",
    r"/wp-json/wp/v2/users/?$",
    r"/wp-content/.*\.sql$",
)

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]

_Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Websocket close code 1008: "policy violation" (RFC 6455 §7.4.1).
WS_POLICY_VIOLATION = 1008


class ClientBanned(OSError):
    """Raised by ``send`` once the client was banned mid-call.

    An ``OSError``, like the error servers raise when the client went away,
    so frameworks treat it as a disconnect.
    """


def _parse_networks(items: Iterable[str]) -> tuple[_Network, ...]:
    networks = []
    for item in items:
        try:
            net = ipaddress.ip_network(normalize_peer(item.strip()), strict=True)
        except ValueError as exc:
            raise ValueError(f"trusted proxy {item!r} is not an address or network: {exc}") from exc
        networks.append(net)
    return tuple(networks)


def _hop_address(text: str) -> str | None:
    """The address in one forwarded hop (quotes, brackets and port removed), or None."""
    text = text.strip().strip('"').strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None  # "unknown", an obfuscated node name, garbage
    return normalize_peer(str(address))


def _forwarded_hops(
    headers: Iterable[tuple[bytes, bytes]], header: str = "x-forwarded-for"
) -> list[str] | None:
    """The hops of the one forwarded *header* the proxy writes, or None if absent.

    Only that header is read: a proxy that appends to ``X-Forwarded-For``
    passes a client's own ``Forwarded`` header through untouched, so reading
    both would let the client choose its address.  Hops without a usable
    ``for=`` are ``""``.
    """
    name = header.encode("latin-1")
    values = [value.decode("latin-1") for key, value in headers if key == name]
    if not values:
        return None
    elements = ",".join(values).split(",")
    if name != b"forwarded":
        return elements
    hops = []
    for element in elements:
        hop = ""
        for pair in element.split(";"):
            key, _, val = pair.partition("=")
            if key.strip().lower() == "for":
                hop = val
                break
        hops.append(hop)
    return hops


def client_address(
    peer: str,
    headers: Iterable[tuple[bytes, bytes]],
    trusted: tuple[_Network, ...],
    header: str = "x-forwarded-for",
) -> str:
    """The client address of a request from *peer*, honouring forwarded headers.

    Headers count only when *peer* is inside one of the *trusted* networks:
    the client is then the rightmost hop that is not a trusted proxy.  An
    unparseable hop stops the walk at the last trusted hop.
    """
    peer = normalize_peer(peer)
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    hops = _forwarded_hops(headers, header)
    if not hops:
        return peer
    client = peer
    for hop in reversed(hops):
        address = _hop_address(hop)
        if address is None:
            break
        client = address
        if not _is_trusted(address, trusted):
            break
    return client


def _is_trusted(ip: str, trusted: tuple[_Network, ...]) -> bool:
    try:
        address: _Address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in net for net in trusted)


class _Call:
    """State of one in-flight ASGI call."""

    __slots__ = ("accepted", "close_after", "complete", "cut", "started")

    def __init__(self) -> None:
        self.cut = False
        self.close_after = False
        self.started = False
        self.complete = False
        self.accepted = False


class BanMiddleware:
    """Refuse banned clients; cancel their in-flight requests and websockets on ban.

    :param app: the ASGI application.
    :param node: the :class:`~banbus.Node` (its supervisor tracks in-flight calls).
    :param trusted_proxies: addresses/networks whose forwarded header is believed.
    :param forwarded_header: the one header your proxy writes:
        ``"x-forwarded-for"`` (default, as nginx/HAProxy/uvicorn) or
        ``"forwarded"`` (RFC 7239).  The other is ignored: a proxy passes a
        client's own copy of it through, and trusting it would let a banned
        client pick its address.
    :param status: the status of the refusal (403).
    :param body: the refusal's body.
    :param listener: the listener name in-flight calls are tracked under.
    :param scanner_trap: ``True`` for :data:`DEFAULT_TRAP_PATTERNS`, or your
        own patterns: matching requests are answered 404 and reported.
    :param trap_kind: the kind trap hits are reported as (default ``scan``).
    """

    def __init__(
        self,
        app: ASGIApp,
        node: Node,
        *,
        trusted_proxies: Iterable[str] = (),
        forwarded_header: str = "x-forwarded-for",
        status: int = 403,
        body: bytes = b"Forbidden\n",
        listener: str = "asgi",
        scanner_trap: bool | Iterable[str] = False,
        trap_kind: str = "scan",
    ) -> None:
        self.app = app
        self.node = node
        if isinstance(trusted_proxies, str):
            trusted_proxies = (trusted_proxies,)
        self.trusted_proxies = _parse_networks(trusted_proxies)
        header = forwarded_header.lower()
        if header not in ("x-forwarded-for", "forwarded"):
            raise ValueError(
                "forwarded_header must be 'x-forwarded-for' or 'forwarded', "
                f"not {forwarded_header!r}"
            )
        self.forwarded_header = header
        self.status = status
        self.body = body
        self.listener = listener
        self.trap: re.Pattern[str] | None = None
        if scanner_trap:
            patterns = DEFAULT_TRAP_PATTERNS if scanner_trap is True else tuple(scanner_trap)
            self.trap = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)
        self.trap_kind = trap_kind
        # The proxy must never be banned for its clients' sins.
        if self.trusted_proxies and node is not None:
            node.exempt(*(str(net) for net in self.trusted_proxies))

    def client(self, scope: Scope) -> str | None:
        """The client address of *scope* (forwarded headers from trusted proxies).

        The one place the middleware decides who the client is: refusal and
        tracking both use it.  None when the server reports no peer.
        """
        peer = scope.get("client")
        if not peer:
            return None
        return client_address(
            str(peer[0]), scope.get("headers") or (), self.trusted_proxies, self.forwarded_header
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        client = self.client(scope)
        if client is None:
            await self.app(scope, receive, send)
            return
        # A banned proxy is refused too, whoever it forwards for.
        peer = normalize_peer(str(scope["client"][0]))
        node = self.node
        if node.is_banned(client) or (client != peer and node.is_banned(peer)):
            await self._refuse(kind, send)
            return

        if self.trap is not None and kind == "http":
            path = str(scope.get("path") or "")
            if self.trap.search(path):
                await self._sprung(client, peer, path, send)
                return

        call = _Call()
        cancel_scope = anyio.CancelScope()
        task = _current_task()

        def closer() -> None:
            if _current_task() is task:
                # The app itself banned its client: let it answer (and publish
                # the ban), then close the connection.
                call.close_after = True
            else:
                call.cut = True
                cancel_scope.cancel()

        server = scope.get("server")
        port = server[1] if server and len(server) > 1 else None
        conn = node.supervisor.track(client, closer, port=port, listener=self.listener,
                                     refuse=False)  # fmt: skip

        async def guarded_receive() -> Message:
            if call.cut:
                return _disconnect(kind)
            return await receive()

        async def guarded_send(message: Message) -> None:
            if call.cut:
                raise ClientBanned(f"client {client} was banned")
            mtype = message["type"]
            if mtype == "http.response.start":
                if call.close_after:
                    message = _with_close(message)
                call.started = True
            elif mtype == "http.response.body":
                if not message.get("more_body", False):
                    call.complete = True
            elif mtype == "websocket.accept":
                call.accepted = True
            elif mtype == "websocket.close":
                call.complete = True
            await send(message)

        try:
            with cancel_scope:
                await self.app(scope, guarded_receive, guarded_send)
        finally:
            conn.untrack()
        if call.cut:
            await self._after_cut(kind, call, send)

    async def _sprung(self, client: str, peer: str, path: str, send: Send) -> None:
        """A probe: report it, answer 404.  (A trusted proxy's own address is in the
        node's ``never_ban``: reporting it counts nothing.)"""
        try:
            await self.node.report(client, self.trap_kind, detail=path)
        except Exception as exc:  # a failed report must not fail the response
            log.warning("banbus: scanner trap: cannot report %s: %s", client, exc)
        # A banned client's connection is closed — not a proxy's, which carries
        # other clients too.
        close = client == peer and self.node.is_banned(client)
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"10")]
        if close:
            headers.append((b"connection", b"close"))
        with contextlib.suppress(OSError):
            await send({"type": "http.response.start", "status": 404, "headers": headers})
            await send({"type": "http.response.body", "body": b"Not Found\n"})

    async def _after_cut(self, kind: str, call: _Call, send: Send) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            try:
                if kind == "http":
                    if not call.started:
                        await self._refuse(kind, send)
                    # A started response is left incomplete: the server drops
                    # the connection rather than pretend it finished.
                elif not call.complete:
                    await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION,
                                "reason": "banned"})  # fmt: skip
            except OSError:
                pass  # the client is already gone

    async def _refuse(self, kind: str, send: Send) -> None:
        if kind == "websocket":
            # Before accept, a close is answered 403 by the server.
            await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION})
            return
        await send({
            "type": "http.response.start",
            "status": self.status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(self.body)).encode()),
                (b"connection", b"close"),
            ],
        })  # fmt: skip
        await send({"type": "http.response.body", "body": self.body})


def _disconnect(kind: str) -> Message:
    if kind == "websocket":
        return {"type": "websocket.disconnect", "code": WS_POLICY_VIOLATION}
    return {"type": "http.disconnect"}


def _with_close(message: Message) -> Message:
    headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"connection"]
    headers.append((b"connection", b"close"))
    return {**message, "headers": headers}
