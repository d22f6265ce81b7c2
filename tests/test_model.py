"""Events, records and argument checks (``banbus._model``)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from banbus import Allow, Ban, Disallow, InvalidReason, InvalidTTL, Unban, parse_ttl
from banbus._model import (
    MAX_REASON_BYTES,
    MAX_TTL_SECONDS,
    Entry,
    Notice,
    ban_fields,
    check_origin,
    check_reason,
    decode_entry,
    decode_flat,
    entries_decoder,
    entry_decoder,
)

FULL = {
    "op": "ban",
    "target": "203.0.113.7",
    "expires": "1795752049412",
    "reason": "scanner",
    "origin": "mx1",
    "eid": "17952-17",
    "seq": "17",
}


def test_decode_full_ban() -> None:
    assert decode_entry(FULL) == Ban(
        target="203.0.113.7",
        expires=1795752049412,
        reason="scanner",
        origin="mx1",
        eid="17952-17",
        seq=17,
    )


@pytest.mark.parametrize(
    ("op", "cls"), [("ban", Ban), ("unban", Unban), ("allow", Allow), ("disallow", Disallow)]
)
def test_decode_each_op(op: str, cls: type) -> None:
    event = decode_entry({"op": op, "target": "198.51.100.0/24", "seq": "3"})
    assert type(event) is cls
    assert event.target == "198.51.100.0/24"
    assert event.seq == 3
    assert event.origin == ""
    assert event.eid == ""
    if cls in (Ban, Allow):
        assert event.expires == 0  # type: ignore[union-attr]
        assert event.reason == ""  # type: ignore[union-attr]


def test_unknown_fields_are_tolerated() -> None:
    fields = {**FULL, "future": "x", "zz": "", "priority": "7"}
    assert decode_entry(fields) == decode_entry(FULL)
    # Fields of another op are ignored, not an error.
    unban = decode_entry({"op": "unban", "target": "203.0.113.7", "expires": "5", "seq": "1"})
    assert unban == Unban(target="203.0.113.7", seq=1)


@pytest.mark.parametrize(
    "change",
    [
        {"op": None},
        {"op": "BAN"},
        {"op": "delete"},
        {"op": ""},
        {"target": None},
        {"target": "1"},
        {"target": "1" * 65},
        {"target": b"203.0.113.7"},
        {"expires": "-1"},
        {"expires": "1.5"},
        {"expires": "soon"},
        {"expires": ""},
        {"expires": " 5"},
        {"expires": "+5"},
        {"expires": "١٢"},  # non-ASCII digits
        {"expires": "99999999999999999999999"},
        {"expires": str(4_294_967_295_001)},  # after 2106-02-07 (2**32 - 1 seconds)
        {"expires": 5},  # not text
        {"seq": "-3"},
        {"seq": "x"},
        {"seq": ""},
        {"seq": "1" * 40},
        {"reason": "r" * (MAX_REASON_BYTES + 1)},
        {"reason": "é" * (MAX_REASON_BYTES // 2 + 1)},  # bytes, not characters
        {"reason": 5},
        {"origin": "o" * 65},
        {"eid": "e" * 129},
    ],
)
def test_bad_entries_are_rejected(change: dict[str, Any]) -> None:
    fields: dict[str, Any] = {**FULL, **change}
    for name, value in change.items():
        if value is None:
            del fields[name]
    with pytest.raises(msgspec.ValidationError):
        decode_entry(fields)


def test_limits_are_inclusive() -> None:
    event = decode_entry(
        {
            **FULL,
            "reason": "é" * (MAX_REASON_BYTES // 2),
            "origin": "o" * 64,
            "eid": "e" * 128,
            "target": "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255/128",
        }
    )
    assert isinstance(event, Ban)
    assert len(event.reason.encode()) == MAX_REASON_BYTES


def test_missing_seq_decodes_as_zero() -> None:
    # The node refuses seq 0 (not written by the functions); decoding allows it.
    fields = {k: v for k, v in FULL.items() if k != "seq"}
    assert decode_entry(fields).seq == 0


def test_events_are_frozen() -> None:
    event = decode_entry(FULL)
    with pytest.raises(AttributeError):
        event.target = "x"  # type: ignore[misc]


def test_entry_encoding_round_trip() -> None:
    entry = Entry(1795752049412, "scan", "mx1", 42)
    raw = msgspec.json.encode(entry)
    assert raw == b'[1795752049412,"scan","mx1",42]'
    assert entry_decoder.decode(raw) == entry
    assert entries_decoder.decode(b'[[0],[5,"r"]]') == [Entry(0), Entry(5, "r")]
    for bad in (b"[-1]", b'["x"]', b"{}", b"[", b'[0,"' + b"r" * 600 + b'"]'):
        with pytest.raises((msgspec.ValidationError, msgspec.DecodeError)):
            entry_decoder.decode(bad)


# -- parse_ttl -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("90s", 90),
        ("90", 90),
        ("10m", 600),
        ("1h", 3600),
        ("1H", 3600),
        (" 7d ", 7 * 86400),
        ("2w", 14 * 86400),
        ("0", 0),
        ("0s", 0),
        ("permanent", 0),
        (None, 0),
        (0, 0),
        (3600, 3600),
        (90.0, 90),
        (MAX_TTL_SECONDS, MAX_TTL_SECONDS),
        (f"{MAX_TTL_SECONDS}s", MAX_TTL_SECONDS),
        # Combined and fractional units, as `banbus list` prints them (issue 11).
        ("1d12h", 36 * 3600),
        ("1.5h", 5400),
        ("6d23h59m59s", 7 * 86400 - 1),
        ("1h30m", 5400),
        ("1y", 365 * 86400),
        ("10y", 3650 * 86400),
        ("2m 30s", 150),
    ],
)
def test_parse_ttl(value: Any, seconds: int) -> None:
    assert parse_ttl(value) == seconds


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (-1, "negative"),
        ("-1", "not a duration"),
        ("-5m", "not a duration"),
        (1.5, "whole seconds"),
        ("1.5", "whole seconds"),
        ("0.5s", "whole seconds"),
        ("١٠", "not a duration"),
        ("1h1h", "unit twice"),
        ("11y", "maximum of 315360000s"),
        (float("nan"), "whole seconds"),
        (float("inf"), "whole seconds"),
        (MAX_TTL_SECONDS + 1, "maximum"),
        ("11000d", "maximum"),
        (10**30, "maximum"),
        ("1e3", "not a duration"),
        ("5x", "not a duration"),
        ("", "not a duration"),
        ("soon", "not a duration"),
        ("1h 30", "not a duration"),
        (True, "number of seconds"),
        ([], "number of seconds"),
    ],
)
def test_parse_ttl_refuses(value: Any, words: str) -> None:
    with pytest.raises(InvalidTTL, match=words):
        parse_ttl(value)


def test_invalid_ttl_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="0 = permanent"):
        parse_ttl("ten minutes")


# -- check_reason / check_origin ----------------------------------------------------------


def test_check_reason() -> None:
    assert check_reason(None) == ""
    assert check_reason("") == ""
    assert check_reason("scanner from 203.0.113.7 — port 25") == (
        "scanner from 203.0.113.7 — port 25"
    )
    assert check_reason("r" * MAX_REASON_BYTES) == "r" * MAX_REASON_BYTES
    assert check_reason("é" * (MAX_REASON_BYTES // 2)) == "é" * (MAX_REASON_BYTES // 2)


@pytest.mark.parametrize(
    ("reason", "words"),
    [
        ("r" * (MAX_REASON_BYTES + 1), "bytes long; the limit is 512"),
        ("é" * (MAX_REASON_BYTES // 2 + 1), "bytes long; the limit is 512"),
        ("line\nbreak", "control characters"),
        ("tab\there", "control characters"),
        ("nul\x00", "control characters"),
        ("del\x7f", "control characters"),
        (b"bytes", "must be text"),
        (5, "must be text"),
    ],
)
def test_check_reason_refuses(reason: Any, words: str) -> None:
    with pytest.raises(InvalidReason, match=words):
        check_reason(reason)


def test_check_origin() -> None:
    assert check_origin("mx1") == "mx1"
    assert check_origin("node-7.eu:a@b_c") == "node-7.eu:a@b_c"
    for bad in ("", "has space", "o" * 65, "new\nline", "ü"):
        with pytest.raises(InvalidReason, match="node id"):
            check_origin(bad)


# -- the positional fast path agrees with the validator ------------------------------------

_digits = st.one_of(
    st.integers(0, 2**64).map(str),
    st.sampled_from(["", "-1", "+1", "1.5", " 1", "00012", "٣", "4294967295000", "4294967295001"]),
)
_texts = st.one_of(
    st.text(max_size=8),
    st.integers(0, 700).map(lambda n: "r" * n),
    st.integers(0, 300).map(lambda n: "é" * n),
    st.integers(0, 140).map(lambda n: "😀" * n),
)


@given(
    op=st.sampled_from(["ban", "allow", "unban", "disallow", "BAN", ""]),
    target=st.one_of(st.sampled_from(["203.0.113.7", "2001:db8::/32", "x"]), st.text(max_size=70)),
    expires=_digits,
    reason=_texts,
    origin=_texts,
    eid=_texts,
    seq=_digits,
)
def test_property_flat_decoding_matches_the_validator(
    op: str, target: str, expires: str, reason: str, origin: str, eid: str, seq: str
) -> None:
    flat = ["op", op, "target", target, "expires", expires, "reason", reason,
            "origin", origin, "eid", eid, "seq", seq]  # fmt: skip
    try:
        expected = decode_entry(dict(zip(flat[0::2], flat[1::2], strict=True)))
    except msgspec.ValidationError:
        with pytest.raises(msgspec.ValidationError):
            decode_flat(flat)
        assert ban_fields(flat) is None
        return
    assert decode_flat(flat) == expected
    fast = ban_fields(flat)
    if fast is not None:
        assert isinstance(expected, (Ban, Allow))
        assert fast == (
            isinstance(expected, Ban),
            expected.target,
            expected.expires,
            expected.reason,
            expected.origin,
            expected.eid,
            expected.seq,
        )


def test_flat_decoding_of_other_layouts() -> None:
    assert decode_flat(["op", "unban", "target", "203.0.113.7", "seq", "4"]) == Unban(
        target="203.0.113.7", seq=4
    )
    # Another field order is not the fast layout but still decodes.
    shuffled = ["seq", "9", "target", "203.0.113.7", "op", "ban", "expires", "0"]
    assert ban_fields(shuffled) is None
    assert decode_flat(shuffled) == Ban(target="203.0.113.7", seq=9)
    unknown_with_seq = ["op", "explode", "target", "1.2.3.4", "seq", "5"]
    for bad in ([], ["op"], ["op", "ban", "target"], unknown_with_seq, ["op", "EXPLODE!"]):
        with pytest.raises(msgspec.ValidationError):
            decode_flat(bad)
    # Without a seq, an op this version does not know is a newer version's
    # informational entry: a Notice nodes skip.
    assert decode_flat(["op", "explode", "target", "1.2.3.4"]) == Notice(name="explode")
    notice = decode_flat(["op", "would_ban", "target", "2001:db8::/64", "kind", "auth",
                          "ttl", "600", "reason", "auth: 5 in 10m", "origin", "mx1"])  # fmt: skip
    assert notice == Notice(name="would_ban", target="2001:db8::/64", kind="auth", ttl=600,
                            reason="auth: 5 in 10m", origin="mx1")  # fmt: skip
