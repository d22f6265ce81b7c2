"""Throwaway Redis servers on free loopback ports (tests, demo, benchmarks).

:class:`RedisProcess` runs a real ``redis-server`` binary with nothing on disk;
:class:`EmbeddedRedis` runs fakeredis' TCP server in a thread for machines
without one.  Neither touches a shared server on 6379.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "EmbeddedRedis",
    "RedisCluster",
    "RedisProcess",
    "SentinelGroup",
    "free_port",
    "hold_connections",
    "redis_server_binary",
]


def hold_connections(port: int, *, dual_stack: bool = False) -> None:
    """A plain keep-alive TCP server on *port* (loopback, or ``::`` with
    *dual_stack*): reads every connection until it closes, answers nothing.

    Runs forever; start it in a daemon thread.  The agent's scenarios and
    benchmark cut its connections from outside the process.
    """
    if dual_stack:
        srv = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True,
                                   backlog=1024)  # fmt: skip
    else:
        srv = socket.create_server(("127.0.0.1", port), backlog=1024)

    def hold(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while conn.recv(100):
                pass

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=hold, args=(conn,), daemon=True).start()


def free_port(host: str = "127.0.0.1", *, below: int = 65536) -> int:
    """Return a TCP port under *below* that was free on *host* a moment ago."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port < below and (below == 65536 or _free(host, port + 10000)):
            return port


def _free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def redis_server_binary() -> str | None:
    """The ``redis-server`` (or ``valkey-server``) on PATH, or None."""
    override = os.environ.get("BANBUS_REDIS_SERVER")
    if override:
        return override
    return shutil.which("redis-server") or shutil.which("valkey-server")


def _ping(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class _Started:
    """``with X() as x``: ``start()`` on entry, ``close()`` on exit."""

    def start(self) -> Self:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class RedisProcess(_Started):
    """A real ``redis-server`` process on a free loopback port.

    ``stop()`` kills it (SIGKILL by default, like a crash); ``start()`` brings
    it back on the same port, empty unless *persist* keeps an AOF.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        args: tuple[str, ...] = (),
        binary: str | None = None,
        persist: bool = False,
        sentinel_config: str | None = None,
    ) -> None:
        found = binary or redis_server_binary()
        if found is None:
            raise RuntimeError("no redis-server binary on PATH")
        self.binary = found
        self.host = host
        self.port = port or free_port(host)
        self.args = args
        self.persist = persist
        self._dir = tempfile.mkdtemp(prefix="banbus-redis-")
        self._proc: subprocess.Popen[bytes] | None = None
        #: A Sentinel: the configuration it starts from (it rewrites the file).
        self._sentinel_config = sentinel_config
        if sentinel_config is not None:
            with open(os.path.join(self._dir, "sentinel.conf"), "w") as f:
                f.write(sentinel_config)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> RedisProcess:
        if self.running:
            return self
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persist
            else ["--appendonly", "no"]
        )
        head = [self.binary]
        if self._sentinel_config is not None:
            head += [os.path.join(self._dir, "sentinel.conf"), "--sentinel"]
            persistence = []
        cmd = [
            *head,
            "--port", str(self.port),
            "--bind", self.host,
            *(() if self._sentinel_config is not None else ("--save", "")),
            *persistence,
            "--dir", self._dir,
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", os.path.join(self._dir, "redis.log"),
            *self.args,
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while not _ping(self.host, self.port):
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                raise RuntimeError(f"redis-server exited at start: {err or self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.01)
        return self

    def log(self) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self._dir, "redis.log")) as f:
            return f.read()[-4000:]
        return ""

    def stop(self, *, kill: bool = True) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill() if kill else proc.terminate()
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


class EmbeddedRedis(_Started):
    """fakeredis' TCP server in a background thread (needs ``banbus[embedded]``)."""

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        try:
            from fakeredis import TcpFakeServer
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "no redis-server on PATH and fakeredis is not installed; "
                "pip install 'banbus[embedded]' or pass --redis URL"
            ) from exc
        self._server = TcpFakeServer((self.host, self.port), server_type="redis")
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="banbus-embedded-redis", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not _ping(self.host, self.port):
            if time.monotonic() > deadline:
                raise RuntimeError("embedded redis did not start")
            time.sleep(0.01)
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


