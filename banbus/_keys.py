"""The keys of a namespace and every limit banbus enforces: one source for Python, CLI and Lua.

The Redis function library (``_library.lua``) carries these limits as
``local NAME = value -- @NAME`` lines; :func:`banbus._library.render` writes
the values below into those lines when it loads the library, and a test
checks that the file on disk already carries them, so the raw file stays
loadable by hand (``redis-cli FUNCTION LOAD``) and can never disagree with
Python.

Keys of namespace ``ns`` share the hash tag ``{ns}`` (one Redis Cluster slot):

==================  ===========================================================
``{ns}:log``        stream of events: ``op target [expires reason] origin eid seq``
``{ns}:bans``       hash target -> ``[expires_ms, reason, origin, seq, created_ms]`` (JSON)
``{ns}:bans:exp``   zset target -> expires_ms (entries that expire)
``{ns}:allow``      the allowlist, as ``{ns}:bans``
``{ns}:allow:exp``  its expiry index
``{ns}:seq``        the event counter
``{ns}:epoch``      id of this incarnation of the namespace (new after data loss)
``{ns}:head``       hash: ``seq``/``id`` of the last event the library wrote and
                    the record's digest ``d1 d2 n`` (see :mod:`banbus._digest`)
``{ns}:removed``    zset ``"b <target>"``/``"a <target>"``/``"*"`` -> server ms of
                    the latest removal (tombstones; capped, see below)
``{ns}:config``     optional hash: ``maxlen``, ``min_prefix_v4``,
                    ``min_prefix_v6``, ``max_ttl``
``{ns}:reseed``     lock held by the node re-seeding after data loss
==================  ===========================================================
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

from ._exceptions import InvalidInput

__all__ = [
    "DEFAULT_MAXLEN",
    "DEFAULT_MIN_PREFIX_V4",
    "DEFAULT_MIN_PREFIX_V6",
    "DIGEST_EXCLUDE_LIMIT",
    "DIGEST_P1",
    "DIGEST_P2",
    "FUTURE_SLACK_MS",
    "LIMITS",
    "MAX_EID_BYTES",
    "MAX_EXPIRES_MS",
    "MAX_ORIGIN_BYTES",
    "MAX_REASON_BYTES",
    "MAX_TARGET_INPUT_BYTES",
    "MAX_TARGET_LENGTH",
    "MAX_TTL_SECONDS",
    "TOMBSTONE_LIMIT",
    "Keys",
    "namespace_keys",
]

#: Widest IPv4/IPv6 prefix accepted without ``force`` (``{ns}:config`` may change it).
DEFAULT_MIN_PREFIX_V4: Final = 8
DEFAULT_MIN_PREFIX_V6: Final = 32
#: ``ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255/128`` is 49 characters.
MAX_TARGET_LENGTH: Final = 64
#: Raw target input (surrounding spaces included) is refused above this many
#: bytes before any other work: a 10 MB argument must cost nothing.
MAX_TARGET_INPUT_BYTES: Final = 256
MAX_REASON_BYTES: Final = 512
MAX_ORIGIN_BYTES: Final = 64
MAX_EID_BYTES: Final = 128
#: Ten years: longer is a typo; use 0 for a permanent ban.  ``{ns}:config``
#: ``max_ttl`` may lower it, never raise it.
MAX_TTL_SECONDS: Final = 10 * 365 * 86400
#: Expiry times are server milliseconds; anything past 2106-02-07 06:28:15 UTC
#: is garbage (a TTL within the limit above never gets there).  It is the last
#: whole second a 32-bit count holds: compact caches keep the expiry so.
MAX_EXPIRES_MS: Final = 4_294_967_295_000
#: Stream entries per namespace kept by ``XADD MAXLEN ~`` unless configured.
DEFAULT_MAXLEN: Final = 100_000
#: Tombstones (removals remembered so a re-seed never undoes them) kept at most.
TOMBSTONE_LIMIT: Final = 100_000
#: A stream id more than this far ahead of the server clock is garbage (a
#: hand-written ``XADD`` with a huge id); the library deletes such entries
#: when they stop ``XADD *`` from working.
FUTURE_SLACK_MS: Final = 86_400_000
#: The record digest: two sums modulo primes below 2**26 (squares stay exact
#: in Lua's doubles).
DIGEST_P1: Final = 67_108_859
DIGEST_P2: Final = 67_108_837
#: A digest comparison is skipped (tried again later) when more entries than
#: this expire before its cutoff: it must stay cheap for Redis.
DIGEST_EXCLUDE_LIMIT: Final = 10_000

#: Auto-ban: the largest threshold (and weight) a policy may have; the sliding
#: window keeps at most this many times per offender.
MAX_THRESHOLD: Final = 1000
#: Policies a namespace may define besides the built-in ones.
MAX_POLICY_KINDS: Final = 64
#: Attacker-controlled detail (a request path, a user name) kept in a reason.
MAX_DETAIL_BYTES: Final = 200

#: The values the Lua library carries, by the name its ``-- @NAME`` lines use.
LIMITS: Final[dict[str, int]] = {
    "DEFAULT_MAXLEN": DEFAULT_MAXLEN,
    "DEFAULT_MIN_PREFIX_V4": DEFAULT_MIN_PREFIX_V4,
    "DEFAULT_MIN_PREFIX_V6": DEFAULT_MIN_PREFIX_V6,
    "MAX_TTL_SECONDS": MAX_TTL_SECONDS,
    "MAX_EXPIRES_MS": MAX_EXPIRES_MS,
    "MAX_TARGET_LENGTH": MAX_TARGET_LENGTH,
    "MAX_TARGET_INPUT_BYTES": MAX_TARGET_INPUT_BYTES,
    "MAX_REASON_BYTES": MAX_REASON_BYTES,
    "MAX_ORIGIN_BYTES": MAX_ORIGIN_BYTES,
    "MAX_EID_BYTES": MAX_EID_BYTES,
    "TOMBSTONE_LIMIT": TOMBSTONE_LIMIT,
    "FUTURE_SLACK_MS": FUTURE_SLACK_MS,
    "DIGEST_P1": DIGEST_P1,
    "DIGEST_P2": DIGEST_P2,
    "DIGEST_EXCLUDE_LIMIT": DIGEST_EXCLUDE_LIMIT,
    "MAX_THRESHOLD": MAX_THRESHOLD,
    "MAX_POLICY_KINDS": MAX_POLICY_KINDS,
    "MAX_DETAIL_BYTES": MAX_DETAIL_BYTES,
}

_NAMESPACE_RE: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class Keys(NamedTuple):
    """The Redis keys of one namespace."""

    namespace: str
    log: str
    bans: str
    bans_exp: str
    allow: str
    allow_exp: str
    seq: str
    epoch: str
    head: str
    removed: str
    config: str
    reseed: str

    @property
    def function_key(self) -> str:
        """KEYS[1] of the function calls: a key of the namespace (ACLs may allow only those)."""
        return self.log


def namespace_keys(namespace: str) -> Keys:
    """The keys of *namespace* (all share the hash tag ``{namespace}``).

    :raises InvalidInput: the name is not 1-64 characters of ``[A-Za-z0-9_.:-]``.
    """
    if not isinstance(namespace, str) or not _NAMESPACE_RE.match(namespace):
        raise InvalidInput(
            f"namespace {namespace!r} must be 1-64 characters of letters, digits and _.:-"
        )
    tag = "{" + namespace + "}"
    return Keys(
        namespace=namespace,
        log=f"{tag}:log",
        bans=f"{tag}:bans",
        bans_exp=f"{tag}:bans:exp",
        allow=f"{tag}:allow",
        allow_exp=f"{tag}:allow:exp",
        seq=f"{tag}:seq",
        epoch=f"{tag}:epoch",
        head=f"{tag}:head",
        removed=f"{tag}:removed",
        config=f"{tag}:config",
        reseed=f"{tag}:reseed",
    )
