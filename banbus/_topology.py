"""Where a namespace lives, and following it when it moves.

Theory of operation
-------------------

All keys of a namespace share one hash tag, so they always live on one
server: a plain server, the primary that a set of Sentinels names, or the
primary of the Redis Cluster shard serving the tag's slot.  A
:class:`Topology` knows which, and keeps knowing:

``server``
    A URL or client of one server (or of a cluster node — see below).
``sentinel``
    ``redis+sentinel://`` URLs, a ``redis.asyncio.Sentinel`` with a service
    name, or a client from ``Sentinel.master_for``: the Sentinels are asked
    for the primary (and, to read from one, the replicas).
``cluster``
    ``redis+cluster://`` URLs, a ``redis.asyncio.RedisCluster``, or any URL
    or client of a cluster node (detected with ``CLUSTER SHARDS`` at the
    first answer): the shard serving the namespace's slot is looked up with
    ``CLUSTER SHARDS``, from the nodes the last answer listed.

Every command of the node goes through :attr:`Topology.client`, a redis-py
client whose pool is *routed*: its connections dial the current primary, and
when the primary changes, idle connections are closed and busy ones are
dropped when they come back.  The connection parameters (credentials, TLS
context, timeouts) are redis-py's own, taken from the URL or from the client
or Sentinel the user gave — one copy, never a partial re-creation.  The
node's reader dials :meth:`Topology.reader_target`: the primary, or a
replica with ``read_from="replica"``.

The topology looks again ("suspects") when

* a routed connection cannot connect, loses its server, or reads an error
  reply saying the primary is elsewhere (``MOVED``, ``ASK``, ``READONLY``,
  ``UNBLOCKED``, ``CLUSTERDOWN``, ``MASTERDOWN``, ``TRYAGAIN``, a script's
  "non local key");
* the reader loses its connection;
* *interval* seconds have passed: a Sentinel failover does not tell a
  client blocked on the old primary, which may wait on, unaware.

When the answer differs, the pool is re-targeted and the ``on_change``
listeners run: the reader reconnects and judges its position like after any
reconnect (the new primary may lack writes the old one acknowledged), and the
outbox is kicked.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import random
import time
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import anyio
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    ConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.crc import key_slot

from ._exceptions import InvalidInput, RedisUnavailable
from ._resp import ServerAddress, address_from

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ._keys import Keys

__all__ = ["ReaderTarget", "Topology", "open_topology", "redirected"]

log = logging.getLogger("banbus")

Kind = Literal["server", "sentinel", "cluster"]
ReadFrom = Literal["primary", "replica"]
Address = tuple[str, int]

#: First words of error replies that say the primary is elsewhere, or moving.
_REDIRECTS: Final = frozenset(
    ("MOVED", "ASK", "READONLY", "UNBLOCKED", "CLUSTERDOWN", "MASTERDOWN", "TRYAGAIN")
)
#: Looked-up nodes remembered as places to ask next time (cluster).
_SEEDS_KEPT: Final = 32
#: A replica the reader lost is not read from again for this long.
_AVOID_SECONDS: Final = 10.0
#: Suspicions closer together than this share one look-up.
_MIN_LOOKUP_GAP: Final = 0.05

#: The client options banbus uses when it makes the client from a URL.
_DEFAULTS: Final[dict[str, Any]] = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}


class ReaderTarget(NamedTuple):
    """Where the reader connects."""

    #: For the lean RESP client; None when only redis-py can connect (a
    #: credential provider, say).
    address: ServerAddress | None
    connection_class: type[AbstractConnection]
    connection_kwargs: dict[str, Any]
    #: A cluster replica: send ``READONLY`` first.
    readonly: bool


#: The same, as redis-py raises them (``MovedError`` and ``AskError`` drop the
#: first word from their message).
_REDIRECT_ERRORS: Final = (
    redis_errors.AskError,  # MovedError is one
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
    redis_errors.ReadOnlyError,
)


def redirected(exc: BaseException) -> bool:
    """Does *exc* (an error reply) say the namespace's primary is elsewhere, or moving?"""
    if isinstance(exc, _REDIRECT_ERRORS):
        return True
    text = str(exc)
    return text.split(" ", 1)[0] in _REDIRECTS or "non local key" in text


# -- the routed pool ----------------------------------------------------------------------


