"""``banbus status``: the namespace and its live nodes, from their heartbeats (issue 11)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import TYPE_CHECKING

import anyio
import pytest

from banbus import Node

from ._helpers import child_node, eventually

if TYPE_CHECKING:
    import redis.asyncio as aioredis

pytestmark = pytest.mark.anyio


async def _status(redis_url: str, namespace: str, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "banbus", "--redis", redis_url, "-n", namespace, "status", *extra]
    return await anyio.to_thread.run_sync(
        lambda: subprocess.run(argv, capture_output=True, text=True, timeout=60)
    )


async def _live(redis_url: str, namespace: str) -> dict[str, dict[str, object]]:
    result = await _status(redis_url, namespace, "--json")
    assert result.returncode == 0, result.stderr
    return {n["node_id"]: n for n in json.loads(result.stdout)["nodes"]}


async def test_status_lists_live_nodes_and_the_dead_drop_out(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    async with (
        Node(redis_url, namespace=namespace, node_id="mx1", heartbeat_interval=0.2) as mx1,
        child_node(redis_url, namespace, "mx2", heartbeat_interval=0.2) as mx2,
    ):
        record = await mx1.ban("203.0.113.5", reason="status")
        assert await mx2.ask(f"sync {record.seq}") == "synced"
        mx1.supervisor.track("198.51.100.1", lambda: None)
        await eventually(lambda: mx1._heartbeat is not None and mx1._heartbeat.stats["sent"] >= 2,
                         5.0, "two beats")  # fmt: skip
        live: dict[str, dict[str, object]] = {}
        with anyio.fail_after(10):
            while set(live) != {"mx1", "mx2"} or live["mx2"]["seq"] != record.seq:
                live = await _live(redis_url, namespace)
        assert live["mx1"]["bans"] == 1 and live["mx1"]["tracked"] == 1
        assert live["mx1"]["connected"] is True and live["mx1"]["interval"] == 0.2
        human = await _status(redis_url, namespace)
        assert "nodes (2 live):" in human.stdout and "mx2" in human.stdout
        assert "1 bans" in human.stdout
        # A node killed without a goodbye drops out after three intervals.
        await mx2.kill()
        with anyio.fail_after(10):
            while "mx2" in live:
                live = await _live(redis_url, namespace)
        assert set(live) == {"mx1"}
        with anyio.fail_after(5):  # and the next beat of a live node cleans it up
            while await admin.zscore(f"{{{namespace}}}:nodes", "mx2") is not None:
                await anyio.sleep(0.05)
    # One closed cleanly leaves at once.
    assert await _live(redis_url, namespace) == {}
