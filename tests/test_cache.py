"""The pure ban cache (``banbus._cache.BanCache``): no Redis, a fake clock."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from banbus import Allow, Ban, BanRecord, Disallow, Unban, parse_target
from banbus._cache import BanCache
from banbus._model import Entry

T0 = 1_800_000_000_000  # server ms


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(clock: Clock) -> BanCache:
    return BanCache(clock)


def ban(target: str, expires: int = 0, seq: int = 1, **kw: str) -> Ban:
    return Ban(target=target, expires=expires, seq=seq, **kw)


def allow(target: str, expires: int = 0, seq: int = 1) -> Allow:
    return Allow(target=target, expires=expires, seq=seq)


def test_empty_cache_bans_nothing(cache: BanCache) -> None:
    for ip in ("203.0.113.7", "2001:db8::1", "::ffff:203.0.113.7", "", "garbage", "fe80::1%eth0"):
        assert not cache.is_banned(ip)
        assert cache.lookup(ip) is None
    assert cache.ban_count == 0


def test_exact_ipv4(cache: BanCache) -> None:
    assert cache.apply(ban("203.0.113.7", reason="scan", origin="mx1"))
    assert cache.is_banned("203.0.113.7")
    assert not cache.is_banned("203.0.113.8")
    assert not cache.is_banned("203.0.113.70")
    assert cache.lookup("203.0.113.7") == BanRecord("203.0.113.7", 0, "scan", "mx1", 1, "ban")
    assert cache.ban_count == 1
    assert cache.network_count == 0


def test_cidr_ipv4(cache: BanCache) -> None:
    cache.apply(ban("198.51.100.0/24"))
    assert cache.is_banned("198.51.100.0")
    assert cache.is_banned("198.51.100.77")
    assert cache.is_banned("198.51.100.255")
    assert not cache.is_banned("198.51.101.0")
    assert not cache.is_banned("198.51.99.255")
    record = cache.lookup("198.51.100.77")
    assert record is not None
    assert record.target == "198.51.100.0/24"
    assert cache.network_count == 1


def test_wide_and_narrow_ipv4_networks(cache: BanCache) -> None:
    # Wider than /16: the /16 filter must mark every /16 the network covers.
    cache.apply(ban("10.0.0.0/8"))
    cache.apply(ban("172.16.0.0/12"))
    cache.apply(ban("192.0.2.128/25"))
    assert cache.is_banned("10.255.255.255")
    assert cache.is_banned("10.0.0.1")
    assert not cache.is_banned("11.0.0.0")
    assert cache.is_banned("172.31.255.255")
    assert not cache.is_banned("172.32.0.0")
    assert cache.is_banned("192.0.2.200")
    assert not cache.is_banned("192.0.2.127")
    # The most specific network is reported.
    cache.apply(ban("10.1.0.0/16"))
    record = cache.lookup("10.1.2.3")
    assert record is not None
    assert record.target == "10.1.0.0/16"
    cache.apply(Unban(target="10.0.0.0/8"))
    assert cache.is_banned("10.1.2.3")
    assert not cache.is_banned("10.2.0.0")


def test_ipv6_exact_and_networks(cache: BanCache) -> None:
    cache.apply(ban("2001:db8::1"))
    cache.apply(ban("2001:db8:1::/48"))
    assert cache.is_banned("2001:db8::1")
    assert cache.is_banned("2001:DB8:0:0::1")  # non-canonical spelling from a peer
    assert cache.is_banned("2001:db8::1%eth0")  # zone id from a link-local style peer
    assert not cache.is_banned("2001:db8::2")
    assert cache.is_banned("2001:db8:1:ffff::1")
    assert not cache.is_banned("2001:db8:2::1")
    record = cache.lookup("2001:db8:1::abcd")
    assert record is not None
    assert record.target == "2001:db8:1::/48"
    # An IPv4 network in use must not break IPv6 lookups (different fast path).
    cache.apply(ban("192.0.2.0/24"))
    assert cache.is_banned("2001:db8:1::1")
    assert cache.is_banned("2001:db8::1")
    assert not cache.is_banned("2001:db8:2::1")


def test_ipv4_mapped_peers_match_ipv4_bans(cache: BanCache) -> None:
    cache.apply(ban("203.0.113.7"))
    cache.apply(ban("198.51.100.0/24"))
    assert cache.is_banned("::ffff:203.0.113.7")
    assert cache.is_banned("::FFFF:cb00:7107")
    assert cache.is_banned("::ffff:198.51.100.9")
    assert not cache.is_banned("::ffff:198.51.101.9")
    record = cache.lookup("::ffff:198.51.100.9")
    assert record is not None
    assert record.target == "198.51.100.0/24"


def test_non_addresses_never_match(cache: BanCache) -> None:
    cache.apply(ban("203.0.113.7"))
    cache.apply(ban("198.51.100.0/24"))
    cache.apply(ban("2001:db8::/32"))
    for ip in ("", "x", "198.51.100", "198.51.100.1.1", "2001:db8::g", "::ffff:300.1.1.1"):
        assert not cache.is_banned(ip)
        assert cache.lookup(ip) is None


def test_allowlist_wins_exact(cache: BanCache) -> None:
    cache.apply(ban("203.0.113.7"))
    cache.apply(allow("203.0.113.7"))
    assert not cache.is_banned("203.0.113.7")
    assert not cache.is_banned("::ffff:203.0.113.7")
    assert cache.lookup("203.0.113.7") is None
    assert cache.allowed("203.0.113.7")
    cache.apply(Disallow(target="203.0.113.7"))
    assert cache.is_banned("203.0.113.7")
    assert not cache.allowed("203.0.113.7")


def test_allowlist_exact_beats_cidr_ban(cache: BanCache) -> None:
    cache.apply(ban("10.0.0.0/8"))
    cache.apply(allow("10.1.2.3"))
    assert not cache.is_banned("10.1.2.3")
    assert cache.is_banned("10.1.2.4")


def test_allowlist_cidr_beats_cidr_and_exact_ban(cache: BanCache) -> None:
    cache.apply(ban("10.0.0.0/8"))
    cache.apply(ban("10.1.2.3"))
    cache.apply(allow("10.1.0.0/16"))
    assert not cache.is_banned("10.1.2.3")
    assert not cache.is_banned("10.1.200.1")
    assert cache.is_banned("10.2.0.1")
    cache.apply(ban("2001:db8::/32"))
    cache.apply(allow("2001:db8:5::/48"))
    assert not cache.is_banned("2001:db8:5::1")
    assert cache.is_banned("2001:db8:6::1")


def test_expiry_is_exact_on_the_clock_before_the_sweep(cache: BanCache, clock: Clock) -> None:
    cache.apply(ban("203.0.113.7", expires=T0 + 1500))
    cache.apply(ban("198.51.100.0/24", expires=T0 + 1500))
    cache.apply(ban("2001:db8::/48", expires=T0 + 1500))
    clock.now = T0 + 1499
    for ip in ("203.0.113.7", "198.51.100.1", "2001:db8::1", "::ffff:203.0.113.7"):
        assert cache.is_banned(ip)
    clock.now = T0 + 1500
    for ip in ("203.0.113.7", "198.51.100.1", "2001:db8::1", "::ffff:203.0.113.7"):
        assert not cache.is_banned(ip)
        assert cache.lookup(ip) is None
    assert cache.get("203.0.113.7") is None
    assert list(cache.records()) == []
    # Nothing swept yet: the memory is still held.
    assert cache.ban_count == 3


def test_expired_allow_stops_winning(cache: BanCache, clock: Clock) -> None:
    cache.apply(ban("203.0.113.7"))
    cache.apply(allow("203.0.113.0/24", expires=T0 + 10))
    assert not cache.is_banned("203.0.113.7")
    clock.now = T0 + 10
    assert cache.is_banned("203.0.113.7")


def test_expired_specific_ban_does_not_hide_a_wider_one(cache: BanCache, clock: Clock) -> None:
    """Before the sweep, an expired exact/narrow ban must not mask an active wider one."""
    cache.apply(ban("10.0.0.0/8"))
    cache.apply(ban("10.1.0.0/16", expires=T0 + 10))
    cache.apply(ban("10.1.2.3", expires=T0 + 10))
    cache.apply(ban("2001:db8::/32"))
    cache.apply(ban("2001:db8:1::/48", expires=T0 + 10))
    clock.now = T0 + 10
    assert cache.lookup("10.1.2.3") is not None
    assert cache.is_banned("10.1.2.3")  # exact expired, /8 active
    assert cache.is_banned("10.1.2.4")  # /16 expired, /8 active
    assert cache.is_banned("2001:db8:1::1")  # /48 expired, /32 active


def test_expire_reclaims(cache: BanCache, clock: Clock) -> None:
    cache.apply(ban("203.0.113.7", expires=T0 + 1500))
    cache.apply(ban("198.51.100.0/24", expires=T0 + 2500))
    cache.apply(ban("192.0.2.1"))  # permanent
    cache.apply(allow("192.0.2.2", expires=T0 + 1500))
    assert cache.next_expiry() is not None
    assert cache.next_expiry() <= T0 + 2000  # type: ignore[operator]
    assert cache.expire(T0 + 1000) == 0
    clock.now = T0 + 2000
    assert cache.expire() == 2
    assert cache.ban_count == 2
    assert cache.allow_count == 0
    assert cache.is_banned("198.51.100.1")
    clock.now = T0 + 3000
    assert cache.expire() == 1
    assert cache.ban_count == 1
    assert cache.network_count == 0
    assert not cache.is_banned("198.51.100.1")
    assert cache.is_banned("192.0.2.1")
    assert cache.next_expiry() is None


def test_sweep_keeps_a_ban_that_was_extended(cache: BanCache, clock: Clock) -> None:
    cache.apply(ban("203.0.113.7", expires=T0 + 1000))
    cache.apply(ban("203.0.113.7", expires=T0 + 60_000, seq=2))
    cache.apply(ban("203.0.113.8", expires=T0 + 1000))
    cache.apply(ban("203.0.113.8", expires=0, seq=3))
    clock.now = T0 + 5000
    assert cache.expire() == 0
    assert cache.is_banned("203.0.113.7")
    assert cache.is_banned("203.0.113.8")


def test_reban_after_expiry(cache: BanCache, clock: Clock) -> None:
    cache.apply(ban("203.0.113.7", expires=T0 + 1000))
    cache.apply(ban("198.51.100.0/24", expires=T0 + 1000))
    clock.now = T0 + 1000
    assert not cache.is_banned("203.0.113.7")
    # Re-ban before the sweep ...
    assert cache.apply(ban("203.0.113.7", expires=T0 + 5000, seq=2))
    assert cache.is_banned("203.0.113.7")
    clock.now = T0 + 3000
    cache.expire()
    assert not cache.is_banned("198.51.100.1")
    # ... and after it.
    assert cache.apply(ban("198.51.100.0/24", expires=T0 + 5000, seq=3))
    assert cache.is_banned("198.51.100.1")
    assert cache.is_banned("203.0.113.7")
    clock.now = T0 + 5000
    assert not cache.is_banned("203.0.113.7")
    assert not cache.is_banned("198.51.100.1")


def test_ban_already_expired_removes(cache: BanCache, clock: Clock) -> None:
    cache.apply(ban("203.0.113.7"))
    assert not cache.apply(ban("203.0.113.7", expires=T0 - 1, seq=2))
    assert not cache.is_banned("203.0.113.7")
    assert cache.ban_count == 0


def test_unban_and_disallow_unknown_targets_are_harmless(cache: BanCache) -> None:
    assert not cache.apply(Unban(target="203.0.113.7"))
    assert not cache.apply(Unban(target="198.51.100.0/24"))
    assert not cache.apply(Disallow(target="2001:db8::/32"))
    assert cache.ban_count == 0
    assert cache.allow_count == 0


def test_apply_is_idempotent(cache: BanCache) -> None:
    events = [
        ban("203.0.113.7", expires=T0 + 5000, reason="a"),
        ban("198.51.100.0/24", seq=2),
        allow("198.51.100.9", seq=3),
        Unban(target="203.0.113.7", seq=4),
        ban("2001:db8::/64", seq=5),
    ]
    for event in events:
        cache.apply(event)

    def state() -> tuple[list[BanRecord], list[BanRecord]]:
        key = lambda r: r.target  # noqa: E731
        return sorted(cache.records("ban"), key=key), sorted(cache.records("allow"), key=key)

    first = state()
    for event in events:
        cache.apply(event)
        cache.apply(event)
    assert state() == first
    assert cache.ban_count == 2
    assert cache.network_count == 2
    assert cache.allow_count == 1
    assert not cache.is_banned("203.0.113.7")
    assert cache.is_banned("198.51.100.1")
    assert not cache.is_banned("198.51.100.9")


def test_network_table_is_rebuilt_after_removal(cache: BanCache) -> None:
    cache.apply(ban("198.51.100.0/24"))
    cache.apply(Unban(target="198.51.100.0/24"))
    cache.apply(ban("198.51.100.0/24"))
    cache.apply(Unban(target="198.51.100.0/24"))
    assert not cache.is_banned("198.51.100.1")
    assert cache.network_count == 0
    cache.apply(ban("198.51.100.0/24"))
    assert cache.is_banned("198.51.100.1")


def test_replace_swaps_and_returns_newly_banned(cache: BanCache, clock: Clock) -> None:
    cache.apply(ban("203.0.113.1"))
    cache.apply(ban("203.0.113.2"))
    cache.apply(ban("198.51.100.0/24"))
    cache.apply(allow("203.0.113.2"))
    newly = cache.replace(
        [
            ("203.0.113.2", Entry(0, "kept", "mx1", 7)),
            ("203.0.113.3", Entry(T0 + 1000, "new", "mx2", 8)),
            ("2001:db8::/48", Entry(0, "", "", 9)),
            ("192.0.2.9", Entry(T0 - 1, "", "", 10)),  # already expired: not stored
        ],
        [("203.0.113.3", Entry(T0 - 1, "", "", 11))],
    )
    assert sorted(newly) == ["2001:db8::/48", "203.0.113.3"]
    assert not cache.is_banned("203.0.113.1")
    assert not cache.is_banned("198.51.100.1")
    assert cache.is_banned("203.0.113.2")  # the allow is gone with the snapshot
    assert cache.is_banned("203.0.113.3")
    assert cache.is_banned("2001:db8::1")
    assert not cache.is_banned("192.0.2.9")
    assert cache.ban_count == 3
    assert cache.allow_count == 0
    assert cache.get("203.0.113.2") == BanRecord("203.0.113.2", 0, "kept", "mx1", 7)
    # The swapped-in tables still expire.
    clock.now = T0 + 2000
    assert cache.expire() == 1
    assert not cache.is_banned("203.0.113.3")
    cache.clear()
    assert cache.ban_count == 0
    assert not cache.is_banned("203.0.113.2")


def test_put_and_get(cache: BanCache) -> None:
    assert cache.put("ban", "203.0.113.7", Entry(0, "r", "o", 3))
    assert not cache.put("allow", "203.0.113.8", Entry(0, "", "", 4))
    assert cache.get("203.0.113.7") == BanRecord("203.0.113.7", 0, "r", "o", 3, "ban")
    assert cache.get("203.0.113.8", "allow") == BanRecord("203.0.113.8", 0, "", "", 4, "allow")
    assert cache.get("203.0.113.8") is None


# -- property: the cache agrees with a naive ipaddress model ---------------------------------

_V4_BASES = [0xC0000200, 0x0A000000, 0x0A010000, 0xCB007100]
_V6_BASES = [0x20010DB8 << 96, (0x20010DB8 << 96) | (1 << 80), 0xFE800000 << 96]
_V4_PLENS = [8, 12, 16, 20, 23, 24, 25, 28, 31, 32]
_V6_PLENS = [32, 40, 48, 56, 63, 64, 65, 96, 112, 127, 128]


@st.composite
def targets(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        value = draw(st.sampled_from(_V4_BASES)) | draw(st.integers(0, 2**12 - 1))
        plen = draw(st.sampled_from(_V4_PLENS))
        net = ipaddress.IPv4Network((value, plen), strict=False)
    else:
        value = draw(st.sampled_from(_V6_BASES)) | draw(st.sampled_from([0, 1, 2**64, 2**80]))
        plen = draw(st.sampled_from(_V6_PLENS))
        net = ipaddress.IPv6Network((value, plen), strict=False)
    return parse_target(str(net), force=True).text


@st.composite
def peers(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        value = draw(st.sampled_from(_V4_BASES)) | draw(st.integers(0, 2**13 - 1))
        text = str(ipaddress.IPv4Address(value))
        return f"::ffff:{text}" if draw(st.integers(0, 4)) == 0 else text
    value = draw(st.sampled_from(_V6_BASES)) | draw(
        st.sampled_from([0, 1, 2, 2**64, 2**64 + 1, 2**80, 2**16])
    )
    return ipaddress.IPv6Address(value).compressed


_ops = st.one_of(
    st.tuples(st.just("ban"), targets(), st.sampled_from([0, 1, 999, 1000, 2500, 5000])),
    st.tuples(st.just("allow"), targets(), st.sampled_from([0, 1, 1000, 3000])),
    st.tuples(st.just("unban"), targets(), st.just(0)),
    st.tuples(st.just("disallow"), targets(), st.just(0)),
    st.tuples(st.just("tick"), st.just(""), st.sampled_from([1, 500, 1000, 1999])),
    st.tuples(st.just("sweep"), st.just(""), st.just(0)),
    st.tuples(st.just("query"), peers(), st.just(0)),
)


def _model_covered(table: dict[str, int], peer: str, now: int) -> bool:
    ip = ipaddress.ip_address(peer)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(
        (expires == 0 or expires > now)
        and ip.version == (net := ipaddress.ip_network(target)).version
        and ip in net
        for target, expires in table.items()
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(_ops, max_size=60), st.lists(peers(), min_size=1, max_size=10))
def test_property_matches_naive_model(
    ops: list[tuple[str, str, int]], final_queries: list[str]
) -> None:
    clock = Clock()
    cache = BanCache(clock)
    bans: dict[str, int] = {}
    allows: dict[str, int] = {}
    seq = 0

    seen: set[str] = set()

    def check(peer: str) -> None:
        expected = _model_covered(bans, peer, clock.now) and not _model_covered(
            allows, peer, clock.now
        )
        assert cache.is_banned(peer) is expected, (peer, bans, allows, clock.now)
        assert (cache.lookup(peer) is not None) is expected

    def check_edges() -> None:
        """The first and last address of every target used so far (where overlaps bite)."""
        for target in sorted(seen):
            net = ipaddress.ip_network(target)
            for address in {net.network_address, net.broadcast_address}:
                check(str(address))
                if address.version == 4:
                    check(f"::ffff:{address}")

    for op, arg, n in ops:
        seq += 1
        if op in ("ban", "allow"):
            seen.add(arg)
        if op == "ban":
            expires = clock.now + n if n else 0
            # Merge as the function library does (the event carries the result).
            if arg in bans and (bans[arg] == 0 or bans[arg] > clock.now):
                expires = 0 if not (expires and bans[arg]) else max(expires, bans[arg])
            cache.apply(Ban(target=arg, expires=expires, seq=seq))
            bans[arg] = expires
        elif op == "allow":
            expires = clock.now + n if n else 0
            cache.apply(Allow(target=arg, expires=expires, seq=seq))
            allows[arg] = expires
        elif op == "unban":
            cache.apply(Unban(target=arg, seq=seq))
            bans.pop(arg, None)
        elif op == "disallow":
            cache.apply(Disallow(target=arg, seq=seq))
            allows.pop(arg, None)
        elif op == "tick":
            clock.now += n
        elif op == "sweep":
            cache.expire()
        else:
            check(arg)
            check_edges()
    for peer in final_queries:
        check(peer)
    check_edges()
    active = {t for t, e in bans.items() if e == 0 or e > clock.now}
    assert {r.target for r in cache.records("ban")} == active
    # The sweep works in whole seconds: a second later everything that had
    # expired before is reclaimed, and nothing active is.
    before = clock.now
    clock.now += 1000
    cache.expire()

    def live(table: dict[str, int], now: int) -> int:
        return sum(1 for e in table.values() if e == 0 or e > now)

    assert live(bans, clock.now) <= cache.ban_count <= live(bans, before)
    assert live(allows, clock.now) <= cache.allow_count <= live(allows, before)
    for peer in final_queries:
        check(peer)


# -- compact mode ---------------------------------------------------------------------


def test_compact_mode_matches_the_default_mode_to_the_second() -> None:
    now = [1_000_000]
    full = BanCache(lambda: now[0])
    small = BanCache(lambda: now[0], compact=True)
    events = [
        Ban(target="203.0.113.7", expires=0, reason="r"),
        Ban(target="203.0.113.8", expires=1_002_000),
        Ban(target="203.0.113.9", expires=1_005_000),
        Ban(target="198.51.100.0/24", expires=0),
        Ban(target="2001:db8::1", expires=0),
        Allow(target="203.0.113.9"),
    ]
    for event in events:
        full.apply(event)
        small.apply(event)
    probes = ["203.0.113.7", "203.0.113.8", "203.0.113.9", "198.51.100.5", "2001:db8::1",
              "::ffff:203.0.113.7", "192.0.2.1"]  # fmt: skip
    for t in (1_000_000, 1_001_999, 1_002_000, 1_010_000):
        now[0] = t
        assert [small.is_banned(p) for p in probes] == [full.is_banned(p) for p in probes], t
    assert len(small._bans.store) == 3  # the exact IPv4 bans really are packed
    assert "203.0.113.7" not in small._bans.exact


def test_compact_mode_records_expiry_unban_and_replace() -> None:
    now = [1_000_000]
    small = BanCache(lambda: now[0], compact=True)
    small.apply(Ban(target="203.0.113.7", expires=1_001_500, reason="dropped"))
    record = small.lookup("203.0.113.7")
    assert record is not None
    assert (record.expires, record.reason) == (1_002_000, "")  # rounded up, no metadata
    assert [r.target for r in small.records()] == ["203.0.113.7"]
    small.apply(Unban(target="203.0.113.7"))
    assert not small.is_banned("203.0.113.7")
    small.apply(Ban(target="203.0.113.8", expires=1_001_000))
    now[0] = 1_003_000
    assert small.expire() == 1
    assert small.ban_count == 0
    newly = small.replace([("203.0.113.10", Entry(0)), ("10.0.0.0/8", Entry(0))], [])
    assert sorted(newly) == ["10.0.0.0/8", "203.0.113.10"]
    assert small.is_banned("203.0.113.10") and small.is_banned("10.1.2.3")


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["ban", "unban", "allow", "disallow", "expire", "fold"]),
            st.sampled_from(["203.0.113.1", "203.0.113.2", "198.51.100.0/24", "2001:db8::/48"]),
            st.sampled_from([0, 1_000, 5_000, 86_400_000]),
        ),
        max_size=40,
    ),
    compact=st.booleans(),
)
def test_tracked_digest_equals_a_fresh_one(ops: list[tuple[str, str, int]], compact: bool) -> None:
    """Folding tracked changes gives the digest computed from scratch, whatever happened."""
    from banbus._digest import Digest, entry_hash
    from banbus._model import Allow, Disallow

    now = [1_800_000_000_000]
    cache = BanCache(lambda: now[0], compact=compact, digest=True)
    for op, target, ttl in ops:
        expires = now[0] + ttl if ttl else 0
        if op == "ban":
            cache.apply(Ban(target=target, expires=expires))
        elif op == "unban":
            cache.apply(Unban(target=target))
        elif op == "allow":
            cache.apply(Allow(target=target, expires=expires))
        elif op == "disallow":
            cache.apply(Disallow(target=target))
        elif op == "expire":
            now[0] += ttl
            cache.expire()
        else:
            cache.fold_some(2)
    expected = Digest()
    for kind in ("ban", "allow"):
        table = cache._bans if kind == "ban" else cache._allow
        for target in table.targets():
            expires = table.expires_of(target)
            assert expires is not None
            expected = expected.add(entry_hash(kind, target, expires))
    assert cache.digest(0) == expected
    steps = list(cache.recompute(chunk=1))
    assert cache.digest(0) == expected
    assert len(steps) == expected.n
