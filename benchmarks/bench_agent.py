"""The host agent, measured inside a private network namespace (root).

Run by ``run.py --only agent`` (which re-executes this file under
``unshare -n``) or directly: ``unshare -n python benchmarks/bench_agent.py``.

* ``agent_reset_p50/p99_ms``: ``FCALL banbus_ban`` → a keep-alive client of a
  plain Python socket server (no banbus in it) sees the reset, with the agent
  running; interleaved with
* ``agent_ss_k_p50/p99_ms``: the baseline — a bare stream reader that runs
  ``ss -K dst IP`` (a process per ban) for each event, on the same server.
* ``agent_nft_load_1m_s``: one transaction loading 1M addresses into the
  agent's sets (what a bootstrap of 1M bans costs in nftables), and
  ``agent_elements_per_s`` from it.

Prints one JSON list of results on stdout.
"""

from __future__ import annotations

import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from banbus._keys import namespace_keys  # noqa: E402
from banbus._library import LIBRARY_CODE  # noqa: E402
from banbus._nft import Nft  # noqa: E402
from banbus._servers import RedisProcess, free_port, hold_connections  # noqa: E402
from banbus._sockdiag import SockDiag  # noqa: E402
from banbus.agent import ruleset  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Callable

PORT = 8099


def _sample(r: redis.Redis, key: str, source: str, port: int, *, raw: bool = False) -> float | None:
    s = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
    s.settimeout(3)
    time.sleep(0.005)  # idle before the ban, like a scanner between probes
    started = time.perf_counter()
    if raw:  # the floor: a bare XADD
        r.xadd(key, {"op": "ban", "target": source})
    else:
        r.fcall("banbus_ban", 1, key, source, 600, "bench")  # type: ignore[no-untyped-call]
    try:
        data = s.recv(10)
        ok = data == b""
    except (ConnectionResetError, ConnectionAbortedError):
        ok = True
    except OSError:
        ok = False
    finally:
        s.close()
    return (time.perf_counter() - started) * 1000 if ok else None


def _follower(url: str, key: str, stop: threading.Event, destroy: Callable[[str], Any]) -> None:
    """A bare stream reader that acts on each ban: runs `ss -K` (the baseline) or
    destroys the sockets in process (the floor)."""
    r = redis.Redis.from_url(url, decode_responses=True)
    last = "0"
    while not stop.is_set():
        try:
            reply = r.xread({key: last}, block=200)
        except redis.ConnectionError:
            return  # the server is going away at the end of the run
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                last = entry_id
                if fields.get("op") == "ban":
                    destroy(fields["target"])


