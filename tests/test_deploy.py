"""Deploying (issue 8): least-privilege ACL users per role, and TLS end to end.

Real ``redis-server`` processes started by the suite: one with ACL users, one
with a TLS port and a CA the suite makes (``trustme``).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest
import redis.asyncio as aioredis

from banbus import Node, RedisUnavailable, ServerError
from banbus._cli import main as cli_main
from banbus._library import ensure_library
from banbus._servers import free_port

from ._helpers import assert_converged, eventually, keys, nodes, synced

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from banbus._servers import RedisProcess

pytestmark = [pytest.mark.anyio, pytest.mark.real_redis]

README = Path(__file__).resolve().parents[1] / "README.md"


def _documented_roles() -> dict[str, list[str]]:
    """The ``ACL SETUSER`` lines of README "Deploying", as the shell reads them: the
    suite creates its users with exactly these rules."""
    text = README.read_text(encoding="utf-8")
    section = text.split("### Least-privilege ACL users", 1)[1].split("\n### ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    roles: dict[str, list[str]] = {}
    for command in block.replace("\\\n", " ").splitlines():
        words = shlex.split(command)
        if words[:3] == ["redis-cli", "ACL", "SETUSER"]:
            roles[words[3].removeprefix("banbus-")] = words[4:]
    return roles


def test_the_documented_acl_lines() -> None:
    """One user per role, each scoped to the namespace's keys and no channel, with a
    password to change; only the operator may load the library."""
    roles = _documented_roles()
    assert set(roles) == {"node", "follower", "operator"}
    for role, rule in roles.items():
        keys = "%R~{banbus}:*" if role == "follower" else "~{banbus}:*"
        assert rule[:4] == ["on", ">CHANGE-ME", "resetkeys", keys]
        assert "-@all" in rule and "resetchannels" in rule
        patterns = [w for w in rule[4:] if w.startswith(("~", "%", "&", "allkeys"))]
        # The follower may write its heartbeat only.
        assert patterns == (["%RW~{banbus}:node:*", "%RW~{banbus}:nodes"]
                            if role == "follower" else [])  # fmt: skip
    assert "+function|load" in roles["operator"]
    assert "+function|load" not in roles["node"] + roles["follower"]
    assert not {"+fcall", "+xadd", "+hset", "+hdel", "+incr"} & set(roles["follower"])


async def _user(admin: aioredis.Redis, name: str, role: str, ns: str) -> None:
    rule = [
        word.replace(">CHANGE-ME", f">{name}-pw").replace("{banbus}", f"{{{ns}}}")
        for word in _documented_roles()[role]
    ]
    await admin.execute_command("ACL", "SETUSER", name, *rule)


def _url(proc: RedisProcess, user: str) -> str:
    return f"redis://{user}:{user}-pw@{proc.host}:{proc.port}/0"


@pytest.fixture
async def acl_server(
    redis_factory: Callable[..., RedisProcess],
) -> AsyncIterator[tuple[RedisProcess, aioredis.Redis]]:
    proc = redis_factory()
    admin = aioredis.Redis.from_url(proc.url, decode_responses=True)
    try:
        await ensure_library(admin)
        await _user(admin, "mx1", "node", "mail")
        await _user(admin, "mx2", "node", "mail")
        await _user(admin, "watcher", "follower", "mail")
        await _user(admin, "ops", "operator", "mail")
        await _user(admin, "other", "node", "web")
        yield proc, admin
    finally:
        await admin.aclose()


async def test_node_roles_scoped_to_one_namespace(
    acl_server: tuple[RedisProcess, aioredis.Redis],
) -> None:
    proc, admin = acl_server
    async with (
        Node(_url(proc, "mx1"), namespace="mail", node_id="mx1", block_ms=200) as a,
        Node(_url(proc, "mx2"), namespace="mail", node_id="mx2", block_ms=200) as b,
        Node(
            _url(proc, "watcher"),
            namespace="mail",
            node_id="watcher",
            reseed=False,
            block_ms=200,
            check_interval=0.1,
        ) as w,  # fmt: skip
    ):
        # A node user may report (auto-ban); a follower reads the policies.
        report = await a.report("203.0.113.60", "scan", weight=3)
        assert report.banned is not None
        assert {p.kind for p in await w.policies()} >= {"scan", "auth"}
        record = await a.ban("203.0.113.7", ttl=600, reason="scan")
        await b.allow("192.0.2.9")
        assert await b.unban("203.0.113.7")
        last = await a.ban("198.51.100.0/24")
        await synced(last.seq, a, b, w)
        assert record.seq > 0
        assert w.is_banned("198.51.100.1") and not w.is_banned("203.0.113.7")
        # The follower may read, never write: its own ban is refused and undone.
        with pytest.raises(ServerError, match=r"NOPERM|no permissions"):
            await w.ban("203.0.113.99")
        assert not w.is_banned("203.0.113.99")
        for node in (a, b, w):
            stats = node.statistics()
            assert (stats.resyncs, stats.reconnects) == (0, 0)
        # The follower's heartbeat is the only thing it may write.
        watcher = aioredis.Redis.from_url(_url(proc, "watcher"))
        try:
            with pytest.raises(Exception, match=r"NOPERM|no permissions"):
                await watcher.set(keys("mail").seq, 99)
        finally:
            await watcher.aclose()
        await eventually(lambda: w._heartbeat is not None and w._heartbeat.stats["sent"] >= 1,
                         5.0, "the follower's heartbeat")  # fmt: skip
        live = await admin.zrange("{mail}:nodes", 0, -1)
        assert set(live) == {"mx1", "mx2", "watcher"}
        # Anti-entropy works read-only.
        await eventually(lambda: w.statistics().digest_checks >= 1, 5.0, "a digest check")
        await assert_converged(admin, "mail", a, b, w)
    # Nothing was denied except the follower's write.
    denied = await admin.acl_log()
    assert {entry["username"] for entry in denied} == {"watcher"}


async def test_a_user_of_another_namespace_is_refused(
    acl_server: tuple[RedisProcess, aioredis.Redis],
) -> None:
    proc, admin = acl_server
    async with Node(_url(proc, "mx1"), namespace="mail", node_id="mx1") as a:
        await a.ban("203.0.113.7")
    # "other" may use namespace web only.
    with pytest.raises((ServerError, RedisUnavailable), match=r"NOPERM|no permissions"):
        async with Node(_url(proc, "other"), namespace="mail", node_id="intruder"):
            pass
    client = aioredis.Redis.from_url(_url(proc, "other"), decode_responses=True)
    try:
        for key in ("mail", "{mail}:log"):
            with pytest.raises(Exception, match=r"NOPERM|no permissions"):
                await client.fcall("banbus_ban", 1, key, "203.0.113.8", 0)
        assert not await admin.hexists(keys("mail").bans, "203.0.113.8")
        async with Node(_url(proc, "other"), namespace="web", node_id="web1") as own:
            await own.ban("203.0.113.8")  # its own namespace works
    finally:
        await client.aclose()


async def test_operator_cli_and_redis_cli_with_a_scoped_user(
    acl_server: tuple[RedisProcess, aioredis.Redis], capsys: pytest.CaptureFixture[str]
) -> None:
    proc, admin = acl_server
    url = _url(proc, "ops")

    def cli(*args: str) -> int:
        return cli_main(["--redis", url, "-n", "mail", *args])

    assert await anyio.to_thread.run_sync(cli, "ban", "203.0.113.7", "--ttl", "1h") == 0
    assert await anyio.to_thread.run_sync(cli, "check", "203.0.113.7") == 1
    assert await anyio.to_thread.run_sync(cli, "list", "--json") == 0
    assert await anyio.to_thread.run_sync(cli, "unban", "203.0.113.7") == 0
    # Auto-ban policies and reports (issue 9).
    assert await anyio.to_thread.run_sync(cli, "policy", "set", "auth", "--threshold", "2") == 0
    assert await anyio.to_thread.run_sync(cli, "policy", "list") == 0
    assert await anyio.to_thread.run_sync(cli, "report", "203.0.113.8", "auth") == 0
    assert await anyio.to_thread.run_sync(cli, "policy", "delete", "auth") == 0
    assert await anyio.to_thread.run_sync(cli, "status") == 0
    capsys.readouterr()
    # redis-cli: the documented call with a key of the namespace as KEYS[1].
    if shutil.which("redis-cli"):
        out = subprocess.run(
            ["redis-cli", "-h", proc.host, "-p", str(proc.port), "--user", "ops", "--pass",
             "ops-pw", "--no-auth-warning", "FCALL", "banbus_ban", "1", "{mail}:log",
             "203.0.113.9", "60", "by hand"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
        assert "203.0.113.9" in out
        assert await admin.hexists(keys("mail").bans, "203.0.113.9")
    # The operator may load the library (a node may not).
    await admin.function_flush()
    assert await anyio.to_thread.run_sync(cli, "ban", "203.0.113.10") == 0


async def test_a_node_that_may_not_load_the_library_says_so(
    acl_server: tuple[RedisProcess, aioredis.Redis],
) -> None:
    proc, admin = acl_server
    await admin.function_flush()
    with pytest.raises(ServerError, match="function library"):
        async with Node(_url(proc, "mx1"), namespace="mail", node_id="mx1"):
            pass


# -- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import trustme

    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("banbus-client")
    files = {
        "ca": folder / "ca.pem",
        "server": folder / "server.pem",
        "client": folder / "client.pem",
        "wrong_ca": folder / "wrong-ca.pem",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.private_key_and_cert_chain_pem.write_to_path(str(files["server"]))
    client.private_key_and_cert_chain_pem.write_to_path(str(files["client"]))
    trustme.CA().cert_pem.write_to_path(str(files["wrong_ca"]))
    return files


@pytest.fixture
def tls_server(
    redis_factory: Callable[..., RedisProcess], tls_files: dict[str, Path]
) -> tuple[RedisProcess, int]:
    tls_port = free_port()
    proc = redis_factory(
        args=(
            "--tls-port", str(tls_port),
            "--tls-cert-file", str(tls_files["server"]),
            "--tls-key-file", str(tls_files["server"]),
            "--tls-ca-cert-file", str(tls_files["ca"]),
            "--tls-auth-clients", "optional",
        )
    )  # fmt: skip
    return proc, tls_port


def _tls_url(port: int, ca: Path, client: Path | None = None) -> str:
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}"
    if client is not None:
        url += f"&ssl_certfile={client}&ssl_keyfile={client}"
    return url


async def test_nodes_cli_and_redis_cli_over_tls(
    tls_server: tuple[RedisProcess, int], tls_files: dict[str, Path], namespace: str
) -> None:
    proc, port = tls_server
    url = _tls_url(port, tls_files["ca"])
    with_cert = _tls_url(port, tls_files["ca"], tls_files["client"])
    admin = aioredis.Redis.from_url(proc.url, decode_responses=True)
    try:
        async with nodes(url, namespace, 1) as (a,), nodes(with_cert, namespace, 1) as (b,):
            record = await a.ban("203.0.113.7", reason="over tls")
            await synced(record.seq, a, b)
            assert b.is_banned("203.0.113.7")
            # The readers are TLS connections too (the server's client list
            # names them; they connected on the TLS port).
            names = {c["name"] for c in await admin.client_list()}
            assert {"banbus-reader:n0"} <= names

            def cli(*args: str) -> int:
                return cli_main(["--redis", url, "-n", namespace, *args])

            assert await anyio.to_thread.run_sync(cli, "ban", "203.0.113.8") == 0
            assert await anyio.to_thread.run_sync(cli, "check", "203.0.113.8") == 1
            if shutil.which("redis-cli"):
                out = subprocess.run(
                    ["redis-cli", "--tls", "--cacert", str(tls_files["ca"]), "-h", "127.0.0.1",
                     "-p", str(port), "FCALL", "banbus_ban", "1", namespace, "203.0.113.9", "0"],
                    capture_output=True, text=True, timeout=10, check=True,
                ).stdout  # fmt: skip
                assert "203.0.113.9" in out
            last = await a.ban("203.0.113.10")
            await synced(last.seq, b)
            assert all(b.is_banned(f"203.0.113.{i}") for i in (7, 8, 9, 10))
            await assert_converged(admin, namespace, a, b)
    finally:
        await admin.aclose()


async def test_wrong_ca_is_a_clear_error(
    tls_server: tuple[RedisProcess, int], tls_files: dict[str, Path], namespace: str
) -> None:
    _, port = tls_server
    url = _tls_url(port, tls_files["wrong_ca"])
    with pytest.raises(RedisUnavailable, match="certificate verify failed") as info:
        async with Node(url, namespace=namespace, node_id="n"):
            pass
    assert "ssl_ca_certs=" in str(info.value)  # says what to do
    code = await anyio.to_thread.run_sync(
        cli_main, ["--redis", url, "-n", namespace, "ban", "203.0.113.7"]
    )
    assert code == 2
