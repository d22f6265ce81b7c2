"""``banbus.Node`` against real Redis: propagation, bootstrap, expiry, faults."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import anyio
import pytest
import redis.asyncio as aioredis
import redis.exceptions as redis_errors

import banbus
from banbus import (
    InvalidReason,
    InvalidTarget,
    InvalidTTL,
    Node,
    NodeClosed,
    UnsafeBan,
)
from banbus._cli import main

from ._helpers import (
    child_node,
    eventually,
    keys,
    nodes,
    reader_client,
    server_bans,
    server_seq,
    synced,
    xlen,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from anyio.abc import TaskStatus

    from banbus._servers import RedisProcess

pytestmark = pytest.mark.anyio


# -- propagation -----------------------------------------------------------------------------


async def test_ban_unban_allow_disallow_propagate(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    async with nodes(redis_url, namespace, 3) as (a, b, c):
        record = await a.ban("203.0.113.7", ttl=3600, reason="scanner")
        assert record.seq > 0
        assert record.target == "203.0.113.7"
        assert record.origin == "n0"
        await synced(record.seq, a, b, c)
        for node in (a, b, c):
            assert node.is_banned("203.0.113.7")
            assert not node.is_banned("203.0.113.8")
            found = node.lookup("203.0.113.7")
            assert found is not None
            assert (found.reason, found.origin, found.seq) == ("scanner", "n0", record.seq)
            assert found.expires == record.expires

        # A CIDR ban from another node, then an allow from a third: the allow wins.
        net = await b.ban("198.51.100.0/24", reason="range")
        allow = await c.allow("198.51.100.10", reason="partner")
        await synced(allow.seq, a, b, c)
        for node in (a, b, c):
            assert node.is_banned("198.51.100.9")
            assert not node.is_banned("198.51.100.10")
            assert node.is_allowed("198.51.100.10")
            assert {r.target for r in node.bans()} == {"203.0.113.7", "198.51.100.0/24"}
            assert [r.target for r in node.allows()] == ["198.51.100.10"]
        assert net.seq < allow.seq

        # Disallow from a, unban from c.
        assert await a.disallow("198.51.100.10")
        assert await c.unban("203.0.113.7")
        last = await b.unban("198.51.100.0/24")
        assert last
        # unban returns a bool; the server's seq is the sync point.
        seq = await server_seq(admin, namespace)
        await synced(seq, a, b, c)
        for node in (a, b, c):
            assert not node.is_banned("203.0.113.7")
            assert not node.is_banned("198.51.100.10")
            assert not node.is_banned("198.51.100.9")
            assert not node.is_allowed("198.51.100.10")
            assert list(node.bans()) == []
            stats = node.statistics()
            assert stats.last_seq == seq
            assert stats.events_skipped == 0
            assert stats.bans_active == 0
        # Own events came back and were recognised.
        assert a.statistics().own_events_confirmed >= 2
        assert b.statistics().own_events_confirmed >= 2


async def test_unban_of_unknown_target_is_remembered(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    """Removing what is not there answers False, yet leaves an event and a tombstone.

    The tombstone is what makes an operator's unban right after a data loss
    win over the re-seed (issue 7, item 7); the event makes any node that
    still held the target drop it.
    """
    async with nodes(redis_url, namespace, 1) as (a,):
        before = await xlen(admin, namespace)
        assert await a.unban("192.0.2.77") is False
        assert await a.disallow("192.0.2.0/24") is False
        assert await xlen(admin, namespace) == before + 2
        tombstones = await admin.zrange(keys(namespace).removed, 0, -1)
        assert set(tombstones) == {"b 192.0.2.77", "a 192.0.2.0/24"}
        assert await server_bans(admin, namespace) == set()


async def test_allowlist_wins_across_nodes(redis_url: str, namespace: str) -> None:
    async with nodes(redis_url, namespace, 3) as (a, b, c):
        await a.allow("10.1.0.0/16", reason="office")
        record = await b.ban("10.1.2.3")
        wide = await c.ban("10.0.0.0/8")
        await synced(wide.seq, a, b, c)
        assert record.seq < wide.seq
        for node in (a, b, c):
            assert not node.is_banned("10.1.2.3")
            assert node.lookup("10.1.2.3") is None
            assert node.is_banned("10.2.0.1")


async def test_separate_processes(redis_url: str, namespace: str) -> None:
    """Nodes in three processes: a ban from any of them reaches the others."""
    async with AsyncExitStack() as stack:
        parent = await stack.enter_async_context(
            Node(redis_url, namespace=namespace, node_id="parent")
        )
        children = [
            await stack.enter_async_context(child_node(redis_url, namespace, f"child{i}"))
            for i in range(2)
        ]
        # Parent -> both children.
        record = await parent.ban("203.0.113.50", reason="from parent")
        for child in children:
            assert await child.ask(f"wait {record.seq} 203.0.113.50 203.0.113.51") == (
                "banned 203.0.113.50=1 203.0.113.51=0"
            )
        # Child 0 -> parent and child 1.
        reply = await children[0].ask("ban 2001:DB8::/48")
        seq = int(reply.split()[1])
        assert seq > record.seq
        await synced(seq, parent)
        assert parent.is_banned("2001:db8::1")
        assert await children[1].ask(f"wait {seq} 2001:db8::1 2001:db8:1::1") == (
            "banned 2001:db8::1=1 2001:db8:1::1=0"
        )
        stats = json.loads(await children[1].ask("stats"))
        assert stats["bans"] == ["2001:db8::/48", "203.0.113.50"]
        assert stats["events_skipped"] == 0


# -- bootstrap -------------------------------------------------------------------------------


def _bulk_targets(count: int) -> list[str]:
    """Exact IPv4, exact IPv6 and IPv4 /24 networks, *count* in all."""
    networks = [f"172.{16 + i // 256}.{i % 256}.0/24" for i in range(1000)]
    v6 = [f"2001:db8::{i:x}:1" for i in range(1000)]
    base = 0x0A000000
    v4 = [
        f"{(v >> 24) & 255}.{(v >> 16) & 255}.{(v >> 8) & 255}.{v & 255}"
        for v in range(base, base + count - 2000)
    ]
    return v4 + v6 + networks


async def _bulk_ban(url: str, namespace: str, targets: list[str]) -> int:
    """Ban *targets* through the function library (pipelined FCALLs); return the last seq."""
    client = aioredis.Redis.from_url(url)
    try:
        await banbus._library.ensure_library(client)
        last = 0
        for start in range(0, len(targets), 10_000):
            pipe = client.pipeline(transaction=False)
            for target in targets[start : start + 10_000]:
                pipe.fcall("banbus_ban", 1, namespace, target, 0, "bulk")
            replies = await pipe.execute()
            last = max(int(reply[0]) for reply in replies)
        return last
    finally:
        await client.aclose()


async def test_late_node_bootstraps_100k_bans(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    targets = _bulk_targets(100_000)
    last = await _bulk_ban(redis_url, namespace, targets)
    assert last == 100_000
    async with Node(redis_url, namespace=namespace, node_id="writer") as writer:
        # Writes keep landing while the late node bootstraps: it must still end exact.
        churned = anyio.Event()

        async def write_more() -> None:
            for i in range(300):
                await writer.ban(f"192.0.2.{i % 250}", reason="churn")
                await writer.unban(targets[i * 7])
            churned.set()

        start = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(write_more)
            async with Node(redis_url, namespace=namespace, node_id="late") as late:
                took = time.monotonic() - start
                with anyio.fail_after(30):
                    await churned.wait()
                await synced(await server_seq(admin, namespace), late)
                expected = await server_bans(admin, namespace)
                assert len(expected) == 100_000 - 300 + 250
                assert {r.target for r in late.bans()} == expected
                stats = late.statistics()
                assert stats.bans_active == len(expected)
                assert stats.networks_active == 1000
                assert stats.events_skipped == 0
                assert late.is_banned("10.0.3.232")
                assert not late.is_banned(targets[7])  # unbanned during the bootstrap
                assert late.is_banned("172.19.231.200")
                assert late.is_banned("2001:db8::3e7:1")
                assert late.is_banned("::ffff:10.1.0.0")
                assert not late.is_banned("10.1.134.160")  # one past the last bulk address
                assert not late.is_banned("172.19.232.1")
        assert took < 30


# -- expiry ----------------------------------------------------------------------------------


async def test_expiry_on_every_node_and_reban(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    async with nodes(redis_url, namespace, 3) as (a, b, c):
        exact = await a.ban("203.0.113.9", ttl=1, reason="short")
        net = await b.ban("198.51.100.0/24", ttl=1)
        v6 = await c.ban("2001:db8:9::/48", ttl=1)
        await synced(v6.seq, a, b, c)
        assert exact.expires > 0
        assert net.expires - exact.expires < 1000
        probes = ("203.0.113.9", "198.51.100.200", "2001:db8:9::1", "::ffff:203.0.113.9")
        for node in (a, b, c):
            assert all(node.is_banned(ip) for ip in probes)

        def all_expired() -> bool:
            return not any(node.is_banned(ip) for node in (a, b, c) for ip in probes)

        waited = await eventually(all_expired, 3.0, "bans expire on every node")
        assert waited < 3.0
        # Expiry is by the server clock, not by the arrival of an event.
        state = await admin.fcall_ro("banbus_state", 1, namespace)  # type: ignore[misc]
        assert int(state[3]) >= exact.expires
        for node in (a, b, c):
            assert node.lookup("203.0.113.9") is None
            assert list(node.bans()) == []

        # Re-ban after expiry: a fresh, permanent ban applies everywhere again.
        again = await c.ban("203.0.113.9", reason="again")
        net_again = await a.ban("198.51.100.0/24", ttl=3600)
        await synced(net_again.seq, a, b, c)
        assert again.expires == 0
        for node in (a, b, c):
            assert node.is_banned("203.0.113.9")
            assert node.is_banned("198.51.100.1")
            found = node.lookup("203.0.113.9")
            assert found is not None
            assert found.reason == "again"
        # The sweep reclaims the expired IPv6 network everywhere.
        await eventually(
            lambda: all(node.statistics().bans_active == 2 for node in (a, b, c)),
            3.0,
            "expired bans reclaimed",
        )


async def test_ban_extension_keeps_the_later_expiry(redis_url: str, namespace: str) -> None:
    async with nodes(redis_url, namespace, 2) as (a, b):
        long = await a.ban("203.0.113.20", ttl=3600)
        short = await b.ban("203.0.113.20", ttl=1)
        await synced(short.seq, a, b)
        assert short.expires == long.expires
        for node in (a, b):
            found = node.lookup("203.0.113.20")
            assert found is not None
            assert found.expires == long.expires
        exact = await b.ban("203.0.113.20", ttl=60, replace=True)
        await synced(exact.seq, a, b)
        assert exact.expires < long.expires
        for node in (a, b):
            found = node.lookup("203.0.113.20")
            assert found is not None
            assert found.expires == exact.expires


# -- canonical targets -----------------------------------------------------------------------


async def test_mapped_and_ipv6_canonicalisation(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    async with nodes(redis_url, namespace, 3) as (a, b, c):
        mapped = await a.ban("::ffff:203.0.113.7")
        assert mapped.target == "203.0.113.7"
        v6 = await b.ban("2001:0DB8:0000:0000:0000:0000:0000:0001")
        assert v6.target == "2001:db8::1"
        mapped_net = await c.ban("::ffff:198.51.100.0/120")
        assert mapped_net.target == "198.51.100.0/24"
        await synced(mapped_net.seq, a, b, c)
        assert await server_bans(admin, namespace) == {
            "203.0.113.7",
            "2001:db8::1",
            "198.51.100.0/24",
        }
        for node in (a, b, c):
            for ip in ("203.0.113.7", "::ffff:203.0.113.7", "::FFFF:CB00:7107"):
                assert node.is_banned(ip), (node, ip)
            for ip in ("2001:db8::1", "2001:DB8::1", "2001:db8:0::0:1", "2001:db8::1%eth0"):
                assert node.is_banned(ip), (node, ip)
            assert node.is_banned("::ffff:198.51.100.7")
            assert node.is_banned("198.51.100.7")
            assert not node.is_banned("2001:db8::2")
            found = node.lookup("::ffff:203.0.113.7")
            assert found is not None
            assert found.target == "203.0.113.7"
        # Unban through another spelling of the same address.
        assert await c.unban("::ffff:203.0.113.7")
        assert await a.unban("2001:db8:0:0::1")
        await synced(await server_seq(admin, namespace), a, b, c)
        for node in (a, b, c):
            assert not node.is_banned("203.0.113.7")
            assert not node.is_banned("2001:db8::1")


async def test_cidr_matching(redis_url: str, namespace: str, admin: aioredis.Redis) -> None:
    async with nodes(redis_url, namespace, 3) as (a, b, c):
        await a.ban("198.51.100.0/24")
        await a.ban("10.0.0.0/8")
        await b.ban("192.0.2.128/25")
        await b.ban("2001:db8::/32")
        last = await c.ban("2001:db8:ffff:1::/64")
        await synced(last.seq, a, b, c)
        banned = [
            "198.51.100.0",
            "198.51.100.255",
            "10.255.0.1",
            "192.0.2.128",
            "192.0.2.255",
            "2001:db8::5",
            "2001:db8:ffff:1::5",
            "::ffff:10.9.9.9",
        ]
        free = [
            "198.51.101.0",
            "11.0.0.0",
            "9.255.255.255",
            "192.0.2.127",
            "2001:db9::1",
            "2001:db7:ffff::1",
        ]
        for node in (a, b, c):
            assert all(node.is_banned(ip) for ip in banned), node
            assert not any(node.is_banned(ip) for ip in free), node
            assert node.statistics().networks_active == 5
            found = node.lookup("2001:db8:ffff:1::5")
            assert found is not None
            assert found.target == "2001:db8:ffff:1::/64"  # the most specific
        await c.unban("2001:db8::/32")
        record = await a.unban("10.0.0.0/8")
        assert record
        await synced(await server_seq(admin, namespace), a, b, c)
        for node in (a, b, c):
            assert not node.is_banned("10.255.0.1")
            assert not node.is_banned("2001:db8::5")
            assert node.is_banned("2001:db8:ffff:1::5")


async def test_redis_cli_fcall_reaches_every_node(
    redis_server: Any, namespace: str, admin: aioredis.Redis
) -> None:
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.skip("no redis-cli on PATH")
    url = redis_server.url
    async with nodes(url, namespace, 3) as (a, b, c):
        base = [cli, "-h", redis_server.host, "-p", str(redis_server.port)]
        ban = await anyio.run_process(
            [
                *base,
                "FCALL",
                "banbus_ban",
                "1",
                namespace,
                "::ffff:203.0.113.77",
                "3600",
                "scanner",
            ]
        )
        seq = int(ban.stdout.split()[0])
        await synced(seq, a, b, c)
        for node in (a, b, c):
            found = node.lookup("203.0.113.77")
            assert found is not None
            assert (found.reason, found.origin) == ("scanner", "fcall")
        await anyio.run_process([*base, "FCALL", "banbus_unban", "1", namespace, "203.0.113.77"])
        await synced(seq + 1, a, b, c)
        assert not any(node.is_banned("203.0.113.77") for node in (a, b, c))


# -- malformed and unsafe input ----------------------------------------------------------------


async def test_malformed_stream_entries_are_skipped(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    log = keys(namespace).log
    async with nodes(redis_url, namespace, 2) as (a, b):
        first = await a.ban("192.0.2.1")
        await synced(first.seq, a, b)
        nxt = str(first.seq + 1)
        garbage = [
            {"op": "explode", "target": "192.0.2.2", "seq": nxt},
            {"op": "ban", "seq": nxt},
            {"op": "ban", "target": "0.0.0.0/0", "expires": "0", "seq": nxt},
            {"op": "ban", "target": "192.0.2.3", "reason": "x" * 100_000, "seq": nxt},
            {"op": "ban", "target": "192.0.2.4", "expires": "0", "origin": "evil"},
            {"op": "ban", "target": "not-an-ip", "seq": nxt},
            {"op": "ban", "target": "192.0.2.5", "expires": "-5", "seq": nxt},
            # inet_pton raises ValueError (not OSError) on an embedded NUL.
            {"op": "ban", "target": "192.0.2.6\x00", "expires": "0", "seq": nxt},
        ]
        for fields in garbage:
            await admin.xadd(log, fields)  # type: ignore[arg-type]
        record = await b.ban("192.0.2.9", reason="after the garbage")
        assert record.seq == first.seq + 1
        await synced(record.seq, a, b)
        for node in (a, b):
            assert node.is_banned("192.0.2.9")
            for ip in ("192.0.2.2", "192.0.2.3", "192.0.2.4", "192.0.2.5", "192.0.2.6",
                       "192.0.2.6\x00", "8.8.8.8"):  # fmt: skip
                assert not node.is_banned(ip), (node, ip)
            stats = node.statistics()
            assert stats.events_skipped == len(garbage)
            assert stats.resyncs == 0
            assert stats.last_seq == record.seq
        # The reader goes on: later events still arrive.
        later = await a.ban("192.0.2.10")
        await synced(later.seq, b)
        assert b.is_banned("192.0.2.10")


UNSAFE: list[tuple[dict[str, Any], type[Exception]]] = [
    ({"target": "0.0.0.0/0"}, UnsafeBan),
    ({"target": "0.0.0.0/0", "force": True}, UnsafeBan),
    ({"target": "::/0", "force": True}, UnsafeBan),
    ({"target": "::ffff:0:0/96", "force": True}, UnsafeBan),
    ({"target": "10.0.0.0/7"}, UnsafeBan),
    ({"target": "2001:db8::/31"}, UnsafeBan),
    ({"target": "banana"}, InvalidTarget),
    ({"target": "10.0.0.1/8"}, InvalidTarget),
    ({"target": "fe80::1%eth0"}, InvalidTarget),
    ({"target": "203.0.113.7", "ttl": -1}, InvalidTTL),
    ({"target": "203.0.113.7", "ttl": "forever and a day"}, InvalidTTL),
    ({"target": "203.0.113.7", "ttl": 10**12}, InvalidTTL),
    ({"target": "203.0.113.7", "ttl": 1.5}, InvalidTTL),
    ({"target": "203.0.113.7", "reason": "x" * 513}, InvalidReason),
    ({"target": "203.0.113.7", "reason": "line\nbreak"}, InvalidReason),
]


async def test_unsafe_input_refused_by_the_python_api(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    async with nodes(redis_url, namespace, 2) as (a, b):
        before = await xlen(admin, namespace)
        for kwargs, error in UNSAFE:
            for method in (a.ban, a.allow):
                with pytest.raises(error):
                    await method(**kwargs)
        for target in ("banana", "0.0.0.0/0x", "10.0.0.1/8"):
            with pytest.raises(InvalidTarget):
                await a.unban(target)
            with pytest.raises(InvalidTarget):
                await a.disallow(target)
        assert await xlen(admin, namespace) == before
        assert await server_bans(admin, namespace) == set()
        for node in (a, b):
            assert list(node.bans()) == []
            assert list(node.allows()) == []
            assert not node.is_banned("203.0.113.7")
            assert not node.is_banned("10.0.0.1")
            assert node.statistics().outbox_pending == 0
        # A wide prefix is accepted when forced, on every node.
        record = await a.ban("10.0.0.0/7", force=True)
        await synced(record.seq, a, b)
        assert b.is_banned("11.1.1.1")


async def test_min_prefix_is_configurable(redis_url: str, namespace: str) -> None:
    async with nodes(redis_url, namespace, 1, min_prefix_v4=24) as (a,):
        with pytest.raises(UnsafeBan, match="/24"):
            await a.ban("198.51.0.0/16")
        assert not a.is_banned("198.51.1.1")
        record = await a.ban("198.51.0.0/16", force=True)
        assert record.seq > 0


@pytest.mark.parametrize(
    "args",
    [
        ["0.0.0.0/0", "0", ""],
        ["0.0.0.0/0", "0", "", "FORCE"],
        ["::/0", "0", "", "FORCE"],
        ["10.0.0.0/7", "0", ""],
        ["banana", "0", ""],
        ["10.0.0.1/8", "0", ""],
        ["203.0.113.7", "-1", ""],
        ["203.0.113.7", "1.5", ""],
        ["203.0.113.7", "999999999999", ""],
        ["203.0.113.7", "0", "x" * 513],
        ["203.0.113.7", "0", "line\nbreak"],
        ["203.0.113.7"],
        ["203.0.113.7", "0", "", "BOGUS"],
    ],
)
async def test_unsafe_input_refused_by_fcall(
    redis_url: str, namespace: str, admin: aioredis.Redis, args: list[str]
) -> None:
    async with nodes(redis_url, namespace, 1) as (a,):
        before = await xlen(admin, namespace)
        for function in ("banbus_ban", "banbus_allow"):
            with pytest.raises(redis_errors.ResponseError, match=r"^BANBUS_(INVALID|UNSAFE) "):
                await admin.fcall(function, 1, namespace, *args)  # type: ignore[misc]
        assert await xlen(admin, namespace) == before
        assert await admin.hlen(keys(namespace).bans) == 0
        assert await admin.hlen(keys(namespace).allow) == 0
        assert list(a.bans()) == []


# -- faults: reconnect, resync, outbox ---------------------------------------------------------


@pytest.mark.real_redis  # fakeredis has no CLIENT KILL
@pytest.mark.parametrize("how", ["id", "type-normal"])
async def test_reader_reconnects_after_client_kill(
    redis_url: str, namespace: str, admin: aioredis.Redis, how: str
) -> None:
    async with nodes(redis_url, namespace, 3) as (a, b, c):
        victim = await reader_client(admin, b)
        assert victim is not None
        if how == "id":
            killed = await admin.client_kill_filter(_id=victim["id"])
            assert killed == 1
        else:
            killed = await admin.execute_command("CLIENT", "KILL", "TYPE", "normal")
            assert int(killed) >= 3  # every reader (and the nodes' write connections)
        record = await a.ban("203.0.113.99", reason="after the kill")
        seq = record.seq
        if how == "id":
            assert seq > 0  # the write path was not touched: published at once
        elif seq == 0:
            # The write connection was killed too: the ban waits in the outbox,
            # which publishes it as soon as the reader is back.
            await eventually(lambda: a.statistics().outbox_pending == 0, 5.0, "outbox published")
            seq = await server_seq(admin, namespace)
        await synced(seq, a, b, c)
        assert b.is_banned("203.0.113.99")
        assert c.is_banned("203.0.113.99")
        assert b.statistics().reconnects >= 1
        if how == "type-normal":
            assert a.statistics().reconnects >= 1
            assert c.statistics().reconnects >= 1
        # The new reader connection has its name again.
        fresh = await reader_client(admin, b)
        assert fresh is not None
        assert fresh["id"] != victim["id"]
        assert b.statistics().connected


async def test_resync_after_the_stream_was_trimmed_past_a_node(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    """A node that could not read (process stopped) while the log was trimmed resyncs."""
    log = keys(namespace).log
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(Node(redis_url, namespace=namespace, node_id="a"))
        child = await stack.enter_async_context(child_node(redis_url, namespace, "stopped"))
        first = await a.ban("192.0.2.1")
        assert await child.ask(f"wait {first.seq} 192.0.2.1") == "banned 192.0.2.1=1"
        os.kill(child.process.pid, signal.SIGSTOP)
        try:
            for i in range(2, 12):
                await a.ban(f"192.0.2.{i}")
            await a.unban("192.0.2.1")
            assert await admin.xtrim(log, maxlen=0, approximate=False) > 0
            await a.ban("198.51.100.0/24")
            last = await a.ban("192.0.2.200")
        finally:
            os.kill(child.process.pid, signal.SIGCONT)
        reply = await child.ask(f"wait {last.seq} 192.0.2.1 192.0.2.5 198.51.100.1 192.0.2.200")
        assert reply == "banned 192.0.2.1=0 192.0.2.5=1 198.51.100.1=1 192.0.2.200=1"
        stats = json.loads(await child.ask("stats"))
        assert stats["resyncs"] >= 1
        assert stats["last_seq"] == last.seq
        assert set(stats["bans"]) == await server_bans(admin, namespace)
        assert len(stats["bans"]) == 12


async def test_resync_after_the_namespace_was_wiped(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    async with nodes(redis_url, namespace, 3, block_ms=200, reseed=False) as (a, b, c):
        for i in range(5):
            record = await a.ban(f"192.0.2.{i}")
        await b.allow("192.0.2.4")
        await synced(record.seq + 1, a, b, c)
        old_seq = record.seq + 1
        # Wipe everything the namespace owns (as FLUSHALL or a new server would).
        found = [k async for k in admin.scan_iter(match="{" + namespace + "}*")]
        assert keys(namespace).epoch in found
        await admin.delete(*found)
        # The idle check notices the reset without any new event.
        await eventually(
            lambda: all(not n.is_banned("192.0.2.0") for n in (a, b, c)), 5.0, "wipe noticed"
        )
        # New writes (more than before, so their seqs pass the old ones) converge.
        for i in range(old_seq + 2):
            record = await c.ban(f"198.51.100.{i}")
        await synced(record.seq, a, b, c)
        expected = await server_bans(admin, namespace)
        assert len(expected) == old_seq + 2
        for node in (a, b, c):
            assert {r.target for r in node.bans()} == expected
            assert list(node.allows()) == []
            assert node.statistics().resyncs >= 1
            assert not node.is_banned("192.0.2.1")
            assert node.is_banned("198.51.100.0")


async def test_connection_lost_during_a_resync(
    redis_url: str, namespace: str, admin: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resync that fails half-way reconnects and resyncs again; the node lives on."""
    import banbus._reader as reader_module

    async with nodes(redis_url, namespace, 1, block_ms=100, backoff=(0.01, 0.05), reseed=False) as (
        b,
    ):
        record = await b.ban("192.0.2.1")
        await synced(record.seq, b)
        real_take = reader_module.take
        attempts: list[int] = []

        async def flaky_take(*args: Any, **kwargs: Any) -> Any:
            attempts.append(1)
            if len(attempts) == 1:
                raise ConnectionError("injected: connection lost during the resync")
            return await real_take(*args, **kwargs)

        monkeypatch.setattr(reader_module, "take", flaky_take)
        found = [k async for k in admin.scan_iter(match="{" + namespace + "}*")]
        await admin.delete(*found)
        await eventually(lambda: b.statistics().resyncs >= 1, 5.0, "resync after the wipe")
        assert len(attempts) >= 2
        assert b.statistics().reconnects >= 1
        assert b.statistics().losses >= 1  # the wipe was seen as a loss...
        assert not b.is_banned("192.0.2.1")  # ...and not re-seeded (reseed=False)
        again = await b.ban("192.0.2.2")
        await synced(again.seq, b)
        assert b.is_banned("192.0.2.2")
        assert {r.target for r in b.bans()} == {"192.0.2.2"}


