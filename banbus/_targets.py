"""Ban targets: one parser for every entry point.

A *target* is an IPv4/IPv6 address or a CIDR network.  Every entry point — the
Python API, the CLI, the stream reader and (mirrored in Lua) the Redis function
library — reduces its input to the same canonical text, because the hot path
compares peer addresses *as sockets report them* against plain strings:

* IPv4 is dotted quad without leading zeros (``203.0.113.7``);
* IPv4-mapped IPv6 (``::ffff:203.0.113.7``) becomes IPv4, for hosts and for
  networks inside ``::ffff:0:0/96``;
* IPv6 is printed exactly as ``inet_ntop(3)`` prints it — which is what
  ``socket.getpeername()`` returns — i.e. lower case, RFC 5952 zero
  compression (a single zero group is not compressed);
* a network whose prefix covers one address (``/32``, ``/128``) is that address;
* a network with host bits set is an error that shows the corrected network.

``0.0.0.0/0`` and ``::/0`` are always refused; a prefix wider than the
configured minimum (default /8 for IPv4, /32 for IPv6) is refused unless forced.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Final, NamedTuple

from ._exceptions import InvalidTarget, UnsafeBan
from ._keys import (
    DEFAULT_MIN_PREFIX_V4,
    DEFAULT_MIN_PREFIX_V6,
    MAX_TARGET_INPUT_BYTES,
    MAX_TARGET_LENGTH,
)

__all__ = [
    "DEFAULT_MIN_PREFIX_V4",
    "DEFAULT_MIN_PREFIX_V6",
    "MAX_TARGET_LENGTH",
    "STRICT_PTON",
    "Target",
    "format_target",
    "parse_target",
]

_MAPPED_NET: Final = ipaddress.IPv6Network("::ffff:0:0/96")


def _strict_pton() -> bool:
    """True if this platform's ``inet_pton(AF_INET, …)`` accepts only canonical
    dotted quads (glibc does: no leading zeros, no short forms, no spaces), so
    that a successful parse proves a text canonical without formatting it back."""
    for text in ("01.2.3.4", "1.2.3.04", "1.2.3", "1.2.3.4.5", " 1.2.3.4", "1.2.3.4 ", "0x1.2.3.4",
                 "1.2.3.256", "00.0.0.0", "1.2.3.4\x00"):  # fmt: skip
        try:
            socket.inet_pton(socket.AF_INET, text)
        except (OSError, ValueError):
            continue
        return False
    return True


#: See _strict_pton: the per-event and per-row checks of IPv4 text skip ``inet_ntop``.
STRICT_PTON: Final = _strict_pton()


class Target(NamedTuple):
    """A validated, canonical ban target."""

    #: Canonical text: the key in Redis, in the stream and in the local cache.
    text: str
    #: 4 or 6.
    version: int
    #: 32/128 for a single address.
    prefixlen: int
    #: The (network) address as an integer.
    value: int

    @property
    def is_network(self) -> bool:
        """True for a CIDR network wider than one address."""
        return self.prefixlen != (32 if self.version == 4 else 128)


def _ntop6(value: int) -> str:
    return socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, "big"))


def _describe(text: object) -> str:
    shown = repr(text)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def parse_target(
    text: str,
    *,
    min_prefix_v4: int = DEFAULT_MIN_PREFIX_V4,
    min_prefix_v6: int = DEFAULT_MIN_PREFIX_V6,
    force: bool = False,
) -> Target:
    """Validate *text* as an address or CIDR network and return its canonical form.

    :param text: ``203.0.113.7``, ``198.51.100.0/24``, ``2001:db8::/48``,
        ``::ffff:203.0.113.7`` …
    :param min_prefix_v4: the widest IPv4 prefix accepted without *force*.
    :param min_prefix_v6: the widest IPv6 prefix accepted without *force*.
    :param force: accept prefixes wider than the minimum (never ``/0``).
    :raises InvalidTarget: the text is not a valid address or network.
    :raises UnsafeBan: the network is ``/0`` or wider than the minimum.
    """
    if not isinstance(text, str):
        raise InvalidTarget(f"target must be a string, not {type(text).__name__}")
    # Bounded before any other work (the function library does the same).
    if len(text) > MAX_TARGET_INPUT_BYTES or (
        not text.isascii() and len(text.encode("utf-8", "surrogatepass")) > MAX_TARGET_INPUT_BYTES
    ):
        size = len(text.encode("utf-8", "surrogatepass"))
        raise InvalidTarget(
            f"target is {size} bytes long; an IP address or CIDR network "
            f"is at most {MAX_TARGET_LENGTH}"
        )
    raw = text.strip()
    if not raw:
        raise InvalidTarget("target is empty; expected an IP address or CIDR network")
    if len(raw) > MAX_TARGET_LENGTH:
        raise InvalidTarget(f"target {_describe(raw)} is too long to be an IP address")
    if "%" in raw:
        raise InvalidTarget(f"target {_describe(raw)} has a zone id; ban the address without '%…'")
    address, slash, prefix = raw.partition("/")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise InvalidTarget(
            f"{_describe(raw)} is not an IP address or CIDR network "
            "(expected e.g. 203.0.113.7, 198.51.100.0/24 or 2001:db8::/48)"
        ) from None
    maxlen = ip.max_prefixlen
    if slash:
        if not prefix.isascii() or not prefix.isdigit() or len(prefix) > 3:
            raise InvalidTarget(
                f"{_describe(raw)} has an invalid prefix length {prefix!r}; "
                f"expected /0 to /{maxlen}"
            )
        plen = int(prefix)
        if plen > maxlen:
            raise InvalidTarget(f"{_describe(raw)} has prefix /{plen}, longer than /{maxlen}")
    else:
        plen = maxlen
    value = int(ip)
    version = ip.version
    if version == 6 and value >> 32 == 0xFFFF and plen >= 96:
        # IPv4-mapped: ::ffff:203.0.113.7 is 203.0.113.7 (dual-stack listeners
        # report IPv4 peers this way).
        version, value, plen, maxlen = 4, value & 0xFFFFFFFF, plen - 96, 32
    host_bits = maxlen - plen
    network = (value >> host_bits) << host_bits
    if network != value:
        fixed = format_target(version, network, plen)
        raise InvalidTarget(f"{_describe(raw)} has host bits set; did you mean {fixed}?")
    canonical = format_target(version, network, plen)
    if plen == 0:
        raise UnsafeBan(f"{canonical} would match every IPv{version} address; refused")
    minimum = min_prefix_v4 if version == 4 else min_prefix_v6
    if plen < minimum and not force:
        raise UnsafeBan(
            f"{canonical} is wider than the minimum prefix /{minimum}; pass force=True to override"
        )
    return Target(canonical, version, plen, network)


def format_target(version: int, value: int, plen: int) -> str:
    """Canonical text of the network *value*/*plen* (the bare address for a host)."""
    if version == 4:
        text = socket.inet_ntop(socket.AF_INET, value.to_bytes(4, "big"))
        return text if plen == 32 else f"{text}/{plen}"
    text = _ntop6(value)
    return text if plen == 128 else f"{text}/{plen}"


def normalize_peer(ip: str) -> str:
    """Return the canonical text of a peer address as a socket reported it.

    Strips an IPv6 zone id and maps ``::ffff:a.b.c.d`` to ``a.b.c.d``.  Unlike
    :func:`parse_target` it never raises: text that is no address comes back
    unchanged (it simply matches nothing).
    """
    if ":" not in ip:
        return ip
    head = ip.partition("%")[0]
    try:
        packed = socket.inet_pton(socket.AF_INET6, head)
    except (OSError, ValueError):
        return ip
    if packed[:12] == b"\0\0\0\0\0\0\0\0\0\0\xff\xff":
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed)