class _RoutedConnection(AbstractConnection):
    """A connection that tells its topology when its server failed it or sent it away."""

    topology: Topology

    async def connect(self) -> None:
        if self.topology.primary is None and not self.topology.unix:
            # Never the redis-py default (localhost:6379): nothing known yet.
            self.topology.suspect("the primary is not known yet")
            raise redis_errors.ConnectionError("the primary is not known yet")
        try:
            await super().connect()  # type: ignore[no-untyped-call]
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            self.topology.suspect(f"cannot connect: {exc}")
            raise

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except redis_errors.ResponseError as exc:
            if redirected(exc):
                self.topology.suspect(str(exc))
            raise
        except (redis_errors.ConnectionError, OSError) as exc:
            self.topology.suspect(f"connection lost: {exc}")
            raise


class _RoutedPool(ConnectionPool):
    """A pool whose connections dial ``connection_kwargs`` host and port — as they are
    when the connection is made; :meth:`retarget` moves them."""

    def _stale(self, connection: AbstractConnection) -> bool:
        kwargs = self.connection_kwargs
        return (getattr(connection, "host", None), getattr(connection, "port", None)) != (
            kwargs.get("host"),
            kwargs.get("port"),
        )

    async def retarget(self, host: str, port: int) -> None:
        self.connection_kwargs.update(host=host, port=port)
        idle, self._available_connections = self._available_connections, []
        for connection in idle:
            with contextlib.suppress(Exception):
                await connection.disconnect()

    async def release(self, connection: AbstractConnection) -> None:
        if self._stale(connection):
            # It talked to the old primary: never hand it out again.
            self._in_use_connections.discard(connection)
            with contextlib.suppress(Exception):
                await connection.disconnect()
            return
        await super().release(connection)


