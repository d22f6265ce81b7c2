"""Test fixtures: real ``redis-server`` processes on free loopback ports.

The suite never touches a shared Redis (6379).  When no ``redis-server`` is on
PATH, a fakeredis TCP server stands in for what it can serve and tests marked
``real_redis`` are skipped with a visible reason — unless
``BANBUS_REQUIRE_REAL_REDIS=1`` (set by ``.ci/run``), which turns that skip
into a failure.
"""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING, Any

import pytest

from banbus._servers import EmbeddedRedis, RedisProcess, redis_server_binary

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

    import redis.asyncio as aioredis

    from banbus import Node

REQUIRE_REAL = os.environ.get("BANBUS_REQUIRE_REAL_REDIS") == "1"
HAVE_REAL = redis_server_binary() is not None
NO_REAL_REASON = "needs a real redis-server process (none on PATH; embedded fakeredis in use)"


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    # redis.asyncio is asyncio-only.
    return "asyncio"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAVE_REAL:
        return
    if REQUIRE_REAL:
        raise pytest.UsageError("BANBUS_REQUIRE_REAL_REDIS=1 but no redis-server is on PATH")
    skip = pytest.mark.skip(reason=NO_REAL_REASON)
    for item in items:
        if "real_redis" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess | EmbeddedRedis]:
    """The suite's shared server: real when available, embedded otherwise."""
    server: RedisProcess | EmbeddedRedis
    server = RedisProcess() if HAVE_REAL else EmbeddedRedis()
    with server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisProcess | EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
def namespace() -> str:
    """A fresh namespace per test: tests share the server, never the keys."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def redis_factory() -> Iterator[Callable[..., RedisProcess]]:
    """Start extra real ``redis-server`` processes; all are killed at teardown."""
    if not HAVE_REAL:
        pytest.skip(NO_REAL_REASON)
    started: list[RedisProcess] = []

    def make(**kwargs: Any) -> RedisProcess:
        proc = RedisProcess(**kwargs).start()
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.close()


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client (``decode_responses``) for inspecting and poking the server."""
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def two_nodes(redis_url: str, namespace: str) -> AsyncIterator[tuple[Node, Node]]:
    """Nodes ``a`` and ``b`` on the test's namespace, in sync."""
    from banbus import Node

    async with (
        Node(redis_url, namespace=namespace, node_id="a") as a,
        Node(redis_url, namespace=namespace, node_id="b") as b,
    ):
        yield a, b
