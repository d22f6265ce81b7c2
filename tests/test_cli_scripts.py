"""The ``banbus`` console script as an operator's scripts run it (issue 11).

Every failure mode runs the real console script in a subprocess and checks
stdout, stderr and the exit code: 0 ok, 1 only ever "banned" (``check``),
2 any failure — one line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

from banbus._keys import namespace_keys

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from banbus._servers import RedisProcess

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = shutil.which("banbus", path=str(Path(sys.executable).parent))


def banbus(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [SCRIPT] if SCRIPT else [sys.executable, "-m", "banbus"]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "BANBUS_REDIS_URL": "redis://127.0.0.1:1/0", **(env or {})},
        errors="surrogateescape",
    )


def one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("banbus: error: ") or lines[0].startswith("banbus demo: error: ")
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def not_redis() -> Iterator[int]:
    """A TCP server that answers like a web server."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(4096)
                    conn.sendall(b"<html>400 Bad Request</html>\r\n")
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    listener.close()


# -- exit codes ------------------------------------------------------------------------------


def test_a_port_that_is_not_redis_is_exit_2(not_redis: int) -> None:
    result = banbus("--redis", f"redis://127.0.0.1:{not_redis}/0", "check", "192.0.2.1")
    one_line_error(result, "something other than Redis")


def test_nothing_listening_is_exit_2_for_every_command() -> None:
    for args in (["check", "192.0.2.1"], ["ban", "192.0.2.1"], ["list"], ["policy", "list"]):
        one_line_error(banbus(*args), "cannot reach Redis")


def test_demo_with_nothing_listening_is_one_line() -> None:
    result = banbus("demo", "--redis", "redis://127.0.0.1:1/0", "--no-color")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]


def test_reasons_that_are_not_text_are_refused(redis_url: str, r: redis.Redis) -> None:
    for reason in ("\udcff", "a\u202eb", "\u009b31m", "x\u2028y"):
        result = banbus("--redis", redis_url, "ban", "192.0.2.7", "--reason", reason)
        one_line_error(result, "reason")
    assert not r.hexists(namespace_keys("banbus").bans, "192.0.2.7")


def test_check_exits_1_only_for_banned(redis_url: str, namespace: str) -> None:
    assert banbus("--redis", redis_url, "-n", namespace, "check", "192.0.2.8").returncode == 0
    assert banbus("--redis", redis_url, "-n", namespace, "ban", "192.0.2.8").returncode == 0
    result = banbus("--redis", redis_url, "-n", namespace, "check", "192.0.2.8")
    assert result.returncode == 1 and "is banned" in result.stdout
    one_line_error(banbus("--redis", redis_url, "-n", namespace, "check", "nope"))


# -- arguments ---------------------------------------------------------------------------------


def test_global_options_go_anywhere_and_origin_is_recorded(
    redis_url: str, namespace: str, r: redis.Redis
) -> None:
    result = banbus("ban", "198.51.100.9", "--ttl", "1d12h", "--redis", redis_url,
                    "--namespace", namespace, "--origin", "alice@ops")  # fmt: skip
    assert result.returncode == 0, result.stderr
    result = banbus("list", "--json", "-n", namespace, "--redis", redis_url)
    (ban,) = json.loads(result.stdout)["bans"]
    assert (ban["target"], ban["origin"]) == ("198.51.100.9", "alice@ops")
    assert 36 * 3600 - 5 <= (ban["expires"] - json.loads(result.stdout)["server_time_ms"]) / 1000
    # By default: cli@<host>.
    banbus("ban", "198.51.100.10", "--redis", redis_url, "-n", namespace)
    stored = r.hget(namespace_keys(namespace).bans, "198.51.100.10")
    assert stored is not None and f'"cli@{socket.gethostname()}'[:20] in stored
    one_line_error(banbus("ban", "198.51.100.11", "--origin", "not ok!", "--redis", redis_url))


def test_version_and_durations(redis_url: str, namespace: str) -> None:
    result = banbus("--version")
    assert result.returncode == 0 and result.stdout.startswith("banbus ")
    assert "function library v" in result.stdout
    for ttl in ("1.5h", "6d23h59m59s", "1y"):
        assert banbus("ban", "198.51.100.20", "--ttl", ttl, "--redis", redis_url, "-n",
                      namespace, "--replace").returncode == 0  # fmt: skip
    one_line_error(banbus("ban", "198.51.100.21", "--ttl", "11y"), "maximum of 315360000s")
    one_line_error(banbus("ban", "198.51.100.21", "--ttl", "١٠"), "not a duration")


