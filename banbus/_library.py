"""The Redis function library (``_library.lua``): its code, loader and errors.

The library is the single write path: Python nodes, the CLI and operators with
``redis-cli FCALL banbus_*`` all go through it, so they share one validation
and one atomic update.  :func:`ensure_library` loads it when the server has no
copy or an older one; :func:`translate_error` turns its error replies into
banbus exceptions.

Error replies start with a code, then (for ``BANBUS_INVALID``) the field::

    BANBUS_INVALID target '10.0.0.1/8' has host bits set; did you mean 10.0.0.0/8?
    BANBUS_INVALID ttl '1.5' is not a whole number of seconds; ...
    BANBUS_INVALID reason is 513 bytes long; the limit is 512
    BANBUS_UNSAFE 0.0.0.0/0 would match every IPv4 address; refused
    BANBUS_CONFIG {banbus}:config min_prefix_v4 '99' is outside 0..32
"""

from __future__ import annotations

import logging
import re
from importlib import resources
from typing import TYPE_CHECKING, Any, Final, cast

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._exceptions import (
    BanbusError,
    InvalidInput,
    InvalidReason,
    InvalidTarget,
    InvalidTTL,
    RedisUnavailable,
    ServerError,
    UnsafeBan,
)
from ._keys import LIMITS

if TYPE_CHECKING:
    from collections.abc import Awaitable

    import redis.asyncio

__all__ = [
    "LIBRARY_CODE",
    "LIBRARY_NAME",
    "LIBRARY_SOURCE",
    "LIBRARY_VERSION",
    "ensure_library",
    "render",
    "translate_error",
]

logger = logging.getLogger("banbus")

LIBRARY_NAME: Final = "banbus"
_LIMIT_LINE: Final = re.compile(r"^(local \w+ = )(\S+)( -- @(\w+))$", re.MULTILINE)


def render(code: str) -> str:
    """Write the limits of :mod:`banbus._keys` into the library's ``-- @NAME`` lines.

    :raises KeyError: a line names a limit ``_keys.LIMITS`` does not have.
    """
    return _LIMIT_LINE.sub(lambda m: f"{m[1]}{LIMITS[m[4]]}{m[3]}", code)


#: The library source as shipped (``banbus/_library.lua``).
LIBRARY_SOURCE: Final = (
    resources.files(__package__ or "banbus").joinpath("_library.lua").read_text(encoding="utf-8")
)
#: What is loaded into Redis: the source with the limits of ``_keys`` (a test
#: checks that the file already carries them, so both are the same text).
LIBRARY_CODE: Final = render(LIBRARY_SOURCE)


def _parse_version(code: str) -> int:
    match = re.search(r"^local VERSION = (\d+)\s*$", code, re.MULTILINE)
    if match is None:  # pragma: no cover - guarded by the tests
        raise RuntimeError("banbus/_library.lua has no 'local VERSION = <int>' line")
    return int(match.group(1))


LIBRARY_VERSION: Final = _parse_version(LIBRARY_CODE)

# The second word of a BANBUS_INVALID reply names the field that was refused.
_INVALID_FIELDS: Final[dict[str, type[InvalidInput]]] = {
    "target": InvalidTarget,
    "ttl": InvalidTTL,
    "reason": InvalidReason,
    "origin": InvalidReason,
    "eid": InvalidReason,
}


def translate_error(exc: ResponseError) -> BanbusError:
    """Map an error reply of the function library to a banbus exception.

    :param exc: the error redis-py raised for an ``FCALL banbus_*``.
    :returns: :class:`UnsafeBan`, :class:`InvalidTarget`, :class:`InvalidTTL`,
        :class:`InvalidReason`, :class:`InvalidInput` (bad option or usage) or,
        for anything else, :class:`ServerError`.  The caller raises it
        ``from exc``.
    """
    text = str(exc)
    code, _, message = text.partition(" ")
    if code == "BANBUS_UNSAFE":
        # The library speaks FCALL; this is for Python callers (the CLI says --force).
        return UnsafeBan(message.replace("pass FORCE to override", "pass force=True to override"))
    if code == "BANBUS_INVALID":
        field = message.partition(" ")[0].rstrip(":")
        return _INVALID_FIELDS.get(field, InvalidInput)(message)
    return ServerError(text)


def tls_hint(exc: BaseException) -> str:
    """Advice for a TLS failure (empty for anything else)."""
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return (" — the server's certificate is not trusted: give the CA that signed it in the "
                "URL (rediss://HOST:PORT/0?ssl_ca_certs=/path/ca.pem)")  # fmt: skip
    if "SSL" in text or "TLS" in text:
        return " — check the TLS options of the URL (ssl_ca_certs, ssl_certfile, ssl_keyfile)"
    return ""


def _function_missing(exc: ResponseError) -> bool:
    return "function not found" in str(exc).lower()


def _unknown_command(exc: ResponseError) -> bool:
    return "unknown command" in str(exc).lower()


async def _installed_version(client: redis.asyncio.Redis) -> int | None:
    """The version of the server's library, or None when it has none."""
    try:
        try:
            reply = await client.fcall_ro("banbus_version", 0)
        except ResponseError as exc:
            if not _unknown_command(exc):
                raise
            # FCALL_RO is Redis 7.0 too, but some proxies do not know it.
            reply = await client.fcall("banbus_version", 0)
    except ResponseError as exc:
        if _function_missing(exc):
            return None
        if _unknown_command(exc):
            raise ServerError(
                "the server has no Redis functions; banbus needs Redis >= 7.0 or Valkey >= 7.2"
            ) from exc
        raise
    try:
        return int(reply)
    except (TypeError, ValueError):
        # Something answers to banbus_version, but not with a number: replace it.
        return None


async def ensure_library(redis: redis.asyncio.Redis) -> int:
    """Load the banbus function library unless the server has it, or a newer one.

    Safe to call from many nodes at once.  A library that is missing is loaded
    without ``REPLACE``, so a node racing with another never overwrites what
    the other just loaded; an older one is replaced.  (Two nodes upgrading to
    *different* versions at the same moment can still leave the older one
    loaded; the newer node repairs it the next time it calls this.)

    :param redis: an asyncio client (``decode_responses`` either way).
    :returns: the version now on the server (``LIBRARY_VERSION`` or newer).
    :raises RedisUnavailable: the server could not be reached.
    :raises ServerError: the server refused (no functions, read-only replica,
        ACL …).
    """
    try:
        for attempt in range(3):
            current = await _installed_version(redis)
            if current is not None and current >= LIBRARY_VERSION:
                if current > LIBRARY_VERSION:
                    logger.info(
                        "server has banbus function library v%d, newer than this client's "
                        "v%d; keeping it",
                        current,
                        LIBRARY_VERSION,
                    )
                return current
            try:
                await cast(
                    "Awaitable[Any]",
                    redis.function_load(LIBRARY_CODE, replace=current is not None or attempt > 0),
                )
            except ResponseError as exc:
                if "already exists" in str(exc).lower():
                    continue  # another node loaded it just now: look again
                raise
            logger.info(
                "loaded banbus function library v%d (server had %s)",
                LIBRARY_VERSION,
                "none" if current is None else f"v{current}",
            )
            return LIBRARY_VERSION
        raise ServerError("could not load the banbus function library: it kept changing")
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise RedisUnavailable(f"cannot load the banbus function library: {exc}"
                               f"{tls_hint(exc)}") from exc  # fmt: skip
    except ResponseError as exc:
        raise ServerError(f"cannot load the banbus function library: {exc}") from exc