@pytest.mark.real_redis
async def test_reader_survives_a_refused_reconnect(
    redis_factory: Callable[..., RedisProcess], namespace: str
) -> None:
    """The server refusing the reader (password rotated) is retried, not fatal."""
    proc = redis_factory()
    admin = aioredis.Redis.from_url(proc.url, decode_responses=True)
    try:
        await admin.config_set("requirepass", "one")  # this connection stays authenticated
        url = f"redis://:one@{proc.host}:{proc.port}/0"
        async with nodes(url, namespace, 2, backoff=(0.01, 0.05)) as (a, b):
            await admin.config_set("requirepass", "two")
            victim = await reader_client(admin, b)
            assert victim is not None
            denied = int((await admin.info("stats"))["total_error_replies"])
            await admin.client_kill_filter(_id=victim["id"])
            # b cannot log in again; it keeps retrying and the body is not cancelled.
            await eventually(lambda: b.statistics().reconnects >= 1, 5.0, "reader lost")
            with anyio.fail_after(5):  # several refused logins (the state under test)
                while int((await admin.info("stats"))["total_error_replies"]) < denied + 3:
                    await anyio.sleep(0.01)
            assert not b.statistics().connected
            await admin.config_set("requirepass", "one")
            record = await a.ban("203.0.113.31")  # a's write connection is still logged in
            assert record.seq > 0
            await synced(record.seq, b)
            assert b.is_banned("203.0.113.31")
            assert b.statistics().connected
    finally:
        await admin.aclose()


