"""Events, records and the limits every entry point enforces.

Stream entries are flat, human-readable field/value pairs, in this order::

    op ban  target 203.0.113.7  expires 1795752049412  reason scanner
    origin mx1  eid 3f2a…-17  seq 17

``expires`` is an absolute time in milliseconds on the *server* clock
(``TIME``), 0 for permanent; ``seq`` is the per-namespace sequence number the
function library assigns; ``eid`` is a unique event id (the caller's
idempotency key, or ``<epoch>-<seq>``).  Decoding validates types and sizes and
ignores unknown fields, so nodes of different versions can share a stream
(new fields get defaults and go last; types never change).
"""

from __future__ import annotations

import re
from itertools import chain
from operator import countOf
from typing import TYPE_CHECKING, Annotated, Final, Literal, TypeAlias

import msgspec

from ._exceptions import InvalidReason, InvalidTTL
from ._keys import (
    MAX_EID_BYTES,
    MAX_EXPIRES_MS,
    MAX_ORIGIN_BYTES,
    MAX_REASON_BYTES,
    MAX_TARGET_LENGTH,
    MAX_TTL_SECONDS,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "MAX_EID_BYTES",
    "MAX_ORIGIN_BYTES",
    "MAX_REASON_BYTES",
    "MAX_TTL_SECONDS",
    "Allow",
    "AnyEvent",
    "Ban",
    "BanRecord",
    "Clear",
    "Disallow",
    "Entry",
    "Event",
    "Notice",
    "StreamEvent",
    "TargetEvent",
    "Unban",
    "check_origin",
    "check_reason",
    "decode_entry",
    "parse_ttl",
]

_MAX_EXPIRES_MS: Final = MAX_EXPIRES_MS

_Reason = Annotated[str, msgspec.Meta(max_length=MAX_REASON_BYTES)]
_Origin = Annotated[str, msgspec.Meta(max_length=MAX_ORIGIN_BYTES)]
_Eid = Annotated[str, msgspec.Meta(max_length=MAX_EID_BYTES)]
_Target = Annotated[str, msgspec.Meta(min_length=2, max_length=MAX_TARGET_LENGTH)]
_Expires = Annotated[int, msgspec.Meta(ge=0, le=_MAX_EXPIRES_MS)]
_Seq = Annotated[int, msgspec.Meta(ge=0)]


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="op"):
    """One entry of the ``{ns}:log`` stream."""

    origin: _Origin = ""
    eid: _Eid = ""
    seq: _Seq = 0


class TargetEvent(Event, frozen=True, kw_only=True):
    """An event about one target (address or CIDR network)."""

    target: _Target


class Ban(TargetEvent, tag="ban", frozen=True, kw_only=True):
    """Ban *target* until *expires* (server ms; 0 = permanent)."""

    expires: _Expires = 0
    reason: _Reason = ""


class Unban(TargetEvent, tag="unban", frozen=True, kw_only=True):
    """Lift the ban on *target*."""


class Allow(TargetEvent, tag="allow", frozen=True, kw_only=True):
    """Allowlist *target* until *expires*; the allowlist beats every ban."""

    expires: _Expires = 0
    reason: _Reason = ""


class Disallow(TargetEvent, tag="disallow", frozen=True, kw_only=True):
    """Remove *target* from the allowlist."""


class Clear(Event, tag="clear", frozen=True, kw_only=True):
    """The namespace was emptied on purpose (``banbus clear``): drop everything."""


class Notice(Event, tag="notice", frozen=True, kw_only=True):
    """A stream entry without a seq: it changes nothing nodes hold.

    ``would_ban`` (a policy in shadow mode crossed its threshold); nodes count
    it.  Any other op without a seq is a newer version's informational entry,
    skipped the same way.  (An unknown op *with* a seq is malformed: nodes
    skip it without taking its seq, and a newer version's record-changing op
    would show as a gap — a reload from the record, never a wrong view.)
    """

    name: str
    target: str = ""
    kind: str = ""
    ttl: int = 0
    reason: str = ""


AnyEvent: TypeAlias = Ban | Unban | Allow | Disallow
StreamEvent: TypeAlias = Ban | Unban | Allow | Disallow | Clear


class BanRecord(msgspec.Struct, frozen=True, gc=False):
    """The current state of one ban (or allowlist entry), as ``lookup()`` returns it."""

    target: str
    #: Server-clock milliseconds; 0 = permanent.
    expires: int
    reason: str
    origin: str
    #: The sequence number of the event that last wrote it (0 = not yet published).
    seq: int
    kind: Literal["ban", "allow"] = "ban"


# -- decoding --------------------------------------------------------------------


