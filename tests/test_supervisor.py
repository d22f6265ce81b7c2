"""The connection supervisor: index logic (fake node) and asyncio/anyio integrations."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import TYPE_CHECKING

import anyio
import pytest

import banbus
from banbus._supervisor import Supervisor, SupervisorStatistics

from ._net import (
    ConnectionGone,
    HTTPClient,
    http_handler,
    listening_socket,
    refused,
    streams_server,
    sync_marker,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._helpers import Pair

# -- unit: the index, with a fake node ------------------------------------------------------


class FakeNode:
    """Bans as a set of networks; ``ban()`` notifies like the real node."""

    def __init__(self) -> None:
        self.banned: set[ipaddress.IPv4Network | ipaddress.IPv6Network] = set()
        self.allowed: set[str] = set()
        self.listeners: list[Callable[[str], None]] = []
        self.checks = 0

    def subscribe(self, callback: Callable[[str], None]) -> Callable[[], None]:
        self.listeners.append(callback)
        return lambda: self.listeners.remove(callback)

    def is_banned(self, ip: str) -> bool:
        self.checks += 1
        address = ipaddress.ip_address(banbus._targets.normalize_peer(ip))
        return ip not in self.allowed and any(address in net for net in self.banned)

    def ban(self, target: str) -> None:
        self.banned.add(ipaddress.ip_network(target))
        for callback in self.listeners:
            callback(target)

    def unban(self, target: str) -> None:
        self.banned.discard(ipaddress.ip_network(target))


class Closer:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def test_exact_ban_cuts_only_that_peer() -> None:
    node = FakeNode()
    sup = Supervisor(node)
    a, a2, b = Closer(), Closer(), Closer()
    ca = sup.track("10.0.0.1", a)
    ca2 = sup.track("::ffff:10.0.0.1", a2)  # IPv4-mapped: same peer
    cb = sup.track("10.0.0.2", b)
    assert ca.peer == ca2.peer == "10.0.0.1"
    assert len(sup) == 3 and sup.statistics().addresses == 2
    node.ban("10.0.0.1")
    assert (a.calls, a2.calls, b.calls) == (1, 1, 0)
    assert ca.cut and ca2.cut and ca.state == "cut" and cb.tracked
    assert ca.reason == "ban 10.0.0.1"
    stats = sup.statistics()
    assert stats.cut == stats.cut_address == 2 and stats.tracked == 1
    ca.untrack()  # after a cut: a no-op
    assert len(sup) == 1


def test_cidr_ban_checks_only_covered_addresses() -> None:
    node = FakeNode()
    sup = Supervisor(node)
    closers = {ip: Closer() for ip in ("10.0.1.1", "10.0.1.200", "10.0.2.1", "10.0.0.255")}
    for ip, closer in closers.items():
        sup.track(ip, closer)
    node.checks = 0
    node.ban("10.0.1.0/24")
    assert {ip for ip, c in closers.items() if c.calls} == {"10.0.1.1", "10.0.1.200"}
    # Only the two covered addresses were confirmed with is_banned: no scan.
    assert node.checks == 2
    assert sup.statistics().cut_network == 2


def test_ipv6_cidr_and_exact() -> None:
    node = FakeNode()
    sup = Supervisor(node)
    inside, outside, scoped = Closer(), Closer(), Closer()
    sup.track("2001:db8:0:1::5", inside)
    sup.track("2001:db8:1::5", outside)
    sup.track("fe80::1%lo", scoped)  # zone id stripped
    node.ban("2001:db8::/48")
    assert (inside.calls, outside.calls) == (1, 0)
    node.ban("fe80::1")
    assert scoped.calls == 1


def test_allowlist_wins_and_unrelated_bans_cost_nothing() -> None:
    node = FakeNode()
    sup = Supervisor(node)
    closer = Closer()
    sup.track("10.0.0.7", closer)
    node.allowed.add("10.0.0.7")
    node.ban("10.0.0.0/24")
    assert closer.calls == 0 and len(sup) == 1
    node.checks = 0
    node.ban("192.0.2.9")
    node.ban("192.0.2.0/24")
    assert node.checks == 0
    assert sup.statistics().bans_seen == 3


def test_refused_at_accept_and_unban_readmits() -> None:
    node = FakeNode()
    sup = Supervisor(node)
    node.ban("10.0.0.9")
    closer = Closer()
    conn = sup.track("10.0.0.9", closer)
    assert conn.refused and conn.cut and not conn.tracked and closer.calls == 1
    assert len(sup) == 0 and sup.statistics().refused == 1
    node.unban("10.0.0.9")
    again = sup.track("10.0.0.9", Closer())
    assert again.tracked
    assert sup.statistics().accepted == 1


def test_track_context_manager_and_non_ip_peers() -> None:
    node = FakeNode()
    sup = Supervisor(node)
    with sup.track("10.0.0.3", Closer()) as conn:
        assert conn.tracked and sup.connections("10.0.0.3") == [conn]
    assert conn.state == "untracked" and len(sup) == 0
    # Unix sockets and garbage are not protected (and never raise).
    for peer in ("", "/run/app.sock", "not-an-ip"):
        handle = sup.track(peer, Closer())
        assert handle.state == "ignored"
        handle.untrack()
    assert sup.statistics().ignored == 3
    node.ban("10.0.0.3")  # nothing tracked: no error


def test_ports_and_listener_filters() -> None:
    node = FakeNode()
    sup = Supervisor(node, ports={8080})
    a, b = Closer(), Closer()
    assert sup.track("10.0.0.4", a, port=8080).tracked
    assert sup.track("10.0.0.4", b, port=9090).state == "ignored"
    node.ban("10.0.0.4")
    assert (a.calls, b.calls) == (1, 0)
    sup.configure(ports=None, listeners={"smtp"})
    node.unban("10.0.0.4")
    assert sup.track("10.0.0.5", Closer(), listener="http").state == "ignored"
    assert sup.track("10.0.0.5", Closer(), listener="smtp").tracked
    with pytest.raises(ValueError, match="mode"):
        sup.configure(mode="explode")  # type: ignore[arg-type]


def test_closer_errors_and_reentrant_untrack() -> None:
    node = FakeNode()
    sup = Supervisor(node)
    conns = []

    def bad() -> None:
        raise RuntimeError("closer bug")

    def untracks() -> None:
        conns[-1].untrack()  # a closer that untracks (connection_lost style)

    sup.track("10.0.0.6", bad)
    conns.append(sup.track("10.0.0.6", untracks))
    seen = []
    sup.watch(seen.append)
    node.ban("10.0.0.6")  # logged, not raised
    assert len(seen) == 2 and len(sup) == 0 and sup.statistics().cut == 2


def test_recheck_scans_after_allow_lifted() -> None:
    node = FakeNode()
    sup = Supervisor(node)
    closer = Closer()
    sup.track("10.0.0.8", closer)
    node.allowed.add("10.0.0.8")
    node.ban("10.0.0.8")
    assert closer.calls == 0
    node.allowed.clear()
    assert sup.recheck() == 1 and closer.calls == 1
    assert sup.statistics().cut_recheck == 1


def test_many_distinct_addresses_stay_sorted() -> None:
    node = FakeNode()
    sup = Supervisor(node)
    handles = [sup.track(f"10.{i % 7}.{i % 13}.{i % 251}", Closer()) for i in range(3000)]
    for h in handles[::3]:
        h.untrack()
    keys = sup._v4.keys
    assert keys == sorted(set(keys)) and len(keys) == len(sup._v4.by_addr)
    node.ban("10.3.0.0/16")
    assert all(not c.peer.startswith("10.3.") for c in sup.connections())
    assert isinstance(sup.statistics(), SupervisorStatistics)
    sup.close()
    sup.close()
    assert node.listeners == []


# -- integration: real nodes, real sockets ---------------------------------------------------


@pytest.mark.anyio
async def test_streams_server_ban_from_other_node(
    two_nodes: Pair,
) -> None:
    a, b = two_nodes
    async with streams_server(b) as port:
        attacker = await HTTPClient.open("127.0.0.1", port, "127.0.0.5")
        bystander = await HTTPClient.open("127.0.0.1", port, "127.0.0.6")
        try:
            assert (await attacker.get("/.env"))[0] == 200
            assert (await bystander.get("/"))[0] == 200
            record = await a.ban("127.0.0.5", reason="scanner")
            await b.wait_for_seq(record.seq)
            # The idle keep-alive connection is cut: EOF/RST, no more requests.
            assert await attacker.wait_closed() == b""
            with pytest.raises(ConnectionGone):
                await attacker.get("/wp-login.php")
            # A new connection is refused; the neighbour is untouched.
            assert await refused("127.0.0.1", port, "127.0.0.5")
            assert (await bystander.get("/still-here"))[1] == b"ok /still-here"
            stats = b.supervisor.statistics()
            assert stats.cut_address == 1 and stats.refused == 1 and stats.tracked == 1
            # An unban lets the address back in.
            assert await a.unban("127.0.0.5")
            await sync_marker(a, b)
            again = await HTTPClient.open("127.0.0.1", port, "127.0.0.5")
            try:
                assert (await again.get("/"))[0] == 200
            finally:
                await again.aclose()
        finally:
            await attacker.aclose()
            await bystander.aclose()


@pytest.mark.anyio
async def test_streams_server_own_ban_from_handler(redis_url: str, namespace: str) -> None:
    """A handler that bans its own peer is not cancelled mid-ban; the ban propagates."""
    async with (
        banbus.Node(redis_url, namespace=namespace, node_id="a") as a,
        banbus.Node(redis_url, namespace=namespace, node_id="b") as b,
    ):
        records: list[banbus.BanRecord] = []
        done = anyio.Event()

        async def detector(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            peer = writer.get_extra_info("peername")[0]
            records.append(await a.ban(peer, reason="probe"))
            writer.close()
            done.set()

        async with streams_server(a, handler=detector) as port:
            client = await HTTPClient.open("127.0.0.1", port, "127.0.0.12")
            try:
                client.writer.write(b"GET /.env HTTP/1.1\r\nHost: x\r\n\r\n")
                assert await client.wait_closed() == b""
            finally:
                await client.aclose()
            with anyio.fail_after(10):
                await done.wait()  # the handler finishes its ban after the cut
        assert records[0].seq > 0
        await b.wait_for_seq(records[0].seq)
        assert b.is_banned("127.0.0.12")


@pytest.mark.anyio
async def test_cidr_ban_cuts_all_covered_peers(two_nodes: Pair) -> None:
    a, b = two_nodes
    async with streams_server(b) as port:
        inside = [await HTTPClient.open("127.0.0.1", port, f"127.0.0.{i}") for i in (17, 18, 30)]
        outside = await HTTPClient.open("127.0.0.1", port, "127.0.0.40")
        try:
            for client in [*inside, outside]:
                assert (await client.get("/"))[0] == 200
            record = await a.ban("127.0.0.16/28", reason="range")
            await b.wait_for_seq(record.seq)
            for client in inside:
                assert await client.wait_closed() == b""
            assert (await outside.get("/"))[0] == 200
            assert b.supervisor.statistics().cut_network == 3
            assert await refused("127.0.0.1", port, "127.0.0.20")
        finally:
            for client in [*inside, outside]:
                await client.aclose()


@pytest.mark.anyio
async def test_dual_stack_ipv6_and_mapped_peers(two_nodes: Pair) -> None:
    a, b = two_nodes
    async with streams_server(b, dual_stack=True) as port:
        v6 = await HTTPClient.open("::1", port, "::1")
        mapped = await HTTPClient.open("127.0.0.1", port, "127.0.0.21")
        other = await HTTPClient.open("127.0.0.1", port, "127.0.0.22")
        try:
            for client in (v6, mapped, other):
                assert (await client.get("/"))[0] == 200
            # The server sees ::ffff:127.0.0.21; the ban names plain IPv4.
            peers = {c.peer for c in b.supervisor.connections()}
            assert peers == {"::1", "127.0.0.21", "127.0.0.22"}
            record = await a.ban("127.0.0.21")
            await b.wait_for_seq(record.seq)
            assert await mapped.wait_closed() == b""
            record = await a.ban("::1")
            await b.wait_for_seq(record.seq)
            assert await v6.wait_closed() == b""
            assert (await other.get("/"))[0] == 200
            assert await refused("::1", port, "::1")
            assert await refused("127.0.0.1", port, "127.0.0.21")
        finally:
            for client in (v6, mapped, other):
                await client.aclose()


@pytest.mark.anyio
@pytest.mark.real_redis
async def test_ban_via_redis_cli_fcall(two_nodes: Pair, redis_url: str, namespace: str) -> None:
    _, b = two_nodes
    port_no = redis_url.rsplit(":", 1)[1].split("/")[0]
    async with streams_server(b) as port:
        client = await HTTPClient.open("127.0.0.1", port, "127.0.0.23")
        try:
            assert (await client.get("/"))[0] == 200
            result = await anyio.run_process(
                [
                    "redis-cli",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    port_no,
                    "FCALL",
                    "banbus_ban",
                    "1",
                    namespace,
                    "127.0.0.23",
                    "0",
                    "test",
                ]
            )
            seq = int(result.stdout.split()[0])
            await b.wait_for_seq(seq)
            assert await client.wait_closed() == b""
            assert await refused("127.0.0.1", port, "127.0.0.23")
        finally:
            await client.aclose()


@pytest.mark.anyio
async def test_graceful_close_mode_and_port_filter(
    two_nodes: Pair,
) -> None:
    a, b = two_nodes
    async with streams_server(b, mode="close") as port, streams_server(b) as other_port:
        b.supervisor.configure(ports={port})
        try:
            guarded = await HTTPClient.open("127.0.0.1", port, "127.0.0.24")
            unguarded = await HTTPClient.open("127.0.0.1", other_port, "127.0.0.24")
            try:
                assert (await guarded.get("/"))[0] == 200
                assert (await unguarded.get("/"))[0] == 200
                record = await a.ban("127.0.0.24")
                await b.wait_for_seq(record.seq)
                assert await guarded.wait_closed() == b""
                assert (await unguarded.get("/"))[0] == 200
            finally:
                await guarded.aclose()
                await unguarded.aclose()
        finally:
            b.supervisor.configure(ports=None)


class EchoProtocol(asyncio.Protocol):
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.log.append("made")

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.log.append("lost")


@pytest.mark.anyio
async def test_protocol_factory(two_nodes: Pair) -> None:
    a, b = two_nodes
    log: list[str] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        b.supervisor.protocol(lambda: EchoProtocol(log)), sock=listening_socket()
    )
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                       local_addr=("127.0.0.25", 0))  # fmt: skip
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        record = await a.ban("127.0.0.25")
        await b.wait_for_seq(record.seq)
        with anyio.fail_after(10):
            with pytest.raises(ConnectionResetError):
                while await reader.read(100):
                    pass
        writer.close()
        # Refused: the inner protocol never sees the connection.
        reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                       local_addr=("127.0.0.25", 0))  # fmt: skip
        with anyio.fail_after(10):
            with pytest.raises(ConnectionResetError):
                while await reader.read(100):
                    pass
        writer.close()
        assert log == ["made", "lost"]
        assert len(b.supervisor) == 0
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.anyio
async def test_anyio_listener(two_nodes: Pair) -> None:
    a, b = two_nodes
    finished: list[str] = []

    async def echo(stream: anyio.abc.SocketStream) -> None:
        peer = stream.extra(anyio.abc.SocketAttribute.remote_address)[0]
        try:
            async with stream:
                async for data in stream:
                    await stream.send(data)
        finally:
            finished.append(peer)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, b.protect(echo))
        attacker = await anyio.connect_tcp("127.0.0.1", port, local_host="127.0.0.26")
        bystander = await anyio.connect_tcp("127.0.0.1", port, local_host="127.0.0.27")
        async with attacker, bystander:
            for stream in (attacker, bystander):
                await stream.send(b"hi")
                assert await stream.receive() == b"hi"
            record = await a.ban("127.0.0.26")
            await b.wait_for_seq(record.seq)
            with (
                anyio.fail_after(10),
                pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)),
            ):
                await attacker.receive()
            await bystander.send(b"still")
            assert await bystander.receive() == b"still"
            # Refused at accept: the handler never runs.
            late = await anyio.connect_tcp("127.0.0.1", port, local_host="127.0.0.26")
            async with late:
                with (
                    anyio.fail_after(10),
                    pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)),
                ):
                    await late.receive()
        tg.cancel_scope.cancel()
    assert sorted(finished) == ["127.0.0.26", "127.0.0.27"]
    assert b.supervisor.statistics().refused == 1


@pytest.mark.anyio
async def test_generic_track_raw_socket(two_nodes: Pair) -> None:
    a, b = two_nodes
    server = listening_socket()
    server.setblocking(True)
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.28", 0))
    conn, peer = server.accept()
    try:
        with b.track(peer[0], conn.close) as handle:
            assert handle.tracked
            record = await a.ban("127.0.0.28")
            await b.wait_for_seq(record.seq)
            assert handle.cut and conn.fileno() == -1
        client.settimeout(10)
        assert client.recv(10) == b""
    finally:
        conn.close()
        client.close()
        server.close()


@pytest.mark.anyio
async def test_streams_handler_return_untracks(two_nodes: Pair) -> None:
    _, b = two_nodes
    protected = b.protect(http_handler)
    done = anyio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await protected(reader, writer)
        done.set()

    server = await asyncio.start_server(handler, sock=listening_socket())
    port = server.sockets[0].getsockname()[1]
    try:
        client = await HTTPClient.open("127.0.0.1", port, "127.0.0.29")
        assert (await client.get("/"))[0] == 200
        assert [c.peer for c in b.supervisor.connections()] == ["127.0.0.29"]
        await client.aclose()
        with anyio.fail_after(10):
            await done.wait()
        assert len(b.supervisor) == 0 and b.supervisor.statistics().accepted == 1
    finally:
        server.close()
        await server.wait_closed()
