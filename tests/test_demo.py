"""``banbus demo``: end to end, against each kind of Redis it can pick."""

from __future__ import annotations

import io

import pytest

import banbus._demo as demo
from banbus._demo import main, run_demo

from .conftest import HAVE_REAL


@pytest.mark.anyio
async def test_demo_with_redis_url(redis_url: str) -> None:
    out = io.StringIO()
    assert await run_demo(redis_url, out=out, color=False) == 0
    text = out.getvalue()
    assert "from --redis" in text
    # The decision: probes counted across nodes, one report crosses the policy.
    assert "reported: 1/3 cluster-wide" in text
    assert "crosses the policy: ban 127.0.0.2 created" in text
    for node in ("node1", "node2", "node3"):
        assert f"{node} " in text
    assert text.count("open connection cut") == 3
    assert "✓ all 3 banbus nodes cut the scanner" in text
    assert "\x1b[" not in text


@pytest.mark.anyio
async def test_demo_falls_back_to_embedded_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "redis_server_binary", lambda: None)
    out = io.StringIO()
    assert await run_demo(None, out=out, color=True) == 0
    assert "embedded fakeredis" in out.getvalue()
    assert "\x1b[32m" in out.getvalue()


@pytest.mark.skipif(not HAVE_REAL, reason="needs redis-server on PATH")
def test_demo_main_starts_redis_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--no-color"]) == 0
    text = capsys.readouterr().out
    assert "started for this demo" in text and "✓" in text


def test_demo_main_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "--redis URL" in capsys.readouterr().out
