"""Exceptions raised by banbus.

Every error banbus raises derives from one root, so ``except BanbusError``
catches them all::

    BanbusError
    ├── InvalidInput            (also a ValueError)
    │   ├── InvalidTarget       garbage address, host bits set, zone id …
    │   ├── UnsafeBan           /0, or a prefix wider than the configured minimum
    │   ├── InvalidTTL          negative, non-integer or above the maximum
    │   └── InvalidReason       too long or with control characters
    ├── RedisUnavailable        Redis could not be reached (the operation may be queued)
    ├── ServerError             Redis or the function library refused a call
    │   └── IncompatibleLibrary the server runs a newer, incompatible library
    └── NodeClosed              the node was used outside ``async with`` / after ``aclose()``
"""

from __future__ import annotations

__all__ = [
    "BanbusError",
    "IncompatibleLibrary",
    "InvalidInput",
    "InvalidReason",
    "InvalidTTL",
    "InvalidTarget",
    "NodeClosed",
    "RedisUnavailable",
    "ServerError",
    "UnsafeBan",
]


class BanbusError(Exception):
    """Root of every exception banbus raises."""


class InvalidInput(BanbusError, ValueError):
    """An argument was rejected before anything was written."""


class InvalidTarget(InvalidInput):
    """The text is not an IP address or CIDR network banbus accepts."""


class UnsafeBan(InvalidInput):
    """The target is too wide to ban (``/0`` always; wider than the minimum unless forced)."""


class InvalidTTL(InvalidInput):
    """The time-to-live is negative, malformed or above the maximum."""


class InvalidReason(InvalidInput):
    """The reason (or origin) text is too long or contains control characters."""


class RedisUnavailable(BanbusError):
    """Redis could not be reached."""


class ServerError(BanbusError):
    """Redis, or the banbus function library running in it, refused a call."""


class IncompatibleLibrary(ServerError):
    """The server's banbus function library is incompatible with this client."""


class NodeClosed(BanbusError):
    """The node is not running: use it inside ``async with`` and not after ``aclose()``."""
