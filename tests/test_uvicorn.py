"""``banbus.uvicorn.http_protocol``: connection-level cuts in a real uvicorn server."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import pytest
import websockets
from websockets.asyncio.client import connect as ws_connect

import banbus
import banbus.uvicorn
from banbus.asgi import BanMiddleware

from ._net import ConnectionGone, HTTPClient, refused, sync_marker, uvicorn_server
from .test_asgi import App

if TYPE_CHECKING:
    from ._helpers import Pair

pytestmark = pytest.mark.anyio


async def test_idle_keep_alive_connection_is_cut(
    two_nodes: Pair,
) -> None:
    a, b = two_nodes
    async with uvicorn_server(BanMiddleware(App(), b), b) as port:
        attacker = await HTTPClient.open("127.0.0.1", port, "127.0.0.41")
        bystander = await HTTPClient.open("127.0.0.1", port, "127.0.0.42")
        try:
            assert (await attacker.get("/"))[0] == 200
            assert (await bystander.get("/"))[0] == 200
            # Idle between requests: only the connection-level hook can see it.
            record = await a.ban("127.0.0.41", reason="scanner")
            await b.wait_for_seq(record.seq)
            assert await attacker.wait_closed() == b""
            with pytest.raises(ConnectionGone):
                await attacker.get("/wp-json/wp/v2/users")
            assert await refused("127.0.0.1", port, "127.0.0.41")
            assert (await bystander.get("/"))[0] == 200
            stats = b.supervisor.statistics()
            assert stats.cut_address == 1 and stats.refused == 1
            assert await a.unban("127.0.0.41")
            await sync_marker(a, b)
            again = await HTTPClient.open("127.0.0.1", port, "127.0.0.41")
            try:
                assert (await again.get("/"))[0] == 200
            finally:
                await again.aclose()
        finally:
            await attacker.aclose()
            await bystander.aclose()


async def test_dual_stack_cidr_and_ipv6(two_nodes: Pair) -> None:
    a, b = two_nodes
    async with uvicorn_server(BanMiddleware(App(), b), b, dual_stack=True) as port:
        mapped = [await HTTPClient.open("127.0.0.1", port, f"127.0.0.{i}") for i in (49, 50)]
        v6 = await HTTPClient.open("::1", port, "::1")
        other = await HTTPClient.open("127.0.0.1", port, "127.0.0.60")
        clients = [*mapped, v6, other]
        try:
            for c in clients:
                assert (await c.get("/"))[0] == 200
            record = await a.ban("127.0.0.48/29")
            await b.wait_for_seq(record.seq)
            for c in mapped:
                assert await c.wait_closed() == b""
            record = await a.ban("::1")
            await b.wait_for_seq(record.seq)
            assert await v6.wait_closed() == b""
            assert (await other.get("/"))[0] == 200
            assert await refused("::1", port, "::1")
        finally:
            for c in clients:
                await c.aclose()


async def test_upgraded_websocket_is_cut(two_nodes: Pair) -> None:
    a, b = two_nodes
    async with uvicorn_server(App(), b) as port:
        uri = f"ws://127.0.0.1:{port}/ws"
        async with ws_connect(uri, local_addr=("127.0.0.43", 0)) as ws:
            await ws.send("ping")
            assert await ws.recv() == "ping"
            record = await a.ban("127.0.0.43")
            await b.wait_for_seq(record.seq)
            with anyio.fail_after(10), pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
        assert len(b.supervisor) == 0


def test_protocol_class() -> None:
    class FakeNode:
        supervisor = object()

    cls = banbus.uvicorn.http_protocol(FakeNode(), "h11")  # type: ignore[arg-type]
    assert cls.__name__ == "BanbusH11Protocol"
    with pytest.raises(ValueError, match="base"):
        banbus.uvicorn.http_protocol(FakeNode(), "nope")  # type: ignore[arg-type]
