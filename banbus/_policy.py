"""Auto-ban: policies, reports, and counting offenses while Redis is away.

The decision lives in the function library (``banbus_report``): every node
and ``redis-cli`` count into the same sliding window, atomically, so of any
number of racing reports exactly one crosses the threshold and creates the
ban.  This module holds what a node needs around that call:

* :class:`Policy` — a kind's rule, parsed from the text the library stores in
  ``{ns}:policies`` (``threshold=5 window=600 ttl=900 …``); the built-in
  defaults mirror the library's.
* :class:`Report` — what :meth:`banbus.Node.report` returns.
* :func:`sanitise_detail` — attacker-controlled text (a request path, a user
  name) made safe for a reason: the library does the same to ``DETAIL``.
* :class:`LocalWindows` — the same sliding window, counted on one node while
  Redis is unreachable (a local crossing bans locally and goes through the
  outbox).
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Final, Literal

import msgspec

from ._exceptions import InvalidInput
from ._keys import MAX_DETAIL_BYTES, MAX_THRESHOLD, MAX_TTL_SECONDS
from ._model import BanRecord  # noqa: TC001 (msgspec resolves it at run time)

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "BUILTIN_POLICIES",
    "LocalWindows",
    "Policy",
    "Report",
    "ReportStatus",
    "check_kind",
    "check_weight",
    "parse_policy",
    "reason_for",
    "sanitise_detail",
]

#: What ``scan`` and ``auth`` mean until an operator sets them (the library's
#: ``BUILTIN_POLICIES``; a test compares the two).
BUILTIN_POLICIES: Final[dict[str, str]] = {
    "scan": "threshold=3 window=300 ttl=3600 escalate=2 max_ttl=604800 forget=604800 "
    "ipv4_prefix=32 ipv6_prefix=64 shadow=0",
    "auth": "threshold=5 window=600 ttl=900 escalate=2 max_ttl=86400 forget=86400 "
    "ipv4_prefix=32 ipv6_prefix=64 shadow=0",
}

_KIND_RE: Final = re.compile(r"^[a-z0-9_.-]{1,32}$")
_FIELD_RE: Final = re.compile(r"([^\s=]+)=(\S*)")

#: How a report ended.  ``counted``: below the threshold; ``banned``: this
#: report crossed it and created the ban; ``shadow``: crossed, policy in shadow
#: mode (nothing banned; a ``would_ban`` notice in the stream); ``already``:
#: crossed, but a ban covers the target; ``allowed``: crossed, but the
#: allowlist covers the address; ``exempt``: never counted (allowlist or
#: ``never_ban`` on this node); ``banned_here``: not sent, the address is
#: banned already (no round trip); ``coalesced``: counted with another report
#: of the same tick, which got the outcome; ``local``: Redis unreachable,
#: counted on this node.
ReportStatus = Literal[
    "counted", "banned", "shadow", "already", "allowed", "exempt", "banned_here", "coalesced",
    "local",
]  # fmt: skip


class Policy(msgspec.Struct, frozen=True, kw_only=True):
    """One kind's rule: ban when *threshold* offenses fall within *window* seconds."""

    kind: str
    threshold: int
    window: int
    #: Seconds of the first ban (0: permanent); the n-th within *forget* lasts
    #: ``ttl * escalate ** (n - 1)``, at most *max_ttl*.
    ttl: int
    escalate: float = 1.0
    max_ttl: int = 604_800
    forget: int = 86_400
    ipv4_prefix: int = 32
    ipv6_prefix: int = 64
    shadow: bool = False
    #: ``default`` (built in), ``set`` (in Redis) or ``invalid: …``.
    source: str = "default"

    def ban_ttl(self, strike: int) -> int:
        """Seconds the *strike*-th ban lasts (0: permanent)."""
        if self.ttl == 0:
            return 0
        ttl = float(self.ttl)
        for _ in range(strike - 1):
            ttl *= self.escalate
            if ttl >= self.max_ttl:
                break
        return min(int(ttl), self.max_ttl)

    def text(self) -> str:
        """The stored form (what ``HGET {ns}:policies KIND`` shows)."""
        return (
            f"threshold={self.threshold} window={self.window} ttl={self.ttl} "
            f"escalate={self.escalate:g} max_ttl={self.max_ttl} forget={self.forget} "
            f"ipv4_prefix={self.ipv4_prefix} ipv6_prefix={self.ipv6_prefix} "
            f"shadow={int(self.shadow)}"
        )


def check_kind(kind: object) -> str:
    """:raises InvalidInput: *kind* is not 1-32 characters of ``a-z 0-9 _ . -``."""
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise InvalidInput(f"kind {kind!r} must be 1 to 32 characters of a-z 0-9 _ . -")
    return kind


def check_weight(weight: object) -> int:
    """:raises InvalidInput: *weight* is not a whole number from 1 to the maximum threshold."""
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_THRESHOLD:
        raise InvalidInput(f"weight {weight!r} must be a whole number from 1 to {MAX_THRESHOLD}")
    return weight


_BOUNDS: Final[dict[str, tuple[float, float]]] = {
    "threshold": (1, MAX_THRESHOLD),
    "window": (1, MAX_TTL_SECONDS),
    "ttl": (0, MAX_TTL_SECONDS),
    "escalate": (1, 100),
    "max_ttl": (1, MAX_TTL_SECONDS),
    "forget": (0, MAX_TTL_SECONDS),
    "ipv4_prefix": (1, 32),
    "ipv6_prefix": (1, 128),
    "shadow": (0, 1),
}