def _ss_k(target: str) -> None:
    subprocess.run(["ss", "-K", "dst", target], capture_output=True)


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def main() -> None:
    quick = "--quick" in sys.argv
    n = 100 if quick else 300
    subprocess.run(["ip", "link", "set", "dev", "lo", "up"], check=True)
    threading.Thread(target=hold_connections, args=(PORT,), daemon=True).start()
    results = []
    with RedisProcess(port=free_port()) as proc:
        r = redis.Redis.from_url(proc.url, decode_responses=True)
        r.function_load(LIBRARY_CODE, replace=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        keys = {
            "agent": namespace_keys("benchagent").log,
            "ss_k": namespace_keys("benchssk").log,
            "floor": "benchfloor:log",
            "supervisor": namespace_keys("benchsup").log,
        }
        agent = subprocess.Popen(
            [sys.executable, "-m", "banbus", "--redis", proc.url, "-n", "benchagent", "agent"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=env,
        )  # fmt: skip
        sup_port = PORT + 1
        supervised = subprocess.Popen(
            [sys.executable, "-m", "banbus.playground", "node", "--name", "sup", "--host",
             "127.0.0.1", "--port", str(sup_port), "--redis", proc.url, "--namespace",
             "benchsup", "--ban-loopback"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=env,
        )  # fmt: skip
        stop = threading.Event()
        diag = SockDiag()
        followers = [
            threading.Thread(target=_follower, args=(proc.url, keys["ss_k"], stop, _ss_k),
                             daemon=True),
            threading.Thread(target=_follower, args=(proc.url, keys["floor"], stop, diag.cut),
                             daemon=True),
        ]  # fmt: skip
        systems = ("agent", "supervisor", "floor", "ss_k")
        times: dict[str, list[float]] = {w: [] for w in systems}
        lost = dict.fromkeys(systems, 0)
        try:
            assert agent.stdout is not None and supervised.stdout is not None
            agent.stdout.readline()
            supervised.stdout.readline()
            for follower in followers:
                follower.start()
            order = list(systems) * n
            random.Random(7).shuffle(order)
            for i, which in enumerate(order):
                k = i + 1  # every sample its own address
                source = f"127.{10 + k // 65536}.{k // 256 % 256}.{k % 256}"
                port = sup_port if which == "supervisor" else PORT
                ms = _sample(r, keys[which], source, port, raw=which == "floor")
                if ms is None:
                    lost[which] += 1
                else:
                    times[which].append(ms)
        finally:
            stop.set()
            for process in (agent, supervised):
                process.terminate()
                process.wait(10)
            diag.close()
        names = {"agent": "agent_reset", "supervisor": "agent_supervisor", "floor": "agent_floor",
                 "ss_k": "agent_ss_k"}  # fmt: skip
        for which in systems:
            values = times[which]
            print(f"  {names[which]}: n={len(values)} p50={_pct(values, 50):.2f} "
                  f"p99={_pct(values, 99):.2f} mean={statistics.mean(values):.2f} ms "
                  f"lost={lost[which]}", file=sys.stderr)  # fmt: skip
        baselines = {
            "ss_k": "ss -K per ban (a process per event)",
            "floor": "XADD → bare reader destroying in process (floor)",
            "supervisor": "in-process supervisor of a banbus node",
        }
        for p in (50, 99):
            results.append({"name": f"agent_reset_p{p}_ms", "value": _pct(times["agent"], p),
                            "unit": "ms", "baseline": _pct(times["ss_k"], p),
                            "baseline_name": f"{baselines['ss_k']} p{p}"})  # fmt: skip
            for which in ("floor", "supervisor"):
                results.append({"name": f"{names[which]}_p{p}_ms",
                                "value": _pct(times[which], p), "unit": "ms",
                                "baseline": _pct(times["agent"], p),
                                "baseline_name": f"agent p{p}, vs {which}"})  # fmt: skip
    # Bootstrap: 1M addresses into the agent's sets, one transaction.
    count = 100_000 if quick else 1_000_000
    nft = Nft()
    nft.run(ruleset("benchload"))
    elements = ", ".join(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255} timeout 3600s"
                         for i in range(count))  # fmt: skip
    started = time.perf_counter()
    nft.run(f"add element inet benchload ban4_host {{ {elements} }}\n")
    load_s = time.perf_counter() - started
    # One ban's element: in process (libnftables) vs the nft command per change.
    singles = 200
    started = time.perf_counter()
    for i in range(singles):
        nft.run(f"add element inet benchload ban4_host {{ 10.250.{i >> 8}.{i & 255} }}\n")
    in_process_us = (time.perf_counter() - started) / singles * 1e6
    started = time.perf_counter()
    for i in range(singles):
        subprocess.run(["nft", "add", "element", "inet", "benchload", "ban4_host",
                        f"{{ 10.251.{i >> 8}.{i & 255} }}"], check=True)  # fmt: skip
    command_us = (time.perf_counter() - started) / singles * 1e6
    print(f"  one element: libnftables {in_process_us:.0f} µs, nft command "
          f"{command_us:.0f} µs", file=sys.stderr)  # fmt: skip
    results.append({"name": "agent_nft_add_us", "value": in_process_us, "unit": "µs",
                    "baseline": command_us,
                    "baseline_name": "the nft command per change (a process)"})  # fmt: skip
    nft.run("delete table inet benchload\n")
    print(f"  nft load: {count:,} elements in {load_s:.2f} s", file=sys.stderr)
    name = "agent_nft_load_1m_s" if count == 1_000_000 else "agent_nft_load_100k_s"
    results.append({"name": name, "value": load_s, "unit": "s"})
    results.append({"name": "agent_elements_per_s", "value": count / load_s, "unit": "elements/s"})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
