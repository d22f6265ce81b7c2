"""Sentinel and Redis Cluster, with real processes (issue 8).

Every test starts its own servers on free loopback ports: a primary with a
replica and three Sentinels, or a cluster of three primaries with a replica
each.  Failovers are real (SIGKILL of the primary, Sentinel or cluster
election), slot moves are the ``CLUSTER SETSLOT`` / ``MIGRATE`` sequence.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from banbus import InvalidInput, Node
from banbus._keys import namespace_keys
from banbus._servers import RedisCluster, SentinelGroup, free_port
from banbus._topology import _healthy_replicas, open_topology

from ._helpers import assert_converged, eventually, keys, reloaded_after_loss, synced, until
from ._net import HTTPClient, streams_server
from ._proxy import Proxy
from .conftest import HAVE_REAL, NO_REAL_REASON

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

pytestmark = pytest.mark.anyio

OPTIONS: dict[str, Any] = {"backoff": (0.02, 0.5), "block_ms": 200, "topology_interval": 0.2}


@pytest.fixture
def sentinel_group() -> Iterator[SentinelGroup]:
    if not HAVE_REAL:
        pytest.skip(NO_REAL_REASON)
    with SentinelGroup() as group:
        yield group


@pytest.fixture
def cluster() -> Iterator[RedisCluster]:
    if not HAVE_REAL:
        pytest.skip(NO_REAL_REASON)
    with RedisCluster() as c:
        yield c


@contextlib.asynccontextmanager
async def client_of(port: int) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(port=port, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def assert_cut(writer: Node, watcher: Node, source: str) -> None:
    """A keep-alive connection from *source* to a server *watcher* protects is cut
    when *writer* bans *source*."""
    async with streams_server(watcher) as port:
        client = await HTTPClient.open("127.0.0.1", port, source)
        try:
            assert (await client.get("/"))[0] == 200
            record = await writer.ban(source, reason="cut")
            assert record.seq > 0
            await synced(record.seq, watcher)
            assert await client.wait_closed() == b""
        finally:
            await client.aclose()


async def burst(node: Node, prefix: str, count: int, halfway: anyio.Event, out: list[str]) -> None:
    """*count* bans one after the other; *halfway* is set in the middle."""
    for i in range(count):
        target = f"{prefix}.{i // 250}.{i % 250}"
        await node.ban(target, reason="burst")
        out.append(target)
        if i == count // 2:
            halfway.set()


async def cli(url: str, namespace: str, *args: str, status: int = 0) -> str:
    """``python -m banbus --redis URL ...`` (a separate process); its output."""
    done = await anyio.run_process(
        [sys.executable, "-m", "banbus", "--redis", url, "--namespace", namespace, *args],
        check=False,
    )
    assert done.returncode == status, done.stderr.decode()
    return done.stdout.decode()


async def answered(*members: Node) -> None:
    """Until every node has the fate of all its own writes."""
    await eventually(
        lambda: all(
            n.statistics().outbox_pending == 0 and n.statistics().writes_pending == 0
            for n in members
        ),
        30.0,
        "every write answered",
    )


# -- the connection model --------------------------------------------------------------


async def test_what_a_node_takes() -> None:
    """Every form of the argument, and clear errors for the wrong ones (nothing contacted)."""
    k = namespace_keys("t")
    t = open_topology("redis+sentinel://u:pw@h1:26379,h2/mymaster/3?sentinel_password=sp", k)
    assert t.kind == "sentinel" and t._service == "mymaster"
    assert t._kwargs["password"] == "pw" and t._kwargs["db"] == 3
    assert t._sentinel is not None
    assert [(c.connection_pool.connection_kwargs["host"], c.connection_pool.connection_kwargs[
        "port"]) for c in t._sentinel.sentinels] == [("h1", 26379), ("h2", 26379)]  # fmt: skip
    assert t._sentinel.sentinels[0].connection_pool.connection_kwargs["password"] == "sp"
    t = open_topology("rediss+sentinel://h1:5000/svc?ssl_cert_reqs=none", k)
    assert t._base.__name__ == "SSLConnection"
    assert t._sentinel is not None and t._sentinel.sentinel_kwargs["ssl"] is True
    t = open_topology("redis+cluster://a:7000,b:7001,[::1]:7002", k)
    assert t.kind == "cluster" and t._seeds == [("a", 7000), ("b", 7001), ("::1", 7002)]
    t = open_topology("redis://h:6380/2", k)
    assert (t.kind, t.primary, t._detect) == ("server", ("h", 6380), True)
    t = open_topology("unix:///run/redis.sock", k)
    assert t.kind == "server" and t.unix and not t._detect
    sentinel = aioredis.Sentinel([("h", 26379)])
    t = open_topology(sentinel.master_for("svc"), k)
    assert (t.kind, t._service) == ("sentinel", "svc")
    assert open_topology(sentinel, k, service="svc").kind == "sentinel"
    cluster_client = aioredis.RedisCluster(host="h", port=7000)
    t = open_topology(cluster_client, k)
    assert t.kind == "cluster" and ("h", 7000) in t._seeds
    for bad, message in (
        ("redis+sentinel://h1:26379", "no service name"),
        ("redis+sentinel://h1:26379/svc/x", "/<service>"),
        ("redis+cluster://h1:notaport", "invalid Redis URL"),
        ("redis://h:port", "invalid Redis URL"),
    ):
        with pytest.raises(InvalidInput, match=message):
            open_topology(bad, k)
    with pytest.raises(InvalidInput, match="service name"):
        open_topology(sentinel, k)
    with pytest.raises(InvalidInput, match="read_from"):
        open_topology("redis://h", k, read_from="nearest")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="redis must be"):
        Node(42)  # type: ignore[arg-type]


# -- Sentinel ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.real_redis
async def test_sentinel_failover_during_a_burst_loses_no_ban(
    sentinel_group: SentinelGroup, namespace: str
) -> None:
    """The primary is killed halfway through a burst of bans: the Sentinels promote the
    replica, every node follows, every ban is in the new primary's record, cuts work."""
    g = sentinel_group
    old = g.primary_port()
    async with (
        Node(g.url, namespace=namespace, node_id="a", **OPTIONS) as a,
        Node(g.url, namespace=namespace, node_id="b", **OPTIONS) as b,
    ):
        assert a.statistics().topology == "sentinel"
        assert a.statistics().primary == f"127.0.0.1:{old}"
        await assert_cut(a, b, "127.0.0.31")
        banned: list[str] = []
        halfway = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(burst, a, "10.7", 400, halfway, banned)
            await halfway.wait()
            g.server(old).stop()
        await answered(a, b)
        new = g.primary_port()
        assert new != old
        async with client_of(new) as admin:
            record = await assert_converged(admin, namespace, a, b)
        assert {target for kind, target in record if kind == "ban"} >= set(banned)
        for node in (a, b):
            stats = node.statistics()
            assert stats.primary == f"127.0.0.1:{new}"
            assert stats.topology_changes == 1
        # After the failover: the other way round.
        await assert_cut(b, a, "127.0.0.32")