_OPS: Final[dict[str | None, type[StreamEvent]]] = {
    "ban": Ban, "unban": Unban, "allow": Allow, "disallow": Disallow, "clear": Clear,
}  # fmt: skip


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _digits(fields: dict[str, str], name: str, limit: int) -> int:
    text = fields.get(name, "0")
    if not isinstance(text, str) or not (text.isascii() and text.isdigit()) or len(text) > 19:
        raise msgspec.ValidationError(f"{name} must be a non-negative integer, not {_shown(text)}")
    value = int(text)
    if value > limit:
        raise msgspec.ValidationError(f"{name} {value} is out of range")
    return value


def _text(fields: dict[str, str], name: str, max_bytes: int) -> str:
    text = fields.get(name, "")
    if not isinstance(text, str):
        raise msgspec.ValidationError(f"{name} must be text")
    if len(text) * 4 > max_bytes and len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise msgspec.ValidationError(f"{name} is longer than {max_bytes} bytes")
    return text


#: A ban/allow entry's field names, in the function library's order.
_BAN_FIELDS: Final = ("op", "target", "expires", "reason", "origin", "eid", "seq")
#: Lengths (characters) within the byte limits whatever the characters.
_REASON_CHARS: Final = MAX_REASON_BYTES // 4
_ORIGIN_CHARS: Final = MAX_ORIGIN_BYTES // 4
_EID_CHARS: Final = MAX_EID_BYTES // 4


def ban_fields(fields: list[str]) -> tuple[bool, str, int, str, str, str, int] | None:
    """Read a ban/allow entry in the function library's exact layout, by position.

    Returns ``(is_ban, target, expires, reason, origin, eid, seq)``, or None
    when the entry has another layout or a value that might exceed a limit
    (the bounds here are conservative; :func:`decode_entry` checks exactly).
    This is the per-event hot path of every node's reader.
    """
    if len(fields) != 14:
        return None
    f_op, op, f_target, target, f_exp, expires, f_reason, reason, f_origin, origin, f_eid, eid, \
        f_seq, seq = fields  # fmt: skip
    if (f_op, f_target, f_exp, f_reason, f_origin, f_eid, f_seq) != _BAN_FIELDS:
        return None
    if (
        (op == "ban" or op == "allow")
        and 2 <= len(target) <= MAX_TARGET_LENGTH
        and len(expires) <= 13 and expires.isascii() and expires.isdigit()
        and len(seq) <= 18 and seq.isascii() and seq.isdigit()
        # Byte limits without encoding: 4 bytes per character at most, and
        # one for ASCII (``isascii`` is O(1): CPython keeps the flag).
        and (len(reason) <= _REASON_CHARS or
             (len(reason) <= MAX_REASON_BYTES and reason.isascii()))
        and (len(origin) <= _ORIGIN_CHARS or
             (len(origin) <= MAX_ORIGIN_BYTES and origin.isascii()))
        and (len(eid) <= _EID_CHARS or (len(eid) <= MAX_EID_BYTES and eid.isascii()))
    ):  # fmt: skip
        expires_ms = int(expires)
        if expires_ms <= _MAX_EXPIRES_MS:
            return op == "ban", target, expires_ms, reason, origin, eid, int(seq)
    return None


def ban_columns(
    rows: Sequence[list[str]],
) -> tuple[list[str], list[int], list[str], list[str], list[int]] | None:
    """:func:`ban_fields` of a batch of entries' fields, column by column (``map``
    and ``countOf`` in C, no Python frame per entry), when every one is a
    *ban* in the library's exact layout within the limits (stricter ones
    than ban_fields' for reason, origin and eid: at most 4 bytes a
    character, whatever the characters).

    Returns ``(targets, expires, reasons, origins, seqs)``, or None: some
    entry is not such a ban (its batch takes the per-entry path).
    """
    n = len(rows)
    if not n or None in rows or countOf(map(len, rows), 14) != n:
        return None
    # One flat list, then strided slices (no Python frame, and no object per
    # entry that would set off the garbage collector).
    flat = list(chain.from_iterable(rows))
    if any(countOf(flat[2 * k :: 14], name) != n for k, name in enumerate(_BAN_FIELDS)):
        return None
    ops, targets, expires, reasons, origins, eids, seqs = (flat[k::14] for k in range(1, 14, 2))
    try:
        digits = "".join(expires) + "".join(seqs)
        if (
            countOf(ops, "ban") != n
            or not digits.isascii() or not digits.isdigit()
            or max(map(len, expires)) > 13 or max(map(len, seqs)) > 18
            or min(map(len, targets)) < 2 or max(map(len, targets)) > MAX_TARGET_LENGTH
            or max(map(len, reasons)) > _REASON_CHARS or max(map(len, origins)) > _ORIGIN_CHARS
            or max(map(len, eids)) > _EID_CHARS
        ):  # fmt: skip
            return None
        expiries = list(map(int, expires))  # ASCII digits: an empty one raises
        numbers = list(map(int, seqs))
    except (TypeError, ValueError):  # not text, or an empty number
        return None
    if max(expiries) > _MAX_EXPIRES_MS:
        return None
    return targets, expiries, reasons, origins, numbers


