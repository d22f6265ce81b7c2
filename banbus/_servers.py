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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["EmbeddedRedis", "RedisProcess", "free_port", "redis_server_binary"]


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on *host* a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


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


class RedisProcess:
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
        cmd = [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
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

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class EmbeddedRedis:
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

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
