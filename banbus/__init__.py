"""banbus: an IP ban decided anywhere takes effect everywhere, within milliseconds.

Each node embeds a :class:`Node`: a local ban cache (synchronous
``is_banned``) kept in sync through a Redis stream, and a connection supervisor
that cuts live connections from an address the moment it is banned.
"""

from __future__ import annotations

from ._exceptions import (
    BanbusError,
    IncompatibleLibrary,
    InvalidInput,
    InvalidReason,
    InvalidTarget,
    InvalidTTL,
    NodeClosed,
    RedisUnavailable,
    ServerError,
    UnsafeBan,
)
from ._model import Allow, Ban, BanRecord, Disallow, Event, Unban, parse_ttl
from ._node import Node, NodeStatistics
from ._policy import Policy, Report
from ._supervisor import BanSource, Supervisor, SupervisorStatistics, TrackedConnection
from ._targets import Target, parse_target
from ._version import __version__

__all__ = [
    "Allow",
    "Ban",
    "BanRecord",
    "BanSource",
    "BanbusError",
    "Disallow",
    "Event",
    "IncompatibleLibrary",
    "InvalidInput",
    "InvalidReason",
    "InvalidTTL",
    "InvalidTarget",
    "Node",
    "NodeClosed",
    "NodeStatistics",
    "Policy",
    "RedisUnavailable",
    "Report",
    "ServerError",
    "Supervisor",
    "SupervisorStatistics",
    "Target",
    "TrackedConnection",
    "Unban",
    "UnsafeBan",
    "__version__",
    "parse_target",
    "parse_ttl",
]