@pytest.mark.slow
@pytest.mark.real_redis
async def test_sentinel_unreplicated_acknowledged_bans_are_restored(namespace: str) -> None:
    """Bans the primary acknowledged but never replicated are restored after the
    failover; a node reading from the replica sees the lag, then follows the promoted
    replica without missing or reordering an event."""
    if not HAVE_REAL:
        pytest.skip(NO_REAL_REASON)
    k = keys(namespace)
    primary_port = free_port()
    async with Proxy("127.0.0.1", primary_port, replica_source="127.0.0.9") as proxy:
        g = SentinelGroup(primary_port=primary_port, via=proxy.port)
        try:
            await anyio.to_thread.run_sync(g.start)
            async with (
                Node(g.url, namespace=namespace, node_id="a", **OPTIONS) as a,
                Node(g.url, namespace=namespace, node_id="b", **OPTIONS) as b,
                client_of(g.replicas[0].port) as replica,
            ):
                await until(lambda: _has_library(replica), 10.0, "the library replicated")
                async with Node(g.url, namespace=namespace, node_id="r",
                                read_from="replica", **OPTIONS) as r:  # fmt: skip
                    assert r.statistics().reading_from == f"127.0.0.1:{g.replicas[0].port}"
                    first = await a.ban("203.0.113.1", reason="replicated")
                    await synced(first.seq, a, b, r)
                    proxy.hold("replica", "down")  # the primary's writes stop reaching the replica
                    second = await a.ban("203.0.113.2", reason="acknowledged")
                    third = await b.ban("198.51.100.0/24", reason="acknowledged")
                    assert second.seq > 0 and third.seq > 0  # the primary took them
                    await synced(third.seq, a, b)
                    await eventually(lambda: r.statistics().read_lag_events == 2, 10.0, "lag seen")
                    assert not r.is_banned("203.0.113.2")
                    assert not await replica.hexists(k.bans, "203.0.113.2")  # really not replicated
                    applied_by_r = r.statistics().events_applied
                    g.primary.stop()
                    await until(lambda: _role_is_master(replica), 30.0, "the replica promoted")
                    promoted = f"127.0.0.1:{g.replicas[0].port}"
                    await eventually(
                        lambda: all(n.statistics().primary == promoted for n in (a, b, r)),
                        30.0,
                        "every node follows",
                    )
                    await answered(a, b)
                    await eventually(
                        lambda: (
                            all(n.statistics().reseed_pending == 0 for n in (a, b, r))
                            and r.is_banned("203.0.113.2")
                            and r.is_banned("198.51.100.7")
                        ),
                        30.0,
                        "restored",
                    )
                    # a and b had read events the new primary never got: each sees
                    # a loss when its reader reconnects (even once the other has put
                    # the bans back and the seqs match again: its last entry is not
                    # in the new stream), and they restore what is missing.
                    await eventually(
                        lambda: all(reloaded_after_loss(n) for n in (a, b)), 15.0, "losses seen"
                    )
                    record = await assert_converged(replica, namespace, a, b, r)
                    assert {("ban", "203.0.113.1"), ("ban", "203.0.113.2"),
                            ("ban", "198.51.100.0/24")} <= set(record)  # fmt: skip
                    sa, sb, sr = a.statistics(), b.statistics(), r.statistics()
                    assert sa.reseed_written + sb.reseed_written >= 2
                    # r read from the replica all along: no loss, no reload, no
                    # skipped entry — the restored bans reached it as new events.
                    assert (sr.losses, sr.resyncs, sr.events_skipped) == (0, 0, 0)
                    assert sr.events_applied >= applied_by_r + 2
                    for s in (sa, sb, sr):
                        assert s.topology_changes >= 1
                    # Sentinel lists the dead old primary as a replica of the new
                    # one at once: it is no place to read from.
                    assert sr.reading_from == promoted
                    assert sr.read_lag_events == 0  # it reads from the new primary
        finally:
            g.close()


