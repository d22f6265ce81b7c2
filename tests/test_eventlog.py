"""Structured INFO logs of bans applied and connections cut (issue 11)."""

from __future__ import annotations

import logging

import pytest

from banbus import Node

from ._helpers import eventually, synced

pytestmark = pytest.mark.anyio


async def test_bans_applied_and_cuts_are_logged_at_info(
    redis_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="banbus.events")
    closed: list[str] = []
    async with (
        Node(redis_url, namespace=namespace, node_id="a", block_ms=200) as a,
        Node(redis_url, namespace=namespace, node_id="b", block_ms=200) as b,
    ):
        assert b._eventlog is not None
        b.supervisor.track("203.0.113.7", lambda: closed.append("x"), port=8080,
                           listener="web")  # fmt: skip
        record = await a.ban("203.0.113.7", ttl=600, reason="scan: 3 in 5m")
        await synced(record.seq, b)
        assert closed == ["x"]
        await eventually(lambda: b._eventlog is not None and b._eventlog.written >= 2, 5.0,
                         "logged")  # fmt: skip
    lines = [r for r in caplog.records if r.name == "banbus.events"]
    applied = [r for r in lines if r.getMessage().startswith("ban applied")]
    on_b = [r for r in applied if "node=b" in r.getMessage()]
    assert on_b, [r.getMessage() for r in lines]
    text = on_b[0].getMessage()
    assert 'target=203.0.113.7 origin=a reason="scan: 3 in 5m"' in text
    assert f"seq={record.seq}" in text and "lag_ms=" in text
    assert on_b[0].banbus["target"] == "203.0.113.7"  # type: ignore[attr-defined]
    cut = [r.getMessage() for r in lines if r.getMessage().startswith("connection cut")]
    assert any("peer=203.0.113.7 port=8080 listener=web how=cut" in c for c in cut), cut


async def test_nothing_is_registered_when_the_log_is_off(
    redis_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="banbus.events")
    async with Node(redis_url, namespace=namespace, block_ms=200) as n:
        assert n._eventlog is None and not n._listeners
