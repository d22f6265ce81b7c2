"""The agent end to end, inside a private network namespace (run by tests/test_agent.py).

Usage: ``unshare -n python tests/_agent_scenario.py``.  Brings ``lo`` up,
starts a redis-server and ``banbus agent`` (the console script) in the
namespace, and a plain keep-alive TCP server that knows nothing of banbus;
clients connect from distinct loopback addresses.  Bans are made with
``FCALL`` as an operator would.  Prints one JSON object of observations.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from banbus._library import ensure_library  # noqa: E402
from banbus._servers import RedisProcess, free_port, hold_connections  # noqa: E402

PORT = 8099
NS = "agent"


def connect(source: str, host: str = "127.0.0.1", timeout: float = 0.5) -> socket.socket | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.bind((source, 0))
        s.connect((host, PORT))
    except OSError:
        s.close()
        return None
    s.settimeout(None)
    return s


def reset_after(s: socket.socket, started: float, limit: float = 3.0) -> float | None:
    """Milliseconds from *started* until *s* is reset, or None."""
    s.settimeout(limit)
    try:
        data = s.recv(10)
    except (ConnectionResetError, ConnectionAbortedError):
        return (time.perf_counter() - started) * 1000
    except OSError:
        return None
    return (time.perf_counter() - started) * 1000 if data == b"" else None


def alive(s: socket.socket) -> bool:
    s.settimeout(0.2)
    try:
        return s.recv(10) != b""
    except TimeoutError:
        return True
    except OSError:
        return False


def wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def in_set(name: str, target: str) -> bool:
    """Is *target* an element of the agent's set *name* (what the kernel holds)?"""
    listing = subprocess.run(["nft", "-j", "list", "set", "inet", "banbus", name],
                             capture_output=True, text=True)  # fmt: skip
    if listing.returncode:
        return False
    for item in json.loads(listing.stdout)["nftables"]:
        for elem in item.get("set", {}).get("elem", []):
            value = elem["elem"]["val"] if isinstance(elem, dict) and "elem" in elem else elem
            if isinstance(value, dict) and "prefix" in value:
                value = f"{value['prefix']['addr']}/{value['prefix']['len']}"
            if value == target:
                return True
    return False


