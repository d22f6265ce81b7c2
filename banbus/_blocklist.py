"""Blocklists in and out: ``banbus import`` and ``banbus export``.

Formats read (``--format auto`` tells them apart line by line):

* plain lists, FireHOL ``.netset``/``.ipset``: one address or network per
  line; ``#`` starts a comment (whole line or after the target);
* Spamhaus DROP/EDROP: ``1.10.16.0/20 ; SBL256894`` — ``;`` starts a comment,
  which becomes the reason (``SBL256894``) unless ``--reason`` is given;
* CSV: ``target,ttl,reason`` (ttl and reason optional; a header line naming
  ``target`` is skipped; quoting as Python's ``csv``).

Every line is validated before anything is written: invalid lines are
reported with their number and skipped, or with ``--strict`` nothing is
written at all.
"""

from __future__ import annotations

import csv
import io
import re
from typing import TYPE_CHECKING, Literal

import msgspec

from ._exceptions import BanbusError
from ._model import check_reason, parse_ttl
from ._policy import sanitise_detail
from ._targets import parse_target

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["Line", "Parsed", "parse_lines"]

Format = Literal["auto", "plain", "csv"]


class Line(msgspec.Struct, frozen=True):
    """One target to import."""

    number: int
    target: str
    #: Seconds; None: the command's ``--ttl``.
    ttl: int | None
    #: None: the command's ``--reason`` (or the list's comment).
    reason: str | None


class Parsed(msgspec.Struct):
    lines: list[Line]
    #: (line number, text, why) of every line refused.
    errors: list[tuple[int, str, str]]
    duplicates: int = 0


def parse_lines(
    rows: Iterable[str], *, fmt: Format = "auto", force: bool = False, max_errors: int = 1000
) -> Parsed:
    """Validate every line of a blocklist; nothing is contacted.

    :param max_errors: errors kept for the report (all are counted).
    """
    out: list[Line] = []
    errors: list[tuple[int, str, str]] = []
    seen: set[str] = set()
    duplicates = 0
    for number, raw in enumerate(rows, start=1):
        text = raw.strip().lstrip("\ufeff")
        if not text or text.startswith(("#", ";")):
            continue
        try:
            line = _line(number, text, fmt, force)
        except BanbusError as exc:
            if len(errors) < max_errors:
                errors.append((number, text[:200], str(exc)))
            else:
                errors.append((number, "", ""))
            continue
        if line is None:
            continue  # a CSV header
        if line.target in seen:
            duplicates += 1
            continue
        seen.add(line.target)
        out.append(line)
    return Parsed(out, errors, duplicates)


def _line(number: int, text: str, fmt: Format, force: bool) -> Line | None:
    # A comma before any comment makes a CSV line ("1.2.3.4 # seen, twice" is plain).
    if fmt == "csv" or (fmt == "auto" and "," in re.split(r"[#;]", text, maxsplit=1)[0]):
        fields = next(csv.reader(io.StringIO(text)))
        fields += [""] * (3 - len(fields))
        target_text, ttl_text, reason_text = (f.strip() for f in fields[:3])
        if target_text.lower() in ("target", "ip", "address", "network", "cidr"):
            return None
        target = parse_target(target_text, force=force).text
        ttl = parse_ttl(ttl_text) if ttl_text else None
        reason = check_reason(reason_text) if reason_text else None
        return Line(number, target, ttl, reason)
    comment = None
    for mark in (";", "#"):
        if mark in text:
            text, _, note = text.partition(mark)
            text = text.strip()
            comment = sanitise_detail(note.strip(), 200) or None
            break
    target = parse_target(text.split()[0] if text else text, force=force).text
    return Line(number, target, None, comment)
