"""The target parser every entry point shares (``banbus._targets``)."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from banbus import BanbusError, InvalidInput, InvalidTarget, Target, UnsafeBan, parse_target
from banbus._targets import normalize_peer


def ntop6(text: str) -> str:
    return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, text))


@pytest.mark.parametrize(
    ("text", "canonical", "version", "prefixlen"),
    [
        ("203.0.113.7", "203.0.113.7", 4, 32),
        (" 203.0.113.7\n", "203.0.113.7", 4, 32),
        ("0.0.0.0", "0.0.0.0", 4, 32),
        ("255.255.255.255", "255.255.255.255", 4, 32),
        ("198.51.100.0/24", "198.51.100.0/24", 4, 24),
        ("10.0.0.0/8", "10.0.0.0/8", 4, 8),
        ("203.0.113.7/32", "203.0.113.7", 4, 32),
        ("2001:DB8::1", "2001:db8::1", 6, 128),
        ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1", 6, 128),
        ("2001:db8:0:0:1::1", "2001:db8::1:0:0:1", 6, 128),
        # RFC 5952: a single zero group is not compressed (inet_ntop agrees).
        ("1:0:1:1:1:1:1:1", "1:0:1:1:1:1:1:1", 6, 128),
        ("::1", "::1", 6, 128),
        ("::", "::", 6, 128),
        ("2001:db8::1/128", "2001:db8::1", 6, 128),
        ("2001:db8::/48", "2001:db8::/48", 6, 48),
        ("2001:DB8:0:0::/64", "2001:db8::/64", 6, 64),
        # IPv4-compatible: inet_ntop (what sockets report) prints the dotted tail.
        ("::102:304", "::1.2.3.4", 6, 128),
        # IPv4-mapped: hosts and networks inside ::ffff:0:0/96 become IPv4.
        ("::ffff:203.0.113.7", "203.0.113.7", 4, 32),
        ("::FFFF:cb00:7107", "203.0.113.7", 4, 32),
        ("0:0:0:0:0:ffff:203.0.113.7", "203.0.113.7", 4, 32),
        ("::ffff:203.0.113.7/128", "203.0.113.7", 4, 32),
        ("::ffff:203.0.113.0/120", "203.0.113.0/24", 4, 24),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8", 4, 8),
    ],
)
def test_canonical_form(text: str, canonical: str, version: int, prefixlen: int) -> None:
    target = parse_target(text)
    assert target == Target(
        canonical, version, prefixlen, int(ipaddress.ip_network(canonical).network_address)
    )
    assert target.is_network == (prefixlen != (32 if version == 4 else 128))
    # The canonical text is a fixed point.
    assert parse_target(target.text) == target


def test_ipv6_text_is_what_sockets_report() -> None:
    for text in ("2001:DB8::0:1", "fe80:0:0:0:0:0:0:1", "2001:db8:1:0:0:0:0:0", "::ffff:0:1.2.3.4"):
        assert parse_target(text).text == ntop6(text)


@pytest.mark.parametrize(
    ("text", "fixed"),
    [
        ("10.0.0.1/8", "10.0.0.0/8"),
        ("203.0.113.7/24", "203.0.113.0/24"),
        ("2001:db8::1/32", "2001:db8::/32"),
        ("2001:db8:0:0:1::/63", "2001:db8::/63"),
        ("::ffff:203.0.113.7/120", "203.0.113.0/24"),
    ],
)
def test_host_bits_set_names_the_corrected_network(text: str, fixed: str) -> None:
    with pytest.raises(InvalidTarget) as info:
        parse_target(text)
    message = str(info.value)
    assert f"did you mean {fixed}?" in message
    assert text in message
    # The suggestion itself is accepted as is.
    assert parse_target(fixed).text == fixed


@pytest.mark.parametrize(
    "text",
    [
        "banana",
        "203.0.113",
        "203.0.113.256",
        "1.2.3.4.5",
        "203.0.113.7/",
        "203.0.113.7/33",
        "203.0.113.7/-1",
        "203.0.113.7/ 8",
        "203.0.113.7/8/8",
        "203.0.113.7/x",
        "2001:db8::1/129",
        "2001:db8:::1",
        "2001:db8::g",
        "1:2:3:4:5:6:7:8:9",
        "::ffff:1.2.3",
        "203.0.113.7 ",
        "http://203.0.113.7/",
        "２０３.0.113.7",  # fullwidth digits
        "203.0.113.7\x00",
    ],
)
def test_garbage_names_the_input(text: str) -> None:
    if text == "203.0.113.7 ":
        # Surrounding whitespace is stripped, not an error.
        assert parse_target(text).text == "203.0.113.7"
        return
    with pytest.raises(InvalidTarget) as info:
        parse_target(text)
    assert repr(text.strip()) in str(info.value)


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_empty_is_refused(text: str) -> None:
    with pytest.raises(InvalidTarget, match="empty"):
        parse_target(text)


@pytest.mark.parametrize("value", [None, 3405803783, b"203.0.113.7", ["203.0.113.7"]])
def test_non_text_is_refused(value: object) -> None:
    with pytest.raises(InvalidTarget, match="must be a string"):
        parse_target(value)  # type: ignore[arg-type]


def test_overlong_input_is_refused_and_shortened_in_the_message() -> None:
    text = "1" * 10_000
    with pytest.raises(InvalidTarget) as info:
        parse_target(text)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("text", ["fe80::1%eth0", "fe80::1%1", "fe80::%lo/64"])
def test_zone_ids_are_refused(text: str) -> None:
    with pytest.raises(InvalidTarget, match="zone id"):
        parse_target(text)


@pytest.mark.parametrize("text", ["010.0.0.1", "203.0.113.07", "0203.0.113.7", "00.0.0.0"])
def test_ipv4_leading_zeros_are_refused(text: str) -> None:
    # 010 is octal to inet_aton: refusing is the only unambiguous reading.
    with pytest.raises(InvalidTarget):
        parse_target(text)


def test_ipv6_leading_zeros_are_canonicalised() -> None:
    assert parse_target("2001:0db8:0000::0001").text == "2001:db8::1"
    assert parse_target("0000:0000::0001").text == "::1"


@pytest.mark.parametrize("text", ["0.0.0.0/0", "::/0", "::ffff:0:0/96", "::ffff:0.0.0.0/96"])
@pytest.mark.parametrize("force", [False, True])
def test_slash_zero_is_always_refused(text: str, force: bool) -> None:
    with pytest.raises(UnsafeBan, match="every IPv"):
        parse_target(text, force=force)
    with pytest.raises(UnsafeBan):
        parse_target(text, force=force, min_prefix_v4=0, min_prefix_v6=0)


@pytest.mark.parametrize(("text", "fixed"), [("1.0.0.0/0", "0.0.0.0/0"), ("2001:db8::/0", "::/0")])
def test_slash_zero_with_host_bits_is_an_error(text: str, fixed: str) -> None:
    with pytest.raises(InvalidInput, match=fixed):
        parse_target(text, force=True)


def test_minimum_prefix_defaults() -> None:
    assert parse_target("10.0.0.0/8").prefixlen == 8
    assert parse_target("2001:db8::/32").prefixlen == 32
    with pytest.raises(UnsafeBan) as info:
        parse_target("10.0.0.0/7")
    assert "10.0.0.0/7" in str(info.value)
    assert "/8" in str(info.value)
    assert "force" in str(info.value)
    with pytest.raises(UnsafeBan, match="/32"):
        parse_target("2001:db8::/31")
    with pytest.raises(UnsafeBan):
        parse_target("::ffff:10.0.0.0/103")  # mapped /103 is IPv4 /7


def test_force_accepts_wide_prefixes() -> None:
    assert parse_target("10.0.0.0/7", force=True).text == "10.0.0.0/7"
    assert parse_target("128.0.0.0/1", force=True).text == "128.0.0.0/1"
    assert parse_target("2000::/3", force=True).text == "2000::/3"
    assert parse_target("8000::/1", force=True).text == "8000::/1"


def test_configurable_minimum_prefix() -> None:
    with pytest.raises(UnsafeBan, match="/16"):
        parse_target("10.0.0.0/15", min_prefix_v4=16)
    assert parse_target("10.0.0.0/16", min_prefix_v4=16).prefixlen == 16
    with pytest.raises(UnsafeBan, match="/48"):
        parse_target("2001:db8::/47", min_prefix_v6=48)
    assert parse_target("0.0.0.0/4", min_prefix_v4=4).prefixlen == 4
    # The IPv6 minimum does not apply to IPv4 and vice versa.
    assert parse_target("10.0.0.0/15", min_prefix_v6=120).prefixlen == 15


def test_error_hierarchy() -> None:
    assert issubclass(InvalidTarget, InvalidInput)
    assert issubclass(UnsafeBan, InvalidInput)
    assert issubclass(InvalidInput, BanbusError)
    assert issubclass(InvalidInput, ValueError)


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("2001:DB8::1", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("not an address", "not an address"),
        ("::ffff:300.1.1.1", "::ffff:300.1.1.1"),
    ],
)
def test_normalize_peer(peer: str, expected: str) -> None:
    assert normalize_peer(peer) == expected


# -- properties ---------------------------------------------------------------------------


@st.composite
def networks(draw: st.DrawFn) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    version = draw(st.sampled_from([4, 6, 6]))
    bits = 32 if version == 4 else 128
    if version == 6 and draw(st.booleans()):
        # Bias towards interesting IPv6: mapped, compatible, sparse zeros.
        value = draw(st.sampled_from([0xFFFF << 32, 0, 0x20010DB8 << 96])) | draw(
            st.integers(0, 2**32 - 1)
        )
    else:
        value = draw(st.integers(0, 2**bits - 1))
    plen = draw(st.integers(1, bits))
    network = ipaddress.ip_network((value, plen), strict=False)
    return network


def _expected(
    net: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> tuple[int, int, int]:
    """(version, prefixlen, value) by ipaddress semantics, with mapped → IPv4."""
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return 4, net.prefixlen - 96, int(mapped)
    return net.version, net.prefixlen, int(net.network_address)


@given(networks())
def test_property_matches_ipaddress(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
    version, plen, value = _expected(net)
    spelled = [str(net), net.exploded, net.compressed.upper()]
    if net.prefixlen == net.max_prefixlen:
        spelled.append(str(net.network_address))
    for text in spelled:
        try:
            target = parse_target(text, force=True)
        except UnsafeBan:
            assert plen == 0
            continue
        assert plen != 0
        assert (target.version, target.prefixlen, target.value) == (version, plen, value)
        # The canonical text is a fixed point ...
        assert parse_target(target.text, force=True) == target
        # ... and is what ipaddress / inet_ntop print.
        host = target.text.partition("/")[0]
        if version == 4:
            assert host == str(ipaddress.IPv4Address(value))
        else:
            assert host == socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, "big"))
        assert target.text.endswith(f"/{plen}") == target.is_network
        # A peer at the network address normalises to the same text.
        if "/" not in text:
            assert normalize_peer(text) == target.text


@given(st.text(max_size=70))
def test_property_arbitrary_text_never_crashes(text: str) -> None:
    try:
        target = parse_target(text, force=True)
    except InvalidInput as exc:
        assert str(exc)
        return
    assert parse_target(target.text, force=True) == target
    net = ipaddress.ip_network(target.text)
    assert (net.prefixlen, int(net.network_address)) == (target.prefixlen, target.value)
