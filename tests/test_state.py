"""The local state file (issue 8): start while Redis is down, survive a crash with queued writes."""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING

import anyio
import pytest
import redis.asyncio as aioredis

from banbus import InvalidInput, Node
from banbus._state import SavedOutbox, SavedView, StateFile

from ._helpers import (
    assert_converged,
    child_node,
    eventually,
    keys,
    record_of,
    server_ms,
    until,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from banbus._servers import RedisProcess

pytestmark = pytest.mark.anyio


@pytest.mark.real_redis
async def test_node_starts_from_its_state_file_while_redis_is_down(
    redis_factory: Callable[..., RedisProcess], namespace: str, tmp_path: Path
) -> None:
    """Enforces at once, queues, and — Redis back empty — restores what it held."""
    proc = redis_factory()
    path = tmp_path / "node.state"
    options = {"node_id": "mx1", "namespace": namespace, "state_file": path,
               "backoff": (0.02, 0.2), "block_ms": 200}  # fmt: skip
    async with Node(proc.url, **options) as a:  # type: ignore[arg-type]
        await a.ban("203.0.113.1", ttl=3600, reason="kept")
        await a.ban("198.51.100.0/24", reason="net")
        await a.allow("192.0.2.9")
    assert path.exists()
    proc.stop()
    started = time.monotonic()
    async with Node(proc.url, **options) as a:  # type: ignore[arg-type]
        assert time.monotonic() - started < 5  # did not wait for Redis
        assert a.is_banned("203.0.113.1") and a.is_banned("198.51.100.7")
        assert a.is_allowed("192.0.2.9")
        assert not a.statistics().connected
        queued = await a.ban("203.0.113.2", reason="while down")
        assert queued.seq == 0 and a.is_banned("203.0.113.2")
        proc.start()  # empty: it lost everything while this node was down
        admin = aioredis.Redis.from_url(proc.url, decode_responses=True)
        try:
            await eventually(
                lambda: (
                    a.statistics().losses >= 1
                    and a.statistics().reseed_pending == 0
                    and a.statistics().outbox_pending == 0
                ),
                15.0,
                "reconciled",
            )
            record = await assert_converged(admin, namespace, a)
            assert set(record) == {
                ("ban", "203.0.113.1"),
                ("ban", "198.51.100.0/24"),
                ("ban", "203.0.113.2"),
                ("allow", "192.0.2.9"),
            }
        finally:
            await admin.aclose()


async def test_restart_with_redis_intact_catches_up(
    redis_url: str, namespace: str, tmp_path: Path, admin: aioredis.Redis
) -> None:
    """The same incarnation: the saved view is caught up (or reloaded), never re-seeded."""
    path = tmp_path / "node.state"
    async with Node(redis_url, namespace=namespace, node_id="a", state_file=path) as a:
        await a.ban("203.0.113.1")
    # Changes while the node was away.
    await admin.fcall("banbus_unban", 1, namespace, "203.0.113.1")
    await admin.fcall("banbus_ban", 1, namespace, "203.0.113.3", 0)
    async with Node(redis_url, namespace=namespace, node_id="a", state_file=path,
                    block_ms=200) as a:  # fmt: skip
        await until(lambda: _applied(a, admin, namespace), 10.0, "caught up")
        assert not a.is_banned("203.0.113.1") and a.is_banned("203.0.113.3")
        stats = a.statistics()
        assert (stats.losses, stats.reseed_written) == (0, 0)
        await assert_converged(admin, namespace, a)


async def _applied(node: Node, admin: aioredis.Redis, namespace: str) -> bool:
    state = await admin.fcall_ro("banbus_state", 1, namespace)  # type: ignore[misc]
    return node.statistics().last_seq >= int(state[1])


@pytest.mark.real_redis
async def test_killed_with_a_queued_outbox_publishes_after_restart(
    redis_factory: Callable[..., RedisProcess], namespace: str, tmp_path: Path
) -> None:
    proc = redis_factory()
    path = str(tmp_path / "child.state")
    options = {"state_file": path, "backoff": [0.02, 0.2], "block_ms": 200}
    async with child_node(proc.url, namespace, "c1", **options) as child:
        proc.stop()
        assert (await child.ask("ban 203.0.113.77 3600")) == "seq 0"  # queued
        await eventually(lambda: os.path.exists(path + ".outbox"), 5.0, "outbox saved")
        await child.kill()
    proc.start()
    admin = aioredis.Redis.from_url(proc.url, decode_responses=True)
    try:
        async with child_node(proc.url, namespace, "c1", **options) as child:

            async def answered() -> bool:
                stats = json.loads(await child.ask("stats"))
                return bool(stats["outbox_pending"] == 0 and stats["writes_pending"] == 0)

            await until(answered, 15.0, "the restored outbox answered")
            assert await admin.hexists(keys(namespace).bans, "203.0.113.77")
            stats = json.loads(await child.ask("stats"))
            assert stats["writes_refused"] == stats["writes_expired"] == 0
            assert "203.0.113.77" in stats["bans"]
            # The hour the ban was given is kept: its expiry is the one decided, not
            # recomputed from a clock the restarted node had not measured yet.
            now = await server_ms(admin)
            record = await record_of(admin, namespace, now)
            expires_s = record[("ban", "203.0.113.77")]
            assert now // 1000 + 3500 < expires_s <= now // 1000 + 3601
        events = [f for _, f in await admin.xrange(keys(namespace).log)
                  if f.get("target") == "203.0.113.77"]  # fmt: skip
        assert len(events) == 1
    finally:
        await admin.aclose()


async def test_corrupt_or_foreign_state_files_are_refused(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    path = tmp_path / "node.state"
    async with Node(redis_url, namespace=namespace, node_id="a", state_file=path) as a:
        await a.ban("203.0.113.1")
    good = path.read_bytes()
    for data, message in (
        (good[:-3], "corrupt"),
        (good[:12] + bytes([good[12] ^ 1]) + good[13:], "corrupt"),
        (b"garbage that is not a state file", "not a banbus state file"),
        (b"BBST\x09V" + good[6:], "another version"),
    ):
        path.write_bytes(data)
        with pytest.raises(InvalidInput, match=message):
            async with Node(redis_url, namespace=namespace, node_id="a", state_file=path):
                pass
    # A sound file of another namespace.
    path.write_bytes(good)
    with pytest.raises(InvalidInput, match="holds namespace"):
        async with Node(redis_url, namespace="other", node_id="a", state_file=path):
            pass


async def test_saving_is_atomic_and_rate_bounded(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    path = tmp_path / "node.state"
    async with Node(redis_url, namespace=namespace, node_id="a", state_file=path,
                    state_interval=0.5) as a:  # fmt: skip
        state = a._state_file
        assert state is not None
        started = time.monotonic()
        for i in range(200):
            await a.ban(f"203.0.113.{i % 250}", ttl=600)
            await anyio.sleep(0.005)
        elapsed = time.monotonic() - started
        assert 1 <= state.stats["view_writes"] <= elapsed / 0.5 + 2
        assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]  # no leftovers
    view, outbox = StateFile(path, namespace).load()
    assert isinstance(view, SavedView) and len(view.bans) == 200
    assert isinstance(outbox, SavedOutbox) and outbox.writes == []


@pytest.mark.real_redis
async def test_the_view_file_holds_what_redis_answered_the_outbox_the_rest(
    redis_factory: Callable[..., RedisProcess], namespace: str, tmp_path: Path
) -> None:
    """Writes Redis did not answer are saved once, in the outbox — not also in the view:
    a restart folds them over the record's entry again, and a refusal restores it."""
    proc = redis_factory()
    path = tmp_path / "node.state"
    async with Node(proc.url, namespace=namespace, node_id="a", state_file=path,
                    backoff=(0.02, 0.2)) as a:  # fmt: skip
        await a.ban("203.0.113.1", reason="record")
        await a.ban("203.0.113.2", ttl=600, reason="record")
        proc.stop()
        await a.unban("203.0.113.1")
        await a.ban("203.0.113.2", ttl=60, replace=True, reason="shortened")
        await a.ban("203.0.113.3", reason="new")
        assert not a.is_banned("203.0.113.1") and a.is_banned("203.0.113.3")
        await a._save_state_now()
        view, outbox = StateFile(path, namespace).load()
        assert view is not None and outbox is not None
        assert {(b[0], b[2]) for b in view.bans} == {
            ("203.0.113.1", "record"),
            ("203.0.113.2", "record"),
        }
        assert [(w.op, w.target) for w in outbox.writes] == [
            ("unban", "203.0.113.1"),
            ("ban", "203.0.113.2"),
            ("ban", "203.0.113.3"),
        ]
        a._flush_timeout = 0.1  # Redis stays down: do not wait on close
