"""A minimal RESP2 client on an asyncio ``Protocol`` with the hiredis parser.

The stream reader is the latency-critical path: a ban written on one node must
reach the connection supervisor of every other node within a millisecond.
redis-py's asyncio client costs a task switch, a ``StreamReader`` and a
``wait_for`` per reply; this client parses inside ``data_received`` and hands
each reply to an optional *sink* callback synchronously, so a ban is applied
and live connections are aborted in the same event-loop callback that
received the bytes.  It implements only what the reader needs: connect,
AUTH/SELECT/CLIENT SETNAME, pipelined commands answered in order, close.

:class:`PyConnection` offers the same interface over a redis-py connection,
for pools banbus cannot dial itself (Sentinel, credential providers): it is
slower (one task runs the commands in turn) but follows the same protocol,
:class:`ReaderConnection`.  It always speaks RESP2, whatever the pool's
default (redis-py 8 defaults to RESP3, where ``XREAD`` answers a dict).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import TYPE_CHECKING, Any, Final, Protocol

import hiredis
import redis.exceptions as redis_errors

if TYPE_CHECKING:
    import ssl as _ssl
    from collections.abc import Callable

    from redis.asyncio import Redis

__all__ = [
    "PyConnection",
    "ReaderConnection",
    "RespConnection",
    "RespError",
    "ServerAddress",
    "address_of",
    "open_reader",
]


class ReaderConnection(Protocol):
    """What the stream follower needs from a connection."""

    @property
    def is_open(self) -> bool: ...

    def call(
        self, *args: bytes | str | int, sink: Callable[[Any], None] | None = None
    ) -> asyncio.Future[Any]:
        """Send one command; *sink* gets the reply before the future resolves."""
        ...

    async def serve(self) -> None:
        """Run what the connection needs to run (returns when it closes; never raises)."""
        ...

    def close(self) -> None: ...


class RespError(Exception):
    """An error reply from the server (``-ERR …``)."""


class ServerAddress:
    """Where and how to connect: host/port or unix path, credentials, db, TLS."""

    __slots__ = ("db", "host", "password", "path", "port", "readonly", "ssl", "username")

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        *,
        path: str | None = None,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        ssl: _ssl.SSLContext | None = None,
        readonly: bool = False,
    ) -> None:
        self.host, self.port, self.path = host, port, path
        self.username, self.password, self.db, self.ssl = username, password, db, ssl
        #: Send ``READONLY`` after connecting (a Redis Cluster replica).
        self.readonly = readonly

    def __repr__(self) -> str:
        where = self.path or f"{self.host}:{self.port}"
        return f"ServerAddress({where!r}, db={self.db}, tls={self.ssl is not None})"


def address_of(client: Redis) -> ServerAddress | None:
    """Derive a :class:`ServerAddress` from a redis-py client's pool, or None."""
    pool = client.connection_pool
    return address_from(pool.connection_class, pool.connection_kwargs)


def address_from(
    cls: type[Any], kwargs: dict[str, Any], *, readonly: bool = False
) -> ServerAddress | None:
    """A :class:`ServerAddress` for redis-py connection class *cls* with *kwargs*, or None.

    None when only redis-py can connect that way (a credential provider, an
    unknown connection class): the caller then reads through redis-py.
    """
    from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection

    if kwargs.get("credential_provider") is not None:
        return None
    common: dict[str, Any] = {
        "username": kwargs.get("username"),
        "password": kwargs.get("password"),
        "db": int(kwargs.get("db") or 0),
        "readonly": readonly,
    }
    if issubclass(cls, UnixDomainSocketConnection):
        return ServerAddress(path=kwargs["path"], **common)
    host, port = kwargs.get("host", "localhost"), int(kwargs.get("port", 6379))
    if issubclass(cls, SSLConnection):
        # redis-py's own TLS context, from all of the client's ssl_* options
        # (CA file/data/path, client certificate, min version, ciphers,
        # hostname check…): a connection object is built, never connected.
        context = cls(**kwargs).ssl_context.get()
        return ServerAddress(host, port, ssl=context, **common)
    if issubclass(cls, Connection):
        return ServerAddress(host, port, **common)
    return None


