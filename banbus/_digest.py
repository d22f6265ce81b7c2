"""The record digest: an order-independent checksum of a namespace's entries.

The function library keeps ``{ns}:head`` fields ``d1 d2 n`` equal to the
digest of the record (``{ns}:bans`` + ``{ns}:allow``), updating them on every
write and purge; each node computes the same digest over its own view.  Equal
digests at the same sequence number mean equal views (with overwhelming
probability); a difference that no sequence gap revealed (an entry added to
the stream by hand, a bug) triggers a resync.  See :mod:`banbus._reseed`.

One entry ``(kind, target, expires_ms)`` hashes to two numbers: ``N`` is the
target's bytes read as one big-endian integer, shifted left by 50 bits, plus
the expiry in whole seconds (rounded up; 0 = permanent) times 4, plus the
kind (1 ban, 2 allowlist); the hash is ``(N mod P)**2 mod P`` for two primes
``P`` below 2**26.  Squaring makes the
sum non-linear (two targets swapping their expiries change it); the primes keep
every intermediate exact in Lua 5.1's doubles, where the library computes the
same thing byte by byte.  The digest is the two sums modulo their primes plus
the entry count.

Entries that expire before a comparison's *cutoff* are left out on both sides,
so the node's local expiry and the library's lazy purge never disagree.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from ._keys import DIGEST_P1, DIGEST_P2

__all__ = ["Digest", "entry_hash"]

_P1: Final = DIGEST_P1
_P2: Final = DIGEST_P2


def entry_hash(kind: str, target: str, expires_ms: int) -> tuple[int, int]:
    """The two digest components of one entry (*kind* ``"ban"``/``"allow"``)."""
    seconds = -(-expires_ms // 1000)
    kind_bits = 1 if kind == "ban" else 2
    n = (int.from_bytes(target.encode(), "big") << 50) | (seconds << 2) | kind_bits
    a = n % _P1
    b = n % _P2
    return a * a % _P1, b * b % _P2


class Digest(NamedTuple):
    """A digest value: two sums modulo primes, and the number of entries."""

    d1: int = 0
    d2: int = 0
    n: int = 0

    def add(self, h: tuple[int, int]) -> Digest:
        return Digest((self.d1 + h[0]) % _P1, (self.d2 + h[1]) % _P2, self.n + 1)

    def sub(self, h: tuple[int, int]) -> Digest:
        return Digest((self.d1 - h[0]) % _P1, (self.d2 - h[1]) % _P2, self.n - 1)

    def minus(self, other: Digest) -> Digest:
        """The offset from *other* to this digest (zero when they are equal)."""
        return Digest((self.d1 - other.d1) % _P1, (self.d2 - other.d2) % _P2, self.n - other.n)

    def __str__(self) -> str:
        return f"{self.d1:08x}{self.d2:08x}/{self.n}"