def test_sentinel_replicas_read_from_only_when_their_link_is_up() -> None:
    """Right after a failover a Sentinel lists the old (dead) primary as a replica,
    not yet marked down; a replica reader must not be sent there."""

    def entry(port: int, flags: str, link: str) -> dict[str, Any]:
        state = {"ip": "127.0.0.1", "port": port, "master-link-status": link,
                 "is_sdown": "s_down" in flags, "is_odown": "o_down" in flags,
                 "is_disconnected": "disconnected" in flags}  # fmt: skip
        return state

    listed = [entry(1, "slave", "ok"), entry(2, "slave", "err"),
              entry(3, "s_down,slave", "ok"), entry(4, "slave,disconnected", "ok"),
              entry(5, "slave", "ok")]  # fmt: skip
    assert _healthy_replicas(listed) == [("127.0.0.1", 1), ("127.0.0.1", 5)]
    assert _healthy_replicas(None) == []


@pytest.mark.slow
@pytest.mark.real_redis
async def test_replica_without_the_library_reader_falls_back_to_the_primary(
    namespace: str,
) -> None:
    """A replica that has not received the function library yet (new, or still
    syncing) cannot serve the bootstrap: the node starts from the primary instead of
    failing, and says so."""
    if not HAVE_REAL:
        pytest.skip(NO_REAL_REASON)
    primary_port = free_port()
    async with Proxy("127.0.0.1", primary_port, replica_source="127.0.0.9") as proxy:
        g = SentinelGroup(primary_port=primary_port, via=proxy.port)
        try:
            await anyio.to_thread.run_sync(g.start)
            proxy.hold("replica", "down")  # nothing the primary gets reaches the replica
            async with (
                client_of(g.replicas[0].port) as replica,
                Node(g.url, namespace=namespace, node_id="a", **OPTIONS) as a,
                Node(g.url, namespace=namespace, node_id="r", read_from="replica",
                     **OPTIONS) as r,
            ):  # fmt: skip
                assert not await _has_library(replica)
                assert r.statistics().reading_from == f"127.0.0.1:{proxy.port}"  # the primary
                ban = await a.ban("203.0.113.9")
                await synced(ban.seq, r)
                assert r.is_banned("203.0.113.9")
                proxy.release("replica", "down")
        finally:
            g.close()


