"""Auto-ban (issue 9): reports counted cluster-wide in the function library.

Real ``redis-server`` (or the embedded fallback for what it can serve), real
node processes, real uvicorn servers and sockets from distinct loopback
addresses.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from banbus import InvalidInput, InvalidTarget, Node, ServerError
from banbus._cli import main as cli_main
from banbus._keys import namespace_keys
from banbus._library import ensure_library
from banbus._policy import BUILTIN_POLICIES, parse_policy, sanitise_detail
from banbus.asgi import BanMiddleware

from ._helpers import child_node, eventually, keys, server_ms, synced
from ._net import ConnectionGone, HTTPClient, uvicorn_server
from ._proxy import Proxy
from .conftest import HAVE_REAL, NO_REAL_REASON
from .test_asgi import App

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import redis.asyncio as aioredis

pytestmark = pytest.mark.anyio

OPTIONS: dict[str, Any] = {"block_ms": 200, "never_ban": []}
ROOT = Path(__file__).resolve().parents[1]


async def _policy(admin: aioredis.Redis, namespace: str, kind: str, **fields: Any) -> None:
    await ensure_library(admin)
    words: list[Any] = []
    for name, value in fields.items():
        words += [name.upper(), value]
    await admin.fcall("banbus_policy", 1, keys(namespace).log, "SET", kind, *words)


async def _stream_ops(admin: aioredis.Redis, namespace: str) -> list[str]:
    return [f["op"] for _, f in await admin.xrange(keys(namespace).log)]


@contextlib.asynccontextmanager
async def _pair(redis_url: str, namespace: str, **options: Any) -> AsyncIterator[tuple[Node, Node]]:
    async with (
        Node(redis_url, namespace=namespace, node_id="a", **{**OPTIONS, **options}) as a,
        Node(redis_url, namespace=namespace, node_id="b", **{**OPTIONS, **options}) as b,
    ):
        yield a, b


# -- exactly one ban per crossing -----------------------------------------------------------


@pytest.mark.slow
async def test_three_processes_racing_ban_exactly_once(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    """3 node processes x 20 tasks report one address: exactly one ban event in the
    stream, exactly one report told ``banned``, enforced everywhere."""
    await _policy(admin, namespace, "race", threshold=150, window=600, ttl=600)
    async with (
        child_node(redis_url, namespace, "p1", never_ban=[]) as p1,
        child_node(redis_url, namespace, "p2", never_ban=[]) as p2,
        child_node(redis_url, namespace, "p3", never_ban=[]) as p3,
    ):
        answers: list[dict[str, Any]] = []

        async def storm(child: Any) -> None:
            answers.append(json.loads(await child.ask("storm 203.0.113.66 race 20 10")))

        async with anyio.create_task_group() as tg:
            for child in (p1, p2, p3):
                tg.start_soon(storm, child)
    banned = [t for answer in answers for t in answer["banned"]]
    assert banned == ["203.0.113.66"]
    assert all(answer["banned_here"] for answer in answers)
    # The reports were spread over the processes (at least two counted some).
    counted = [sum(n for s, n in a["outcomes"].items() if s != "banned_here") for a in answers]
    assert sum(1 for n in counted if n) >= 2, answers
    assert (await _stream_ops(admin, namespace)).count("ban") == 1
    record = await admin.hget(keys(namespace).bans, "203.0.113.66")
    assert record is not None and '"race: 150 in 10m"' in record


async def test_coalesced_reports_share_one_round_trip_and_one_ban(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    async with _pair(redis_url, namespace) as (a, _b):
        before = a.statistics().report_round_trips
        reports = []

        async def one() -> None:
            reports.append(await a.report("203.0.113.70", "scan"))

        async with anyio.create_task_group() as tg:
            for _ in range(5):  # started in one tick: merged
                tg.start_soon(one)
        stats = a.statistics()
        assert stats.report_round_trips == before + 1
        assert stats.reports_coalesced == 4
        assert [r.banned is not None for r in reports].count(True) == 1
        assert sorted(r.status for r in reports) == ["banned"] + ["coalesced"] * 4
        assert a.is_banned("203.0.113.70")  # enforced here before report() returned
        # An address banned already costs no round trip.
        again = await a.report("203.0.113.70", "scan")
        assert again.status == "banned_here" and again.banned is None
        assert a.statistics().report_round_trips == before + 1


# -- the window --------------------------------------------------------------------------------


async def test_window_edges_both_ways(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    """threshold offenses within the window ban; the same number spread wider never
    does (earlier offenses written in the library's own format)."""
    await _policy(admin, namespace, "edge", threshold=3, window=10, ttl=60)
    k = keys(namespace)
    async with _pair(redis_url, namespace) as (a, _b):
        now = await server_ms(admin)
        # Two offenses 9.5 and 9 s ago: inside the 10 s window.
        await admin.set(f"{{{namespace}}}:offenses:edge:198.51.100.1", f"{now - 9500},{now - 9000}")
        r = await a.report("198.51.100.1", "edge")
        assert (r.status, r.count, r.threshold) == ("banned", 3, 3)
        # Two offenses 10.5 and 10.2 s ago: outside.  Never a ban.
        await admin.set(
            f"{{{namespace}}}:offenses:edge:198.51.100.2", f"{now - 10500},{now - 10200}"
        )
        r = await a.report("198.51.100.2", "edge")
        assert (r.status, r.count) == ("counted", 1)
        # One just outside, one inside: 2 in the window.
        await admin.set(
            f"{{{namespace}}}:offenses:edge:198.51.100.3", f"{now - 11000},{now - 5000}"
        )
        r = await a.report("198.51.100.3", "edge")
        assert (r.status, r.count) == ("counted", 2)
        assert not await admin.hexists(k.bans, "198.51.100.2")
        assert not await admin.hexists(k.bans, "198.51.100.3")
        # Memory per offender is bounded by the threshold and expires with the window.
        key = f"{{{namespace}}}:offenses:edge:198.51.100.3"
        assert len((await admin.get(key) or "").split(",")) <= 3
        assert 0 < await admin.pttl(key) <= 10_000


async def test_window_slides_in_real_time(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    await _policy(admin, namespace, "tick", threshold=3, window=1, ttl=60)
    async with _pair(redis_url, namespace) as (a, _b):
        first = await a.report("198.51.100.9", "tick")
        second = await a.report("198.51.100.9", "tick")
        assert (first.count, second.count) == (1, 2)
        start = a.server_time()
        await eventually(lambda: a.server_time() > start + 1100, 5.0, "the window passes")
        third = await a.report("198.51.100.9", "tick")
        assert (third.status, third.count) == ("counted", 1)


# -- escalation, prefixes --------------------------------------------------------------------


async def test_escalation_over_three_strikes(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    """The n-th ban lasts ttl x escalate^(n-1), capped; a re-offence after the ban
    expired is counted afresh and escalates."""
    await _policy(admin, namespace, "esc", threshold=2, window=60, ttl=1, escalate=3,
                  max_ttl=5, forget=600)  # fmt: skip
    ip = "198.51.100.20"
    async with _pair(redis_url, namespace) as (a, b):
        lengths = []
        for strike in (1, 2, 3):
            assert (await a.report(ip, "esc")).status == "counted"
            r = await a.report(ip, "esc")
            assert r.banned is not None, strike
            now = await server_ms(admin)
            lengths.append(round((r.banned.expires - now) / 1000))
            assert f"strike {strike}" in r.banned.reason or strike == 1
            await synced(r.banned.seq, b)
            assert b.is_banned(ip)
            if strike == 1:
                # Let it expire: the re-offence is counted afresh.
                await eventually(lambda: not a.is_banned(ip), 5.0, "the first ban expires")
            else:
                assert await a.unban(ip)
        assert lengths == [1, 3, 5]  # 1, 3, 9 capped at 5


async def test_ipv6_offenders_count_and_are_banned_as_a_64(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    async with _pair(redis_url, namespace) as (a, b):
        statuses = [
            (await a.report(f"2001:db8:1:2::{i}", "scan")).status for i in (1, 2)
        ]  # fmt: skip
        r = await b.report("2001:db8:1:2:ffff::9", "scan")
        assert statuses == ["counted", "counted"]
        assert r.banned is not None and r.banned.target == "2001:db8:1:2::/64"
        assert b.is_banned("2001:db8:1:2:abcd::1")
        await synced(r.banned.seq, a)
        assert a.is_banned("2001:db8:1:2::77") and not a.is_banned("2001:db8:1:3::1")


# -- never auto-banned -----------------------------------------------------------------------


async def test_allowlist_and_never_ban_are_never_auto_banned(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    await _policy(admin, namespace, "one", threshold=1, window=60, ttl=60)
    k = keys(namespace)
    async with Node(redis_url, namespace=namespace, node_id="d", block_ms=200) as d:
        # Default never_ban: loopback.  Not even counted.
        r = await d.report("127.0.0.9", "one")
        assert (r.status, r.count, r.banned) == ("exempt", 0, None)
        r = await d.report("::1", "one")
        assert r.status == "exempt"
        allowed = await d.allow("198.51.100.0/24", reason="partner")
        await synced(allowed.seq, d)
        assert (await d.report("198.51.100.5", "one")).status == "exempt"
        # redis-cli bypasses the node: the library refuses the ban itself.
        reply = await admin.fcall("banbus_report", 1, k.log, "198.51.100.5", "one")
        assert reply[0] == "allowed"
        assert d.statistics().reports_exempt == 3
        # An explicit ban still works on them.
        record = await d.ban("127.0.0.9", ttl=60)
        assert record.seq > 0 and d.is_banned("127.0.0.9")
    assert not await admin.hexists(k.bans, "198.51.100.5")
    assert not await admin.keys(f"{{{namespace}}}:offenses:one:127.*")


async def test_scanner_trap_reports_the_client_never_the_trusted_proxy(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    """Behind a trusted proxy the forwarded client is reported and banned; a probe
    from the proxy itself (no forwarded header) is answered but never reported."""
    async with _pair(redis_url, namespace) as (a, _b):
        app = BanMiddleware(App(), a, trusted_proxies=["127.0.0.70"], scanner_trap=True)
        async with uvicorn_server(app) as port:
            proxy = await HTTPClient.open("127.0.0.1", port, "127.0.0.70")
            try:
                for _ in range(3):
                    status, *_ = await proxy.get("/.env")
                    assert status == 404
                assert a.statistics().reports_exempt == 3  # the proxy: never counted
                for n in range(3):
                    status, *_ = await proxy.get(
                        f"/admin/vendor/phpunit/phpunit/src/Util/PHP/eval-stdin.php?{n}",
                        headers={"X-Forwarded-For": "203.0.113.80"},
                    )
                    assert status == 404
                assert a.is_banned("203.0.113.80")
                assert not a.is_banned("127.0.0.70")
                # The proxy still serves its other clients.
                status, *_ = await proxy.get("/", headers={"X-Forwarded-For": "203.0.113.81"})
                assert status == 200
            finally:
                await proxy.aclose()
    record = await admin.hget(keys(namespace).bans, "203.0.113.80")
    assert record is not None and "eval-stdin.php" in record


@pytest.mark.slow
async def test_scanner_on_keep_alive_is_cut_on_every_node_a_few_probes_in(
    redis_url: str, namespace: str
) -> None:
    """The scanner that started the project: keep-alive probes to node A's server;
    with the default ``scan`` policy it is banned on the third probe, and its
    keep-alive connection to node B's server is cut."""
    async with _pair(redis_url, namespace) as (a, b):
        trap = {"scanner_trap": True}
        async with (
            uvicorn_server(BanMiddleware(App(), a, scanner_trap=True), a, **trap) as port_a,
            uvicorn_server(BanMiddleware(App(), b, scanner_trap=True), b, **trap) as port_b,
        ):
            scanner_a = await HTTPClient.open("127.0.0.1", port_a, "127.0.0.90")
            scanner_b = await HTTPClient.open("127.0.0.1", port_b, "127.0.0.90")
            bystander = await HTTPClient.open("127.0.0.1", port_b, "127.0.0.91")
            try:
                assert (await scanner_b.get("/"))[0] == 200  # an open keep-alive on B
                probes = ["/lib/vendor/phpunit/phpunit/src/Util/PHP/eval-stdin.php",
                          "/laravel/vendor/phpunit/phpunit/src/Util/PHP/eval-stdin.php",
                          "/www/vendor/phpunit/phpunit/src/Util/PHP/eval-stdin.php"]  # fmt: skip
                answered = 0
                with contextlib.suppress(ConnectionGone):
                    for path in probes:
                        status, *_ = await scanner_a.get(path)
                        assert status == 404
                        answered += 1
                assert answered >= 2
                assert a.is_banned("127.0.0.90")
                assert await scanner_b.wait_closed() == b""  # cut on B too
                assert (await bystander.get("/"))[0] == 200
                # The crossing report may return after the cut it caused (the
                # event can beat the reply): wait for it.
                await eventually(lambda: a.statistics().auto_bans == 1, 5.0, "report returned")
                assert b.supervisor.statistics().cut_address >= 1
            finally:
                for c in (scanner_a, scanner_b, bystander):
                    await c.aclose()


async def test_malformed_http_is_reported_at_the_connection_level(
    redis_url: str, namespace: str
) -> None:
    async with _pair(redis_url, namespace) as (a, _b):
        async with uvicorn_server(BanMiddleware(App(), a), a, scanner_trap=True) as port:
            for _ in range(3):
                with anyio.fail_after(10):
                    stream = await anyio.connect_tcp("127.0.0.1", port, local_host="127.0.0.95")
                    async with stream:
                        await stream.send(b"\x16\x03\x01 not HTTP at all\r\n\r\n")
                        with contextlib.suppress(anyio.EndOfStream, OSError):
                            await stream.receive()
            await eventually(lambda: a.is_banned("127.0.0.95"), 5.0, "banned")
        record = a.lookup("127.0.0.95")
        assert record is not None and "malformed HTTP" in record.reason


# -- shadow mode, policies ---------------------------------------------------------------------


async def test_shadow_mode_bans_nothing_and_records_a_notice(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    await _policy(admin, namespace, "auth", threshold=2, shadow=1)
    async with _pair(redis_url, namespace) as (a, b):
        first = await a.report("203.0.113.30", "auth", detail="user=root")
        second = await a.report("203.0.113.30", "auth", detail="user=admin")
        assert (first.shadow, second.shadow) == (False, True)
        assert second.status == "shadow" and second.banned is None
        assert not a.is_banned("203.0.113.30")
        marker = await a.ban("192.0.2.1", ttl=60)  # a later event: b has read the notice
        await synced(marker.seq, a, b)
        for node in (a, b):
            stats = node.statistics()
            assert (stats.would_bans_seen, stats.events_skipped, stats.resyncs) == (1, 0, 0)
        assert a.statistics().shadow_crossings == 1
        assert not b.is_banned("203.0.113.30")
    ops = await _stream_ops(admin, namespace)
    assert ops == ["would_ban", "ban"]
    rows = await admin.fcall_ro("banbus_policies", 1, keys(namespace).log)
    assert ["auth", 1] == [rows[0][0], rows[0][3]]


async def test_builtin_policies_are_the_same_in_python_and_in_the_library(
    admin: aioredis.Redis, namespace: str
) -> None:
    await ensure_library(admin)
    rows = await admin.fcall_ro("banbus_policies", 1, keys(namespace).log)
    assert {r[0]: r[1] for r in rows} == BUILTIN_POLICIES
    assert {r[2] for r in rows} == {"default"}
    for kind, text in BUILTIN_POLICIES.items():
        assert parse_policy(kind, text).text() == text


async def test_policy_crud_from_the_cli_and_redis_cli(
    redis_url: str, namespace: str, admin: aioredis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    async def cli(*argv: str) -> int:
        args = ["--redis", redis_url, "--namespace", namespace, *argv]
        return await anyio.to_thread.run_sync(cli_main, args)

    assert await cli("policy", "set", "brute", "--threshold", "4", "--window", "1h", "--ttl", "1d",
               "--escalate", "1.5", "--max-ttl", "30d", "--ipv6-prefix", "56") == 0  # fmt: skip
    assert "brute: threshold=4 window=3600 ttl=86400 escalate=1.5" in capsys.readouterr().out
    assert await cli("policy", "set", "brute", "--shadow") == 0  # others keep their value
    assert "threshold=4" in capsys.readouterr().out
    assert await cli("policy", "list", "--json") == 0
    listed = {p["kind"]: p for p in json.loads(capsys.readouterr().out)}
    assert listed["brute"]["policy"].endswith("ipv6_prefix=56 shadow=1")
    assert listed["brute"]["source"] == "set" and listed["scan"]["source"] == "default"
    # A new kind needs its three numbers; bad values are one line, exit 2.
    assert await cli("policy", "set", "other", "--threshold", "3") == 2
    assert "needs THRESHOLD, WINDOW and TTL" in capsys.readouterr().err
    assert await cli("policy", "set", "scan", "--ipv4-prefix", "4") == 2
    assert "outside" in capsys.readouterr().err
    assert await cli("policy", "set", "Bad!", "--threshold", "3") == 2
    assert await cli("report", "198.51.100.4", "nope") == 2
    assert "has no policy" in capsys.readouterr().err
    # Reports from the CLI and redis-cli share the window.
    assert await cli("policy", "set", "brute", "--enforce", "--threshold", "2") == 0
    assert await cli("report", "198.51.100.4", "brute") == 0
    assert "1/2" in capsys.readouterr().out
    reply = await admin.fcall("banbus_report", 1, namespace, "198.51.100.4", "brute")
    assert reply[0] == "banned" and reply[3] == "198.51.100.4"
    assert await admin.fcall("banbus_policy", 1, namespace, "DELETE", "brute") == 1
    assert await cli("policy", "delete", "scan") == 0
    assert "built-in default" in capsys.readouterr().out
    # redis-cli: the documented calls.
    if shutil.which("redis-cli") and HAVE_REAL:
        port = redis_url.rsplit(":", 1)[1].split("/")[0]
        out = subprocess.run(
            ["redis-cli", "-p", port, "FCALL", "banbus_policy", "1", namespace, "SET", "auth",
             "THRESHOLD", "7"], capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "threshold=7 window=600" in out
        out = subprocess.run(["redis-cli", "-p", port, "FCALL", "banbus_report", "1", namespace,
                              "198.51.100.44", "auth"], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
        assert out.splitlines()[:3] == ["counted", "1", "7"]


async def test_bad_reports_are_clear_errors(redis_url: str, namespace: str) -> None:
    async with Node(redis_url, namespace=namespace, block_ms=200) as n:
        with pytest.raises(InvalidTarget, match="is a network"):
            await n.report("198.51.100.0/24", "scan")
        with pytest.raises(InvalidTarget):
            await n.report("not an ip", "scan")
        with pytest.raises(InvalidInput, match="kind"):
            await n.report("198.51.100.1", "SCAN!")
        with pytest.raises(InvalidInput, match="weight"):
            await n.report("198.51.100.1", "scan", weight=0)
        with pytest.raises(InvalidInput, match="has no policy"):
            await n.report("198.51.100.1", "unknown-kind")
        # Hostile detail is sanitised into the reason, never refused.
        r = await n.report("198.51.100.1", "scan", weight=3,
                           detail="/x\x1b]0;owned\x07\u202egnp.exe\udcff" + "A" * 500)  # fmt: skip
        assert r.banned is not None
        assert "\x1b" not in r.banned.reason and "\u202e" not in r.banned.reason
        assert len(r.banned.reason.encode()) <= 512


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(detail=st.text(min_size=1, max_size=260))
async def test_detail_is_sanitised_the_same_by_python_and_the_library(
    admin: aioredis.Redis, namespace: str, detail: str
) -> None:
    """Python (offline crossings) and the library (crossings in Redis) write the
    same reason for the same attacker text."""
    k = namespace_keys(namespace)
    await _policy(admin, namespace, "one", threshold=1, window=60, ttl=60)
    await admin.delete(f"{{{namespace}}}:strikes:one:198.51.100.200", k.bans)
    raw = detail.encode("utf-8", "surrogatepass")
    reply = await admin.fcall("banbus_report", 1, k.log, "198.51.100.200", "one", "DETAIL", raw)
    expected = sanitise_detail(sanitise_detail(detail))  # idempotent, too
    assert reply[10] == f"one: 1 in 1m ({expected})" or (
        not expected and reply[10] == "one: 1 in 1m"
    )
    await admin.fcall("banbus_unban", 1, k.log, "198.51.100.200")


# -- Redis down, versions --------------------------------------------------------------------


@pytest.mark.slow
async def test_reports_while_redis_is_down_ban_locally_and_publish_later(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    host, port = redis_url.split("://")[1].split("/")[0].rsplit(":", 1)
    async with (
        Proxy(host, int(port)) as proxy,
        Node(proxy.url, namespace=namespace, node_id="off", backoff=(0.05, 0.2),
             **OPTIONS) as n,
        Node(redis_url, namespace=namespace, node_id="other", **OPTIONS) as other,
    ):  # fmt: skip
        policies = await n.policies()
        assert {p.kind for p in policies} >= {"scan", "auth"}
        proxy.refuse()
        proxy.cut()
        first = await n.report("203.0.113.55", "scan")
        second = await n.report("203.0.113.55", "scan")
        assert (first.status, second.status) == ("local", "local")
        third = await n.report("203.0.113.55", "scan", detail="/.env")
        assert third.banned is not None and third.status == "banned"
        assert n.is_banned("203.0.113.55")  # enforced here at once
        stats = n.statistics()
        assert (stats.reports_counted_locally, stats.auto_bans_local) == (3, 1)
        assert stats.outbox_pending == 1
        assert not await admin.hexists(keys(namespace).bans, "203.0.113.55")
        proxy.accept()
        await eventually(lambda: n.statistics().outbox_pending == 0, 15.0, "published")
        await eventually(lambda: other.is_banned("203.0.113.55"), 5.0, "everywhere")
    record = await admin.hget(keys(namespace).bans, "203.0.113.55")
    assert record is not None and "scan: 3 in 5m (/.env)" in record


PREVIOUS_VERSION = "94832ed"  # the last commit before auto-ban (library v4)


@pytest.mark.slow
@pytest.mark.real_redis
async def test_a_node_of_the_previous_version_skips_the_new_entries(
    redis_url: str, namespace: str, admin: aioredis.Redis, tmp_path: Path
) -> None:
    """``would_ban`` notices (no seq) are skipped by a node of the previous release
    without a reload, and by this version as notices; unknown informational ops of a
    newer version are skipped the same way."""
    if not HAVE_REAL:
        pytest.skip(NO_REAL_REASON)
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.fail("this test needs the git history (a clone) to build the previous version")
    archive = tmp_path / "old.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), PREVIOUS_VERSION,
                    "banbus"], check=True)  # fmt: skip
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "old", filter="data")
    await _policy(admin, namespace, "auth", threshold=1, shadow=1)
    env_path = f"{tmp_path / 'old'}"
    child = ROOT / "tests" / "_node_child.py"
    process = await anyio.open_process(
        [sys.executable, str(child), redis_url, namespace, "old", json.dumps({"block_ms": 200})],
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": env_path},
    )
    async with process, Node(redis_url, namespace=namespace, node_id="new", **OPTIONS) as new:
        from ._helpers import Child

        old = Child(process)
        try:
            assert await old.line() == "ready"
            assert (await new.report("203.0.113.40", "auth")).status == "shadow"
            await admin.xadd(keys(namespace).log, {"op": "future_info", "note": "newer"})
            record = await new.ban("203.0.113.41", ttl=60)
            assert await old.ask(f"sync {record.seq}") == "synced"
            await synced(record.seq, new)
            old_stats = json.loads(await old.ask("stats"))
            assert "203.0.113.41" in old_stats["bans"]
            assert old_stats["resyncs"] == 0 and old_stats["events_skipped"] == 2
            stats = new.statistics()
            assert (stats.notices_seen, stats.would_bans_seen) == (2, 1)
            assert (stats.events_skipped, stats.resyncs) == (0, 0)
        finally:
            assert process.stdin is not None
            await process.stdin.send(b"quit\n")
            with anyio.fail_after(10):
                await process.wait()


async def test_watch_shows_would_ban_and_a_bad_stored_policy_is_a_clear_error(
    redis_url: str, namespace: str, admin: aioredis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    k = keys(namespace)
    await _policy(admin, namespace, "auth", threshold=1, shadow=1)
    reply = await admin.fcall("banbus_report", 1, k.log, "203.0.113.31", "auth", "DETAIL", "u=x")
    assert reply[0] == "shadow"
    argv = ["--redis", redis_url, "--namespace", namespace, "watch", "--from", "0", "--count", "1"]
    assert await anyio.to_thread.run_sync(cli_main, argv) == 0
    line = capsys.readouterr().out
    assert "would ban  203.0.113.31  for 15m" in line and "(shadow mode)" in line
    # A policy written by hand that the library cannot use: every entry point
    # says so; the node lives on.
    await admin.hset(f"{{{namespace}}}:policies", "scan", "threshold=0 window=60 ttl=60")
    async with Node(redis_url, namespace=namespace, node_id="n", **OPTIONS) as n:
        with pytest.raises(ServerError, match="BANBUS_CONFIG policy scan threshold 0"):
            await n.report("203.0.113.32", "scan")
        # Counting without Redis falls back on the built-in policy, not the broken one.
        assert {p.kind: p for p in await n.policies()}["scan"].source == "default"
        assert (await n.report("203.0.113.32", "auth")).status == "shadow"
    listing = ["--redis", redis_url, "--namespace", namespace, "policy", "list"]
    assert await anyio.to_thread.run_sync(cli_main, listing) == 0
    assert "[invalid: BANBUS_CONFIG policy scan threshold 0 is outside 1..1000]" in (
        capsys.readouterr().out
    )


async def test_a_report_waiting_when_the_node_closes_gets_an_error(
    redis_url: str, namespace: str
) -> None:
    """No caller waits forever: a report still on its way when the node closes
    raises NodeClosed."""
    from banbus import NodeClosed

    sent = anyio.Event()
    outcome: list[BaseException] = []

    async def stuck(commands: Any) -> Any:
        sent.set()
        await anyio.sleep_forever()

    async def report(node: Node) -> None:
        try:
            await node.report("203.0.113.90", "scan")
        except NodeClosed as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:  # the caller outlives the node
        async with Node(redis_url, namespace=namespace, node_id="c", **OPTIONS) as node:
            publisher: Any = node._publisher
            publisher.execute = stuck
            tg.start_soon(report, node)
            await sent.wait()
    assert len(outcome) == 1


async def test_a_permanent_policy_that_forgets_at_once(
    redis_url: str, namespace: str, admin: aioredis.Redis
) -> None:
    """ttl 0 and forget 0: the crossing bans permanently and keeps no strikes (it
    must not fail after the ban was written)."""
    await _policy(admin, namespace, "perm", threshold=1, window=60, ttl=0, forget=0)
    reply = await admin.fcall("banbus_report", 1, keys(namespace).log, "198.51.100.66", "perm")
    assert reply[0] == "banned" and reply[6] == 0
    assert not await admin.exists(f"{{{namespace}}}:strikes:perm:198.51.100.66")