@pytest.mark.real_redis
@pytest.mark.slow
async def test_outbox_publishes_bans_made_while_redis_was_down(
    redis_factory: Callable[..., RedisProcess], namespace: str
) -> None:
    proc = redis_factory()
    async with nodes(proc.url, namespace, 2, backoff=(0.02, 0.2)) as (a, b):
        warmup = await a.ban("192.0.2.1")
        await synced(warmup.seq, a, b)
        proc.stop()
        with anyio.fail_after(5):
            record = await a.ban("203.0.113.66", ttl=3600, reason="offline")
        assert record.seq == 0  # not published yet
        assert a.is_banned("203.0.113.66")  # but enforced here at once
        assert a.statistics().outbox_pending == 1
        assert not b.is_banned("203.0.113.66")
        proc.start()  # same port, empty: no data, no functions
        await eventually(
            lambda: b.is_banned("203.0.113.66"), 10.0, "outbox ban reaches the other node"
        )
        assert a.statistics().outbox_pending == 0
        assert a.is_banned("203.0.113.66")
        found = b.lookup("203.0.113.66")
        assert found is not None
        assert (found.reason, found.origin) == ("offline", "n0")
        assert found.expires == pytest.approx(record.expires, abs=2000)
        client = aioredis.Redis.from_url(proc.url, decode_responses=True)
        try:
            assert "203.0.113.66" in await server_bans(client, namespace)
        finally:
            await client.aclose()
        # The nodes are fully back: a new ban propagates by seq.
        again = await b.ban("203.0.113.67")
        assert again.seq > 0
        await synced(again.seq, a, b)
        assert a.is_banned("203.0.113.67")