async def _has_library(client: aioredis.Redis) -> bool:
    return bool(await client.execute_command("FUNCTION", "LIST", "LIBRARYNAME", "banbus"))


async def _role_is_master(client: aioredis.Redis) -> bool:
    with contextlib.suppress(Exception):
        return (await client.execute_command("ROLE"))[0] == "master"  # type: ignore[no-any-return]
    return False


@pytest.mark.slow
@pytest.mark.real_redis
async def test_sentinel_node_joining_mid_failover(
    sentinel_group: SentinelGroup, namespace: str
) -> None:
    """A node started right after the primary died waits for the promotion, then starts;
    ``banbus watch`` follows the failover; the CLI finds the new primary."""
    g = sentinel_group
    old = g.primary_port()
    watch_argv = [sys.executable, "-m", "banbus", "--redis", g.url, "--namespace", namespace,
                  "watch", "--from", "0", "--count", "3"]  # fmt: skip
    async with (
        Node(g.url, namespace=namespace, node_id="a", **OPTIONS) as a,
        await anyio.open_process(watch_argv) as watch,
    ):
        assert watch.stdout is not None
        record = await a.ban("203.0.113.5", reason="before")
        with anyio.fail_after(10):
            assert b"203.0.113.5" in await watch.stdout.receive()  # it is watching
        async with client_of(old) as primary:
            assert await primary.execute_command("WAIT", 1, 5000) == 1  # replicated
        g.server(old).stop()
        async with Node(g.url, namespace=namespace, node_id="late", **OPTIONS) as late:
            assert late.is_banned("203.0.113.5")
            assert late.statistics().primary != f"127.0.0.1:{old}"
            assert late.statistics().topology_lookups >= 2  # it had to look again
            new = late.statistics().primary
            await eventually(lambda: a.statistics().primary == new, 15.0, "a follows")
            again = await a.ban("203.0.113.6")
            await synced(again.seq, late)
            assert late.is_banned("203.0.113.6")
            # The CLI takes the same URL, and finds the new primary too.
            out = await cli(g.url, namespace, "ban", "203.0.113.7", "--reason", "cli")
            seq = int(out.rsplit("seq ", 1)[1].rstrip(")\n"))
            await synced(seq, a, late)
            assert "203.0.113.7" in await cli(g.url, namespace, "list")
        with anyio.fail_after(20):
            assert await watch.wait() == 0  # it saw the two bans after the failover
        assert record.seq > 0


# -- Cluster -----------------------------------------------------------------------------


def _slot_of(namespace: str) -> int:
    return key_slot(keys(namespace).log.encode())