def _pack(args: tuple[bytes | str | int, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = b"%d" % arg
        out.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(out)


_CLOSED: Final = ConnectionError("connection closed")


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class RespConnection(asyncio.Protocol):
    """One connection, replies matched to requests in order."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader(encoding="utf-8", errors="replace",
                                      replyError=RespError)  # fmt: skip
        self._waiters: deque[tuple[asyncio.Future[Any], Callable[[Any], None] | None]] = deque()
        self._transport: asyncio.Transport | None = None
        self._lost: Exception | None = None

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiters = self._waiters
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(ConnectionError(f"RESP protocol error: {exc}"))
                return
            if reply is False:
                return
            if not waiters:  # unsolicited: the server is not speaking RESP2 to us
                self._fail(ConnectionError("unexpected reply from server"))
                return
            future, sink = waiters.popleft()
            if sink is not None and not isinstance(reply, RespError):
                try:
                    sink(reply)
                except Exception as exc:  # the sink must not kill the connection
                    if not future.done():
                        future.set_exception(exc)
                    continue
            if not future.done():
                if isinstance(reply, RespError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc if exc is not None else ConnectionError("connection closed by server"))

    def _fail(self, exc: Exception) -> None:
        if self._lost is None:
            self._lost = exc
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.abort()
        while self._waiters:
            future, _ = self._waiters.popleft()
            if not future.done():
                future.set_exception(ConnectionError(str(exc)))

    # -- API -----------------------------------------------------------------------------

    @classmethod
    async def open(
        cls, address: ServerAddress, *, name: str | None = None, timeout: float = 5.0
    ) -> RespConnection:
        """Connect, authenticate, select the db and name the client."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            if address.path:
                _, proto = await loop.create_unix_connection(cls, address.path)
            else:
                _, proto = await loop.create_connection(
                    cls, address.host, address.port, ssl=address.ssl,
                    server_hostname=address.host if address.ssl else None,
                )  # fmt: skip
            try:
                if address.password is not None:
                    if address.username:
                        await proto.call("AUTH", address.username, address.password)
                    else:
                        await proto.call("AUTH", address.password)
                if address.db:
                    await proto.call("SELECT", address.db)
                if address.readonly:
                    await proto.call("READONLY")
                if name:
                    try:
                        await proto.call("CLIENT", "SETNAME", name)
                    except RespError:
                        pass  # CLIENT may be denied by ACL; naming is a courtesy
            except BaseException:
                proto.close()
                raise
        return proto

    @property
    def is_open(self) -> bool:
        return self._transport is not None and self._lost is None

    async def serve(self) -> None:
        """Nothing to run: replies are handled in ``data_received``."""

    def call(
        self, *args: bytes | str | int, sink: Callable[[Any], None] | None = None
    ) -> asyncio.Future[Any]:
        """Send one command; the future resolves with its reply.

        *sink*, if given, is called with the reply inside ``data_received``,
        before the future resolves (and before any other task runs).
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._transport is None:
            future.set_exception(ConnectionError(str(self._lost or _CLOSED)))
            return future
        self._waiters.append((future, sink))
        self._transport.write(_pack(args))
        # A read sent ahead may never be awaited if the connection drops:
        # mark its exception retrieved so asyncio does not log it.
        future.add_done_callback(_retrieve)
        return future

    def close(self) -> None:
        """Abort the connection; pending calls fail with ``ConnectionError``."""
        self._fail(ConnectionError("connection closed by client"))


class PyConnection:
    """A :class:`ReaderConnection` over one redis-py connection, in RESP2.

    Commands are sent and answered one at a time by :meth:`serve`, which the
    owner runs in its task group for as long as the connection is used.
    """

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._queue: deque[
            tuple[tuple[bytes | str | int, ...], asyncio.Future[Any], Callable[[Any], None] | None]
        ] = deque()
        self._wakeup = asyncio.Event()
        self._open = True

    @classmethod
    async def open(
        cls, connection_class: type[Any], kwargs: dict[str, Any], name: str, *, readonly: bool
    ) -> PyConnection:
        """A new redis-py connection of *connection_class* with *kwargs* (not from a pool)."""
        kwargs = dict(kwargs)
        kwargs.update(
            decode_responses=True,
            encoding_errors="replace",
            socket_timeout=None,
            client_name=name,
            protocol=2,
        )
        conn = connection_class(**kwargs)
        await conn.connect()
        if readonly:
            await conn.send_command("READONLY")
            await conn.read_response()
        return cls(conn)

    @property
    def is_open(self) -> bool:
        return self._open

    def call(
        self, *args: bytes | str | int, sink: Callable[[Any], None] | None = None
    ) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        if not self._open:
            future.set_exception(ConnectionError("connection closed"))
            return future
        self._queue.append((args, future, sink))
        self._wakeup.set()
        return future

    async def serve(self) -> None:
        try:
            while self._open:
                if not self._queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                args, future, sink = self._queue[0]
                try:
                    await self._conn.send_command(*args)
                    reply = await self._conn.read_response()
                except redis_errors.ResponseError as exc:
                    self._queue.popleft()
                    if not future.done():
                        future.set_exception(RespError(str(exc)))
                    continue
                except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
                    self._fail(ConnectionError(str(exc)))
                    return
                self._queue.popleft()
                if future.done():
                    continue
                try:
                    if sink is not None:
                        sink(reply)
                except Exception as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(reply)
        finally:
            self._fail(ConnectionError("connection closed"))

    def _fail(self, exc: Exception) -> None:
        self._open = False
        self._wakeup.set()
        while self._queue:
            _, future, _ = self._queue.popleft()
            if not future.done():
                future.set_exception(exc)
        with contextlib.suppress(Exception):
            self._conn._close()

    def close(self) -> None:
        self._fail(ConnectionError("connection closed by client"))


async def open_reader(
    address: ServerAddress | None,
    connection_class: type[Any],
    kwargs: dict[str, Any],
    name: str,
    *,
    readonly: bool = False,
) -> ReaderConnection:
    """The reader's connection: lean when *address* is known, else through redis-py.

    :raises ServerError: the server refused it (authentication, ACL).
    :raises RedisUnavailable: it could not be reached.
    """
    from ._exceptions import RedisUnavailable, ServerError

    try:
        if address is not None:
            return await RespConnection.open(address, name=name)
        return await PyConnection.open(connection_class, kwargs, name, readonly=readonly)
    except (RespError, redis_errors.ResponseError) as exc:
        raise ServerError(f"reader connection refused: {exc}") from exc
    except (OSError, TimeoutError, redis_errors.RedisError) as exc:
        from ._library import tls_hint

        raise RedisUnavailable(f"cannot connect the reader: {exc}{tls_hint(exc)}") from exc
