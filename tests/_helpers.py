"""Helpers shared by the node, trust and fault tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from banbus import Node
from banbus._follower import valid_target
from banbus._keys import Keys, namespace_keys
from banbus._model import entry_decoder

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable

    import redis.asyncio as aioredis
    from anyio.abc import Process

CHILD = Path(__file__).with_name("_node_child.py")

#: Two nodes on one namespace (the ``two_nodes`` fixture).
Pair = tuple[Node, Node]

#: (kind, target) -> expiry in whole seconds (0 = permanent): what a view or
#: the record says, at the digest's granularity.
View = dict[tuple[str, str], int]


@asynccontextmanager
async def nodes(url: str, namespace: str, count: int, **options: Any) -> AsyncIterator[list[Node]]:
    """*count* nodes ``n0``, ``n1``… on one namespace, closed on exit."""
    async with AsyncExitStack() as stack:
        started = [
            await stack.enter_async_context(
                Node(url, namespace=namespace, node_id=f"n{i}", **options)
            )
            for i in range(count)
        ]
        yield started


async def synced(seq: int, *members: Node) -> None:
    """Wait until every node applied event *seq* (the synchronisation point)."""
    assert seq > 0
    with anyio.fail_after(10):
        for node in members:
            await node.wait_for_seq(seq)


async def eventually(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll *predicate* (for behaviour that has no event, like expiry); return the delay."""
    start = time.monotonic()
    deadline = start + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout}s")
        await anyio.sleep(0.002)
    return time.monotonic() - start


async def until(check: Callable[[], Any], timeout: float, what: str) -> None:
    """Poll the coroutine function *check* until it returns true."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout}s")
        await anyio.sleep(0.01)


def keys(namespace: str) -> Keys:
    return namespace_keys(namespace)


async def server_ms(admin: aioredis.Redis) -> int:
    seconds, micros = await admin.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def xlen(admin: aioredis.Redis, namespace: str) -> int:
    return int(await admin.xlen(keys(namespace).log))


async def server_seq(admin: aioredis.Redis, namespace: str) -> int:
    """The namespace's last sequence number, from ``banbus_state``."""
    state = await admin.fcall_ro("banbus_state", 1, namespace)  # type: ignore[misc]
    return int(state[1])


async def server_bans(admin: aioredis.Redis, namespace: str) -> set[str]:
    return set(await admin.hkeys(keys(namespace).bans))


async def reader_client(admin: aioredis.Redis, node: Node) -> dict[str, Any] | None:
    for client in await admin.client_list():
        if client.get("name") == f"banbus-reader:{node.node_id}":
            return client
    return None


def _seconds(expires_ms: int) -> int:
    return -(-expires_ms // 1000)


def view_of(node: Node, horizon_ms: int) -> View:
    """What *node* enforces, leaving out entries that expire before *horizon_ms*."""
    out: View = {}
    for kind, records in (("ban", node.bans()), ("allow", node.allows())):
        for record in records:
            if record.expires == 0 or record.expires > horizon_ms:
                out[(kind, record.target)] = _seconds(record.expires)
    return out


def view_from_dump(dump: Iterable[tuple[str, str, int]], horizon_ms: int) -> View:
    """The same from a child process's dump (``[kind, target, expires_ms]`` rows)."""
    return {
        (kind, target): _seconds(expires)
        for kind, target, expires in dump
        if expires == 0 or expires > horizon_ms
    }


async def record_of(admin: aioredis.Redis, namespace: str, horizon_ms: int) -> View:
    """What the record holds that a node may take (valid targets and values).

    Entries that expire before *horizon_ms* are left out.
    """
    k = keys(namespace)
    out: View = {}
    for kind, key in (("ban", k.bans), ("allow", k.allow)):
        for target, value in (await admin.hgetall(key)).items():
            try:
                entry = entry_decoder.decode(value)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if not valid_target(target):
                continue
            expires = entry.expires
            if expires == 0 or expires > horizon_ms:
                out[(kind, target)] = _seconds(expires)
    return out


async def assert_converged(admin: aioredis.Redis, namespace: str, *members: Node) -> View:
    """Every node's view equals the record (entries expiring in the next 3 s aside)."""
    await caught_up(admin, namespace, *members)
    horizon = await server_ms(admin) + 3000
    record = await record_of(admin, namespace, horizon)
    for node in members:
        view = view_of(node, horizon)
        assert view == record, (
            f"{node.node_id} differs from the record: only in the view "
            f"{ {k: v for k, v in view.items() if record.get(k) != v} }, only in the record "
            f"{ {k: v for k, v in record.items() if view.get(k) != v} }"
        )
    return record


async def caught_up(admin: aioredis.Redis, namespace: str, *members: Node) -> None:
    """Wait until every node has applied the library's last event."""
    seq = await server_seq(admin, namespace)
    if seq:
        await synced(seq, *members)


class Child:
    def __init__(self, process: Process) -> None:
        self.process = process
        assert process.stdout is not None
        self.stdout = BufferedByteReceiveStream(process.stdout)

    async def line(self) -> str:
        with anyio.fail_after(30):
            return (await self.stdout.receive_until(b"\n", 1 << 20)).decode()

    async def ask(self, command: str) -> str:
        assert self.process.stdin is not None
        await self.process.stdin.send(command.encode() + b"\n")
        return await self.line()

    async def kill(self) -> None:
        """SIGKILL, as a crash: nothing is flushed, no goodbye."""
        self.process.kill()
        await self.process.wait()


@asynccontextmanager
async def child_node(
    url: str, namespace: str, node_id: str, **options: Any
) -> AsyncIterator[Child]:
    """A node in its own process (``tests/_node_child.py``), closed on exit."""
    process = await anyio.open_process(
        [sys.executable, str(CHILD), url, namespace, node_id, json.dumps(options)],
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(CHILD.parent.parent)},
    )
    async with process:
        child = Child(process)
        try:
            assert await child.line() == "ready"
            yield child
            if process.returncode is not None:  # killed by the test
                return
            assert process.stdin is not None
            await process.stdin.send(b"quit\n")
            with anyio.fail_after(10):
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


def reloaded_after_loss(node: Node) -> bool:
    """Has *node* seen a data loss and finished the reload that follows it?

    (``losses`` counts at the start of that reload, ``resyncs`` once the
    snapshot is installed and the re-seed candidates are held.)
    """
    stats = node.statistics()
    return stats.losses >= 1 and stats.resyncs >= stats.losses