@pytest.mark.slow
@pytest.mark.real_redis
async def test_cluster_any_node_a_cluster_client_and_a_replica_reader(
    cluster: RedisCluster, namespace: str
) -> None:
    owner = cluster.owner(_slot_of(namespace))
    replica = cluster.replicas_of(owner)[0]
    stranger = next(n for n in cluster.nodes if n is not owner and n is not replica)
    seeds = ",".join(f"127.0.0.1:{n.port}" for n in cluster.nodes[:2])
    rc = aioredis.RedisCluster(host="127.0.0.1", port=stranger.port)
    async with (
        rc,
        Node(stranger.url, namespace=namespace, node_id="a", **OPTIONS) as a,
        Node(rc, namespace=namespace, node_id="b", **OPTIONS) as b,
        Node(f"redis+cluster://{seeds}", namespace=namespace, node_id="r", read_from="replica",
             **OPTIONS) as r,
    ):  # fmt: skip
        for node in (a, b, r):
            stats = node.statistics()
            assert (stats.topology, stats.primary) == ("cluster", f"127.0.0.1:{owner.port}")
            assert stats.topology_changes == 0
        assert r.statistics().reading_from == f"127.0.0.1:{replica.port}"
        await assert_cut(a, b, "127.0.0.41")
        await assert_cut(b, r, "127.0.0.42")
        # The CLI, given the URL of a node that does not serve the slot.
        out = await cli(stranger.url, namespace, "ban", "203.0.113.8")
        await synced(int(out.rsplit("seq ", 1)[1].rstrip(")\n")), a, b, r)
        seen = await cli(f"redis+cluster://{seeds}", namespace, "check", "203.0.113.8", status=1)
        assert "203.0.113.8 is banned" in seen
        async with client_of(owner.port) as admin:
            await assert_converged(admin, namespace, a, b, r)
        assert r.statistics().read_lag_events == 0


@pytest.mark.slow
@pytest.mark.real_redis
async def test_cluster_slot_owner_killed_nodes_follow(
    cluster: RedisCluster, namespace: str
) -> None:
    owner = cluster.owner(_slot_of(namespace))
    replica = cluster.replicas_of(owner)[0]
    async with (
        Node(cluster.url, namespace=namespace, node_id="a", **OPTIONS) as a,
        Node(cluster.url, namespace=namespace, node_id="b", **OPTIONS) as b,
    ):
        banned: list[str] = []
        halfway = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(burst, a, "10.8", 400, halfway, banned)
            await halfway.wait()
            owner.stop()
        await answered(a, b)
        assert cluster.owner(_slot_of(namespace)) is replica
        async with client_of(replica.port) as admin:
            record = await assert_converged(admin, namespace, a, b)
        assert {target for kind, target in record if kind == "ban"} >= set(banned)
        for node in (a, b):
            stats = node.statistics()
            assert stats.primary == f"127.0.0.1:{replica.port}"
            assert stats.topology_changes == 1
        await assert_cut(b, a, "127.0.0.43")


@pytest.mark.slow
@pytest.mark.real_redis
async def test_cluster_slot_migration_nodes_follow(cluster: RedisCluster, namespace: str) -> None:
    """The namespace's slot moves to another primary, key by key, while a node bans:
    no write lands half-done, every accepted ban is in the record, the nodes follow."""
    slot = _slot_of(namespace)
    source = cluster.owner(slot)
    target = next(n for n in cluster.nodes[: cluster.primaries_count] if n is not source)
    async with (
        Node(cluster.url, namespace=namespace, node_id="a", **OPTIONS) as a,
        Node(cluster.url, namespace=namespace, node_id="b", **OPTIONS) as b,
        client_of(source.port) as src,
        client_of(target.port) as dst,
    ):
        first = await a.ban("203.0.113.9", ttl=3600)
        await synced(first.seq, a, b)
        src_id, dst_id = await src.execute_command("CLUSTER", "MYID"), await dst.execute_command(
            "CLUSTER", "MYID"
        )  # fmt: skip
        banned: list[str] = []
        halfway = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(burst, a, "10.9", 300, halfway, banned)
            await halfway.wait()
            await dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            await src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            while moving := await src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1):
                # One key at a time: the slowest migration, the worst case for a write.
                await src.execute_command(
                    "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *moving
                )
                await anyio.sleep(0)
            for client in (dst, src):
                await client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        await answered(a, b)
        record = await assert_converged(dst, namespace, a, b)
        assert {t for kind, t in record if kind == "ban"} >= {*banned, "203.0.113.9"}
        # Every event of the record is in the stream, once: nothing half-written.
        assert await dst.xlen(keys(namespace).log) == len(record)
        for node in (a, b):
            stats = node.statistics()
            assert stats.primary == f"127.0.0.1:{target.port}"
            assert stats.topology_changes == 1
        await assert_cut(b, a, "127.0.0.44")
