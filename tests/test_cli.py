"""The ``banbus`` command line, in-process (``main(argv)``) and as ``python -m banbus``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

from banbus._cli import _default_origin, main
from banbus._node import namespace_keys
from banbus._servers import free_port

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    Run = Callable[..., tuple[int, str, str]]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def cli(redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]) -> Run:
    """Run the CLI in-process against the test server; return (code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main(["--redis", redis_url, "--namespace", namespace, *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def run_module(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "banbus", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def xlen(r: redis.Redis, namespace: str) -> int:
    return int(r.xlen(namespace_keys(namespace).log))  # type: ignore[arg-type]


def test_ban_list_check_unban(cli: Run, r: redis.Redis, namespace: str) -> None:
    code, out, err = cli("ban", "::ffff:203.0.113.7", "--ttl", "1h", "--reason", "scan")
    assert (code, err) == (0, "")
    assert out.startswith("banned 203.0.113.7 until ")
    assert "(seq 1)" in out
    code, out, _ = cli("ban", "198.51.100.0/24")
    assert code == 0
    assert "banned 198.51.100.0/24 permanently (seq 2)" in out
    assert xlen(r, namespace) == 2
    assert set(r.hkeys(namespace_keys(namespace).bans)) == {"203.0.113.7", "198.51.100.0/24"}

    code, out, _ = cli("list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "bans (2):"
    assert "198.51.100.0/24" in lines[1]
    assert "permanent" in lines[1]
    assert "203.0.113.7" in lines[2]
    assert '"scan"' in lines[2]
    assert "left" in lines[2]
    assert lines[3] == "allowlist (0):"

    code, out, _ = cli("list", "--json")
    assert code == 0
    data = json.loads(out)
    assert [b["target"] for b in data["bans"]] == ["198.51.100.0/24", "203.0.113.7"]
    scan = data["bans"][1]
    assert (scan["reason"], scan["origin"], scan["seq"], scan["kind"]) == (
        "scan",
        _default_origin(),
        1,
        "ban",
    )
    assert 3_590_000 < scan["expires"] - data["server_time_ms"] <= 3_600_000
    assert data["allow"] == []

    assert cli("check", "203.0.113.7")[0] == 1
    assert cli("check", "::ffff:203.0.113.7")[0] == 1
    code, out, _ = cli("check", "198.51.100.99")
    assert code == 1
    assert "banned by 198.51.100.0/24" in out
    code, out, _ = cli("check", "203.0.113.8")
    assert code == 0
    assert "not banned" in out

    code, out, _ = cli("unban", "203.0.113.7")
    assert code == 0
    assert "removed ban on 203.0.113.7 (seq 3)" in out
    assert cli("check", "203.0.113.7")[0] == 0
    # Unbanning again changes nothing, but is logged and remembered (a
    # tombstone: a re-seed after data loss must not undo it).
    code, out, _ = cli("unban", "203.0.113.7")
    assert code == 0
    assert "nothing to do" in out
    assert xlen(r, namespace) == 4
    assert r.zscore(namespace_keys(namespace).removed, "b 203.0.113.7") is not None


def test_allow_and_disallow(cli: Run, namespace: str, r: redis.Redis) -> None:
    assert cli("ban", "10.0.0.0/8")[0] == 0
    code, out, _ = cli("allow", "10.1.2.3", "--reason", "office")
    assert code == 0
    assert out.startswith("allowlisted 10.1.2.3 permanently")
    code, out, _ = cli("check", "10.1.2.3")
    assert code == 0
    assert "allowlisted by 10.1.2.3" in out
    assert cli("check", "10.1.2.4")[0] == 1
    code, out, _ = cli("list", "--json")
    assert [a["target"] for a in json.loads(out)["allow"]] == ["10.1.2.3"]
    code, out, _ = cli("disallow", "10.1.2.3")
    assert code == 0
    assert "removed allowlist entry for 10.1.2.3" in out
    assert cli("check", "10.1.2.3")[0] == 1
    assert r.hlen(namespace_keys(namespace).allow) == 0


def test_force_and_ttl_units(cli: Run, r: redis.Redis, namespace: str) -> None:
    assert cli("ban", "10.0.0.0/7", "--force")[0] == 0
    assert cli("check", "11.255.0.1")[0] == 1
    for ttl, seconds in (("90s", 90), ("10m", 600), ("7d", 7 * 86400), ("2w", 14 * 86400)):
        code, _, _ = cli("ban", "203.0.113.1", "--ttl", ttl, "--replace")
        assert code == 0
        data = json.loads(cli("list", "--json")[1])
        (record,) = [b for b in data["bans"] if b["target"] == "203.0.113.1"]
        left = record["expires"] - data["server_time_ms"]
        assert seconds * 1000 - 5000 < left <= seconds * 1000, ttl


def test_watch_from_the_beginning(cli: Run) -> None:
    cli("ban", "203.0.113.7", "--reason", "a b")
    cli("ban", "2001:db8::/48", "--ttl", "1h")
    cli("unban", "203.0.113.7")
    code, out, err = cli("watch", "--from", "0", "--count", "3")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert len(lines) == 3
    assert "ban" in lines[0]
    assert "203.0.113.7" in lines[0]
    assert 'reason="a b"' in lines[0]
    assert "seq=1" in lines[0]
    assert "2001:db8::/48" in lines[1]
    assert "unban" in lines[2]
    assert "seq=3" in lines[2]
    code, out, _ = cli("watch", "--from", "0", "--count", "2", "--json")
    assert code == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert [(e["op"], e["target"], e["seq"]) for e in events] == [
        ("ban", "203.0.113.7", 1),
        ("ban", "2001:db8::/48", 2),
    ]


def test_watch_shows_malformed_entries(cli: Run, r: redis.Redis, namespace: str) -> None:
    r.xadd(namespace_keys(namespace).log, {"op": "explode", "target": "1.2.3.4", "seq": "1"})
    code, out, _ = cli("watch", "--from", "0", "--count", "1")
    assert code == 0
    assert "malformed" in out


@pytest.mark.real_redis  # synchronises on CLIENT LIST's cmd field (not in fakeredis)
def test_watch_live_in_a_subprocess(redis_url: str, namespace: str, r: redis.Redis) -> None:
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "banbus",
            "--redis",
            redis_url,
            "-n",
            namespace,
            "watch",
            "--count",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    ) as proc:
        try:
            # Synchronise on the watcher being blocked in XREAD (it starts at the end).
            deadline = time.monotonic() + 30
            while not any(c.get("cmd") == "xread" for c in r.client_list()):
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "watch never started reading"
                time.sleep(0.01)
            assert main(["--redis", redis_url, "-n", namespace, "ban", "198.51.100.3"]) == 0
            assert main(["--redis", redis_url, "-n", namespace, "allow", "198.51.100.4"]) == 0
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    assert "198.51.100.3" in lines[0]
    assert "allow" in lines[1]
    assert "198.51.100.4" in lines[1]


@pytest.mark.parametrize(
    "args",
    [
        ["ban", "0.0.0.0/0"],
        ["ban", "0.0.0.0/0", "--force"],
        ["ban", "::/0", "--force"],
        ["ban", "10.0.0.0/7"],
        ["ban", "banana"],
        ["ban", "10.0.0.1/8"],
        ["ban", "fe80::1%eth0"],
        ["ban", "203.0.113.7", "--ttl", "-1"],
        ["ban", "203.0.113.7", "--ttl", "1.5"],
        ["ban", "203.0.113.7", "--ttl", "20y"],
        ["ban", "203.0.113.7", "--ttl", "999999999999"],
        ["ban", "203.0.113.7", "--reason", "x" * 513],
        ["ban", "203.0.113.7", "--reason", "two\nlines"],
        ["allow", "0.0.0.0/0"],
        ["allow", "banana"],
        ["unban", "banana"],
        ["disallow", "10.0.0.1/8"],
        ["check", "banana"],
        ["check", "10.0.0.0/8"],
    ],
)
def test_bad_input_exits_2_with_one_line(
    cli: Run, r: redis.Redis, namespace: str, args: list[str]
) -> None:
    cli("ban", "192.0.2.1")
    before = xlen(r, namespace)
    code, out, err = cli(*args)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("banbus: error: ")
    assert len(err) < 300
    assert xlen(r, namespace) == before
    assert r.hkeys(namespace_keys(namespace).bans) == ["192.0.2.1"]
    assert r.hlen(namespace_keys(namespace).allow) == 0


def test_bad_input_names_the_problem(cli: Run) -> None:
    assert "did you mean 10.0.0.0/8?" in cli("ban", "10.0.0.1/8")[2]
    assert "'banana'" in cli("ban", "banana")[2]
    assert "force" in cli("ban", "10.0.0.0/7")[2]
    assert "every IPv4 address" in cli("ban", "0.0.0.0/0", "--force")[2]


def test_bad_namespace_and_url(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--redis", redis_url, "-n", "bad ns", "ban", "192.0.2.1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "namespace" in err
    assert main(["--redis", "notaurl", "ban", "192.0.2.1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "notaurl" in err


@pytest.mark.parametrize("command", [["ban", "192.0.2.1"], ["list"], ["check", "192.0.2.1"]])
def test_unreachable_redis(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    start = time.monotonic()
    code = main(["--redis", f"redis://127.0.0.1:{port}/0", *command])
    assert code == 2
    assert time.monotonic() - start < 20
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("banbus: error: ")
    assert f"127.0.0.1:{port}" in err


def test_env_var_url_and_namespace(
    redis_url: str,
    namespace: str,
    r: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("BANBUS_REDIS_URL", redis_url)
    monkeypatch.setenv("BANBUS_NAMESPACE", namespace)
    assert main(["ban", "192.0.2.55"]) == 0
    assert "192.0.2.55" in capsys.readouterr().out
    assert r.hkeys(namespace_keys(namespace).bans) == ["192.0.2.55"]
    assert main(["check", "192.0.2.55"]) == 1
    # --redis beats the environment.
    monkeypatch.setenv("BANBUS_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert main(["check", "192.0.2.55"]) == 2
    capsys.readouterr()
    assert main(["--redis", redis_url, "check", "192.0.2.55"]) == 1


def test_python_dash_m(redis_url: str, namespace: str, r: redis.Redis) -> None:
    env = {"BANBUS_REDIS_URL": redis_url}
    done = run_module("-n", namespace, "ban", "2001:DB8::7", "--reason", "via -m", env=env)
    assert done.returncode == 0, done.stderr
    assert "banned 2001:db8::7 permanently" in done.stdout
    check = run_module("-n", namespace, "check", "2001:db8:0::7", env=env)
    assert check.returncode == 1
    assert "2001:db8::7 is banned" in check.stdout
    assert run_module("-n", namespace, "check", "2001:db8::8", env=env).returncode == 0
    listed = run_module("-n", namespace, "list", "--json", env=env)
    assert [b["target"] for b in json.loads(listed.stdout)["bans"]] == ["2001:db8::7"]
    before = xlen(r, namespace)
    bad = run_module("-n", namespace, "ban", "::/0", "--force", env=env)
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.count("\n") == 1
    assert "::/0" in bad.stderr
    assert xlen(r, namespace) == before
    closed = run_module("--redis", f"redis://127.0.0.1:{free_port()}/0", "list")
    assert closed.returncode == 2
    assert closed.stderr.count("\n") == 1
    assert "Traceback" not in closed.stderr


def test_help_lists_the_commands() -> None:
    done = run_module("--help")
    assert done.returncode == 0
    for command in ("ban", "unban", "allow", "disallow", "list", "check", "watch"):
        assert command in done.stdout
    assert run_module("frobnicate").returncode == 2