def test_prefix_limits_are_the_namespaces_and_errors_speak_cli(
    redis_url: str, namespace: str, r: redis.Redis
) -> None:
    args = ("--redis", redis_url, "-n", namespace)
    one_line_error(banbus("ban", "10.0.0.0/7", *args), "add --force")
    r.hset(namespace_keys(namespace).config, "min_prefix_v4", 6)
    result = banbus("ban", "10.0.0.0/7", *args)
    assert result.returncode == 0 and "banned 10.0.0.0/7" in result.stdout


def test_hints_for_replace_and_a_covering_ban(redis_url: str, namespace: str) -> None:
    args = ("--redis", redis_url, "-n", namespace)
    banbus("ban", "198.51.100.30", "--ttl", "1d", *args)
    result = banbus("ban", "198.51.100.30", "--ttl", "1h", *args)
    assert "--replace sets it to exactly that" in result.stdout
    banbus("ban", "198.51.100.0/24", *args)
    result = banbus("unban", "198.51.100.77", *args)
    assert result.returncode == 0
    assert "covered by 198.51.100.0/24" in result.stdout
    assert "banbus unban 198.51.100.0/24" in result.stdout


# -- terminal injection ------------------------------------------------------------------------


HOSTILE = "\x1b]0;owned\x07\x1b[2J\u009b31m\u202eevil"


def test_human_output_is_escaped_and_json_is_exact(
    redis_url: str, namespace: str, r: redis.Redis
) -> None:
    k = namespace_keys(namespace)
    # Written by hand, as an attacker with write access to Redis could.
    r.hset(k.bans, "192.0.2.50", json.dumps([0, HOSTILE, HOSTILE, 1]))
    r.xadd(k.log, {"op": "ban", "target": "192.0.2.50", "expires": "0", "reason": HOSTILE,
                   "origin": HOSTILE, "eid": "x", "seq": "1"})  # fmt: skip
    r.xadd(k.log, {"op": "ban", "target": HOSTILE, "seq": "2"})
    args = ("--redis", redis_url, "-n", namespace)
    outputs = [
        banbus("list", *args).stdout,
        banbus("watch", "--from", "0", "--count", "2", *args).stdout,
        banbus("check", "192.0.2.50", *args).stdout,
    ]
    for out in outputs:
        assert out
        for raw in ("\x1b", "\x07", "\u009b", "\u202e"):
            assert raw not in out, (raw, out)
    assert "\\x1b]0;owned" in outputs[0] and "\\u202e" in outputs[0]
    listed = json.loads(banbus("list", "--json", *args).stdout)
    assert listed["bans"][0]["reason"] == HOSTILE  # --json stays exact


# -- the library, the demo ---------------------------------------------------------------------


@pytest.mark.real_redis
def test_load_library_after_a_restart_without_persistence(redis_url: str, r: redis.Redis) -> None:
    r.function_flush()
    result = banbus("load-library", "--redis", redis_url)
    assert result.returncode == 0 and "function library v" in result.stdout
    assert r.fcall("banbus_version", 0)  # type: ignore[no-untyped-call]


def test_demo_uses_banbus_redis_url_and_leaves_nothing(redis_url: str, r: redis.Redis) -> None:
    before = set(r.keys("{demo-*"))
    result = banbus("demo", "--no-color", env={"BANBUS_REDIS_URL": redis_url})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "from --redis" in result.stdout or redis_url.split("//")[1] in result.stdout
    assert set(r.keys("{demo-*")) == before


# -- history -----------------------------------------------------------------------------------