@pytest.mark.real_redis
async def test_expiry_while_redis_is_down(
    redis_factory: Callable[..., RedisProcess], namespace: str
) -> None:
    proc = redis_factory()
    async with nodes(proc.url, namespace, 2, backoff=(0.05, 0.2)) as (a, b):
        record = await a.ban("203.0.113.44", ttl=1)
        permanent = await a.ban("203.0.113.45")
        await synced(permanent.seq, a, b)
        assert record.expires > 0
        proc.stop()
        # No server, no events: each node expires the ban on its own clock.
        await eventually(
            lambda: not a.is_banned("203.0.113.44") and not b.is_banned("203.0.113.44"),
            3.0,
            "expiry without Redis",
        )
        assert a.is_banned("203.0.113.45")
        assert b.is_banned("203.0.113.45")
        assert not b.statistics().connected


@pytest.mark.real_redis
async def test_write_refused_by_the_server_does_not_diverge(
    redis_factory: Callable[..., RedisProcess], namespace: str
) -> None:
    proc = redis_factory()
    admin = aioredis.Redis.from_url(proc.url)
    try:
        async with nodes(proc.url, namespace, 2) as (a, b):
            await admin.config_set("maxmemory", "1")  # every write: OOM
            # "Not now", not "no": enforced here, queued, retried with its event id.
            queued = await a.ban("203.0.113.7")
            assert queued.seq == 0
            assert a.is_banned("203.0.113.7")
            assert a.statistics().outbox_pending == 1
            await admin.config_set("maxmemory", "0")
            # The outbox retries on a capped backoff; wait for the effect.
            with anyio.fail_after(10):
                while not b.is_banned("203.0.113.7"):
                    await anyio.sleep(0.01)
            assert a.statistics().outbox_pending == 0
            assert await admin.xlen(f"{{{namespace}}}:log") == 1
    finally:
        await admin.aclose()