def decode_flat(fields: list[str]) -> StreamEvent | Notice:
    """Decode a stream entry's flat ``[field, value, …]`` list (as XREAD returns it).

    :raises msgspec.ValidationError: malformed entry.
    """
    fast = ban_fields(fields)
    if fast is not None:
        is_ban, target, expires, reason, origin, eid, seq = fast
        return (Ban if is_ban else Allow)(target=target, expires=expires, reason=reason,
                                          origin=origin, eid=eid, seq=seq)  # fmt: skip
    if len(fields) % 2:
        raise msgspec.ValidationError("odd number of fields")
    return decode_entry(dict(zip(fields[0::2], fields[1::2], strict=True)))


def decode_entry(fields: dict[str, str]) -> StreamEvent | Notice:
    """Validate one stream entry's fields and return its event.

    Hand-written rather than ``msgspec.convert`` because it runs once per
    stream event on every node (4x faster); the rules are the Struct
    constraints above.  Unknown fields are ignored.

    :raises msgspec.ValidationError: a field is missing, mistyped or too large.
    """
    op = fields.get("op")
    cls = _OPS.get(op)
    if cls is None:
        if isinstance(op, str) and _OP_RE.match(op) and "seq" not in fields:
            return _notice(op, fields)
        raise msgspec.ValidationError(
            f"unknown op {_shown(op)}; expected ban, unban, allow, disallow, clear"
        )
    origin = _text(fields, "origin", MAX_ORIGIN_BYTES)
    eid = _text(fields, "eid", MAX_EID_BYTES)
    seq = _digits(fields, "seq", 2**63 - 1)
    if cls is Clear:
        return Clear(origin=origin, eid=eid, seq=seq)
    target = fields.get("target")
    if not isinstance(target, str) or not 2 <= len(target) <= MAX_TARGET_LENGTH:
        raise msgspec.ValidationError(f"target {_shown(target)} is missing or has a bad length")
    if cls is Ban or cls is Allow:
        return cls(
            target=target,
            expires=_digits(fields, "expires", _MAX_EXPIRES_MS),
            reason=_text(fields, "reason", MAX_REASON_BYTES),
            origin=origin,
            eid=eid,
            seq=seq,
        )
    assert cls is Unban or cls is Disallow
    return cls(target=target, origin=origin, eid=eid, seq=seq)


_OP_RE: Final = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def _notice(op: str, fields: dict[str, str]) -> Notice:
    if op == "would_ban":
        return Notice(
            name=op,
            target=_text(fields, "target", MAX_TARGET_LENGTH),
            kind=_text(fields, "kind", 32),
            ttl=_digits(fields, "ttl", MAX_TTL_SECONDS) if "ttl" in fields else 0,
            reason=_text(fields, "reason", MAX_REASON_BYTES),
            origin=_text(fields, "origin", MAX_ORIGIN_BYTES),
        )
    return Notice(name=op)


class Entry(msgspec.Struct, array_like=True, gc=False):
    """What the local cache keeps per target (48 bytes), and the stored hash value.

    The ``{ns}:bans``/``{ns}:allow`` hash values are this struct as a JSON array,
    ``[expires, reason, origin, seq]``, so a page of HSCAN decodes in one call.
    """

    expires: _Expires
    reason: _Reason = ""
    origin: _Origin = ""
    seq: _Seq = 0


#: Decodes a JSON array of stored values (one HSCAN page) in one C call.
entries_decoder: Final = msgspec.json.Decoder(list[Entry])
entry_decoder: Final = msgspec.json.Decoder(Entry)


# -- argument checks shared by the API and the CLI --------------------------------

_TTL_PART_RE: Final = re.compile(r"(\d{1,12}(?:\.\d{1,9})?)\s*(y|w|d|h|m|s)?\s*", re.ASCII)
_UNITS: Final = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_ORIGIN_RE: Final = re.compile(r"^[A-Za-z0-9._:@-]{1,64}$")
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")
#: C1 controls, line/paragraph separators, bidi embeddings/overrides/isolates:
#: invisible, and they reorder or rewrite what a terminal shows.
_UNSAFE_RE: Final = re.compile("[\x80-\x9f\u2028-\u202e\u2066-\u2069]")


