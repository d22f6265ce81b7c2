"""The compose files are for users (no Docker engine here): check they parse and agree."""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys
from typing import Any

import anyio
import pytest
import yaml
from anyio.streams.buffered import BufferedByteReceiveStream

from banbus._servers import free_port

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.anyio


def test_compose_file_parses_and_runs_the_playground() -> None:
    from banbus import playground

    data = yaml.safe_load((ROOT / "compose" / "compose.yaml").read_text())
    services = data["services"]
    assert {"redis", "node1", "node2", "node3", "scanner", "cli"} <= set(services)
    for name in ("node1", "node2", "node3", "scanner", "cli"):
        service = services[name]
        assert service["environment"]["BANBUS_REDIS_URL"] == "redis://redis:6379/0"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        dockerfile = ROOT / "compose" / service["build"]["dockerfile"].split("/", 1)[1]
        assert dockerfile.is_file()
    # Real protected servers, not followers; the scanner waits for them.
    for name in ("node1", "node2", "node3"):
        command = services[name]["command"]
        assert command[:4] == ["python", "-m", "banbus.playground", "node"]
        assert "healthcheck" in services[name]
    assert "--uvicorn" in services["node3"]["command"]
    assert services["scanner"]["command"][3:] == ["scan", "node1:8080", "node2:8080",
                                                   "node3:8080"]  # fmt: skip
    assert set(services["scanner"]["depends_on"]) >= {"node1", "node2", "node3"}
    assert ".[asgi]" in (ROOT / "compose" / "Dockerfile").read_text()  # node3 needs uvicorn
    with pytest.raises(SystemExit):  # the commands are the module's own
        playground.main(["node", "--help"])


async def test_the_compose_services_run_as_processes(redis_url: str, namespace: str) -> None:
    """compose.yaml's commands, run as processes on loopback: the scanner is cut on
    every node (the compose file is not run here: no Docker engine)."""
    services = yaml.safe_load((ROOT / "compose" / "compose.yaml").read_text())["services"]
    ports = {name: free_port() for name in ("node1", "node2", "node3")}
    env = {**os.environ, "BANBUS_REDIS_URL": redis_url, "BANBUS_NAMESPACE": namespace,
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    async with contextlib.AsyncExitStack() as stack:
        for name, port in ports.items():
            argv = [sys.executable, *services[name]["command"][1:]]
            argv[argv.index("--port") + 1] = str(port)
            argv += ["--host", "127.0.0.1", "--ban-loopback"]  # loopback stands for the network
            process = await stack.enter_async_context(
                await anyio.open_process(argv, env=env, stderr=subprocess.DEVNULL)
            )
            stack.push_async_callback(_stop, process)
            assert process.stdout is not None
            with anyio.fail_after(30):
                line = await BufferedByteReceiveStream(process.stdout).receive_until(b"\n", 4096)
            assert f"{name} listening on 127.0.0.1:{port}".encode() in line
        scan = [sys.executable, *services["scanner"]["command"][1:]]
        scan = [f"127.0.0.1:{ports[w.split(':')[0]]}" if w.startswith("node") else w for w in scan]
        result = await anyio.run_process([*scan, "--source", "127.0.0.3"], env=env, check=False)
    out = result.stdout.decode()
    assert result.returncode == 0, out
    assert out.count("then cut") == 3 and "scanner cut on every node" in out


async def _stop(process: Any) -> None:
    process.terminate()
    with anyio.move_on_after(5):
        await process.wait()
    if process.returncode is None:
        process.kill()


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