def parse_policy(kind: str, text: str, source: str = "default") -> Policy:
    """A policy from its stored text (the library has validated what it stored).

    :raises InvalidInput: a field is unknown, missing or out of bounds.
    """
    values: dict[str, float] = {}
    for name, raw in _FIELD_RE.findall(text):
        bounds = _BOUNDS.get(name)
        if bounds is None:
            raise InvalidInput(f"policy {kind}: unknown field {name!r}")
        try:
            value = float(raw) if name == "escalate" else int(raw)
        except ValueError:
            raise InvalidInput(f"policy {kind}: {name} {raw!r} is not a number") from None
        if not bounds[0] <= value <= bounds[1]:
            raise InvalidInput(f"policy {kind}: {name} {raw} is outside {bounds[0]}..{bounds[1]}")
        values[name] = value
    for name in ("threshold", "window", "ttl"):
        if name not in values:
            raise InvalidInput(f"policy {kind} has no {name}")
    return Policy(
        kind=kind,
        threshold=int(values["threshold"]),
        window=int(values["window"]),
        ttl=int(values["ttl"]),
        escalate=float(values.get("escalate", 1.0)),
        max_ttl=int(values.get("max_ttl", 604_800)),
        forget=int(values.get("forget", 86_400)),
        ipv4_prefix=int(values.get("ipv4_prefix", 32)),
        ipv6_prefix=int(values.get("ipv6_prefix", 64)),
        shadow=bool(values.get("shadow", 0)),
        source=source,
    )


def builtin_policies() -> dict[str, Policy]:
    return {kind: parse_policy(kind, text) for kind, text in BUILTIN_POLICIES.items()}


class Report(msgspec.Struct, frozen=True, kw_only=True):
    """What :meth:`banbus.Node.report` returns."""

    #: The ban this call created (exactly one report per crossing gets it).
    banned: BanRecord | None
    #: Offenses in the window after this report (0 when it was not counted).
    count: int
    threshold: int
    #: True when the policy is in shadow mode and this call crossed it.
    shadow: bool
    status: ReportStatus
    #: What is counted and banned: the address widened to the policy's prefix.
    target: str
    kind: str


# -- text from the attacker --------------------------------------------------------------

#: Control, C1, line-separator and bidi characters: invisible, and they rewrite
#: what a terminal shows (the CLI escapes the same set in what it prints).
UNSAFE_TEXT_RE: Final = re.compile(
    "[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069\u061c]"
)


def escape_text(text: str) -> str:
    """*text* for a terminal: the unsafe characters as escapes (``\\x1b``, ``\\u202e``)."""
    return UNSAFE_TEXT_RE.sub(lambda m: m[0].encode("unicode_escape").decode(), text)


def sanitise_detail(text: str | bytes, limit: int = MAX_DETAIL_BYTES) -> str:
    """Attacker-controlled *text* made safe for a reason, never refused.

    Control characters, C1 controls, line separators and bidi overrides become
    ``?``; bytes that are not UTF-8 become ``?`` too; the result is cut to
    *limit* UTF-8 bytes at a character boundary.  The function library applies
    the same rules to ``DETAIL``.
    """
    if isinstance(text, bytes):
        raw = text[: limit * 4]
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            text = "".join(chr(b) if b < 128 else "?" for b in raw)
    text = UNSAFE_TEXT_RE.sub("?", text[: limit * 4])
    encoded = text.encode("utf-8", "surrogatepass")
    try:
        encoded.decode()
    except UnicodeDecodeError:  # lone surrogates
        text = "".join(c if ord(c) < 128 else "?" for c in text)
        encoded = text.encode()
    if len(encoded) > limit:
        text = encoded[:limit].decode("utf-8", "ignore")
    return text


def _duration(seconds: int) -> str:
    for unit, suffix in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= unit and seconds % unit == 0:
            return f"{seconds // unit}{suffix}"
    return f"{seconds}s"


def reason_for(policy: Policy, count: int, strike: int, detail: str) -> str:
    """The reason of an auto-ban (the library builds the same)."""
    reason = f"{policy.kind}: {count} in {_duration(policy.window)}"
    if strike > 1:
        reason += f", strike {strike}"
    if detail:
        reason += f" ({detail})"
    return reason


# -- counting without Redis ------------------------------------------------------------------


class LocalWindows:
    """Sliding windows counted on this node while Redis is unreachable.

    Bounded: at most *limit* (kind, target) windows, the least recently
    reported dropped first; each keeps at most the policy's threshold times.
    """

    def __init__(self, limit: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._windows: OrderedDict[tuple[str, str], list[float]] = OrderedDict()
        self._strikes: dict[tuple[str, str], tuple[int, float]] = {}
        self._limit = limit
        self._clock = clock

    def __len__(self) -> int:
        return len(self._windows)

    def add(self, policy: Policy, target: str, weight: int) -> tuple[int, bool]:
        """Count *weight* offenses now; ``(count, crossed)``.  A crossing starts
        the window afresh."""
        now = self._clock()
        key = (policy.kind, target)
        times = self._windows.pop(key, [])
        since = now - policy.window
        times = [t for t in times if t > since]
        times.extend([now] * min(weight, policy.threshold))
        times = times[-policy.threshold :]
        count = len(times)
        if count >= policy.threshold:
            return count, True
        self._windows[key] = times
        while len(self._windows) > self._limit:
            self._windows.popitem(last=False)
        return count, False

    def strike(self, policy: Policy, target: str, ttl_of: Callable[[int], int]) -> int:
        """The number of this ban among the target's recent ones (forgotten
        *forget* seconds after the last one ended)."""
        now = self._clock()
        key = (policy.kind, target)
        n, until = self._strikes.get(key, (0, 0.0))
        n = n + 1 if until > now else 1
        self._strikes[key] = (n, now + ttl_of(n) + policy.forget)
        if len(self._strikes) > self._limit:
            self._strikes = {k: v for k, v in self._strikes.items() if v[1] > now}
        return n
