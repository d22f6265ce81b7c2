"""Shared pieces of the benchmark suite: results, a lean RESP client, workers, clients.

Everything here is benchmark plumbing, not banbus code: the floor measurements
use :class:`Resp` (hiredis + an ``asyncio.Protocol``), so they contain no
banbus code at all.

Clocks: every timestamp is ``time.perf_counter_ns()``, which on Linux reads
``CLOCK_MONOTONIC`` — one clock for every process on the machine, so a time
taken in a node process can be subtracted from one taken in the coordinator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import resource
import socket
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import hiredis

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

HERE = Path(__file__).resolve().parent
WORKER = HERE / "worker.py"

now_ns = time.perf_counter_ns


# -- results ---------------------------------------------------------------------------


@dataclass
class Result:
    """One row of the table / one object of the JSON output."""

    name: str
    value: float
    unit: str
    baseline: float | None = None
    #: Name of the metric (or description) the baseline is.
    baseline_name: str = ""
    #: Target for this metric, as (comparison, number): ("<=", 0.5) or (">=", 150e3).
    target: tuple[str, float] | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or not self.baseline or math.isnan(self.value):
            return None
        return self.value / self.baseline

    def met(self) -> bool | None:
        if self.target is None or math.isnan(self.value):
            return None
        op, bound = self.target
        return self.value <= bound if op == "<=" else self.value >= bound

    def as_json(self) -> dict[str, Any]:
        ratio = self.ratio
        return {
            "name": self.name,
            "value": None if math.isnan(self.value) else _round(self.value),
            "unit": self.unit,
            "baseline": None if self.baseline is None else _round(self.baseline),
            "ratio": None if ratio is None else round(ratio, 4),
        }


def _round(x: float) -> float:
    if x == 0 or not math.isfinite(x):
        return x
    digits = max(0, 4 - math.floor(math.log10(abs(x))))
    return round(x, digits)


def fmt_num(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    ax = abs(x)
    if ax >= 1e5:
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100); NaN for no values."""
    if not values:
        return math.nan
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


# -- small helpers ----------------------------------------------------------------------