def _base_class(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """The plain redis-py class under a Sentinel-managed (or already routed) one."""
    from redis.asyncio.sentinel import SentinelManagedConnection

    if issubclass(cls, _RoutedConnection) or issubclass(cls, SentinelManagedConnection):
        return SSLConnection if issubclass(cls, SSLConnection) else Connection
    return cls


def _accepted(cls: type[AbstractConnection], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The items of *kwargs* that *cls* (and the classes it passes ``**kwargs`` to) take."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters
        names.update(p for p in params if p != "self")
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            break
    return {k: v for k, v in kwargs.items() if k in names}


# -- the topology ------------------------------------------------------------------------


class Topology:
    """The current primary (and replicas) of one namespace; see the module docstring.

    Built by :func:`open_topology`; :meth:`start` looks up once, :meth:`run`
    follows for as long as the node runs.
    """

    def __init__(
        self,
        kind: Kind,
        keys: Keys,
        *,
        connection_class: type[AbstractConnection],
        connection_kwargs: dict[str, Any],
        seeds: list[Address] | None = None,
        sentinel: aioredis.Sentinel | None = None,
        service: str | None = None,
        read_from: ReadFrom = "primary",
        interval: float = 1.0,
        detect: bool = False,
    ) -> None:
        self.kind: Kind = kind
        self._keys = keys
        self._slot = key_slot(keys.log.encode())
        self._base = _base_class(connection_class)
        kwargs = _accepted(self._base, connection_kwargs)
        kwargs.pop("connection_pool", None)
        self._kwargs = kwargs
        self._sentinel = sentinel
        self._service = service
        self.read_from: ReadFrom = read_from
        self.interval = interval
        #: A server URL or client: ask once whether it is a cluster node.
        self._detect = detect
        self._seeds: list[Address] = list(seeds or [])
        routed: type[AbstractConnection] = type(
            f"Routed{self._base.__name__}", (_RoutedConnection, self._base), {"topology": self}
        )
        self.unix = issubclass(self._base, UnixDomainSocketConnection)
        pool = (ConnectionPool if self.unix else _RoutedPool)(
            connection_class=self._base if self.unix else routed, **kwargs
        )
        #: Every command of the node goes through this client.
        self.client = aioredis.Redis(connection_pool=pool)
        self.primary: Address | None = (
            None if self.unix or kind != "server" else (kwargs["host"], int(kwargs["port"]))
        )
        self.replicas: list[Address] = []
        #: The replica the reader uses (read_from="replica"), None: the primary.
        self.reading: Address | None = None
        self.changes = 0
        self.lookups = 0
        self.lookup_failures = 0
        #: How far the view trails the primary (read_from="replica"): events, ms.
        self.read_lag: tuple[int, float] = (0, 0.0)
        self._listeners: list[Callable[[], None]] = []
        self._avoided: dict[Address, float] = {}
        self._suspected: anyio.Event | None = None
        self._last_lookup = 0.0
        self._lock: anyio.Lock | None = None

    def __repr__(self) -> str:
        return f"<Topology {self.kind} primary={self.describe(self.primary)}>"

    @staticmethod
    def describe(address: Address | None) -> str:
        return f"{address[0]}:{address[1]}" if address is not None else "-"

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call *callback()* whenever the primary, or the replica read from, changes."""
        self._listeners.append(callback)

    # -- looking up ------------------------------------------------------------------------

    async def start(
        self,
        timeout: float,
        probe: Callable[[aioredis.Redis], Awaitable[object]] | None = None,
    ) -> None:
        """Look up the primary and run *probe* on it, retrying for up to *timeout*
        seconds (a failover may be under way: the Sentinels may still name the
        primary that just died).

        :raises RedisUnavailable: nothing answered in time.
        """
        self._suspected = anyio.Event()
        self._lock = anyio.Lock()
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            try:
                await self.refresh(force=True)
                if probe is not None:
                    await probe(self.client)
                return
            except RedisUnavailable:
                if time.monotonic() + delay > deadline:
                    raise
            await anyio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def refresh(self, *, force: bool = False) -> bool:
        """Look up the primary now; re-target if it moved.  Returns True if it did.

        :raises RedisUnavailable: no Sentinel / cluster node answered.
        """
        assert self._lock is not None
        async with self._lock:
            if not force and time.monotonic() - self._last_lookup < _MIN_LOOKUP_GAP:
                return False
            self._last_lookup = time.monotonic()
            self.lookups += 1
            try:
                primary, replicas = await self._lookup()
            except RedisUnavailable:
                self.lookup_failures += 1
                raise
            return await self._apply(primary, replicas)

    async def _lookup(self) -> tuple[Address | None, list[Address]]:
        if self.kind == "sentinel":
            return await self._ask_sentinels()
        if self.kind == "cluster":
            return await self._ask_cluster()
        if self._detect and await self._detect_cluster():
            return await self._ask_cluster()
        return self.primary, []

    async def _detect_cluster(self) -> bool:
        """Is the server a cluster node?  (Its ``CLUSTER SHARDS`` says.)"""
        try:
            reply = await self.client.execute_command("CLUSTER", "SHARDS")  # type: ignore[no-untyped-call]
        except redis_errors.ResponseError:
            # "cluster support disabled", an unknown command (an embedded
            # server), or NOPERM (an ACL user without cluster commands: it
            # is then taken for a single server).
            self._detect = False
            return False
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            from ._library import tls_hint

            raise RedisUnavailable(f"cannot reach {self.describe(self.primary)}: {exc}"
                                   f"{tls_hint(exc)}") from exc  # fmt: skip
        self._detect = False
        self.kind = "cluster"
        self._seeds = [a for a in (self.primary,) if a is not None]
        # The node named is not necessarily the one serving the slot: the
        # look-up that follows is the first.
        self.primary = None
        self._learn(_parse_shards(reply))
        log.info("banbus: %s is a Redis Cluster node; following the shard of slot %d",
                 self.describe(self.primary), self._slot)  # fmt: skip
        return True

    async def _ask_sentinels(self) -> tuple[Address | None, list[Address]]:
        """Every Sentinel at once; the newest configuration wins.

        Right after a failover, Sentinels that have not heard of it yet still
        name the old primary; redis-py's ``discover_master`` takes the first
        answer (and keeps asking that Sentinel first).  The answer with the
        highest ``config-epoch`` is the last failover's.
        """
        assert self._sentinel is not None and self._service is not None
        sentinel, service = self._sentinel, self._service

        async def ask(client: aioredis.Redis) -> dict[str, Any] | BaseException:
            try:
                with anyio.fail_after(2.0):
                    state: dict[str, Any] = await client.sentinel_master(service)  # type: ignore[assignment]
                    return state
            except (redis_errors.RedisError, OSError, TimeoutError) as exc:
                return exc

        answers: list[tuple[aioredis.Redis, dict[str, Any] | BaseException]] = []

        async def collect(client: aioredis.Redis) -> None:
            answers.append((client, await ask(client)))

        async with anyio.create_task_group() as tg:
            for client in sentinel.sentinels:
                tg.start_soon(collect, client)
        states = [(c, a) for c, a in answers if isinstance(a, dict)]
        valid = [(c, a) for c, a in states if sentinel.check_master_state(a, service)]
        if not valid:
            errors = "; ".join(str(a) for _, a in answers if not isinstance(a, dict))
            if states:
                raise RedisUnavailable(f"no Sentinel sees a healthy primary for {service!r} "
                                       "(a failover may be under way)")  # fmt: skip
            raise RedisUnavailable(f"the Sentinels cannot be reached ({errors})")
        client, state = max(valid, key=lambda ca: int(ca[1].get("config-epoch", 0)))
        replicas: list[Address] = []
        if self.read_from == "replica":
            with contextlib.suppress(redis_errors.RedisError, OSError):
                replicas = _healthy_replicas(await client.sentinel_slaves(service))
        return (_text(state["ip"]), int(state["port"])), replicas

    async def _ask_cluster(self) -> tuple[Address | None, list[Address]]:
        """``CLUSTER SHARDS`` from a node other than the primary first (after a
        failover the old primary may still think it is one), the primary last."""
        others = [a for a in self._seeds if a != self.primary]
        random.shuffle(others)
        errors = []
        for address in [*others[:3], *([self.primary] if self.primary else [])]:
            try:
                shards = await self._shards_of(address)
            except (redis_errors.RedisError, OSError) as exc:
                errors.append(f"{self.describe(address)}: {exc}")
                continue
            found = self._learn(shards)
            if found is not None:
                return found
            errors.append(f"{self.describe(address)}: no healthy primary serves slot {self._slot}")
        raise RedisUnavailable(
            f"no cluster node could say who serves slot {self._slot}: "
            f"{'; '.join(errors) or 'no nodes known'}"
        )

    async def _shards_of(self, address: Address) -> list[dict[str, Any]]:
        kwargs = dict(self._kwargs, host=address[0], port=address[1])
        client = aioredis.Redis(
            connection_pool=ConnectionPool(connection_class=self._base, **kwargs)
        )
        try:
            return _parse_shards(await client.execute_command("CLUSTER", "SHARDS"))  # type: ignore[no-untyped-call]
        finally:
            await client.aclose(close_connection_pool=True)

    def _learn(self, shards: list[dict[str, Any]]) -> tuple[Address, list[Address]] | None:
        """Remember every node as a seed; return the primary and replicas of our slot."""
        tls = issubclass(self._base, SSLConnection)
        seeds: list[Address] = []
        found: tuple[Address, list[Address]] | None = None
        for shard in shards:
            primary: Address | None = None
            replicas: list[Address] = []
            for node in shard["nodes"]:
                port = node.get("tls-port") if tls else node.get("port")
                host = node.get("endpoint") or node.get("ip")
                if not port or not host or host == "?":
                    continue
                address = (str(host), int(port))
                seeds.append(address)
                health, role = node.get("health"), node.get("role")
                if role == "master" and health == "online":
                    primary = address
                # Redis 7.0 says "loading" of a replica that has replicated
                # nothing yet; one that really is loading answers LOADING,
                # and the reader then moves on (see avoid()).
                elif role != "master" and health in ("online", "loading"):
                    replicas.append(address)
            slots = shard["slots"]
            if primary is not None and any(
                int(slots[i]) <= self._slot <= int(slots[i + 1]) for i in range(0, len(slots), 2)
            ):
                found = (primary, replicas)
        if seeds:
            self._seeds = list(dict.fromkeys(seeds))[:_SEEDS_KEPT]
        return found

    def avoid(self, why: str) -> None:
        """The reader lost its replica: read elsewhere for a while (another replica, or
        the primary), and look up again."""
        if self.reading is not None:
            self._avoided[self.reading] = time.monotonic() + _AVOID_SECONDS
            log.info("banbus: reading from replica %s failed (%s); trying elsewhere",
                     self.describe(self.reading), why)  # fmt: skip
        self.suspect(why)

    def leave_replica(self, why: str) -> bool:
        """The replica read from cannot serve (*why*): read from the primary now, and
        avoid that replica for a while.  False when the reader is on the primary."""
        if self.reading is None:
            return False
        log.warning("banbus: not reading from replica %s: %s; reading from the primary",
                    self.describe(self.reading), why)  # fmt: skip
        self._avoided[self.reading] = time.monotonic() + _AVOID_SECONDS
        self.reading, self.read_lag = None, (0, 0.0)
        self.suspect(why)
        return True

    async def _apply(self, primary: Address | None, replicas: list[Address]) -> bool:
        self.replicas = replicas
        now = time.monotonic()
        self._avoided = {a: t for a, t in self._avoided.items() if t > now}
        usable = [a for a in replicas if a not in self._avoided]
        reading = self.reading
        if self.read_from == "replica":
            if reading not in usable:
                reading = random.choice(usable) if usable else None
                if reading is None and self.reading is not None:
                    log.warning("banbus: no replica of %s is available; reading from the primary",
                                self.describe(primary))  # fmt: skip
        moved = primary != self.primary
        if not moved and reading == self.reading:
            return False
        if moved and primary is not None:
            if self.primary is not None:
                log.warning("banbus: the primary of %r moved from %s to %s",
                            self._keys.namespace, self.describe(self.primary),
                            self.describe(primary))  # fmt: skip
            pool = self.client.connection_pool
            if isinstance(pool, _RoutedPool):
                await pool.retarget(*primary)
        first = self.primary is None
        self.primary, self.reading = primary or self.primary, reading
        if reading is None:
            self.read_lag = (0, 0.0)
        if not first:
            self.changes += 1
        for callback in self._listeners:
            callback()
        return True

    # -- following ------------------------------------------------------------------------

    def suspect(self, why: str) -> None:
        """Something suggests the primary moved: look again soon."""
        if self._suspected is not None and not self._suspected.is_set():
            log.debug("banbus: topology of %r suspected: %s", self._keys.namespace, why)
            self._suspected.set()

    async def run(self, position: Callable[[], tuple[int, str]] | None = None) -> None:
        """Look up when suspected, and every *interval* seconds (forever).

        *position* gives the node's last applied (seq, entry id): with
        ``read_from="replica"`` the read lag is measured against the primary.
        """
        assert self._suspected is not None
        if self.kind == "server" and not self._detect and self.read_from == "primary":
            return  # nothing can move
        failures = 0
        while True:
            with anyio.move_on_after(self.interval):
                await self._suspected.wait()
            self._suspected = anyio.Event()
            try:
                await self.refresh()
            except RedisUnavailable as exc:
                # A failover under way: look again soon, but a fleet of nodes
                # must not hammer the Sentinels (50 ms doubling to 400 ms).
                log.debug("banbus: topology look-up failed: %s", exc)
                await anyio.sleep(min(0.05 * 2**failures, 0.4) * random.uniform(0.5, 1.0))
                failures = min(failures + 1, 8)
                self.suspect("the last look-up failed")
                continue
            except Exception:  # never let a look-up bug stop following
                log.exception("banbus: topology look-up failed")
                continue
            failures = 0
            if position is not None and self.reading is not None:
                await self._measure_lag(position)
            else:
                self.read_lag = (0, 0.0)  # reading from the primary

    async def _measure_lag(self, position: Callable[[], tuple[int, str]]) -> None:
        try:
            reply = await self.client.fcall_ro("banbus_state", 1, self._keys.function_key)
        except (redis_errors.RedisError, OSError):
            return
        head_id, head_seq = _text(reply[0]), int(reply[1])
        seq, last_id = position()
        behind = max(0, head_seq - seq)
        ms = 0.0
        if behind:
            ms = max(0.0, float(_id_ms(head_id) - _id_ms(last_id)))
        self.read_lag = (behind, ms)

    def reader_target(self) -> ReaderTarget:
        """Where the reader connects (the primary, or the replica it reads from)."""
        kwargs = dict(self._kwargs)
        readonly = False
        if not self.unix:
            where = self.reading or self.primary
            if where is None:
                raise RedisUnavailable("the primary is not known yet")
            kwargs.update(host=where[0], port=where[1])
            # A cluster replica serves reads only to connections that ask.
            readonly = self.reading is not None and self.kind == "cluster"
        return ReaderTarget(address_from(self._base, kwargs, readonly=readonly), self._base,
                            kwargs, readonly)  # fmt: skip

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(Exception):
                await self.client.aclose(close_connection_pool=True)
            if self._sentinel is not None:
                for client in self._sentinel.sentinels:
                    with contextlib.suppress(Exception):
                        await client.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _id_ms(entry_id: str) -> int:
    head = entry_id.partition("-")[0]
    return int(head) if head.isdigit() else 0


def _pairs(items: Any) -> dict[str, Any]:
    """A RESP2 flat key/value list (or a RESP3 map) as a dict with text keys."""
    if isinstance(items, dict):
        return {_text(k): v for k, v in items.items()}
    return {_text(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}


def _parse_shards(reply: Any) -> list[dict[str, Any]]:
    shards = []
    for raw in reply:
        shard = _pairs(raw)
        nodes = []
        for node in shard.get("nodes", []):
            fields = _pairs(node)
            nodes.append({k: _text(v) if isinstance(v, bytes) else v for k, v in fields.items()})
        shards.append({"slots": list(shard.get("slots", [])), "nodes": nodes})
    return shards


# -- what the user gives --------------------------------------------------------------------


def open_topology(
    redis: Any,
    keys: Keys,
    *,
    service: str | None = None,
    read_from: ReadFrom = "primary",
    interval: float = 1.0,
) -> Topology:
    """A :class:`Topology` for what was passed as ``Node(redis, ...)`` or ``--redis``.

    Nothing is contacted yet (see :meth:`Topology.start`).

    :param redis: a URL (``redis://``, ``rediss://``, ``unix://``,
        ``redis+sentinel://``, ``rediss+sentinel://``, ``redis+cluster://``,
        ``rediss+cluster://``), a ``redis.asyncio.Redis`` (of a server, a
        cluster node, or from ``Sentinel.master_for``), a
        ``redis.asyncio.RedisCluster``, or a ``redis.asyncio.Sentinel`` with
        *service*.
    :raises InvalidInput: a URL that cannot be used, a Sentinel without service.
    :raises TypeError: anything else.
    """
    if read_from not in ("primary", "replica"):
        raise InvalidInput(f"read_from must be 'primary' or 'replica', not {read_from!r}")
    common: dict[str, Any] = {"read_from": read_from, "interval": interval}
    if isinstance(redis, str):
        return _from_url(redis, keys, service, common)
    if isinstance(redis, aioredis.Sentinel):
        if not service:
            raise InvalidInput(
                "a redis.asyncio.Sentinel needs the service name: service='mymaster'"
            )
        cls = SSLConnection if redis.connection_kwargs.get("ssl") else Connection
        kwargs = {k: v for k, v in redis.connection_kwargs.items() if k != "ssl"}
        return Topology("sentinel", keys, connection_class=cls, connection_kwargs=kwargs,
                        sentinel=redis, service=service, **common)  # fmt: skip
    if isinstance(redis, aioredis.RedisCluster):
        manager = redis.nodes_manager
        kwargs = dict(manager.connection_kwargs)
        cls = kwargs.pop("connection_class", Connection)
        seeds = [(n.host, int(n.port)) for n in manager.startup_nodes.values()]
        seeds += [(n.host, int(n.port)) for n in manager.nodes_cache.values()]
        return Topology("cluster", keys, connection_class=cls, connection_kwargs=kwargs,
                        seeds=list(dict.fromkeys(seeds)), **common)  # fmt: skip
    if isinstance(redis, aioredis.Redis):
        from redis.asyncio.sentinel import SentinelConnectionPool

        pool = redis.connection_pool
        kwargs = dict(pool.connection_kwargs)
        if isinstance(pool, SentinelConnectionPool):
            service = pool.service_name
            return Topology("sentinel", keys, connection_class=pool.connection_class,
                            connection_kwargs=kwargs, sentinel=pool.sentinel_manager,
                            service=service, **common)  # fmt: skip
        return Topology("server", keys, connection_class=pool.connection_class,
                        connection_kwargs=kwargs, detect=True, **common)  # fmt: skip
    raise TypeError(
        "redis must be a URL, a redis.asyncio.Redis, RedisCluster or Sentinel "
        f"(with service=...), not {type(redis).__name__}"
    )


def _from_url(url: str, keys: Keys, service: str | None, common: dict[str, Any]) -> Topology:
    scheme = url.partition("://")[0].lower()
    try:
        if scheme in ("redis+sentinel", "rediss+sentinel"):
            return _sentinel_url(url, keys, service, common)
        if scheme in ("redis+cluster", "rediss+cluster"):
            plain, hosts = _multi_host(url, 6379)
            kwargs = dict(_DEFAULTS, **parse_url(plain))
            cls = kwargs.pop("connection_class", Connection)
            for k in ("host", "port", "db"):
                kwargs.pop(k, None)
            return Topology("cluster", keys, connection_class=cls, connection_kwargs=kwargs,
                            seeds=hosts, **common)  # fmt: skip
        kwargs = dict(_DEFAULTS, **parse_url(url))
    except (ValueError, KeyError, IndexError) as exc:
        raise InvalidInput(f"invalid Redis URL {url!r}: {exc}") from exc
    cls = kwargs.pop("connection_class", Connection)
    if not issubclass(cls, UnixDomainSocketConnection):
        kwargs.setdefault("host", "localhost")
        kwargs.setdefault("port", 6379)
    return Topology("server", keys, connection_class=cls, connection_kwargs=kwargs,
                    detect=not issubclass(cls, UnixDomainSocketConnection), **common)  # fmt: skip


def _multi_host(url: str, default_port: int) -> tuple[str, list[Address]]:
    """``scheme://[user:pass@]h1[:p1],h2[:p2]/rest`` -> (a ``redis(s)://`` URL of
    the first host, with the rest of *url*; every host)."""
    parts = urlsplit(url)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    hosts: list[Address] = []
    for item in hostlist.split(","):
        host, _, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "")
        if not host:
            host, port = port, ""
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host:
            raise ValueError(f"empty host in {hostlist!r}")
        hosts.append((host, int(port) if port else default_port))
    if not hosts:
        raise ValueError("no hosts")
    tls = parts.scheme.lower().startswith("rediss")
    netloc = (userinfo + "@" if userinfo else "") + "localhost"
    plain = f"{'rediss' if tls else 'redis'}://{netloc}{parts.path or ''}"
    if parts.query:
        plain += "?" + parts.query
    return plain, hosts


def _healthy_replicas(entries: Any) -> list[Address]:
    """The replicas a Sentinel lists that can serve reads now.

    redis-py's ``filter_slaves`` drops only those marked down.  Right after a
    failover the old primary is listed as a replica of the new one long before
    a Sentinel marks it down (``down-after-milliseconds``): a reader sent there
    would dial a dead server.  A replica counts only when its Sentinel link is
    up and it reports its link to the primary up.
    """
    found: list[Address] = []
    for entry in entries or ():
        if entry.get("is_sdown") or entry.get("is_odown") or entry.get("is_disconnected"):
            continue
        if _text(entry.get("master-link-status", "")) != "ok":
            continue
        found.append((_text(entry["ip"]), int(entry["port"])))
    return found


def _sentinel_url(url: str, keys: Keys, service: str | None, common: dict[str, Any]) -> Topology:
    """``redis+sentinel://[user:pass@]host[:port][,host[:port]...]/service[/db][?options]``.

    *user:pass* and the options are the primary's (redis-py URL options);
    ``sentinel_username`` / ``sentinel_password`` authenticate to the
    Sentinels, which are reached over TLS too with ``rediss+sentinel``.
    """
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    sentinel_auth = {
        k: query.pop(f"sentinel_{k}") for k in ("username", "password") if f"sentinel_{k}" in query
    }
    path = [unquote(p) for p in parts.path.split("/") if p]
    if service is None:
        if not path:
            raise ValueError("no service name: redis+sentinel://host:26379/<service>[/db]")
        service = path.pop(0)
    db = path.pop(0) if path else "0"
    if path or not db.isdigit():
        raise ValueError("the path must be /<service>[/<db>]")
    rest = parts._replace(path=f"/{db}", query=urlencode(query))
    plain, hosts = _multi_host(rest.geturl(), 26379)
    kwargs = dict(_DEFAULTS, **parse_url(plain))
    cls = kwargs.pop("connection_class", Connection)
    for k in ("host", "port"):
        kwargs.pop(k, None)
    sentinel_kwargs: dict[str, Any] = {k: v for k, v in kwargs.items()
                                       if k.startswith(("socket_", "ssl_"))}  # fmt: skip
    if issubclass(cls, SSLConnection):
        sentinel_kwargs["ssl"] = True
    sentinel_kwargs.update(sentinel_auth)
    sentinel = aioredis.Sentinel(hosts, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    return Topology("sentinel", keys, connection_class=cls, connection_kwargs=kwargs,
                    sentinel=sentinel, service=service, **common)  # fmt: skip


def sentinel_url(hosts: list[Address], service: str, *, password: str | None = None) -> str:
    """A ``redis+sentinel://`` URL (for documentation and tests)."""
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"redis+sentinel://{auth}{','.join(f'{h}:{p}' for h, p in hosts)}/{service}"
