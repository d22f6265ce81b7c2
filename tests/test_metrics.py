"""Prometheus exposition of a node's statistics (real Redis, real scrape text)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import banbus
import banbus.metrics

pytestmark = pytest.mark.anyio


async def test_metrics_reflect_the_node(redis_url: str, namespace: str) -> None:
    registry = CollectorRegistry()
    async with (
        banbus.Node(redis_url, namespace=namespace, node_id="mx1") as a,
        banbus.Node(redis_url, namespace=namespace, node_id="mx2") as b,
    ):
        collector = banbus.metrics.register(a, registry)
        collector.add(b)
        record = await a.ban("203.0.113.7", reason="scan")
        await b.wait_for_seq(record.seq)
        text = generate_latest(registry).decode()
    labels = f'namespace="{namespace}",node="mx2"'
    assert f"banbus_bans_active{{{labels}}} 1.0" in text
    assert f"banbus_events_applied_total{{{labels}}} 1.0" in text
    assert f"banbus_connected{{{labels}}} 1.0" in text
    assert f'banbus_connections_cut_total{{namespace="{namespace}",node="mx1"}} 0.0' in text
    assert "# HELP banbus_resyncs_total" in text


async def test_metrics_include_what_an_embedding_process_adds(
    redis_url: str, namespace: str
) -> None:
    """``banbus agent`` adds its counters (heartbeat_extra): they are exported too."""
    registry = CollectorRegistry()
    async with banbus.Node(redis_url, namespace=namespace, node_id="agent@h") as node:
        node.heartbeat_extra = lambda: {"connections_cut": 3, "elements_loaded": 7}
        banbus.metrics.register(node, registry)
        text = generate_latest(registry).decode()
    labels = f'namespace="{namespace}",node="agent@h"'
    assert f"banbus_agent_connections_cut{{{labels}}} 3.0" in text
    assert f"banbus_agent_elements_loaded{{{labels}}} 7.0" in text