def parse_ttl(value: int | float | str | None) -> int:
    """Return a TTL in whole seconds (0 = permanent).

    Accepts an int, a float with no fraction, or text like ``90``, ``90s``,
    ``10m``, ``1h``, ``7d``, ``2w``, ``0``/``permanent``.

    :raises InvalidTTL: negative, fractional, malformed or above ten years.
    """
    if value is None:
        return 0
    if isinstance(value, bool):
        raise InvalidTTL(f"ttl must be a number of seconds, not {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise InvalidTTL(f"ttl must be whole seconds, not {value!r}")
        value = int(value)
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str):
        seconds = _parse_duration(value)
    else:
        raise InvalidTTL(f"ttl must be a number of seconds, not {type(value).__name__}")
    if seconds < 0:
        raise InvalidTTL(f"ttl must not be negative (got {seconds}); use 0 for permanent")
    if seconds > MAX_TTL_SECONDS:
        raise InvalidTTL(
            f"ttl {value!r} ({seconds}s) is above the maximum of {MAX_TTL_SECONDS}s "
            "(10 years, 3650d); use 0 for a permanent ban"
        )
    return seconds


def _parse_duration(value: str) -> int:
    """``90``, ``90s``, ``10m``, ``1.5h``, ``1d12h``, ``6d23h59m59s``, ``2w``, ``1y``
    (365 days), ``permanent`` — in whole seconds."""
    text = value.strip().lower()
    if text in ("permanent", "forever", "never"):
        return 0
    hint = "use seconds or 90s, 10m, 1.5h, 1d12h, 7d, 2w, 1y (0 = permanent)"
    if not text or len(text) > 64 or not text.isascii():
        raise InvalidTTL(f"ttl {value!r} is not a duration; {hint}")
    total = 0.0
    position = 0
    units: list[str | None] = []
    while position < len(text):
        match = _TTL_PART_RE.match(text, position)
        if match is None or match.end() == position:
            raise InvalidTTL(f"ttl {value!r} is not a duration; {hint}")
        unit = match[2]
        if unit is None and match.end() < len(text):
            raise InvalidTTL(f"ttl {value!r} is not a duration; {hint}")
        units.append(unit)
        total += float(match[1]) * _UNITS[unit]
        position = match.end()
    if None in units and len(units) > 1:  # "1h 30": 30 what?
        raise InvalidTTL(f"ttl {value!r} is not a duration; {hint}")
    if len(units) != len(set(units)):
        raise InvalidTTL(f"ttl {value!r} names a unit twice; {hint}")
    if total > 2 * MAX_TTL_SECONDS:
        return int(total)  # refused by the caller, with the maximum
    if not total.is_integer() and abs(total - round(total)) > 1e-6:
        raise InvalidTTL(f"ttl {value!r} is {total:g} seconds; use whole seconds")
    return round(total)


def check_reason(reason: str | None) -> str:
    """Return *reason* if it fits the limits.

    :raises InvalidReason: not text, longer than 512 bytes (UTF-8) or with
        control characters.
    """
    if reason is None:
        return ""
    if not isinstance(reason, str):
        raise InvalidReason(f"reason must be text, not {type(reason).__name__}")
    size = len(reason.encode("utf-8", "surrogatepass"))
    if size > MAX_REASON_BYTES:
        raise InvalidReason(f"reason is {size} bytes long; the limit is {MAX_REASON_BYTES}")
    if _CONTROL_RE.search(reason):
        raise InvalidReason("reason must not contain control characters (newlines, tabs …)")
    unsafe = _UNSAFE_RE.search(reason)
    if unsafe:
        raise InvalidReason(
            f"reason contains U+{ord(unsafe[0]):04X} at character {unsafe.start()} (a C1 control "
            "or a bidi/line-separator character); use printable text"
        )
    try:
        reason.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (text decoded with errors="surrogateescape"):
        # Redis would refuse it, so it is refused here, before anything is done.
        raise InvalidReason("reason is not valid UTF-8 (it has a lone surrogate)") from None
    return reason


def check_origin(origin: str) -> str:
    """Return *origin* (a node id) if it is 1–64 characters of ``[A-Za-z0-9._:@-]``.

    :raises InvalidReason: otherwise.
    """
    if not isinstance(origin, str) or not _ORIGIN_RE.match(origin):
        raise InvalidReason(
            f"node id {origin!r} must be 1-64 characters of letters, digits and ._:@-"
        )
    return origin