def redis_host_port(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", parsed.port or 6379


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def source_ip(block: int, i: int) -> str:
    """The *i*-th client source address of *block*: ``127.<block>.<i//250>.<i%250+1>``."""
    return f"127.{block}.{i // 250}.{i % 250 + 1}"


def pack(*args: bytes | str | int) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = b"%d" % arg
        out.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(out)


def ns_keys_pattern(namespace: str) -> str:
    return "{" + namespace + "}:*"


# -- a lean RESP client (hiredis + asyncio.Protocol) --------------------------------------


class RespError(Exception):
    pass


class Resp(asyncio.Protocol):
    """Minimal pipelined RESP2 client: ``call()`` writes at once, replies match in order."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader(encoding="utf-8", errors="replace", replyError=RespError)
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.on_reply: Callable[[Any], None] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, url: str, name: str | None = None) -> Resp:
        host, port = redis_host_port(url)
        _, proto = await asyncio.get_running_loop().create_connection(cls, host, port)
        sock = proto.transport.get_extra_info("socket") if proto.transport else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if name:
            await proto.call("CLIENT", "SETNAME", name)
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        while (reply := reader.gets()) is not False:
            if self.on_reply is not None:
                self.on_reply(reply)
            if not self._waiters:
                continue
            future = self._waiters.popleft()
            if future.done():
                continue
            if isinstance(reply, RespError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_exception(ConnectionError(str(exc or "connection closed")))
        if not self.closed.done():
            self.closed.set_result(None)

    def call(self, *args: bytes | str | int) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.transport is None:
            future.set_exception(ConnectionError("connection closed"))
            return future
        self._waiters.append(future)
        self.transport.write(pack(*args))
        return future

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def pipeline(url: str, commands: Iterable[tuple[Any, ...]], batch: int = 5000) -> list[Any]:
    """Send *commands* over one blocking socket, *batch* at a time; return the last replies.

    Raises on the first error reply.  Used to populate namespaces quickly.
    """
    host, port = redis_host_port(url)
    last: list[Any] = []
    with socket.create_connection((host, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = hiredis.Reader(encoding="utf-8", errors="replace")
        chunk: list[bytes] = []

        def flush() -> None:
            nonlocal last
            sock.sendall(b"".join(chunk))
            want, last = len(chunk), []
            chunk.clear()
            while len(last) < want:
                data = sock.recv(1 << 20)
                if not data:
                    raise ConnectionError("redis closed the connection")
                reader.feed(data)
                while (reply := reader.gets()) is not False:
                    if isinstance(reply, hiredis.ReplyError):
                        raise RespError(str(reply))
                    last.append(reply)

        for command in commands:
            chunk.append(pack(*command))
            if len(chunk) >= batch:
                flush()
        if chunk:
            flush()
    return last


def command(url: str, *args: Any) -> Any:
    """One blocking command (setup/teardown only)."""
    return pipeline(url, [args])[0]


def redis_cpu_seconds(url: str) -> float:
    info = command(url, "INFO", "CPU")
    values = dict(
        line.split(":", 1) for line in info.splitlines() if ":" in line and not line.startswith("#")
    )
    return float(values["used_cpu_sys"]) + float(values["used_cpu_user"])


def drop_namespace(url: str, namespace: str) -> None:
    """Delete every key of *namespace* (``{ns}:*``)."""
    cursor = "0"
    for _ in range(100_000):
        cursor, keys = command(
            url, "SCAN", cursor, "MATCH", ns_keys_pattern(namespace), "COUNT", 1000
        )
        if keys:
            command(url, "UNLINK", *keys)
        if cursor == "0":
            return


def client_id(url: str, name: str) -> int | None:
    """The id of the first client named *name* (CLIENT LIST), or None."""
    for line in command(url, "CLIENT", "LIST").splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if fields.get("name") == name:
            return int(fields["id"])
    return None


# -- worker processes ----------------------------------------------------------------------


@dataclass
class Worker:
    """A child process running ``benchmarks/worker.py``; JSON lines over stdin/stdout."""

    name: str
    proc: asyncio.subprocess.Process
    log_path: Path
    ready: dict[str, Any] = field(default_factory=dict)

    @classmethod
    async def start(cls, name: str, mode: str, *args: str, timeout: float = 60.0) -> Worker:
        log_dir = Path(os.environ.get("BENCH_LOG_DIR") or tempfile.gettempdir())
        log_path = log_dir / f"worker-{name}-{os.getpid()}.log"
        with open(log_path, "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(WORKER),
                mode,
                *args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                limit=1 << 26,
            )
        worker = cls(name, proc, log_path)
        try:
            worker.ready = await worker.read(timeout)
        except BaseException:
            await worker.stop()
            raise
        return worker

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise RuntimeError(
                f"worker {self.name} did not answer in {timeout}s; log:\n{self.log_tail()}"
            ) from None
        if not line:
            await asyncio.sleep(0.2)
            raise RuntimeError(
                f"worker {self.name} exited (rc={self.proc.returncode}); log:\n{self.log_tail()}"
            )
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"worker {self.name}: {reply['error']}")
        return reply

    async def request(self, cmd: str, timeout: float = 60.0, **kwargs: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kwargs}).encode() + b"\n")
        await self.proc.stdin.drain()
        return await self.read(timeout)

    def log_tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-n:]
        return ""

    async def stop(self, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc.returncode is None:
            with contextlib.suppress(Exception):
                assert proc.stdin is not None
                proc.stdin.write(b'{"cmd": "quit"}\n')
                await proc.stdin.drain()
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        with contextlib.suppress(OSError):
            self.log_path.unlink()


async def start_workers(specs: Sequence[tuple[str, str, Sequence[str]]]) -> list[Worker]:
    """Start workers concurrently; stop them all if one fails."""
    tasks = [asyncio.ensure_future(Worker.start(n, m, *a)) for n, m, a in specs]
    done = await asyncio.gather(*tasks, return_exceptions=True)
    workers = [w for w in done if isinstance(w, Worker)]
    errors = [e for e in done if isinstance(e, BaseException)]
    if errors:
        await stop_workers(workers)
        raise errors[0]
    return workers


async def stop_workers(workers: Iterable[Worker]) -> None:
    await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)


# -- keep-alive clients ---------------------------------------------------------------------


class KeepAliveClient(asyncio.Protocol):
    """A client that holds its connection open and timestamps the moment it is cut.

    The server writes one byte (``+``) once it has registered the connection;
    :attr:`ready` resolves then.  :attr:`closed_ns` is taken in the first of
    ``eof_received``/``connection_lost`` (RST shows up as the latter).
    """

    __slots__ = ("_on_close", "closed", "closed_ns", "ready", "transport")

    def __init__(self, on_close: Callable[[KeepAliveClient], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[int] = loop.create_future()
        self.closed_ns = 0
        self.transport: asyncio.Transport | None = None
        self._on_close = on_close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def _mark(self) -> None:
        if not self.closed_ns:
            self.closed_ns = now_ns()
            if not self.closed.done():
                self.closed.set_result(self.closed_ns)
            if self._on_close is not None:
                self._on_close(self)

    def eof_received(self) -> bool:
        self._mark()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._mark()
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before ready"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def open_client(
    port: int,
    src: str,
    *,
    host: str = "127.0.0.1",
    timeout: float = 5.0,
    on_close: Callable[[KeepAliveClient], None] | None = None,
) -> KeepAliveClient:
    """Connect from source address *src* and wait until the server has registered us."""
    loop = asyncio.get_running_loop()
    _, client = await asyncio.wait_for(
        loop.create_connection(lambda: KeepAliveClient(on_close), host, port, local_addr=(src, 0)),
        timeout,
    )
    await asyncio.wait_for(client.ready, timeout)
    return client