async def test_own_ban_applies_before_the_round_trip(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    async with nodes(redis_url, namespace, 2) as (a, b):
        done = anyio.Event()
        records: list[banbus.BanRecord] = []

        async def ban() -> None:
            records.append(await a.ban("203.0.113.5", reason="now"))
            done.set()

        # Hold every write on the server: the FCALL cannot complete.
        await admin.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(ban)
                with anyio.fail_after(2):
                    while not a.is_banned("203.0.113.5"):
                        await anyio.sleep(0)
                assert not done.is_set()  # enforced here while the write is in flight
                assert not b.is_banned("203.0.113.5")
                found = a.lookup("203.0.113.5")
                assert found is not None
                assert (found.reason, found.seq) == ("now", 0)
                await admin.execute_command("CLIENT", "UNPAUSE")
        finally:
            await admin.execute_command("CLIENT", "UNPAUSE")
        (record,) = records
        assert record.seq > 0
        await synced(record.seq, a, b)
        assert b.is_banned("203.0.113.5")
        assert a.statistics().own_events_confirmed == 1


# -- lifecycle -------------------------------------------------------------------------------


async def _pump(url: str, namespace: str, stop: anyio.Event, count: list[int]) -> None:
    """Write bans as fast as pipelines go until *stop* is set."""
    client = aioredis.Redis.from_url(url)
    try:
        await banbus._library.ensure_library(client)
        n = 0
        while not stop.is_set():
            pipe = client.pipeline(transaction=False)
            for _ in range(500):
                n += 1
                ip = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
                pipe.fcall("banbus_ban", 1, namespace, ip, 0, "load")
            await pipe.execute()
            count[0] = n
    finally:
        await client.aclose()


@pytest.mark.parametrize("how", ["aclose", "cancel"])
async def test_shutdown_under_load(
    redis_url: str, namespace: str, admin: aioredis.Redis, how: str
) -> None:
    stop = anyio.Event()
    written = [0]
    connections = len(await admin.client_list())
    with anyio.fail_after(30):
        async with anyio.create_task_group() as outer:
            node = Node(redis_url, namespace=namespace, node_id="victim", batch_size=100)
            if how == "aclose":
                await node.__aenter__()
                outer.start_soon(_pump, redis_url, namespace, stop, written)
                await node.wait_for_seq(3000)
                assert node.is_banned("10.0.1.1")
                start = time.monotonic()
                await node.aclose()
                assert time.monotonic() - start < 5
            else:

                async def run(*, task_status: TaskStatus[None]) -> None:
                    async with node:
                        task_status.started()
                        await anyio.sleep_forever()

                start = time.monotonic()
                async with anyio.create_task_group() as tg:
                    await tg.start(run)
                    outer.start_soon(_pump, redis_url, namespace, stop, written)
                    await node.wait_for_seq(3000)
                    assert node.is_banned("10.0.1.1")
                    start = time.monotonic()
                    tg.cancel_scope.cancel()
                assert time.monotonic() - start < 5
            assert written[0] > 0
            # The node is closed while events still stream in; the pump goes on.
            with pytest.raises(NodeClosed):
                await node.ban("203.0.113.1")
            with pytest.raises(NodeClosed):
                await node.wait_for_seq(10**9)
            assert not node.statistics().connected
            seen = written[0]
            with anyio.fail_after(10):
                while written[0] == seen:
                    await anyio.sleep(0.01)
            stop.set()
    # Every connection it opened (reader and writes) is closed, cancelled or not.
    assert await reader_client(admin, node) is None
    with anyio.fail_after(5):
        while len(await admin.client_list()) > connections:
            await anyio.sleep(0.01)


async def test_waiters_are_released_on_close(redis_url: str, namespace: str) -> None:
    errors: list[BaseException] = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            async with Node(redis_url, namespace=namespace) as node:

                async def wait() -> None:
                    try:
                        await node.wait_for_seq(10**9)
                    except NodeClosed as exc:
                        errors.append(exc)

                tg.start_soon(wait)
                await anyio.wait_all_tasks_blocked()
                assert errors == []
    assert len(errors) == 1


async def test_node_with_an_existing_client(redis_url: str, namespace: str) -> None:
    for decode in (False, True):
        client = aioredis.Redis.from_url(redis_url, decode_responses=decode)
        try:
            async with (
                Node(client, namespace=namespace, node_id="given") as a,
                Node(redis_url, namespace=namespace, node_id="url") as b,
            ):
                record = await a.ban(f"::ffff:203.0.113.{10 + decode}", ttl="1h")
                assert record.target == f"203.0.113.{10 + decode}"
                assert isinstance(record.target, str)
                await synced(record.seq, a, b)
                assert b.is_banned(record.target)
                assert a.is_banned(record.target)
            # The node did not close a client it was handed.
            assert await client.ping()
        finally:
            await client.aclose()


async def test_node_outside_async_with(redis_url: str, namespace: str) -> None:
    node = Node(redis_url, namespace=namespace, node_id="idle")
    assert "new" in repr(node)
    with pytest.raises(NodeClosed, match="async with"):
        await node.ban("203.0.113.7")
    with pytest.raises(NodeClosed):
        await node.unban("203.0.113.7")
    with pytest.raises(NodeClosed):
        await node.wait_for_seq(1)
    assert not node.is_banned("203.0.113.7")
    async with node:
        assert "running" in repr(node)
        record = await node.ban("203.0.113.7")
        assert record.seq > 0
    assert "closed" in repr(node)
    for call in (node.ban("203.0.113.8"), node.allow("203.0.113.8"), node.disallow("1.2.3.4")):
        with pytest.raises(NodeClosed):
            await call
    with pytest.raises(NodeClosed):
        await node.__aenter__()
    await node.aclose()  # idempotent


async def test_bad_constructor_arguments() -> None:
    with pytest.raises(banbus.InvalidInput, match="namespace"):
        Node("redis://127.0.0.1:1/0", namespace="has space")
    with pytest.raises(banbus.InvalidInput, match="namespace"):
        Node("redis://127.0.0.1:1/0", namespace="{x}")
    with pytest.raises(InvalidReason, match="node id"):
        Node("redis://127.0.0.1:1/0", node_id="bad id")
    with pytest.raises(TypeError):
        Node(6379)  # type: ignore[arg-type]
    with pytest.raises(banbus.InvalidInput, match="URL"):
        async with Node("nosuchscheme://x"):
            pass


async def test_unreachable_redis_at_start() -> None:
    from banbus._servers import free_port

    node = Node(f"redis://127.0.0.1:{free_port()}/0", namespace="x")
    with anyio.fail_after(20), pytest.raises(banbus.RedisUnavailable):
        async with node:
            pass
    with pytest.raises(NodeClosed):
        await node.ban("203.0.113.7")


async def test_statistics_and_repr(redis_url: str, namespace: str) -> None:
    async with nodes(redis_url, namespace, 2) as (a, b):
        await a.ban("198.51.100.0/24")
        await a.allow("198.51.100.7")
        record = await a.ban("203.0.113.1")
        await synced(record.seq, a, b)
        stats = b.statistics()
        assert stats.node_id == "n1"
        assert stats.namespace == namespace
        assert stats.events_applied == 3
        assert stats.bans_active == 2
        assert stats.networks_active == 1
        assert stats.allows_active == 1
        assert stats.last_seq == record.seq
        assert stats.connected
        assert 0 <= stats.lag_ms <= stats.max_lag_ms < 5000
        with pytest.raises(AttributeError):
            stats.events_applied = 0  # type: ignore[misc]
        text = repr(b)
        assert "'n1'" in text
        assert namespace in text
        assert "bans=2" in text


async def test_write_refused_for_good_is_undone_locally(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    async with nodes(redis_url, namespace, 1) as (a,):
        await a.ban("203.0.113.8", reason="kept")
        # Corrupt the record's type: every later write fails with WRONGTYPE.
        await admin.delete(f"{{{namespace}}}:allow")
        await admin.set(f"{{{namespace}}}:allow", "not a hash")
        with pytest.raises(banbus.ServerError):
            await a.allow("203.0.113.8")
        assert a.is_banned("203.0.113.8")  # the allow was undone here too
        assert not a.is_allowed("203.0.113.8")
        assert a.statistics().outbox_pending == 0


async def test_bootstrap_finishes_under_sustained_writes(redis_url: str, namespace: str) -> None:
    """Catch-up stops at the stream head seen after the snapshot, not at a quiet stream."""
    stop = anyio.Event()
    count = [0]
    async with anyio.create_task_group() as tg:
        tg.start_soon(_pump, redis_url, namespace, stop, count)
        with anyio.fail_after(10):
            while count[0] < 2000:
                await anyio.sleep(0.01)
        try:
            # A tiny batch: the pump writes faster than this node reads.
            with anyio.fail_after(20):
                async with Node(redis_url, namespace=namespace, batch_size=5) as node:
                    assert node.statistics().last_seq >= 2000
        finally:
            stop.set()


@pytest.mark.real_redis
@pytest.mark.slow
async def test_outbox_keeps_the_order_of_writes(
    redis_factory: Callable[..., RedisProcess], namespace: str
) -> None:
    """A ban then its unban, both made while Redis is down, land in that order."""
    proc = redis_factory()
    async with nodes(proc.url, namespace, 2, backoff=(0.02, 0.2)) as (a, b):
        proc.stop()
        with anyio.fail_after(5):
            await a.ban("203.0.113.70", reason="first")
            await a.unban("203.0.113.70")
            await a.ban("203.0.113.71", reason="second")
        assert not a.is_banned("203.0.113.70")
        assert a.statistics().outbox_pending == 3
        proc.start()
        await eventually(lambda: b.is_banned("203.0.113.71"), 10.0, "last write arrives")
        assert not b.is_banned("203.0.113.70")  # the unban came after the ban
        assert not a.is_banned("203.0.113.70")
        client = aioredis.Redis.from_url(proc.url, decode_responses=True)
        try:
            ops = [fields["op"] for _id, fields in await client.xrange(f"{{{namespace}}}:log")]
            assert ops == ["ban", "unban", "ban"]
        finally:
            await client.aclose()


async def test_malformed_record_value_is_skipped_not_fatal(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    """A hand-edited hash value holding two JSON arrays must not break a page decode."""
    async with nodes(redis_url, namespace, 1) as (a,):
        await a.ban("10.0.0.1")
        await a.ban("10.0.0.2")
    await admin.hset(f"{{{namespace}}}:bans", "10.0.0.3", '[0,"x","y",1],[0,"x","y",2]')
    await admin.hset(f"{{{namespace}}}:bans", "0.0.0.0/0", '[0,"x","y",3]')
    await admin.hset(f"{{{namespace}}}:bans", "10.0.0.4\x00", '[0,"x","y",4]')
    # Past 2106-02-07: a compact cache's 32-bit seconds cannot hold it (it
    # crashed the compact bootstrap: OverflowError).
    await admin.hset(f"{{{namespace}}}:bans", "10.0.0.5", '[4294967296000,"x","y",5]')
    for mode in ("full", "compact", "bloom"):
        async with nodes(redis_url, namespace, 1, cache=mode) as (b,):
            assert b.is_banned("10.0.0.1") or await b.check("10.0.0.1")
            assert await b.check("10.0.0.2")
            assert not b.is_banned("10.0.0.3")
            assert not b.is_banned("10.0.0.4") and not b.is_banned("10.0.0.4\x00")
            assert not b.is_banned("8.8.8.8")  # the /0 record was refused
            assert not b.is_banned("10.0.0.5") and not await b.check("10.0.0.5")
            assert b.statistics().events_skipped == 4, mode


@pytest.mark.real_redis
@pytest.mark.slow
async def test_acknowledged_own_write_is_not_reapplied_after_resync(
    redis_factory: Callable[..., RedisProcess], namespace: str
) -> None:
    """An own ban published from the outbox, then lifted elsewhere, stays lifted."""
    proc = redis_factory()
    async with nodes(proc.url, namespace, 2, block_ms=300, backoff=(0.02, 0.2)) as (a, b):
        warmup = await a.ban("10.9.9.9")
        await synced(warmup.seq, a, b)
        proc.stop()  # Redis crashes and comes back empty
        await a.ban("10.0.0.7", reason="decided while down")
        proc.start()
        await eventually(
            lambda: a.statistics().outbox_pending == 0 and b.is_banned("10.0.0.7"),
            10.0,
            "outbox published",
        )
        record_seq = b.statistics().last_seq
        await synced(record_seq, a)
        lifted = await b.unban("10.0.0.7")
        assert lifted
        await eventually(lambda: not a.is_banned("10.0.0.7"), 5.0, "unban reaches a")
        resyncs = a.statistics().resyncs
        # Force another resync of a: wipe the namespace's epoch.
        client = aioredis.Redis.from_url(proc.url)
        try:
            await client.set(f"{{{namespace}}}:epoch", "reset")
        finally:
            await client.aclose()
        await eventually(lambda: a.statistics().resyncs > resyncs, 10.0, "a resyncs")
        assert not a.is_banned("10.0.0.7")
        assert a.statistics().writes_pending == 0


async def test_clear_on_purpose_is_not_reseeded(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    async with nodes(redis_url, namespace, 2, block_ms=200) as (a, b):
        record = await a.ban("192.0.2.1")
        await synced(record.seq, a, b)
        argv = ["--redis", redis_url, "-n", namespace, "clear", "--yes"]
        assert await anyio.to_thread.run_sync(main, argv) == 0
        await eventually(
            lambda: not a.is_banned("192.0.2.1") and not b.is_banned("192.0.2.1"),
            10.0,
            "clear reaches the nodes",
        )
        assert await server_bans(admin, namespace) == set()
        # The log keeps its history, and says what happened last.
        (_, last), *_ = await admin.xrevrange(f"{{{namespace}}}:log", count=1)
        assert last["op"] == "clear" and last["origin"].startswith("cli@")
        assert a.statistics().losses == 0 and b.statistics().losses == 0
        assert a.statistics().resyncs == 0 and b.statistics().resyncs == 0


def _bans_of(node: Node) -> list[str]:
    return [r.target for r in node.bans()]


async def test_compact_node_bootstraps_and_follows(redis_url: str, namespace: str) -> None:
    async with nodes(redis_url, namespace, 1) as (a,):
        await a.ban("203.0.113.7", ttl=3600, reason="scan")
        await a.ban("198.51.100.0/24")
        async with Node(redis_url, namespace=namespace, compact=True) as small:
            assert small.is_banned("203.0.113.7")
            assert small.is_banned("198.51.100.9")
            record = await a.ban("203.0.113.8")
            await small.wait_for_seq(record.seq)
            assert small.is_banned("203.0.113.8")
            assert len(small.cache._bans.store) == 2  # stored packed, not as records
            assert small.statistics().cache_mode == "compact"
            record = await a.unban("203.0.113.8")
            await eventually(lambda: not small.is_banned("203.0.113.8"), 5.0, "unban")


@pytest.mark.real_redis  # fakeredis refuses AUTH of the password-less default user
async def test_redis_py_reader_fallback(
    redis_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch, admin: aioredis.Redis
) -> None:
    """Clients banbus cannot dial itself (a credential provider) read via redis-py.

    The client speaks RESP3 (redis-py 8's default; ``XREAD`` then answers a
    dict): the fallback reader still reads normally, with no resync and no
    reconnect (issue 7, item 13).
    """
    from redis.credentials import UsernamePasswordCredentialProvider

    # The default user has no password: any password is accepted.
    provider = UsernamePasswordCredentialProvider("default", "from-a-provider")
    client = aioredis.Redis.from_url(redis_url, protocol=3, credential_provider=provider)
    async with (
        client,
        nodes(redis_url, namespace, 1) as (a,),
        Node(client, namespace=namespace, node_id="b", block_ms=200, check_interval=0.1) as b,
    ):
        assert b._topology.reader_target().address is None  # redis-py reads
        reader = await reader_client(admin, b)
        assert reader is not None and reader["resp"] == "2"
        record = await a.ban("203.0.113.7", reason="fallback")
        await synced(record.seq, b)
        assert b.is_banned("203.0.113.7")
        await a.unban("203.0.113.7")
        await eventually(lambda: not b.is_banned("203.0.113.7"), 5.0, "unban via fallback")
        # Idle reads time out, and digests are compared: let a few go by.
        await eventually(lambda: b.statistics().digest_checks >= 3, 10.0, "digest checks")
        stats = b.statistics()
        assert stats.connected
        assert (stats.resyncs, stats.reconnects) == (0, 0)
        assert stats.events_applied == 2


@pytest.mark.real_redis
async def test_outbox_keeps_replace(
    redis_factory: Callable[..., RedisProcess], namespace: str
) -> None:
    """A queued ban that shortens an expiry (replace=True) still shortens it when published."""
    proc = redis_factory()
    admin = aioredis.Redis.from_url(proc.url)
    try:
        async with nodes(proc.url, namespace, 2, backoff=(0.02, 0.2)) as (a, b):
            long = await a.ban("203.0.113.60", ttl=3600)
            await synced(long.seq, a, b)
            await admin.config_set("maxmemory", "1")  # writes refused for now: queued
            short = await a.ban("203.0.113.60", ttl=60, replace=True)
            assert short.seq == 0
            await admin.config_set("maxmemory", "0")
            await eventually(
                lambda: (
                    (found := b.lookup("203.0.113.60")) is not None
                    and found.expires < long.expires - 3_000_000
                ),
                10.0,
                "the shortened expiry reaches b",
            )
            assert a.statistics().writes_pending == 0
    finally:
        await admin.aclose()


class ManualClock:
    """A server clock that moves only when told (TTL tests without waiting)."""

    def __init__(self) -> None:
        self.ms = time.time_ns() // 1_000_000

    def __call__(self) -> int:
        return self.ms


async def test_ttl_with_an_injected_clock(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    """An hour-long ban expires when the node's clock says so: no real wait.

    The record keeps it (its clock has not moved); the anti-entropy leaves
    out what expires before its cutoff on both sides, so the skewed clock
    causes no reload.
    """
    clock = ManualClock()
    async with nodes(
        redis_url, namespace, 1, clock=clock, clock_interval=None, block_ms=100,
        check_interval=0.05,
    ) as (a,):  # fmt: skip
        hour = await a.ban("203.0.113.9", ttl=3600, reason="an hour")
        day = await a.ban("203.0.113.10", ttl=86400, reason="a day")
        await synced(day.seq, a)
        assert a.is_banned("203.0.113.9") and a.is_banned("203.0.113.10")
        clock.ms += 3601 * 1000
        assert not a.is_banned("203.0.113.9")  # at once: the hit checks the clock
        assert a.is_banned("203.0.113.10")
        await eventually(lambda: a.statistics().bans_active == 1, 5.0, "reclaimed by the sweep")
        checks = a.statistics().digest_checks
        await eventually(lambda: a.statistics().digest_checks >= checks + 3, 10.0, "checks")
        stats = a.statistics()
        assert (stats.resyncs, stats.digest_mismatches) == (0, 0)
        assert await admin.hexists(keys(namespace).bans, "203.0.113.9")  # Redis's clock: later
        assert hour.expires > 0
