"""The compose files are for users (no Docker engine here): check they parse and agree."""

from __future__ import annotations

import pathlib

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_compose_file_parses_and_points_nodes_at_its_redis() -> None:
    data = yaml.safe_load((ROOT / "compose" / "compose.yaml").read_text())
    services = data["services"]
    assert {"redis", "node1", "node2", "cli"} <= set(services)
    for name in ("node1", "node2", "cli"):
        service = services[name]
        assert service["environment"]["BANBUS_REDIS_URL"] == "redis://redis:6379/0"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        dockerfile = ROOT / "compose" / service["build"]["dockerfile"].split("/", 1)[1]
        assert dockerfile.is_file()
    assert services["node1"]["command"][0] == "banbus"