def test_list_shows_who_and_when_and_filters(redis_url: str, namespace: str) -> None:
    args = ("--redis", redis_url, "-n", namespace)
    banbus("ban", "203.0.113.1", "--ttl", "1h", "--reason", "ssh brute", "--origin", "alice", *args)
    banbus("ban", "203.0.113.0/24", "--ttl", "2d", "--reason", "scan", *args)
    banbus("ban", "198.51.100.5", "--reason", "spam", "--origin", "bob", *args)
    # Extending a live ban keeps its creation time.
    first = json.loads(banbus("list", "--json", *args).stdout)
    created = {b["target"]: b["created"] for b in first["bans"]}
    banbus("ban", "203.0.113.1", "--ttl", "2h", "--origin", "carol", *args)
    listed = json.loads(banbus("list", "--json", *args).stdout)
    by_target = {b["target"]: b for b in listed["bans"]}
    assert by_target["203.0.113.1"]["created"] == created["203.0.113.1"]
    assert by_target["203.0.113.1"]["origin"] == "carol"
    assert 7100 < by_target["203.0.113.1"]["remaining_s"] <= 7200
    assert by_target["198.51.100.5"]["remaining_s"] is None  # permanent
    assert all(b["created"] <= listed["server_time_ms"] for b in listed["bans"])
    covering = json.loads(banbus("list", "--json", "--covering", "203.0.113.1", *args).stdout)
    assert [b["target"] for b in covering["bans"]] == ["203.0.113.0/24", "203.0.113.1"]
    mine = json.loads(banbus("list", "--json", "--origin", "cli@*", *args).stdout)
    assert [b["target"] for b in mine["bans"]] == ["203.0.113.0/24"]
    spam = json.loads(banbus("list", "--json", "--reason", "SPAM", *args).stdout)
    assert [b["target"] for b in spam["bans"]] == ["198.51.100.5"]
    assert len(json.loads(banbus("list", "--json", "--limit", "1", *args).stdout)["bans"]) == 1
    human = banbus("list", *args).stdout
    assert "made " in human and " ago" in human and "by carol" in human
    checked = banbus("check", "203.0.113.9", *args)
    assert checked.returncode == 1 and "banned by 203.0.113.0/24" in checked.stdout
    one_line_error(banbus("list", "--covering", "203.0.113.0/24", *args), "one address")


# -- import / export ---------------------------------------------------------------------------

DROP = """; Spamhaus DROP List 2026/11/29 - (c) 2026 The Spamhaus Project SLU
; Last-Modified: Sun, 29 Nov 2026 10:00:00 GMT
1.10.16.0/20 ; SBL256894
1.19.0.0/16 ; SBL434604
"""
NETSET = """#
# firehol_level1 — ipv4 hash:net ipset
#
1.10.16.0/20
5.134.128.0/19   # inline comment
223.254.0.0/16
not-an-ip
10.0.0.1/8
5.134.128.0/19
"""
CSV = """target,ttl,reason
198.51.100.7,1h,"ssh, brute"
2001:db8::/48,,from csv
203.0.113.9
"""


