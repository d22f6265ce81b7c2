"""``banbus.asgi.BanMiddleware`` over real uvicorn servers and real clients."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest
import websockets
from websockets.asyncio.client import connect as ws_connect

from banbus.asgi import BanMiddleware, client_address

from ._net import HTTPClient, sync_marker, uvicorn_server

if TYPE_CHECKING:
    from ._helpers import Pair

pytestmark = pytest.mark.anyio


class App:
    """``/`` answers; ``/hang`` never answers; ``/stream`` streams; ``/ws`` echoes."""

    def __init__(self) -> None:
        self.entered = {"hang": anyio.Event(), "stream": anyio.Event()}
        self.cancelled: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope["path"]
        if scope["type"] == "websocket":
            await self.websocket(receive, send)
            return
        try:
            if path == "/hang":
                self.entered["hang"].set()
                await anyio.sleep_forever()
            if path == "/stream":
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"text/plain")]})  # fmt: skip
                await send({"type": "http.response.body", "body": b"chunk-1\n",
                            "more_body": True})  # fmt: skip
                self.entered["stream"].set()
                await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(path)
            raise
        body = f"hello {scope['client'][0]}".encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})

    async def websocket(self, receive: Any, send: Any) -> None:
        message = await receive()
        assert message["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
                await send({"type": "websocket.send", "text": message.get("text")})
        except anyio.get_cancelled_exc_class():
            self.cancelled.append("ws")
            raise


def client(port: int, source: str) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(local_address=source, retries=0)
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", transport=transport,
                             timeout=10)  # fmt: skip


async def test_middleware_only_checks_every_keep_alive_request(
    two_nodes: Pair,
) -> None:
    """Without the connection-level protocol, each request on a keep-alive connection is checked."""
    a, b = two_nodes
    async with uvicorn_server(BanMiddleware(App(), b)) as port:
        conn = await HTTPClient.open("127.0.0.1", port, "127.0.0.31")
        try:
            assert (await conn.get("/"))[:2] == (200, b"hello 127.0.0.31")
            record = await a.ban("127.0.0.31")
            await b.wait_for_seq(record.seq)
            status, body, close = await conn.get("/next")  # same keep-alive connection
            assert (status, body, close) == (403, b"Forbidden\n", True)
            assert await conn.wait_closed() == b""
        finally:
            await conn.aclose()
        async with client(port, "127.0.0.31") as banned, client(port, "127.0.0.32") as other:
            assert (await banned.get("/")).status_code == 403
            assert (await other.get("/")).status_code == 200
            assert await a.unban("127.0.0.31")
            await sync_marker(a, b)
            assert (await banned.get("/")).status_code == 200


async def test_in_flight_request_is_answered_403(
    two_nodes: Pair,
) -> None:
    a, b = two_nodes
    app = App()
    async with uvicorn_server(BanMiddleware(app, b)) as port:
        async with client(port, "127.0.0.33") as http, anyio.create_task_group() as tg:
            responses: list[httpx.Response] = []

            async def hang() -> None:
                responses.append(await http.get("/hang"))

            tg.start_soon(hang)
            with anyio.fail_after(10):
                await app.entered["hang"].wait()
            record = await a.ban("127.0.0.33")
            await b.wait_for_seq(record.seq)
        assert responses[0].status_code == 403
        assert responses[0].headers["connection"] == "close"
        assert app.cancelled == ["/hang"]


async def test_streaming_response_is_cut(two_nodes: Pair) -> None:
    a, b = two_nodes
    app = App()
    async with uvicorn_server(BanMiddleware(app, b)) as port:
        async with client(port, "127.0.0.34") as http, client(port, "127.0.0.35") as other:
            async with http.stream("GET", "/stream") as response:
                chunks = response.aiter_raw()
                assert await chunks.__anext__() == b"chunk-1\n"
                record = await a.ban("127.0.0.34")
                await b.wait_for_seq(record.seq)
                with anyio.fail_after(10), pytest.raises(httpx.RemoteProtocolError):
                    await chunks.__anext__()
            assert (await other.get("/")).status_code == 200
        assert app.cancelled == ["/stream"]


async def test_websocket_is_closed_1008(two_nodes: Pair) -> None:
    a, b = two_nodes
    app = App()
    async with uvicorn_server(BanMiddleware(app, b)) as port:
        uri = f"ws://127.0.0.1:{port}/ws"
        async with ws_connect(uri, local_addr=("127.0.0.36", 0)) as ws:
            await ws.send("ping")
            assert await ws.recv() == "ping"
            record = await a.ban("127.0.0.36")
            await b.wait_for_seq(record.seq)
            with anyio.fail_after(10), pytest.raises(websockets.ConnectionClosed) as info:
                await ws.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1008
        # The handshake of a banned client is refused.
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with ws_connect(uri, local_addr=("127.0.0.36", 0)):
                pass
        assert refused.value.response.status_code == 403
        assert app.cancelled == ["ws"]


async def test_forwarded_headers_only_from_trusted_proxies(
    two_nodes: Pair,
) -> None:
    a, b = two_nodes
    record = await a.ban("203.0.113.66")
    await b.wait_for_seq(record.seq)
    app = BanMiddleware(App(), b, trusted_proxies=("127.0.0.1", "10.0.0.0/8"))
    async with uvicorn_server(app) as port:
        # The trusted proxy (127.0.0.1) forwards for the banned client: refused.
        async with client(port, "127.0.0.1") as proxy:
            xff = {"x-forwarded-for": "203.0.113.66, 10.1.2.3"}
            assert (await proxy.get("/", headers=xff)).status_code == 403
            # A client's own Forwarded header, passed through by a proxy that
            # appends to X-Forwarded-For, is not read: the banned address shows.
            both = {"forwarded": "for=198.51.100.77", "x-forwarded-for": "203.0.113.66"}
            assert (await proxy.get("/", headers=both)).status_code == 403
            fwd = {"forwarded": "for=203.0.113.66"}
            assert (await proxy.get("/", headers=fwd)).status_code == 200
            # A spoofed leftmost hop does not launder the banned rightmost one...
            xff = {"x-forwarded-for": "198.51.100.1, 203.0.113.66"}
            assert (await proxy.get("/", headers=xff)).status_code == 403
            # ...and an honest client behind the proxy passes.
            xff = {"x-forwarded-for": "198.51.100.1"}
            assert (await proxy.get("/", headers=xff)).status_code == 200
        # An untrusted peer's headers have no effect, either way.
        async with client(port, "127.0.0.37") as spoofer:
            xff = {"x-forwarded-for": "203.0.113.66", "forwarded": "for=203.0.113.66"}
            assert (await spoofer.get("/", headers=xff)).status_code == 200
        record = await a.ban("127.0.0.38")
        await b.wait_for_seq(record.seq)
        async with client(port, "127.0.0.38") as banned:
            xff = {"x-forwarded-for": "198.51.100.7", "forwarded": "for=198.51.100.7"}
            assert (await banned.get("/", headers=xff)).status_code == 403


async def test_ban_behind_proxy_cuts_in_flight_call(
    two_nodes: Pair,
) -> None:
    a, b = two_nodes
    app = App()
    async with uvicorn_server(BanMiddleware(app, b, trusted_proxies=["127.0.0.1"])) as port:
        async with client(port, "127.0.0.1") as proxy, anyio.create_task_group() as tg:
            responses: list[httpx.Response] = []

            async def hang() -> None:
                headers = {"x-forwarded-for": "198.51.100.9"}
                responses.append(await proxy.get("/hang", headers=headers))

            tg.start_soon(hang)
            with anyio.fail_after(10):
                await app.entered["hang"].wait()
            assert [c.peer for c in b.supervisor.connections()] == ["198.51.100.9"]
            record = await a.ban("198.51.100.9")
            await b.wait_for_seq(record.seq)
        assert responses[0].status_code == 403


def forwarded_for(header: str, address: str) -> str:
    """The value a proxy writing *header* sends for a client at *address*."""
    return f"for={address};proto=http" if header == "forwarded" else address


@pytest.mark.parametrize(
    ("header", "other"), [("forwarded", "x-forwarded-for"), ("x-forwarded-for", "forwarded")]
)
async def test_only_the_configured_forwarded_header_names_the_client(
    two_nodes: Pair, header: str, other: str
) -> None:
    """Refusal and tracking both use the configured header; the other one is ignored."""
    a, b = two_nodes
    proxy_ip, banned_ip, honest_ip, late_ip = "127.0.0.51", "127.0.0.52", "127.0.0.53", "127.0.0.54"
    record = await a.ban(banned_ip)
    await b.wait_for_seq(record.seq)
    app = App()
    middleware = BanMiddleware(app, b, trusted_proxies=[proxy_ip], forwarded_header=header)
    async with uvicorn_server(middleware) as port:
        async with client(port, banned_ip) as direct:
            assert (await direct.get("/")).status_code == 403
        async with client(port, proxy_ip) as proxy:
            # The trusted proxy forwards for the banned client in its header: refused.
            named = {header: forwarded_for(header, banned_ip)}
            assert (await proxy.get("/", headers=named)).status_code == 403
            # The other header is the client's own, passed through: never read.
            spoofed = {other: forwarded_for(other, banned_ip)}
            assert (await proxy.get("/", headers=spoofed)).status_code == 200
            laundered = {header: forwarded_for(header, banned_ip),
                         other: forwarded_for(other, honest_ip)}  # fmt: skip
            assert (await proxy.get("/", headers=laundered)).status_code == 403
            framed = {header: forwarded_for(header, honest_ip),
                      other: forwarded_for(other, banned_ip)}  # fmt: skip
            assert (await proxy.get("/", headers=framed)).status_code == 200

            # An in-flight call is tracked under the client the header names,
            # so a ban for that client cuts it.
            async with anyio.create_task_group() as tg:
                responses: list[httpx.Response] = []

                async def hang() -> None:
                    headers = {header: forwarded_for(header, late_ip),
                               other: forwarded_for(other, honest_ip)}  # fmt: skip
                    responses.append(await proxy.get("/hang", headers=headers))

                tg.start_soon(hang)
                with anyio.fail_after(10):
                    await app.entered["hang"].wait()
                assert [c.peer for c in b.supervisor.connections()] == [late_ip]
                record = await a.ban(late_ip)
                await b.wait_for_seq(record.seq)
            assert responses[0].status_code == 403
            assert app.cancelled == ["/hang"]


def test_client_address_parsing() -> None:
    trusted = BanMiddleware(App(), None, trusted_proxies=("10.0.0.0/8", "::1")).trusted_proxies  # type: ignore[arg-type]
    h = [(b"x-forwarded-for", b"1.2.3.4, 10.0.0.2"), (b"x-forwarded-for", b"10.0.0.3")]
    assert client_address("10.0.0.1", h, trusted) == "1.2.3.4"
    assert client_address("::ffff:10.0.0.1", h, trusted) == "1.2.3.4"
    assert client_address("192.0.2.5", h, trusted) == "192.0.2.5"
    # An unparseable hop stops at the last trusted hop.
    h = [(b"x-forwarded-for", b"1.2.3.4, unknown, 10.0.0.2")]
    assert client_address("10.0.0.1", h, trusted) == "10.0.0.2"
    h = [(b"forwarded", b'for="[2001:db8::7]:80";proto=https, for=10.0.0.9')]
    assert client_address("::1", h, trusted, "forwarded") == "2001:db8::7"
    assert client_address("::1", h, trusted) == "::1"  # not the configured header
    h = [(b"forwarded", b"for=1.2.3.4:5678"), (b"x-forwarded-for", b"5.6.7.8")]
    assert client_address("10.9.9.9", h, trusted, "forwarded") == "1.2.3.4"
    assert client_address("10.9.9.9", h, trusted) == "5.6.7.8"
    with pytest.raises(ValueError, match="forwarded_header"):
        BanMiddleware(App(), None, forwarded_header="x-real-ip")  # type: ignore[arg-type]
    assert client_address("10.0.0.1", [], trusted) == "10.0.0.1"
    with pytest.raises(ValueError, match="trusted proxy"):
        BanMiddleware(App(), None, trusted_proxies=("10.0.0.1/8",))  # type: ignore[arg-type]
