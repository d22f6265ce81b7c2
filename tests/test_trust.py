"""Issue 7: a node never silently drifts from the record.

One test per item of the issue, each the scenario that broke it (a race with
a slow reply, a fault at the worst moment, a hand-written entry).  Each ends
on the invariant — the node's view equals the record, nothing pending is
left behind — and asserts the counters that prove which path ran.
"""

from __future__ import annotations

import json
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import pytest
import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from banbus import InvalidReason, Node, ServerError
from banbus._cache import BanCache
from banbus._keys import LIMITS, MAX_TTL_SECONDS, TOMBSTONE_LIMIT
from banbus._library import LIBRARY_SOURCE, render
from banbus._model import Ban, Unban, ban_fields

from ._helpers import (
    assert_converged,
    caught_up,
    eventually,
    keys,
    nodes,
    reloaded_after_loss,
    server_ms,
    server_seq,
    synced,
    until,
    xlen,
)
from ._proxy import Proxy

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def proxied_pair(
    redis_url: str, namespace: str, *, quiet: bool = False
) -> AsyncIterator[tuple[Proxy, Node, Node]]:
    """Node ``a`` behind a breakable proxy, node ``b`` direct; both past a first event.

    *quiet*: ``a`` runs no periodic command of its own (anti-entropy, clock,
    heartbeat, topology), so that a test holding its replies knows which
    connection its write goes over: one of those in flight at that moment
    made the write open a new connection, whose handshake the held replies
    then stalled (seen: 1 run in 10-25 with the embedded server).
    """
    hostport = redis_url.split("://", 1)[1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    options: dict[str, Any] = {}
    if quiet:
        options = {"check_interval": 0, "clock_interval": None, "heartbeat_interval": 0,
                   "topology_interval": 3600.0}  # fmt: skip
    async with Proxy(host, int(port)) as proxy:
        async with (
            Node(proxy.url, namespace=namespace, node_id="a", backoff=(0.02, 0.1), **options) as a,
            Node(redis_url, namespace=namespace, node_id="b") as b,
        ):
            warmup = await b.ban("192.0.2.1")
            await synced(warmup.seq, a)
            yield proxy, a, b


# -- 1. an own write that expires while queued -----------------------------------------------


async def test_own_write_expiring_in_the_outbox_leaves_no_trace(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    """Item 1: a queued ban that ran out is dropped everywhere, also from what a resync re-applies.

    Node a is cut off; it bans T for 1 s (queued).  Meanwhile b bans T for
    good.  Once a's ban has run out, a comes back to a stream trimmed past it
    and reloads: T must stay banned (b's permanent ban), and nothing of a's
    dead write may linger.
    """
    async with proxied_pair(redis_url, namespace) as (proxy, a, b):
        proxy.refuse()
        queued = await a.ban("203.0.113.5", ttl=1, reason="short")
        assert queued.seq == 0 and a.is_banned("203.0.113.5")
        forever = await b.ban("203.0.113.5", reason="for good")
        assert forever.expires == 0
        for i in range(5):  # more history, then trim it past a
            await b.ban(f"192.0.2.{10 + i}")
        await admin.xtrim(keys(namespace).log, maxlen=1, approximate=False)
        # Wait on a's own server clock until its queued ban has run out.
        await eventually(lambda: a.server_time() > queued.expires + 50, 5.0, "queued ban expires")
        proxy.accept()
        await eventually(
            lambda: a.statistics().resyncs >= 1 and a.statistics().writes_pending == 0,
            10.0,
            "a reloads, and drops its dead write",
        )
        await caught_up(admin, namespace, a, b)
        assert a.is_banned("203.0.113.5"), "the permanent ban must win"
        stats = a.statistics()
        assert (stats.writes_expired, stats.writes_pending, stats.outbox_pending) == (1, 0, 0)
        await assert_converged(admin, namespace, a, b)


# -- 2. an own write whose reply is slow during a resync -------------------------------------


async def test_slow_reply_during_a_resync_takes_the_records_word(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    """Item 2: Redis applied a's ban, b unbanned it, a reloaded, then a's reply came.

    The reply's seq is at or before the snapshot a now holds: the record
    decided (unbanned), and a must follow it rather than keep its own ban.
    """
    async with proxied_pair(redis_url, namespace, quiet=True) as (proxy, a, b):
        proxy.hold("reader")  # a reads nothing for now
        proxy.hold("client", "down")  # and gets no replies to its writes
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.ban, "203.0.113.7", 0, "mine")
            # Redis has applied it (the reply is held in the proxy).
            await until(lambda: admin.hexists(keys(namespace).bans, "203.0.113.7"), 5.0, "applied")
            assert a.is_banned("203.0.113.7")
            assert await b.unban("203.0.113.7")
            await admin.xtrim(keys(namespace).log, maxlen=1, approximate=False)
            resyncs = a.statistics().resyncs
            proxy.release("reader")
            await eventually(lambda: a.statistics().resyncs > resyncs, 10.0, "a reloads")
            proxy.release("client", "down")  # now the ban's reply arrives
        assert not a.is_banned("203.0.113.7"), "b's later unban is the record's word"
        assert a.statistics().writes_pending == 0
        await assert_converged(admin, namespace, a, b)


# -- 3. the server clock is re-measured under steady traffic ---------------------------------


class SuspendableClock:
    """A local monotonic clock that can lose time, as a suspended host's does."""

    def __init__(self) -> None:
        self.lost_ms = 0

    def __call__(self) -> int:
        return time.monotonic_ns() // 1_000_000 - self.lost_ms


async def test_clock_is_remeasured_under_steady_traffic(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    """Item 3: after the local clock loses 30 s, expiry is right again within an interval.

    Writes keep the reader busy (it never idles), so only a schedule that does
    not depend on idleness corrects the offset.
    """
    clock = SuspendableClock()
    async with Node(
        redis_url, namespace=namespace, node_id="a", clock=clock, clock_interval=0.5
    ) as a:
        stop = anyio.Event()

        async def traffic() -> None:
            i = 0
            while not stop.is_set():
                i += 1
                await admin.fcall("banbus_ban", 1, namespace, f"198.51.100.{i % 200}", 600)
                await anyio.sleep(0.005)

        async with anyio.create_task_group() as tg:
            tg.start_soon(traffic)
            clock.lost_ms = 30_000  # the host slept 30 s; its monotonic clock did not count it
            assert a.server_time() < await server_ms(admin) - 25_000
            record = await a.ban("203.0.113.9", ttl=2)
            measured = a.statistics().clock_measurements
            await eventually(
                lambda: a.statistics().clock_measurements > measured, 5.0, "re-measured"
            )
            assert abs(a.server_time() - await server_ms(admin)) < 500
            # The 2 s ban ends on time, not 30 s late.
            await until(lambda: _past(admin, record.expires + 1500), 5.0, "server time")
            assert not a.is_banned("203.0.113.9")
            stop.set()
        stats = a.statistics()
        assert stats.resyncs == 0  # corrected by measurement, not by a reload


async def _past(admin: aioredis.Redis, ms: int) -> bool:
    return await server_ms(admin) > ms


# -- 4. the expiry wheel stays bounded --------------------------------------------------------


def test_expiry_wheel_stays_bounded() -> None:
    """Item 4: 60k ban/unban cycles on 100 targets with a 1-day TTL."""
    now = [1_800_000_000_000]
    cache = BanCache(lambda: now[0])
    for i in range(60_000):
        target = f"203.0.113.{i % 100}"
        cache.apply(Ban(target=target, expires=now[0] + 86_400_000 + i, seq=2 * i + 1))
        if i % 2:
            cache.apply(Unban(target=target, seq=2 * i + 2))
        now[0] += 1
    held = cache.ban_count
    items = sum(len(b) + len(a) for b, a in cache._wheel.values())
    assert items <= 2 * held + 1024, f"{items} wheel items for {held} bans"
    assert cache.wheel_size == items


async def test_expiry_wheel_of_a_node_stays_bounded(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    async with nodes(redis_url, namespace, 2) as (a, b):
        for round_ in range(30):
            async with admin.pipeline(transaction=False) as pipe:
                for i in range(100):
                    pipe.fcall("banbus_ban", 1, namespace, f"203.0.113.{i}", 86400)
                    if round_ % 2:
                        pipe.fcall("banbus_unban", 1, namespace, f"203.0.113.{i}")
                await pipe.execute()
        await caught_up(admin, namespace, a, b)
        for node in (a, b):
            stats = node.statistics()
            assert stats.expiry_wheel <= 2 * stats.bans_active + 1024


# -- 5. Redis memory does not follow the write rate --------------------------------------------


async def test_redis_memory_is_bounded_by_maxlen_and_live_entries(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    """Item 5: 20k writes through a node leave no per-write keys in Redis."""
    k = keys(namespace)
    await admin.hset(k.config, "maxlen", 1000)
    async with nodes(redis_url, namespace, 1) as (a,):
        for round_ in range(100):
            async with anyio.create_task_group() as tg:
                for i in range(100):
                    target = f"203.0.113.{i}"
                    if round_ % 2:
                        tg.start_soon(a.unban, target)
                    else:
                        tg.start_soon(a.ban, target, 600)
        await caught_up(admin, namespace, a)
        names = {key async for key in admin.scan_iter(match="{" + namespace + "}*", count=1000)}
        beats = {f"{{{namespace}}}:nodes", *(n for n in names if ":node:" in n)}
        assert len(beats) <= 2  # one node's heartbeat, and the zset of nodes
        assert names - beats == {k.log, k.seq, k.epoch, k.head, k.removed, k.config}
        assert await xlen(admin, namespace) <= 1100  # MAXLEN ~ trims in whole nodes
        assert await admin.zcard(k.removed) == 100
        assert a.statistics().writes_pending == 0
        await assert_converged(admin, namespace, a)


# -- 6. re-seeding only on evidence of loss, only what is missing ------------------------------


async def test_forged_epoch_costs_no_republication(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    """Item 6a: ``SET {ns}:epoch`` by hand: nodes reload, find nothing missing, write nothing."""
    async with nodes(redis_url, namespace, 2, block_ms=200) as (a, b):
        for i in range(50):
            await a.ban(f"192.0.2.{i}", reason="held")
        await caught_up(admin, namespace, a, b)
        before = await xlen(admin, namespace)
        await admin.set(keys(namespace).epoch, "forged")
        await eventually(lambda: reloaded_after_loss(a) and reloaded_after_loss(b), 10.0, "noticed")
        await eventually(
            lambda: a.statistics().reseed_pending == 0 and b.statistics().reseed_pending == 0,
            10.0,
            "nothing held back",
        )
        assert await xlen(admin, namespace) == before, "nothing re-published"
        for node in (a, b):
            assert node.statistics().reseed_written == 0
        await assert_converged(admin, namespace, a, b)


async def test_entry_with_a_huge_seq_is_skipped(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    """Item 6b: one hand-written entry with seq 10**15: skipped, no reload, no re-seed."""
    async with nodes(redis_url, namespace, 2, block_ms=200) as (a, b):
        for i in range(20):
            await a.ban(f"192.0.2.{i}")
        await caught_up(admin, namespace, a, b)
        before = await xlen(admin, namespace)
        await admin.xadd(
            keys(namespace).log,
            {"op": "ban", "target": "198.51.100.66", "expires": "0", "reason": "",
             "origin": "x", "eid": "x", "seq": str(10**15)},
        )  # fmt: skip
        marker = await b.ban("192.0.2.200")
        await synced(marker.seq, a, b)
        for node in (a, b):
            stats = node.statistics()
            assert (stats.resyncs, stats.losses, stats.reseed_written) == (0, 0, 0)
            assert stats.events_skipped == 1
            assert not node.is_banned("198.51.100.66")
        assert await xlen(admin, namespace) == before + 2
        await assert_converged(admin, namespace, a, b)


# -- 7. an unban right after the loss beats the re-seed --------------------------------------


async def test_unban_right_after_a_loss_wins_over_the_reseed(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    """Item 7: the record is wiped; an operator unbans T at once; the nodes re-seed the rest."""
    async with nodes(redis_url, namespace, 2, block_ms=300) as (a, b):
        await a.ban("203.0.113.1", reason="lifted after the loss")
        await a.ban("203.0.113.2", reason="kept")
        last = await b.allow("192.0.2.9", reason="office")
        await synced(last.seq, a, b)
        await admin.flushall()
        # The operator, right away (the nodes have not noticed yet).
        assert a.statistics().losses == 0
        await admin.fcall("banbus_unban", 1, namespace, "203.0.113.1", "ORIGIN", "ops")
        await eventually(
            lambda: all(reloaded_after_loss(n) for n in (a, b)), 10.0, "the loss is seen"
        )
        await eventually(
            lambda: all(n.statistics().reseed_pending == 0 for n in (a, b)), 10.0, "re-seeded"
        )
        record = await assert_converged(admin, namespace, a, b)
        assert ("ban", "203.0.113.2") in record and ("allow", "192.0.2.9") in record
        assert ("ban", "203.0.113.1") not in record
        assert not a.is_banned("203.0.113.1") and not b.is_banned("203.0.113.1")
        assert sum(n.statistics().reseed_lifted for n in (a, b)) >= 1
        # Each missing entry was written once (the lock, then the gap check).
        log = [f for _, f in await admin.xrange(keys(namespace).log)]
        assert sorted(f["target"] for f in log if f["op"] in ("ban", "allow")) == [
            "192.0.2.9",
            "203.0.113.2",
        ]


# -- 8. anti-entropy: a forged entry with the next seq -----------------------------------------


async def test_entry_added_by_hand_with_the_next_seq_is_undone(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    """Item 8: every node applies it, the record never has it; nodes notice within seconds."""
    async with nodes(redis_url, namespace, 2, block_ms=200, check_interval=0.2) as (a, b):
        marker = await a.ban("192.0.2.1")
        await synced(marker.seq, a, b)
        seq = await server_seq(admin, namespace)
        await admin.xadd(
            keys(namespace).log,
            {"op": "ban", "target": "198.51.100.66", "expires": "0", "reason": "forged",
             "origin": "x", "eid": "x", "seq": str(seq + 1)},
        )  # fmt: skip
        await eventually(lambda: a.is_banned("198.51.100.66"), 5.0, "a applies the forged entry")
        await eventually(
            lambda: not a.is_banned("198.51.100.66") and not b.is_banned("198.51.100.66"),
            10.0,
            "the nodes notice and reload",
        )
        for node in (a, b):
            stats = node.statistics()
            assert stats.forged_entries >= 1 and stats.resyncs >= 1
        # The stream goes on: the real next seq is applied, the forged one stays skipped.
        again = await b.ban("192.0.2.2")
        assert again.seq == seq + 1
        await synced(again.seq, a, b)
        await assert_converged(admin, namespace, a, b)


async def test_anti_entropy_catches_a_view_that_drifted(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    """Divergence no seq reveals (here: a view changed behind the node's back) is repaired."""
    async with nodes(redis_url, namespace, 2, block_ms=100, check_interval=0.1) as (a, b):
        record = await a.ban("192.0.2.1")
        await synced(record.seq, a, b)
        await eventually(lambda: b.statistics().digest_checks >= 1, 5.0, "first comparison")
        b.cache.apply(Unban(target="192.0.2.1"))  # a bug, a cosmic ray…
        assert not b.is_banned("192.0.2.1")
        await eventually(lambda: b.is_banned("192.0.2.1"), 5.0, "repaired")
        stats = b.statistics()
        assert stats.digest_mismatches >= 1 and stats.resyncs >= 1
        assert stats.record_digest_mismatch == 0


async def test_record_edited_by_hand_is_reported_not_reloaded_in_a_loop(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    """A record changed outside the functions differs from its own digest.

    A reload shows it (the view is the record; the digest is not): it is
    reported once and taken as the baseline — no reload loop — until
    ``banbus_repair`` recomputes the digest, after which all agree again.
    """
    async with nodes(redis_url, namespace, 1, block_ms=100, check_interval=0.1) as (a,):
        marker = await a.ban("192.0.2.1")
        await synced(marker.seq, a)
        await eventually(lambda: a.statistics().digest_checks >= 1, 5.0, "first comparison")
        await admin.hset(keys(namespace).bans, "192.0.2.77", json.dumps([0, "by hand", "x", 0]))
        assert not a.is_banned("192.0.2.77")  # no event: nobody knows yet
        a.cache.apply(Unban(target="192.0.2.1"))  # a drift, to make a reload
        await eventually(lambda: a.statistics().record_digest_mismatch == 1, 10.0, "reported")
        assert a.is_banned("192.0.2.77") and a.is_banned("192.0.2.1")  # the reload
        resyncs = a.statistics().resyncs
        checks = a.statistics().digest_checks
        await eventually(lambda: a.statistics().digest_checks >= checks + 5, 10.0, "checks")
        assert a.statistics().resyncs == resyncs, "no reload loop"
        # The documented repair: the digest is recomputed, the node agrees again.
        _, before, after = await admin.fcall("banbus_repair", 1, namespace)
        assert before != after
        await eventually(lambda: a.statistics().record_digest_mismatch == 0, 10.0, "repaired")
        await assert_converged(admin, namespace, a)


# -- 9. a stream id at the maximum ------------------------------------------------------------


async def test_maximal_stream_id_repairs_itself(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    """Item 9: ``XADD {ns}:log 18446744073709551615-…`` must not stop writes or readers."""
    async with nodes(redis_url, namespace, 2, block_ms=200) as (a, b):
        warmup = await a.ban("192.0.2.1")
        await synced(warmup.seq, a, b)
        top = "18446744073709551615-18446744073709551615"
        await admin.xadd(keys(namespace).log, {"op": "junk"}, id=top)
        record = await a.ban("203.0.113.8", reason="after the junk")
        assert record.seq == warmup.seq + 1
        await eventually(lambda: b.is_banned("203.0.113.8"), 10.0, "b follows")
        assert await admin.xrange(keys(namespace).log, min=top, max=top) == []
        again = await b.ban("203.0.113.9")
        await synced(again.seq, a, b)
        await assert_converged(admin, namespace, a, b)


# -- 10. one TTL limit for Lua and Python --------------------------------------------------------


def test_lua_carries_the_python_limits() -> None:
    """Item 10: the library file already holds every limit of ``banbus._keys``."""
    assert render(LIBRARY_SOURCE) == LIBRARY_SOURCE
    for name, value in LIMITS.items():
        assert f" = {value} -- @{name}\n" in LIBRARY_SOURCE


async def test_config_cannot_raise_the_ttl_limit(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    """Item 10: a namespace's max_ttl may lower the limit, never raise it past what nodes keep."""
    async with nodes(redis_url, namespace, 1) as (a,):
        await admin.hset(keys(namespace).config, "max_ttl", str(10**12))
        with pytest.raises(redis_errors.ResponseError, match=r"BANBUS_CONFIG .* max_ttl"):
            await admin.fcall("banbus_ban", 1, namespace, "203.0.113.1", 10**11)
        with pytest.raises(ServerError, match="max_ttl"):
            await a.ban("203.0.113.2", ttl=3600)
        assert not a.is_banned("203.0.113.2")
        await admin.hset(keys(namespace).config, "max_ttl", "60")
        with pytest.raises(redis_errors.ResponseError, match="above the maximum of 60"):
            await admin.fcall("banbus_ban", 1, namespace, "203.0.113.1", 61)
        await admin.hset(keys(namespace).config, "max_ttl", str(MAX_TTL_SECONDS))
        record = await a.ban("203.0.113.3", ttl=MAX_TTL_SECONDS)
        await synced(record.seq, a)
        assert a.is_banned("203.0.113.3")
        assert a.statistics().events_skipped == 0


# -- 11. a failed write is undone here ---------------------------------------------------------


async def test_lone_surrogate_reason_is_refused_before_anything(
    two_nodes: tuple[Node, Node], admin: aioredis.Redis, namespace: str
) -> None:
    """Item 11: ``errors="surrogateescape"`` text is refused as the library would refuse it."""
    a, _ = two_nodes
    reason = b"scan \xff".decode("utf-8", "surrogateescape")
    with pytest.raises(InvalidReason, match="UTF-8"):
        await a.ban("203.0.113.4", reason=reason)
    assert not a.is_banned("203.0.113.4")
    assert await admin.hlen(keys(namespace).bans) == 0
    assert await a.unban("203.0.113.4") is False


async def test_any_failure_of_a_write_undoes_it_here(
    two_nodes: tuple[Node, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _ = two_nodes
    publisher: Any = a._publisher

    async def broken(commands: Any) -> Any:
        raise RuntimeError("a bug in the write path")

    monkeypatch.setattr(publisher, "_roundtrip", broken)
    with pytest.raises(RuntimeError):
        await a.ban("203.0.113.5")
    assert not a.is_banned("203.0.113.5")
    stats = a.statistics()
    assert (stats.writes_pending, stats.outbox_pending, stats.writes_refused) == (0, 0, 1)


# -- 12. the reader's fast path with realistic node ids ------------------------------------------


def test_fast_path_takes_long_node_ids() -> None:
    """Item 12: a Kubernetes ``hostname-pid`` origin and its event ids stay on the fast path."""
    origin = "mail-frontend-7d9f8b6c5d-x2k4q-1234567"  # 40 characters
    fields = ["op", "ban", "target", "203.0.113.7", "expires", "0", "reason", "scan",
              "origin", origin, "eid", f"{origin}.3f2a9c1b5d7e8f10", "seq", "7"]  # fmt: skip
    assert ban_fields(fields) == (True, "203.0.113.7", 0, "scan", origin,
                                  f"{origin}.3f2a9c1b5d7e8f10", 7)  # fmt: skip
    # Limits still hold exactly: one byte too many leaves the fast path.
    fields[9] = "x" * 65
    assert ban_fields(fields) is None


# -- 15. every input bounded before any work ----------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("banbus_ban", "\u00a0" * 5_000_000, 60), id="10MB-nbsp-target"),
        pytest.param(("banbus_ban", "9" * 10_000_000, 60), id="10MB-digit-target"),
        pytest.param(("banbus_ban", "203.0.113.1", "9" * 10_000_000), id="10MB-ttl"),
        pytest.param(("banbus_ban", "203.0.113.1", 60, "r" * 10_000_000), id="10MB-reason"),
        pytest.param(("banbus_ban", "203.0.113.1", 60, "", "\x01" * 10_000_000), id="10MB-opt"),
        pytest.param(("banbus_ban", "203.0.113.1", 60, "", "EID", "e" * 10_000_000), id="10MB-eid"),
        pytest.param(("banbus_check", "\u2003" * 3_000_000), id="10MB-check"),
    ],
)
async def test_huge_arguments_are_refused_at_once(
    args: tuple[Any, ...], admin: aioredis.Redis, namespace: str
) -> None:
    """Item 15: the library bounds every argument before touching it."""
    function, *rest = args
    call = admin.fcall_ro if function == "banbus_check" else admin.fcall
    # Warm the connection so the timing is the call's.
    await admin.ping()
    started = time.perf_counter()
    with pytest.raises(redis_errors.ResponseError, match=r"^BANBUS_INVALID"):
        await call(function, 1, namespace, *rest)
    # The bound is the behaviour: transferring 10 MB takes ~20 ms; parsing
    # it char by char in Lua took ~1 s.
    assert time.perf_counter() - started < 0.5
    assert await admin.exists(keys(namespace).log) == 0


def test_tombstone_cap_is_the_shared_limit() -> None:
    assert LIMITS["TOMBSTONE_LIMIT"] == TOMBSTONE_LIMIT


# -- found by review: races and error paths -----------------------------------------------------


def _write(node: Node, target: str, expires: int = 0) -> Any:
    from banbus._model import Ban
    from banbus._publisher import Write

    publisher: Any = node._publisher
    return Write(Ban(target=target, expires=expires, origin=node.node_id, eid=publisher.new_eid()))


async def test_outbox_write_expiring_while_being_sent(
    two_nodes: tuple[Node, Node], admin: aioredis.Redis, namespace: str
) -> None:
    """The outbox sends a ban; it runs out while the reply is slow; the next write still lands."""
    a, _ = two_nodes
    publisher: Any = a._publisher
    real = publisher._roundtrip
    slow = anyio.Event()

    async def slow_roundtrip(commands: Any) -> Any:
        await slow.wait()
        return await real(commands)

    publisher._roundtrip = slow_roundtrip
    first = _write(a, "10.0.0.1", a.server_time() + 300)
    second = _write(a, "10.0.0.2")
    for write in (first, second):
        publisher.hold(write)
        publisher._queue(write)
    # The first ban runs out while it is on the wire; the expiry sweep runs.
    await eventually(lambda: a.server_time() > first.event.expires + 50, 5.0, "expiry")
    publisher.prune()
    publisher._roundtrip = real
    slow.set()
    await eventually(lambda: a.statistics().outbox_pending == 0, 10.0, "outbox drained")
    await until(lambda: admin.hexists(keys(namespace).bans, "10.0.0.2"), 5.0, "second lands")
    # Answered writes stay pending until the reader has seen their events.
    await eventually(lambda: a.statistics().writes_pending == 0, 5.0, "own events seen")
    await assert_converged(admin, namespace, a)


async def test_outbox_survives_a_library_it_cannot_reload(
    redis_factory: Any, namespace: str
) -> None:
    """Redis lost the functions and this node's user may not load them: writes wait, node lives."""
    proc = redis_factory()
    admin = aioredis.Redis.from_url(proc.url, decode_responses=True)
    try:
        from banbus._library import ensure_library

        await ensure_library(admin)
        await admin.execute_command(
            "ACL", "SETUSER", "app", "on", ">pw", "~*", "&*", "+@all", "-function|load"
        )
        url = f"redis://app:pw@{proc.host}:{proc.port}/0"
        async with Node(url, namespace=namespace, node_id="a", backoff=(0.02, 0.1)) as a:
            await a.ban("10.0.0.1")
            await admin.function_flush()
            record = await a.ban("10.0.0.2")  # refused: queued, not fatal
            assert record.seq == 0 and a.is_banned("10.0.0.2")
            await eventually(lambda: a.statistics().outbox_pending == 1, 5.0, "queued")
            await ensure_library(admin)  # an operator loads it
            await eventually(lambda: a.statistics().outbox_pending == 0, 10.0, "published")
            assert await admin.hexists(keys(namespace).bans, "10.0.0.2")
    finally:
        await admin.aclose()


async def test_reseed_waits_out_a_busy_server(redis_factory: Any, namespace: str) -> None:
    """OOM while re-seeding is not a verdict: the candidates stay held and are restored later."""
    proc = redis_factory()
    admin = aioredis.Redis.from_url(proc.url, decode_responses=True)
    try:
        async with nodes(proc.url, namespace, 1, block_ms=200) as (a,):
            for i in range(5):
                await a.ban(f"10.0.0.{i}")
            reseeder: Any = a._reseeder
            real_lock = reseeder._lock
            oom = anyio.Event()

            async def lock() -> bool:
                won: bool = await real_lock()
                if won and not oom.is_set():
                    await admin.config_set("maxmemory", "1")  # full, right after the lock
                    oom.set()
                return won

            reseeder._lock = lock
            await admin.delete(*[k async for k in admin.scan_iter(match="{" + namespace + "}*")])
            await oom.wait()
            await eventually(lambda: a.statistics().losses >= 1, 5.0, "loss seen")
            assert all(a.is_banned(f"10.0.0.{i}") for i in range(5))
            assert a.statistics().reseed_lifted == 0
            await admin.config_set("maxmemory", "0")
            await eventually(lambda: a.statistics().reseed_written == 5, 15.0, "restored")
            await assert_converged(admin, namespace, a)
    finally:
        await admin.aclose()


def test_recompute_while_the_allowlist_changes() -> None:
    """A digest recomputed in chunks sees each table as it was when it started."""
    from banbus._digest import Digest, entry_hash
    from banbus._model import Entry

    def fresh(allows: list[str]) -> BanCache:
        cache = BanCache(lambda: 1_000_000, digest=True)
        bans = [(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", Entry(0)) for i in range(25_000)]
        cache.replace(bans, [(t, Entry(0)) for t in allows])
        return cache

    cache = fresh(["192.0.2.1", "192.0.2.2"])
    steps = cache.recompute()
    next(steps)  # the first chunk of bans is done
    cache.set_entry("allow", "192.0.2.1", None)  # a disallow applied meanwhile
    for _ in steps:
        pass
    expected = Digest()
    for i in range(25_000):
        expected = expected.add(entry_hash("ban", f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", 0))
    expected = expected.add(entry_hash("allow", "192.0.2.2", 0))
    assert cache.digest(0) == expected


async def test_stream_deleted_with_the_head_intact_is_not_a_reload_loop(
    admin: aioredis.Redis, namespace: str
) -> None:
    """Nothing was missed when the node is at the library's last event, stream or not."""
    async with nodes(_url(admin), namespace, 1, block_ms=100) as (a,):
        record = await a.ban("10.0.0.1")
        await synced(record.seq, a)
        await admin.delete(keys(namespace).log)
        probes = a.statistics().clock_measurements
        await eventually(
            lambda: a.statistics().clock_measurements >= probes + 5, 10.0, "idle checks"
        )
        assert a.statistics().resyncs == 0
        again = await a.ban("10.0.0.2")
        await synced(again.seq, a)
        await assert_converged(admin, namespace, a)


def _url(admin: aioredis.Redis) -> str:
    kwargs = admin.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/0"


async def test_own_event_seen_before_the_retry_is_not_sent_again(
    two_nodes: tuple[Node, Node], admin: aioredis.Redis, namespace: str
) -> None:
    """A write queued as ambiguous whose own event then arrives is done: never sent again."""
    a, b = two_nodes
    publisher: Any = a._publisher
    real = publisher._roundtrip
    go = anyio.Event()

    async def held(commands: Any) -> Any:
        await go.wait()
        return await real(commands)

    first = _write(a, "10.0.0.8")  # keeps the outbox busy
    publisher.hold(first)
    publisher._roundtrip = held
    publisher._queue(first)
    landed = _write(a, "10.0.0.9")
    publisher.hold(landed)
    reply = (await real([("FCALL", "banbus_ban", 1, namespace, "10.0.0.9", 0, "",
                          "ORIGIN", "a", "EID", landed.event.eid)]))[0]  # fmt: skip
    landed.ambiguous = True  # …its answer was "lost": queued for a retry
    publisher._queue(landed)
    await synced(int(reply[0]), a, b)  # its own event comes back first
    publisher._roundtrip = real
    go.set()
    await eventually(lambda: a.statistics().outbox_pending == 0, 5.0, "drained")
    events = [f for _, f in await admin.xrange(keys(namespace).log) if f["target"] == "10.0.0.9"]
    assert len(events) == 1
    assert a.statistics().retries_duplicate == 0  # not even retried
    # Answered writes stay pending until the reader has seen their events.
    await eventually(lambda: a.statistics().writes_pending == 0, 5.0, "own events seen")


async def test_failed_xadd_moves_nothing(admin: aioredis.Redis, namespace: str) -> None:
    """A write whose event cannot be appended leaves the counter and the record alone."""
    k = keys(namespace)
    await admin.fcall("banbus_ban", 1, namespace, "10.0.0.1", 0)
    await admin.delete(k.log)
    await admin.set(k.log, "not a stream")
    with pytest.raises(redis_errors.ResponseError):
        await admin.fcall("banbus_ban", 1, namespace, "10.0.0.2", 0)
    assert await admin.get(k.seq) == "1"
    assert not await admin.hexists(k.bans, "10.0.0.2")
