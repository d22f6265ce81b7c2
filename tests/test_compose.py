"""The compose files are for users (no Docker engine here): check they parse and agree."""

from __future__ import annotations

import pathlib
from typing import Any

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


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose" / name).read_text())
    return data


def test_sentinel_compose_points_nodes_at_its_sentinels() -> None:
    from banbus._keys import namespace_keys
    from banbus._topology import open_topology

    services = _load("sentinel.yaml")["services"]
    sentinels = [s for s in services if s.startswith("sentinel")]
    assert len(sentinels) == 3
    for name in sentinels:
        script = services[name]["command"][0]
        assert "sentinel monitor mymaster redis-primary 6379 2" in script
        assert "--sentinel" in script
    assert "--replicaof" in services["redis-replica"]["command"]
    for name in ("node1", "node2", "cli"):
        url = services[name]["environment"]["BANBUS_REDIS_URL"]
        topology = open_topology(url, namespace_keys("banbus"))  # the URL is one banbus takes
        assert topology.kind == "sentinel" and topology._service == "mymaster"
        assert topology._sentinel is not None
        hosts = {c.connection_pool.connection_kwargs["host"] for c in topology._sentinel.sentinels}
        assert hosts == set(sentinels)
        assert (ROOT / "compose" / services[name]["build"]["dockerfile"].split("/", 1)[1]).is_file()


def test_cluster_compose_points_nodes_at_its_nodes() -> None:
    from banbus._keys import namespace_keys
    from banbus._topology import open_topology

    data = _load("cluster.yaml")
    services = data["services"]
    redis = {s: services[s] for s in services if s.startswith("redis")}
    assert len(redis) == 6
    addresses = {s["networks"]["cluster"]["ipv4_address"] for s in redis.values()}
    for service in redis.values():
        assert "--cluster-enabled" in service["command"]
    init = services["cluster-init"]["command"][0]
    assert "--cluster-replicas 1" in init
    assert {a for a in addresses if f"{a}:6379" in init} == addresses
    subnet = data["networks"]["cluster"]["ipam"]["config"][0]["subnet"]
    assert all(a.startswith(subnet.rsplit(".", 1)[0] + ".") for a in addresses)
    for name in ("node1", "node2", "cli"):
        url = services[name]["environment"]["BANBUS_REDIS_URL"]
        topology = open_topology(url, namespace_keys("banbus"))
        assert topology.kind == "cluster"
        assert {host for host, _ in topology._seeds} <= addresses
        assert services[name]["depends_on"]["cluster-init"]["condition"] == (
            "service_completed_successfully"
        )