def main() -> None:
    subprocess.run(["ip", "link", "set", "dev", "lo", "up"], check=True)
    for address in ("2001:db8::1", "2001:db8::5"):
        subprocess.run(["ip", "-6", "addr", "add", f"{address}/128", "dev", "lo"], check=True)
    out: dict[str, Any] = {}
    threading.Thread(target=hold_connections, args=(PORT,), kwargs={"dual_stack": True},
                     daemon=True).start()  # fmt: skip
    with RedisProcess(port=free_port()) as proc:
        r = redis.Redis.from_url(proc.url, decode_responses=True)
        import anyio

        async def load() -> None:
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(proc.url)
            await ensure_library(client)
            await client.aclose()

        anyio.run(load)
        key = "{" + NS + "}:log"
        r.fcall("banbus_ban", 1, key, "127.0.9.9", 0, "before the agent")  # type: ignore[no-untyped-call]
        agent = subprocess.Popen(
            [sys.executable, "-m", "banbus", "--redis", proc.url, "-n", NS, "agent"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        try:
            assert agent.stdout is not None
            out["agent_started"] = agent.stdout.readline().strip()
            out["bootstrap_blocked"] = connect("127.0.9.9") is None

            attacker, bystander = connect("127.0.0.5"), connect("127.0.0.6")
            v6 = connect("2001:db8::5", "2001:db8::1")
            allowed, neighbour = connect("127.0.2.7"), connect("127.0.2.8")
            assert attacker and bystander and v6 and allowed and neighbour
            # 1. An address: its established connection is reset, new ones get nothing.
            started = time.perf_counter()
            r.fcall("banbus_ban", 1, key, "127.0.0.5", 0, "scanner")  # type: ignore[no-untyped-call]
            out["reset_ms"] = reset_after(attacker, started)
            out["bystander_alive"] = alive(bystander)
            out["new_from_banned"] = connect("127.0.0.5") is not None
            # 2. A network with an allowlisted address inside it.
            r.fcall("banbus_allow", 1, key, "127.0.2.7", 0, "office")  # type: ignore[no-untyped-call]
            out["allow_loaded"] = wait_for(lambda: in_set("allow4", "127.0.2.7"))
            started = time.perf_counter()
            r.fcall("banbus_ban", 1, key, "127.0.2.0/24", 0, "net")  # type: ignore[no-untyped-call]
            out["cidr_reset_ms"] = reset_after(neighbour, started)
            out["allowed_alive"] = alive(allowed)
            out["allowed_new"] = connect("127.0.2.7") is not None
            out["cidr_new"] = connect("127.0.2.99") is not None
            # 3. IPv6.
            started = time.perf_counter()
            r.fcall("banbus_ban", 1, key, "2001:db8::5", 0, "v6")  # type: ignore[no-untyped-call]
            out["v6_reset_ms"] = reset_after(v6, started)
            out["v6_new"] = connect("2001:db8::5", "2001:db8::1") is not None
            # 4. Unban: new connections work again.
            r.fcall("banbus_unban", 1, key, "127.0.0.5")  # type: ignore[no-untyped-call]
            out["after_unban"] = wait_for(lambda: (c := connect("127.0.0.5")) is not None
                                          and (c.close() or True))  # fmt: skip
            # 5. Expiry in the kernel.
            r.fcall("banbus_ban", 1, key, "127.0.3.3", 1, "short")  # type: ignore[no-untyped-call]
            out["expiring_blocked"] = wait_for(lambda: connect("127.0.3.3", timeout=0.2) is None)
            out["expired_open"] = wait_for(lambda: connect("127.0.3.3", timeout=0.2) is not None,
                                           timeout=5.0)  # fmt: skip
            # 6. Nested networks: the wider one runs out, the inner one stays.
            r.fcall("banbus_ban", 1, key, "127.0.4.0/25", 0, "inner")  # type: ignore[no-untyped-call]
            r.fcall("banbus_ban", 1, key, "127.0.4.0/24", 1, "outer")  # type: ignore[no-untyped-call]
            out["outer_blocked"] = wait_for(lambda: connect("127.0.4.200", timeout=0.2) is None)
            out["outer_expired"] = wait_for(
                lambda: connect("127.0.4.200", timeout=0.2) is not None, timeout=5.0
            )
            out["inner_still_blocked"] = connect("127.0.4.9", timeout=0.3) is None
            # 7. The address inside a banned network: blocked until both are lifted.
            r.fcall("banbus_ban", 1, key, "127.0.5.5", 0, "host")  # type: ignore[no-untyped-call]
            r.fcall("banbus_ban", 1, key, "127.0.5.0/24", 0, "net")  # type: ignore[no-untyped-call]
            out["net_loaded"] = wait_for(lambda: in_set("ban4_net", "127.0.5.0/24"))
            r.fcall("banbus_unban", 1, key, "127.0.5.0/24")  # type: ignore[no-untyped-call]
            out["net_unloaded"] = wait_for(lambda: not in_set("ban4_net", "127.0.5.0/24"))
            out["host_inside_lifted_net_blocked"] = connect("127.0.5.5", timeout=0.3) is None
            out["net_lifted_open"] = connect("127.0.5.6", timeout=0.3) is not None
            # 8. Removing an allowlist entry cuts nobody who is not banned.
            r.fcall("banbus_allow", 1, key, "127.0.8.0/24", 0, "office")  # type: ignore[no-untyped-call]
            out["office_allowed"] = wait_for(lambda: in_set("allow4", "127.0.8.0/24"))
            office = connect("127.0.8.8")
            assert office is not None
            r.fcall("banbus_disallow", 1, key, "127.0.8.0/24")  # type: ignore[no-untyped-call]
            out["office_disallowed"] = wait_for(lambda: not in_set("allow4", "127.0.8.0/24"))
            out["office_alive"] = alive(office)
            # 9. The table flushed behind the agent's back: loaded again.
            subprocess.run(["nft", "delete", "table", "inet", "banbus"], check=True)
            out["table_back"] = wait_for(lambda: in_set("ban4_host", "127.0.9.9"), timeout=15)
            status = subprocess.run([sys.executable, "-m", "banbus", "--redis", proc.url,
                                     "-n", NS, "agent", "status"],
                                    capture_output=True, text=True, cwd=ROOT)  # fmt: skip
            out["status"] = status.stdout
        finally:
            agent.terminate()
            try:
                agent.wait(10)
            except subprocess.TimeoutExpired:
                agent.kill()
            out["agent_stderr"] = (agent.stderr.read() if agent.stderr else "")[-2000:]
        listing = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True)
        out["tables_after_exit"] = listing.stdout
        phase_two(proc.url, r, out)
    print(json.dumps(out))


def start_agent(url: str, namespace: str, *extra: str) -> subprocess.Popen[str]:
    agent = subprocess.Popen(
        [sys.executable, "-m", "banbus", "--redis", url, "-n", namespace, "agent", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert agent.stdout is not None
    return agent


def stop_agent(agent: subprocess.Popen[str]) -> None:
    agent.terminate()
    try:
        agent.wait(10)
    except subprocess.TimeoutExpired:
        agent.kill()


def phase_two(url: str, r: redis.Redis, out: dict[str, Any]) -> None:
    """--ports, a resync after the stream was trimmed past the agent, a restart with
    100k bans, and no capability."""
    other_port = PORT + 1
    threading.Thread(target=hold_connections, args=(other_port,), kwargs={"dual_stack": True},
                     daemon=True).start()  # fmt: skip
    # --ports: only the listed local ports are filtered and cut.
    ns = "ports"
    key = "{" + ns + "}:log"
    agent = start_agent(url, ns, "--ports", str(PORT))
    try:
        assert agent.stdout is not None
        agent.stdout.readline()
        on_port = connect("127.0.6.6")
        other = socket.create_connection(("127.0.0.1", other_port),
                                         source_address=("127.0.6.6", 0))  # fmt: skip
        assert on_port is not None
        started = time.perf_counter()
        r.fcall("banbus_ban", 1, key, "127.0.6.6", 0, "ports")  # type: ignore[no-untyped-call]
        out["ports_reset_ms"] = reset_after(on_port, started)
        out["ports_other_alive"] = alive(other)
        out["ports_other_new"] = wait_for(lambda: _connect_port("127.0.6.6", other_port))
        out["ports_listed_new"] = connect("127.0.6.6") is not None
        # A resync: the stream trimmed past a stopped agent.
        r.hset("{" + ns + "}:config", "maxlen", 10)
        agent.send_signal(19)  # SIGSTOP
        for i in range(60):
            r.fcall("banbus_ban", 1, key, f"127.0.7.{i + 1}", 0, "while stopped")  # type: ignore[no-untyped-call]
        agent.send_signal(18)  # SIGCONT
        out["resync_loaded"] = wait_for(
            lambda: all(in_set("ban4_host", f"127.0.7.{i}") for i in (1, 30, 60)), timeout=15
        )
        out["resync_blocks"] = connect("127.0.7.1", timeout=0.3) is None
    finally:
        stop_agent(agent)
    # A restart with 100k bans in the namespace.
    ns = "big"
    key = "{" + ns + "}:log"
    for start in range(0, 100_000, 5000):
        pipe = r.pipeline(transaction=False)
        for i in range(start, start + 5000):
            pipe.fcall("banbus_ban", 1, key, f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}", 0, "big")  # type: ignore[no-untyped-call]
        pipe.execute()
    started = time.perf_counter()
    agent = start_agent(url, ns)
    try:
        assert agent.stdout is not None
        out["big_started"] = agent.stdout.readline().strip()
        out["big_start_s"] = time.perf_counter() - started
        out["big_blocked"] = in_set("ban4_host", "10.1.134.159")  # the 100,000th
    finally:
        stop_agent(agent)
    # --keep: the table stays after the agent (enforcing what it held).
    agent = start_agent(url, "big", "--keep", "--table", "kept", "--hook-priority", "-20")
    assert agent.stdout is not None
    agent.stdout.readline()
    stop_agent(agent)
    kept = subprocess.run(["nft", "list", "chain", "inet", "kept", "input"],
                          capture_output=True, text=True)  # fmt: skip
    out["kept_after_exit"] = kept.stdout
    subprocess.run(["nft", "delete", "table", "inet", "kept"], check=False)
    # Without CAP_NET_ADMIN: a clear error, exit 2.
    without = ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin"]
    refused = subprocess.run(
        [*without, sys.executable, "-m", "banbus", "--redis", url, "-n", "nocap", "agent"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    out["nocap_rc"] = refused.returncode
    out["nocap_stderr"] = refused.stderr


def _connect_port(source: str, port: int) -> bool:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=0.3,
                                     source_address=(source, 0))  # fmt: skip
    except OSError:
        return False
    s.close()
    return True


if __name__ == "__main__":
    main()