def test_import_drop_firehol_and_csv(
    redis_url: str, namespace: str, r: redis.Redis, tmp_path: Path
) -> None:
    args = ("--redis", redis_url, "-n", namespace)
    k = namespace_keys(namespace)
    (tmp_path / "drop.txt").write_text(DROP)
    (tmp_path / "level1.netset").write_text(NETSET)
    (tmp_path / "list.csv").write_text(CSV)
    result = banbus("import", str(tmp_path / "drop.txt"), *args)
    assert result.returncode == 0 and "banned 2 of 2 targets" in result.stdout
    assert json.loads(r.hget(k.bans, "1.10.16.0/20") or "[]")[1] == "SBL256894"
    # Invalid lines: reported with their number, skipped; --strict writes nothing.
    strict = banbus("import", str(tmp_path / "level1.netset"), "--strict", *args)
    assert strict.returncode == 2
    assert "level1.netset:7:" in strict.stderr and "level1.netset:8:" in strict.stderr
    assert "did you mean 10.0.0.0/8?" in strict.stderr
    assert not r.hexists(k.bans, "223.254.0.0/16")
    dry = banbus("import", str(tmp_path / "level1.netset"), "--dry-run", *args)
    assert dry.returncode == 0 and "3 valid targets, 2 invalid lines, 1 duplicates" in dry.stdout
    assert not r.hexists(k.bans, "223.254.0.0/16")
    done = banbus("import", str(tmp_path / "level1.netset"), "--ttl", "7d", *args)
    assert done.returncode == 0
    assert "banned 3 of 3 targets (2 invalid lines skipped, 1 duplicates)" in done.stdout
    stored = json.loads(r.hget(k.bans, "223.254.0.0/16") or "[]")
    assert stored[1] == "import level1.netset"
    csv_run = banbus("import", str(tmp_path / "list.csv"), "--reason", "", *args)
    assert csv_run.returncode == 0, csv_run.stderr
    assert json.loads(r.hget(k.bans, "198.51.100.7") or "[]")[1] == "ssh, brute"
    assert json.loads(r.hget(k.bans, "2001:db8::/48") or "[]")[1] == "from csv"
    assert json.loads(r.hget(k.bans, "203.0.113.9") or "[]")[0] == 0  # permanent
    # From standard input, into the allowlist.
    piped = subprocess.run(
        [SCRIPT or "banbus", "import", "-", "--allow", *args], input="192.0.2.0/24\n",
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert piped.returncode == 0 and r.hexists(k.allow, "192.0.2.0/24")


def test_export_round_trips_with_import(
    redis_url: str, namespace: str, r: redis.Redis, tmp_path: Path
) -> None:
    args = ("--redis", redis_url, "-n", namespace)
    (tmp_path / "list.csv").write_text(CSV)
    banbus("import", str(tmp_path / "list.csv"), *args)
    exported = banbus("export", "--format", "csv", *args)
    assert exported.returncode == 0
    (tmp_path / "out.csv").write_text(exported.stdout)
    copy = f"{namespace}-copy"
    assert banbus("import", str(tmp_path / "out.csv"), "--redis", redis_url, "-n",
                  copy).returncode == 0  # fmt: skip
    again = banbus("export", "--format", "csv", "--redis", redis_url, "-n", copy).stdout
    rows = [line.split(",", 1)[0] for line in exported.stdout.splitlines()]
    assert rows == [line.split(",", 1)[0] for line in again.splitlines()]
    assert '"ssh, brute"' in again
    plain = banbus("export", *args).stdout.splitlines()
    assert plain[0].startswith("# banbus bans") and sorted(plain[1:]) == sorted(rows[1:])
    listed = json.loads(banbus("export", "--format", "json", *args).stdout)
    assert {e["target"] for e in listed} == set(rows[1:])


@pytest.mark.real_redis
def test_watch_survives_a_redis_restart(
    redis_factory: Callable[..., RedisProcess], namespace: str
) -> None:
    """What compose runs as a long-lived container: it reconnects and resumes."""
    proc = redis_factory()
    args = ("--redis", proc.url, "-n", namespace)
    assert banbus("ban", "192.0.2.61", *args).returncode == 0
    command = [SCRIPT] if SCRIPT else [sys.executable, "-m", "banbus"]
    watch = subprocess.Popen([*command, "watch", "--from", "0", "--count", "2", *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert watch.stdout is not None
        assert "192.0.2.61" in watch.stdout.readline()  # it is following
        proc.stop()  # SIGKILL: no persistence, the stream is gone
        proc.start()
        assert banbus("ban", "192.0.2.62", *args).returncode == 0
        out, err = watch.communicate(timeout=30)
    finally:
        watch.kill()
    assert watch.returncode == 0, err
    assert "192.0.2.62" in out
    assert "reconnecting" in err


def test_import_shows_progress_on_a_terminal(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    import pty

    listing = tmp_path / "big.netset"
    listing.write_text("".join(f"10.9.{i >> 8}.{i & 255}\n" for i in range(5000)))
    command = [SCRIPT] if SCRIPT else [sys.executable, "-m", "banbus"]
    leader, follower = pty.openpty()
    try:
        result = subprocess.run(
            [*command, "import", str(listing), "--redis", redis_url, "-n", namespace],
            stdout=subprocess.PIPE, stderr=follower, text=True, timeout=60,
        )  # fmt: skip
        os.close(follower)
        follower = -1
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
        if follower != -1:
            os.close(follower)
    assert result.returncode == 0 and "banned 5,000 of 5,000 targets" in result.stdout
    assert b"5,000/5,000" in shown and b"[####" in shown


def test_a_comment_with_a_comma_is_not_csv() -> None:
    from banbus._blocklist import parse_lines

    parsed = parse_lines(["1.2.3.4 # scanner, seen twice", "5.6.7.0/24 ; SBL1, SBL2",
                          "9.9.9.9,1h,ssh # not a comment"])  # fmt: skip
    assert [(line.target, line.reason) for line in parsed.lines] == [
        ("1.2.3.4", "scanner, seen twice"), ("5.6.7.0/24", "SBL1, SBL2"),
        ("9.9.9.9", "ssh # not a comment"),
    ]  # fmt: skip
    assert parsed.errors == []