class SentinelGroup(_Started):
    """A primary, *replicas* replicas and *sentinels* Sentinels watching them.

    The service is ``mymaster``; failure detection is fast (*down_after_ms*)
    so that tests and benchmarks fail over in about a second.  The Sentinels
    start knowing each other and the replicas (their configuration names
    them), so the group is ready at once.

    *via*: a port in front of the primary (a test's proxy): the Sentinels
    monitor the primary there and the replicas replicate from there, their
    links coming from *replica_source_ip* so that the proxy can tell them
    apart (and hold replication back while the primary takes writes).
    """

    service = "mymaster"

    def __init__(
        self,
        *,
        replicas: int = 1,
        sentinels: int = 3,
        down_after_ms: int = 500,
        primary_port: int | None = None,
        via: int | None = None,
        replica_source_ip: str = "127.0.0.9",
        args: tuple[str, ...] = (),
    ) -> None:
        # Replicas sync at once (Redis waits 5 s for more replicas by default).
        args = ("--repl-diskless-sync-delay", "0", *args)
        self.primary = RedisProcess(port=primary_port, args=args)
        source = str(via or self.primary.port)
        link = ("--bind-source-addr", replica_source_ip) if via else ()
        replica_args = (*args, *link, "--replica-announce-ip", "127.0.0.1",
                        "--replicaof", "127.0.0.1", source)  # fmt: skip
        self.replicas = [RedisProcess(args=replica_args) for _ in range(replicas)]
        ports = [free_port() for _ in range(sentinels)]
        ids = [os.urandom(20).hex() for _ in range(sentinels)]
        name = self.service
        common = (
            f"sentinel monitor {name} 127.0.0.1 {via or self.primary.port} {sentinels // 2 + 1}\n"
            f"sentinel down-after-milliseconds {name} {down_after_ms}\n"
            f"sentinel failover-timeout {name} {max(2 * down_after_ms, 1000)}\n"
            f"sentinel parallel-syncs {name} 1\n"
            + "".join(f"sentinel known-replica {name} 127.0.0.1 {r.port}\n" for r in self.replicas)
        )
        self.sentinels = []
        for i, port in enumerate(ports):
            others = "".join(
                f"sentinel known-sentinel {name} 127.0.0.1 {p} {ids[j]}\n"
                for j, p in enumerate(ports)
                if j != i
            )
            config = f"sentinel myid {ids[i]}\n{common}{others}"
            self.sentinels.append(RedisProcess(port=port, sentinel_config=config))

    @property
    def servers(self) -> list[RedisProcess]:
        return [self.primary, *self.replicas]

    @property
    def url(self) -> str:
        """The ``redis+sentinel://`` URL banbus takes."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}"

    def start(self, timeout: float = 20.0) -> SentinelGroup:
        for server in self.servers:
            server.start()
        deadline = time.monotonic() + timeout
        for replica in self.replicas:
            while _info(replica.port, "replication").get("master_link_status") != "up":
                if time.monotonic() > deadline:
                    raise RuntimeError("replica did not sync with the primary")
                time.sleep(0.02)
        for sentinel in self.sentinels:
            sentinel.start()
        # Every Sentinel knows every replica and the other Sentinels.
        want = (len(self.replicas), len(self.sentinels) - 1)
        for sentinel in self.sentinels:
            while self._sentinel_sees(sentinel.port) != want:
                if time.monotonic() > deadline:
                    raise RuntimeError("the Sentinels did not discover each other")
                time.sleep(0.05)
        return self

    def _sentinel_sees(self, port: int) -> tuple[int, int]:
        import redis

        client = redis.Redis(port=port, socket_timeout=5.0, decode_responses=True)
        try:
            fields = client.info("sentinel").get("master0", {})
        finally:
            client.close()
        return int(fields.get("slaves", -1)), int(fields.get("sentinels", 0)) - 1

    def primary_port(self) -> int:
        """The primary as the first Sentinel that answers sees it."""
        for sentinel in self.sentinels:
            if sentinel.running:
                reply = _command(sentinel.port, "SENTINEL", "get-master-addr-by-name",
                                 self.service)  # fmt: skip
                if isinstance(reply, list):
                    return int(reply[1])
        raise RuntimeError("no Sentinel answers")

    def server(self, port: int) -> RedisProcess:
        return next(s for s in self.servers if s.port == port)

    def close(self) -> None:
        for proc in (*self.sentinels, *self.servers):
            proc.close()


class RedisCluster(_Started):
    """A Redis Cluster of *primaries* primaries with *replicas* replicas each.

    Slots are assigned evenly in order; *node_timeout_ms* is short so that a
    killed primary's replica takes over in a second or two.
    """

    def __init__(
        self,
        *,
        primaries: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 1000,
        args: tuple[str, ...] = (),
    ) -> None:
        self.primaries_count = primaries
        self.replicas_count = replicas
        # A cluster node also listens on its port + 10000 (the cluster bus).
        options = (
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
            "--cluster-require-full-coverage", "no",
            "--repl-diskless-sync-delay", "0",
            *args,
        )  # fmt: skip
        self.nodes = [
            RedisProcess(port=free_port(below=55536), args=options)
            for _ in range(primaries * (1 + replicas))
        ]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, timeout: float = 30.0) -> RedisCluster:
        for node in self.nodes:
            node.start()
        ids = [str(_command(n.port, "CLUSTER", "MYID")) for n in self.nodes]
        first = self.nodes[0]
        for node in self.nodes[1:]:
            _command(first.port, "CLUSTER", "MEET", "127.0.0.1", str(node.port))
        count = self.primaries_count
        for i in range(count):
            low, high = i * 16384 // count, (i + 1) * 16384 // count - 1
            _command(self.nodes[i].port, "CLUSTER", "ADDSLOTSRANGE", str(low), str(high))
        deadline = time.monotonic() + timeout
        for node in self.nodes:  # every node must know every other before REPLICATE
            while sum(1 for _ in self._nodes_lines(node.port)) < len(self.nodes):
                if time.monotonic() > deadline:
                    raise RuntimeError("cluster nodes did not meet")
                time.sleep(0.05)
        for r in range(self.replicas_count):
            for i in range(count):
                replica = self.nodes[count * (r + 1) + i]
                while _command(replica.port, "CLUSTER", "REPLICATE", ids[i]) != "OK":
                    if time.monotonic() > deadline:
                        raise RuntimeError("cluster replica could not attach")
                    time.sleep(0.05)
        self.wait_ok(deadline - time.monotonic())
        return self

    def _nodes_lines(self, port: int) -> list[list[str]]:
        reply = _command(port, "CLUSTER", "NODES")
        return [line.split() for line in str(reply).splitlines() if line.strip()]

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every running node says ``cluster_state:ok`` and every replica is in sync."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if not node.running:
                continue
            while True:
                state = _info_text(node.port, "CLUSTER", "INFO")
                role = _info(node.port, "replication")
                synced = role.get("role") == "master" or role.get("master_link_status") == "up"
                if "cluster_state:ok" in state and synced:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster node {node.port} is not ok: {state[:200]}")
                time.sleep(0.05)

    def owner(self, slot: int) -> RedisProcess:
        """The primary serving *slot*, as the first running node sees it."""
        node = next(n for n in self.nodes if n.running)
        for line in self._nodes_lines(node.port):
            if "master" not in line[2] or "fail" in line[2]:
                continue
            for part in line[8:]:
                low, _, high = part.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    port = int(line[1].split("@")[0].rsplit(":", 1)[1])
                    return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"no primary serves slot {slot}")

    def replicas_of(self, primary: RedisProcess) -> list[RedisProcess]:
        primary_id = str(_command(primary.port, "CLUSTER", "MYID"))
        out = []
        for line in self._nodes_lines(primary.port):
            if line[3] == primary_id:
                port = int(line[1].split("@")[0].rsplit(":", 1)[1])
                out.append(next(n for n in self.nodes if n.port == port))
        return out

    def close(self) -> None:
        for node in self.nodes:
            node.close()


def _command(port: int, *args: str, timeout: float = 5.0) -> object:
    """One command to 127.0.0.1:*port* (setup helper; replies decoded, errors returned)."""
    import redis

    client = redis.Redis(port=port, socket_timeout=timeout, decode_responses=True)
    try:
        reply: object = client.execute_command(*args)  # type: ignore[no-untyped-call]
    except redis.ResponseError as exc:
        return exc
    finally:
        client.close()
    return reply


def _info_text(port: int, *args: str) -> str:
    reply = _command(port, *args)
    return reply if isinstance(reply, str) else ""


def _info(port: int, section: str) -> dict[str, str]:
    import redis

    client = redis.Redis(port=port, socket_timeout=5.0, decode_responses=True)
    try:
        return {k: str(v) for k, v in client.info(section).items()}
    finally:
        client.close()
