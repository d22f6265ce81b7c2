"""The Redis function library: target parsing parity with Python, writes, loader.

Most tests run against the suite's real ``redis-server``; the loader's version
dance also runs against fakeredis, which is the embedded fallback server.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import shlex
import shutil
import subprocess
from typing import TYPE_CHECKING, Any

import anyio
import fakeredis
import pytest
import redis
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from banbus._exceptions import (
    BanbusError,
    InvalidInput,
    InvalidReason,
    InvalidTarget,
    InvalidTTL,
    RedisUnavailable,
    ServerError,
    UnsafeBan,
)
from banbus._library import (
    LIBRARY_CODE,
    LIBRARY_NAME,
    LIBRARY_VERSION,
    ensure_library,
    translate_error,
)
from banbus._servers import free_port
from banbus._targets import parse_target

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

    from banbus._servers import EmbeddedRedis, RedisProcess

AsyncRedis = redis.asyncio.Redis

# --------------------------------------------------------------------------- helpers


def code_with_version(version: int) -> str:
    code, n = re.subn(
        r"^local VERSION = \d+$", f"local VERSION = {version}", LIBRARY_CODE, flags=re.M
    )
    assert n == 1
    return code


_WRITES = ("banbus_ban", "banbus_allow", "banbus_unban", "banbus_disallow", "banbus_clear")


async def fcall(r: AsyncRedis, function: str, ns: str, *args: Any, status: bool = True) -> Any:
    """FCALL with the library's errors translated like banbus does (writes: with STATUS)."""
    positional = 3 if function in ("banbus_ban", "banbus_allow") else 1
    if status and function in _WRITES and (len(args) >= positional or function == "banbus_clear"):
        args = (*args, "STATUS")
    try:
        return await r.fcall(function, 1, ns, *args)
    except ResponseError as exc:
        raise translate_error(exc) from exc


async def server_ms(r: AsyncRedis) -> int:
    seconds, micros = await r.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def snapshot(r: AsyncRedis, ns: str) -> dict[str, Any]:
    """Everything a write could have touched in namespace *ns*."""
    keys = sorted(await r.keys(f"{{{ns}}}*"))
    dump: dict[str, Any] = {"keys": keys}
    for key in keys:
        kind = await r.type(key)
        if kind == "hash":
            dump[key] = await r.hgetall(key)
        elif kind == "zset":
            dump[key] = await r.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            dump[key] = await r.xrange(key)
        else:
            dump[key] = await r.get(key)
    return dump


@pytest.fixture
async def r(redis_url: str) -> AsyncIterator[AsyncRedis]:
    client = AsyncRedis.from_url(redis_url, decode_responses=True)
    await ensure_library(client)
    yield client
    await client.aclose()


def _outcome_python(text: str, force: bool) -> tuple[str, Any]:
    try:
        return ("ok", parse_target(text, force=force).text)
    except (InvalidTarget, UnsafeBan) as exc:
        return ("error", type(exc))


def _outcome_lua(client: redis.Redis, ns: str, text: str, force: bool) -> tuple[str, Any]:
    extra = ["FORCE"] if force else []
    try:
        reply = client.fcall("banbus_check", 1, ns, text.encode(), *extra)
    except ResponseError as exc:
        return ("error", type(translate_error(exc)))
    return ("ok", reply.decode() if isinstance(reply, bytes) else reply)


@pytest.fixture(scope="module")
def sync_client(redis_server: RedisProcess | EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.function_load(LIBRARY_CODE, replace=True)
    yield client
    client.close()


# --------------------------------------------------------------------------- targets

TRICKY_TARGETS = [
    # (input, canonical text or exception type), with the default minimums.
    ("203.0.113.7", "203.0.113.7"),
    ("  203.0.113.7\t\n", "203.0.113.7"),
    ("\u00a0203.0.113.7\u2003", "203.0.113.7"),
    ("203.0.113.7/32", "203.0.113.7"),
    ("203.0.113.0/24", "203.0.113.0/24"),
    ("203.0.113.0/024", "203.0.113.0/24"),
    ("10.0.0.1/8", InvalidTarget),
    ("10.0.0.0/7", UnsafeBan),
    ("0.0.0.0/0", UnsafeBan),
    ("1.2.3.4/0", InvalidTarget),  # host bits come before /0
    ("01.2.3.4", InvalidTarget),
    ("1.2.3.04", InvalidTarget),
    ("0.0.0.0", "0.0.0.0"),
    ("256.1.1.1", InvalidTarget),
    ("1.2.3", InvalidTarget),
    ("1.2.3.4.5", InvalidTarget),
    ("1.2.3.4/33", InvalidTarget),
    ("1.2.3.4/", InvalidTarget),
    ("1.2.3.4/1234", InvalidTarget),
    ("1.2.3.4/+8", InvalidTarget),
    ("1.2.3.4//32", InvalidTarget),
    ("", InvalidTarget),
    ("   ", InvalidTarget),
    ("fe80::1%eth0", InvalidTarget),
    ("1" * 65, InvalidTarget),
    ("2001:DB8::1", "2001:db8::1"),
    ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
    ("2001:db8:0:1:1:1:1:1", "2001:db8:0:1:1:1:1:1"),  # one zero group stays
    ("1:0:0:2:2:0:0:3", "1::2:2:0:0:3"),  # first of two equal runs
    ("1:0:0:2:0:0:0:3", "1:0:0:2::3"),  # longest run
    ("::", "::"),  # the unspecified address is one address
    ("::/0", UnsafeBan),
    ("::1", "::1"),
    ("1::", "1::"),
    ("::1.2.3.4", "::1.2.3.4"),  # glibc keeps the dotted quad
    ("::0.1.0.0", "::0.1.0.0"),
    ("::ffff:203.0.113.7", "203.0.113.7"),
    ("::FFFF:cb00:7107", "203.0.113.7"),
    ("::ffff:203.0.113.0/120", "203.0.113.0/24"),
    ("::ffff:0.0.0.0/96", UnsafeBan),
    ("::ffff:0:0/95", InvalidTarget),  # host bits: ::fffe:0:0/95
    ("::fffe:0:0/95", "::fffe:0:0/95"),
    ("2001:db8::/32", "2001:db8::/32"),
    ("2001:db8::/31", UnsafeBan),
    ("2001:db8::1/64", InvalidTarget),
    ("2001:db8::/129", InvalidTarget),
    ("1:2:3:4:5:6:7:8:9", InvalidTarget),
    ("1:2:3:4:5:6:7", InvalidTarget),
    ("1::2::3", InvalidTarget),
    (":1:2:3:4:5:6:7", InvalidTarget),
    ("1:2:3:4:5:6:7:", InvalidTarget),
    ("1:2:3:4:5:6:7::", "1:2:3:4:5:6:7:0"),
    ("::1:2:3:4:5:6:7", "0:1:2:3:4:5:6:7"),
    ("1:2:3:4:5:6:1.2.3.4", "1:2:3:4:5:6:102:304"),
    ("1:2:3:4:5:6:7:1.2.3.4", InvalidTarget),
    ("::01.2.3.4", InvalidTarget),
    ("12345::", InvalidTarget),
    ("g::", InvalidTarget),
    ("1:2", InvalidTarget),
    ("1.2.3.4:80", InvalidTarget),
    ("[::1]", InvalidTarget),
    ("\u0661.2.3.4", InvalidTarget),  # Arabic-Indic digit: isdigit() but not ASCII
    ("1.2.3.4\x00", InvalidTarget),
]


def _expected(value: str | type[BanbusError]) -> tuple[str, Any]:
    return ("ok", value) if isinstance(value, str) else ("error", value)


@pytest.mark.parametrize(("text", "expected"), TRICKY_TARGETS)
def test_tricky_targets(
    sync_client: redis.Redis, text: str, expected: str | type[BanbusError]
) -> None:
    assert _outcome_python(text, False) == _expected(expected)
    assert _outcome_lua(sync_client, "tparity", text, False) == _expected(expected)


def test_every_prefix_length(sync_client: redis.Redis) -> None:
    for address in ("255.255.255.255", "203.0.113.7", "0.0.0.0", "128.0.0.0"):
        for plen in range(33):
            for text in (f"{address}/{plen}", f"::ffff:{address}/{plen + 96}"):
                for force in (False, True):
                    want = _outcome_python(text, force)
                    assert _outcome_lua(sync_client, "tparity", text, force) == want, text
    for value in (2**128 - 1, 0x2001_0DB8 << 96 | 1, 1 << 127, 0xFFFF << 32, 1):
        for plen in range(129):
            net = ipaddress.IPv6Network((value >> (128 - plen) << (128 - plen), plen))
            for text in (f"{ipaddress.IPv6Address(value)}/{plen}", str(net)):
                for force in (False, True):
                    want = _outcome_python(text, force)
                    assert _outcome_lua(sync_client, "tparity", text, force) == want, text


_GROUP = st.one_of(st.just(0), st.just(0), st.just(0), st.just(0xFFFF), st.integers(0, 0xFFFF))


@st.composite
def _v6_text(draw: st.DrawFn) -> str:
    groups = draw(st.lists(_GROUP, min_size=8, max_size=8))
    if draw(st.booleans()):
        groups[:5] = [0] * 5
        groups[5] = draw(st.sampled_from([0, 0xFFFF]))
    value = int.from_bytes(b"".join(g.to_bytes(2, "big") for g in groups), "big")
    addr = ipaddress.IPv6Address(value)
    style = draw(st.sampled_from(["compressed", "exploded", "dotted", "groups"]))
    if style == "compressed":
        text = addr.compressed
    elif style == "exploded":
        text = addr.exploded
    elif style == "dotted":
        head = ":".join(f"{g:x}" for g in groups[:6])
        text = f"{head}:{ipaddress.IPv4Address(value & 0xFFFFFFFF)}"
        if groups[:6] == [0] * 6 or groups[:6] == [0] * 5 + [0xFFFF]:
            text = (
                "::"
                + ("ffff:" if groups[5] else "")
                + str(ipaddress.IPv4Address(value & 0xFFFFFFFF))
            )
    else:
        text = ":".join(f"{g:x}" for g in groups)
    if draw(st.booleans()):
        text = text.upper()
    return text


@st.composite
def _target_text(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["v4", "v6", "v4", "v6", "garbage", "hexish", "octets"]))
    if kind == "v4":
        text = str(ipaddress.IPv4Address(draw(st.integers(0, 2**32 - 1))))
    elif kind == "v6":
        text = draw(_v6_text())
    elif kind == "octets":
        octets = draw(st.lists(st.from_regex(r"\A[0-9]{1,4}\Z"), min_size=3, max_size=5))
        text = ".".join(octets)
    elif kind == "hexish":
        text = draw(st.text(alphabet="0123456789abcdefABCDEFgx:.:::/%", max_size=45))
    else:
        return draw(st.text(st.characters(codec="utf-8"), max_size=70))
    suffix = draw(
        st.one_of(
            st.just(""),
            st.integers(0, 130).map(lambda n: f"/{n}"),
            st.from_regex(r"\A/[0-9a+ ]{0,4}\Z"),
        )
    )
    text += suffix
    if draw(st.integers(0, 9)) == 0:
        text = draw(st.sampled_from([" ", "\t", "\u00a0", "\u3000"])) + text + " \n"
    return text


@settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(text=_target_text(), force=st.booleans())
def test_lua_matches_parse_target(sync_client: redis.Redis, text: str, force: bool) -> None:
    assert _outcome_lua(sync_client, "tparity", text, force) == _outcome_python(text, force)


@pytest.mark.anyio
async def test_check_uses_namespace_config(r: AsyncRedis, namespace: str) -> None:
    assert await fcall(r, "banbus_check", namespace, "10.0.0.0/12") == "10.0.0.0/12"
    await r.hset(f"{{{namespace}}}:config", mapping={"min_prefix_v4": 16, "min_prefix_v6": 48})
    with pytest.raises(UnsafeBan, match=r"^10\.0\.0\.0/12 is wider than the minimum prefix /16"):
        await fcall(r, "banbus_check", namespace, "10.0.0.0/12")
    assert await fcall(r, "banbus_check", namespace, "10.0.0.0/12", "force") == "10.0.0.0/12"
    with pytest.raises(UnsafeBan):
        await fcall(r, "banbus_check", namespace, "2001:db8::/32")
    with pytest.raises(UnsafeBan):  # FORCE never allows /0
        await fcall(r, "banbus_check", namespace, "::/0", "FORCE")
    await r.hset(f"{{{namespace}}}:config", "min_prefix_v4", "99")
    with pytest.raises(ServerError, match="BANBUS_CONFIG"):
        await fcall(r, "banbus_check", namespace, "10.0.0.0/12")


@pytest.mark.anyio
async def test_error_messages_read_like_python(r: AsyncRedis, namespace: str) -> None:
    with pytest.raises(ResponseError) as info:
        await r.fcall("banbus_ban", 1, namespace, "10.0.0.1/8", "60")
    assert str(info.value) == (
        "BANBUS_INVALID target '10.0.0.1/8' has host bits set; did you mean 10.0.0.0/8?"
    )
    with pytest.raises(ResponseError) as info:
        await r.fcall("banbus_ban", 1, namespace, "0.0.0.0/0", "60")
    assert str(info.value) == "BANBUS_UNSAFE 0.0.0.0/0 would match every IPv4 address; refused"
    with pytest.raises(ResponseError) as info:
        await r.fcall("banbus_ban", 1, namespace, "10.0.0.0/7", "60")
    assert str(info.value) == (
        "BANBUS_UNSAFE 10.0.0.0/7 is wider than the minimum prefix /8; pass FORCE to override"
    )


# --------------------------------------------------------------------------- writes


@pytest.mark.anyio
async def test_ban_writes_record_index_and_event(r: AsyncRedis, namespace: str) -> None:
    before = await server_ms(r)
    seq, stream_id, target, expires, status, epoch = await fcall(
        r, "banbus_ban", namespace, " 2001:DB8::0:7 ", "3600", "scanner", "ORIGIN", "node-1"
    )
    assert status == "written"
    after = await server_ms(r)
    assert (seq, target) == (1, "2001:db8::7")
    assert before + 3_600_000 <= expires <= after + 3_600_000
    ns = f"{{{namespace}}}"
    assert json.loads(await r.hget(f"{ns}:bans", target))[:4] == [expires, "scanner", "node-1", 1]
    assert await r.zrange(f"{ns}:bans:exp", 0, -1, withscores=True) == [(target, expires)]
    assert epoch == await r.get(f"{ns}:epoch")
    assert epoch and re.fullmatch(r"[0-9]+", epoch)
    entries = await r.xrange(f"{ns}:log")
    assert entries == [
        (
            stream_id,
            {
                "op": "ban",
                "target": target,
                "expires": str(expires),
                "reason": "scanner",
                "origin": "node-1",
                "eid": f"{epoch}-1",
                "seq": "1",
            },
        )
    ]
    # Field order is part of the format (XRANGE in redis-cli is the audit log).
    # (redis-py builds the field dict in reply order.)
    assert list(entries[0][1]) == ["op", "target", "expires", "reason", "origin", "eid", "seq"]
    assert await r.get(f"{ns}:seq") == "1"
    # The head: the last event the library wrote, and the record's digest.
    head = await r.hgetall(f"{ns}:head")
    assert head["id"] == stream_id and set(head) == {"id", "d1", "d2"}


@pytest.mark.anyio
async def test_reason_is_optional_and_json_safe(r: AsyncRedis, namespace: str) -> None:
    ns = f"{{{namespace}}}"
    await fcall(r, "banbus_ban", namespace, "192.0.2.1", "0")
    assert json.loads(await r.hget(f"{ns}:bans", "192.0.2.1"))[:4] == [0, "", "fcall", 1]
    tricky = 'say "hi" \\ / d\u00e9j\u00e0 vu \u2603'
    await fcall(r, "banbus_allow", namespace, "192.0.2.2", "0", tricky, "force")
    assert json.loads(await r.hget(f"{ns}:allow", "192.0.2.2"))[:4] == [0, tricky, "fcall", 2]
    # A keyword in third place is a reason; options come after it.
    await fcall(r, "banbus_ban", namespace, "192.0.2.3", "0", "FORCE")
    assert json.loads(await r.hget(f"{ns}:bans", "192.0.2.3"))[1] == "FORCE"
    await fcall(r, "banbus_ban", namespace, "10.0.0.0/7", "0", "", "FORCE")
    assert await r.hexists(f"{ns}:bans", "10.0.0.0/7")
    await fcall(r, "banbus_ban", namespace, "192.0.2.4", "0", "x" * 512)


@pytest.mark.anyio
async def test_reban_merges_expiry(r: AsyncRedis, namespace: str) -> None:
    ns = f"{{{namespace}}}"
    _, _, _, first, *_ = await fcall(r, "banbus_ban", namespace, "198.51.100.1", "3600")
    # A shorter re-ban keeps the later expiry, but is still an event.
    seq, _, _, merged, *_ = await fcall(r, "banbus_ban", namespace, "198.51.100.1", "60", "again")
    assert (seq, merged) == (2, first)
    stored = json.loads(await r.hget(f"{ns}:bans", "198.51.100.1"))
    assert stored[:4] == [first, "again", "fcall", 2]
    created = stored[4]  # the first write's time, kept while the ban lives
    assert first - 3600 * 1000 - 1000 <= created <= first - 3600 * 1000
    # A longer one extends.
    _, _, _, longer, *_ = await fcall(r, "banbus_ban", namespace, "198.51.100.1", "7200")
    assert longer > first
    # REPLACE sets it exactly, even shorter.
    _, _, _, short, *_ = await fcall(
        r, "banbus_ban", namespace, "198.51.100.1", "60", "", "replace"
    )
    assert short < first
    assert await r.zscore(f"{ns}:bans:exp", "198.51.100.1") == short
    # Permanent wins over any expiry, and a later timed ban does not undo it.
    assert (await fcall(r, "banbus_ban", namespace, "198.51.100.1", "0"))[3] == 0
    assert (await fcall(r, "banbus_ban", namespace, "198.51.100.1", "60"))[3] == 0
    assert await r.zscore(f"{ns}:bans:exp", "198.51.100.1") is None
    # ... unless replaced.
    _, _, _, timed, *_ = await fcall(
        r, "banbus_ban", namespace, "198.51.100.1", "60", "", "REPLACE"
    )
    assert timed > 0
    assert await r.zscore(f"{ns}:bans:exp", "198.51.100.1") == timed
    assert await r.xlen(f"{ns}:log") == 7
    assert json.loads(await r.hget(f"{ns}:bans", "198.51.100.1"))[4] == created


@pytest.mark.anyio
async def test_reban_after_real_expiry(r: AsyncRedis, namespace: str) -> None:
    ns = f"{{{namespace}}}"
    _, _, _, first, *_ = await fcall(r, "banbus_ban", namespace, "198.51.100.2", "1")
    with anyio.fail_after(5):
        while await server_ms(r) <= first:  # wait on the server's clock
            await anyio.sleep(0.02)
    start = await server_ms(r)
    seq, _, _, again, *_ = await fcall(r, "banbus_ban", namespace, "198.51.100.2", "1", "back")
    assert seq == 2
    assert start + 1000 <= again <= await server_ms(r) + 1000
    stored = json.loads(await r.hget(f"{ns}:bans", "198.51.100.2"))
    assert stored[:4] == [again, "back", "fcall", 2]
    assert stored[4] == again - 1000  # expired before: created anew


@pytest.mark.anyio
async def test_purge_removes_expired_entries_without_events(r: AsyncRedis, namespace: str) -> None:
    ns = f"{{{namespace}}}"
    past = await server_ms(r) - 1000
    # 150 expired bans and 3 expired allows, as if written long ago.
    for i in range(150):
        target = f"192.0.2.{i}"
        await r.hset(f"{ns}:bans", target, json.dumps([past, "", "old", i]))
        await r.zadd(f"{ns}:bans:exp", {target: past})
    for i in range(3):
        await r.hset(f"{ns}:allow", f"10.9.{i}.0/24", json.dumps([past, "", "old", i]))
        await r.zadd(f"{ns}:allow:exp", {f"10.9.{i}.0/24": past})
    await fcall(r, "banbus_ban", namespace, "203.0.113.9", "60")
    assert await r.zcard(f"{ns}:bans:exp") == 50 + 1  # at most 100 per call
    assert await r.hlen(f"{ns}:bans") == 50 + 1
    assert await r.zcard(f"{ns}:allow:exp") == 0
    assert await r.hlen(f"{ns}:allow") == 0
    await fcall(r, "banbus_unban", namespace, "203.0.113.200")  # no-op still purges
    assert await r.hlen(f"{ns}:bans") == 1
    assert await r.xlen(f"{ns}:log") == 2  # the ban, and the (remembered) removal
    # The digest followed the purges: it is that of the one entry left.
    *_, status, d1, d2, n = await r.fcall_ro("banbus_digest", 1, namespace, 0)
    assert (status, n) == ("ok", 1)
    from banbus._digest import Digest, entry_hash

    expires = json.loads(await r.hget(f"{ns}:bans", "203.0.113.9"))[0]
    assert Digest(d1, d2, n) == Digest().add(entry_hash("ban", "203.0.113.9", expires))


@pytest.mark.anyio
async def test_unban_and_disallow(r: AsyncRedis, namespace: str) -> None:
    ns = f"{{{namespace}}}"
    await fcall(r, "banbus_ban", namespace, "2001:db8:1::/48", "600")
    await fcall(r, "banbus_allow", namespace, "10.0.0.0/7", "0", "", "FORCE")
    seq, stream_id, target, expires, status, _ = await fcall(
        r, "banbus_unban", namespace, "2001:DB8:1:0::/48", "ORIGIN", "ops"
    )
    assert (seq, target, expires, status) == (3, "2001:db8:1::/48", 0, "written")
    assert not await r.hexists(f"{ns}:bans", target)
    assert await r.zscore(f"{ns}:bans:exp", target) is None
    epoch = await r.get(f"{ns}:epoch")
    last = (await r.xrevrange(f"{ns}:log", count=1))[0]
    assert last == (
        stream_id,
        {"op": "unban", "target": target, "origin": "ops", "eid": f"{epoch}-3", "seq": "3"},
    )
    # Removing a wide entry needs no FORCE.
    seq, _, target, *_ = await fcall(r, "banbus_disallow", namespace, "10.0.0.0/7")
    assert (seq, target) == (4, "10.0.0.0/7")
    assert await r.hlen(f"{ns}:allow") == 0
    assert (await r.xrevrange(f"{ns}:log", count=1))[0][1]["op"] == "disallow"


@pytest.mark.anyio
async def test_unban_of_missing_target_is_remembered(r: AsyncRedis, namespace: str) -> None:
    """A removal of what is not recorded changes nothing but leaves a tombstone and an event."""
    ns = f"{{{namespace}}}"
    seq, _, target, _, status, _ = await fcall(r, "banbus_unban", namespace, "203.0.113.7")
    assert (seq, target, status) == (1, "203.0.113.7", "absent")
    reply = await fcall(r, "banbus_disallow", namespace, "::ffff:203.0.113.7")
    assert (reply[2], reply[4]) == ("203.0.113.7", "absent")
    assert set(await r.zrange(f"{ns}:removed", 0, -1)) == {"a 203.0.113.7", "b 203.0.113.7"}
    assert await r.hlen(f"{ns}:bans") == 0
    assert [f["op"] for _, f in await r.xrange(f"{ns}:log")] == ["unban", "disallow"]


@pytest.mark.anyio
async def test_tombstones_are_capped(r: AsyncRedis, namespace: str) -> None:
    """Tombstones never outgrow TOMBSTONE_LIMIT, whatever the removal rate."""
    from banbus._keys import TOMBSTONE_LIMIT

    ns = f"{{{namespace}}}"
    # Fill to the cap by hand (fast), then remove through the library.
    filler = {f"b 10.{i >> 16}.{(i >> 8) & 255}.{i & 255}": i for i in range(TOMBSTONE_LIMIT)}
    await r.zadd(f"{ns}:removed", filler)
    for i in range(5):
        await fcall(r, "banbus_unban", namespace, f"192.0.2.{i}")
    assert await r.zcard(f"{ns}:removed") == TOMBSTONE_LIMIT
    assert await r.zscore(f"{ns}:removed", "b 192.0.2.4") is not None
    assert await r.zscore(f"{ns}:removed", "b 10.0.0.0") is None  # the oldest went


@pytest.mark.anyio
async def test_retry_finds_the_first_attempt_in_the_stream(r: AsyncRedis, namespace: str) -> None:
    """RETRY: a call whose answer was lost is written once; no per-write key is kept."""
    ns = f"{{{namespace}}}"
    since = await server_ms(r) - 5000
    first = await fcall(r, "banbus_ban", namespace, "203.0.113.7", "600", "x", "EID", "node-a:42")
    again = await fcall(
        r, "banbus_ban", namespace, "203.0.113.7", "900", "y", "EID", "node-a:42", "RETRY", since
    )
    assert again[:4] == first[:4] and again[4] == "duplicate"
    assert await r.xlen(f"{ns}:log") == 1
    assert json.loads(await r.hget(f"{ns}:bans", "203.0.113.7"))[1] == "x"
    assert await r.keys(f"{ns}:eid*") == []
    # Same for removal: a retried unban does not remove a newer ban.
    gone = await fcall(r, "banbus_unban", namespace, "203.0.113.7", "EID", "node-a:43")
    assert gone[0] == 2
    await fcall(r, "banbus_ban", namespace, "203.0.113.7", "600")
    retried = await fcall(
        r, "banbus_unban", namespace, "203.0.113.7", "eid", "node-a:43", "retry", since
    )
    assert retried[:4] == gone[:4] and retried[4] == "duplicate"
    assert await r.hexists(f"{ns}:bans", "203.0.113.7")
    assert await r.xlen(f"{ns}:log") == 3
    # A retry of a call that never ran is written normally.
    fresh = await fcall(
        r, "banbus_ban", namespace, "203.0.113.8", "60", "", "EID", "node-a:44", "RETRY", since
    )
    assert (fresh[0], fresh[4]) == (4, "written")
    # Without EID, RETRY has nothing to look for.
    with pytest.raises(InvalidInput, match="RETRY needs EID"):
        await fcall(r, "banbus_ban", namespace, "203.0.113.9", "60", "", "RETRY", since)


@pytest.mark.anyio
async def test_retry_after_the_stream_was_trimmed_is_unverified(
    r: AsyncRedis, namespace: str
) -> None:
    ns = f"{{{namespace}}}"
    since = await server_ms(r) - 5000
    await fcall(r, "banbus_ban", namespace, "203.0.113.7", "600", "", "EID", "lost-1")
    await r.xtrim(f"{ns}:log", maxlen=0, approximate=False)
    reply = await fcall(
        r, "banbus_ban", namespace, "203.0.113.7", "600", "", "EID", "lost-1", "RETRY", since
    )
    assert (reply[0], reply[4]) == (2, "unverified")


@pytest.mark.anyio
async def test_reseed_writes_only_into_a_gap(r: AsyncRedis, namespace: str) -> None:
    ns = f"{{{namespace}}}"
    since = await server_ms(r)
    await fcall(r, "banbus_ban", namespace, "192.0.2.1", "0", "live")
    present = await fcall(r, "banbus_ban", namespace, "192.0.2.1", "60", "old", "RESEED", since)
    assert (present[0], present[4]) == (0, "present")
    await fcall(r, "banbus_unban", namespace, "192.0.2.2")  # removed after `since`
    lifted = await fcall(r, "banbus_ban", namespace, "192.0.2.2", "60", "old", "RESEED", since)
    assert (lifted[0], lifted[4]) == (0, "lifted")
    # A removal before `since` was seen by whoever re-seeds: it does not count.
    later = await server_ms(r) + 1
    written = await fcall(r, "banbus_ban", namespace, "192.0.2.2", "60", "old", "RESEED", later)
    assert written[4] == "written"
    # A clear is a removal of everything.
    await fcall(r, "banbus_clear", namespace)
    after_clear = await fcall(r, "banbus_ban", namespace, "192.0.2.3", "0", "", "RESEED", since)
    assert after_clear[4] == "lifted"
    assert await r.hlen(f"{ns}:bans") == 0


@pytest.mark.anyio
async def test_stream_is_trimmed(r: AsyncRedis, namespace: str) -> None:
    ns = f"{{{namespace}}}"
    await r.hset(f"{ns}:config", "maxlen", 10)
    async with r.pipeline(transaction=False) as pipe:
        for i in range(500):
            pipe.fcall("banbus_ban", 1, namespace, f"10.{i // 256}.{i % 256}.1", "60")
        replies = await pipe.execute()
    assert [reply[0] for reply in replies] == list(range(1, 501))
    # MAXLEN ~ trims whole stream nodes (stream-node-max-entries, 100).
    assert 10 <= await r.xlen(f"{ns}:log") <= 10 + 100
    assert await r.hlen(f"{ns}:bans") == 500


BAD_CALLS: list[tuple[str, tuple[Any, ...], type[BanbusError]]] = [
    ("banbus_ban", ("not-an-ip", "60"), InvalidTarget),
    ("banbus_ban", ("10.0.0.1/8", "60"), InvalidTarget),
    ("banbus_ban", ("0.0.0.0/0", "60", "", "FORCE"), UnsafeBan),
    ("banbus_ban", ("::/0", "60"), UnsafeBan),
    ("banbus_ban", ("10.0.0.0/7", "60"), UnsafeBan),
    ("banbus_allow", ("2001:db8::/31", "0"), UnsafeBan),
    ("banbus_ban", ("192.0.2.1", "-1"), InvalidTTL),
    ("banbus_ban", ("192.0.2.1", "1.5"), InvalidTTL),
    ("banbus_ban", ("192.0.2.1", ""), InvalidTTL),
    ("banbus_ban", ("192.0.2.1", "315360001"), InvalidTTL),
    ("banbus_ban", ("192.0.2.1", "99999999999999999999"), InvalidTTL),
    ("banbus_ban", ("192.0.2.1", "60", "x" * 513), InvalidReason),
    ("banbus_ban", ("192.0.2.1", "60", "line\nbreak"), InvalidReason),
    ("banbus_ban", ("192.0.2.1", "60", "del\x7f"), InvalidReason),
    ("banbus_ban", ("192.0.2.1", "60", b"\xff\xfe latin-1?"), InvalidReason),
    ("banbus_ban", ("192.0.2.1", "60", "", "ORIGIN", "two words"), InvalidReason),
    ("banbus_ban", ("192.0.2.1", "60", "", "ORIGIN", "o" * 65), InvalidReason),
    ("banbus_ban", ("192.0.2.1", "60", "", "EID", "e" * 129), InvalidReason),
    ("banbus_ban", ("192.0.2.1", "60", "", "EID", ""), InvalidReason),
    ("banbus_ban", ("192.0.2.1", "60", "", "BOGUS"), InvalidInput),
    ("banbus_ban", ("192.0.2.1", "60", "", "ORIGIN"), InvalidInput),
    ("banbus_ban", ("192.0.2.1", "60", "", "FORCE", "FORCE"), InvalidInput),
    ("banbus_ban", ("192.0.2.1",), InvalidInput),
    ("banbus_unban", ("192.0.2.1", "REPLACE"), InvalidInput),
    ("banbus_unban", ("not-an-ip",), InvalidTarget),
    ("banbus_allow", ("192.0.2.1", "60", "", "EID", "a/b"), InvalidReason),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("function", "args", "error"), BAD_CALLS)
async def test_refused_call_writes_nothing(
    r: AsyncRedis,
    namespace: str,
    function: str,
    args: tuple[Any, ...],
    error: type[BanbusError],
) -> None:
    await fcall(r, "banbus_ban", namespace, "192.0.2.1", "600", "existing")
    await fcall(r, "banbus_allow", namespace, "192.0.2.9", "600", "existing")
    before = await snapshot(r, namespace)
    with pytest.raises(error) as info:
        await fcall(r, function, namespace, *args, status=False)
    assert type(info.value) is error
    assert await snapshot(r, namespace) == before


@pytest.mark.anyio
async def test_broken_keyspace_never_records_without_event(r: AsyncRedis, namespace: str) -> None:
    ns = f"{{{namespace}}}"
    await r.set(f"{ns}:log", "not a stream")
    with pytest.raises(ServerError, match="WRONGTYPE"):
        await fcall(r, "banbus_ban", namespace, "192.0.2.1", "60")
    assert await r.hlen(f"{ns}:bans") == 0
    assert await r.zcard(f"{ns}:bans:exp") == 0


@pytest.mark.anyio
async def test_bad_namespace_and_key_count(r: AsyncRedis) -> None:
    with pytest.raises(InvalidInput, match="namespace"):
        await fcall(r, "banbus_ban", "a{b}", "192.0.2.1", "60")
    with pytest.raises(ResponseError, match="BANBUS_INVALID usage"):
        await r.fcall("banbus_ban", 0, "192.0.2.1", "60")
    assert await r.keys("{a{b}*") == []


@pytest.mark.anyio
async def test_state_is_the_bootstrap_watermark(r: AsyncRedis, namespace: str) -> None:
    last_id, seq, epoch, now, version = await r.fcall_ro("banbus_state", 1, namespace)
    assert (last_id, seq, epoch, version) == ("0-0", 0, "", LIBRARY_VERSION)
    assert abs(now - await server_ms(r)) < 5000
    await fcall(r, "banbus_ban", namespace, "192.0.2.1", "60")
    _, stream_id, *_ = await fcall(r, "banbus_ban", namespace, "192.0.2.2", "60")
    last_id, seq, epoch, _, _ = await r.fcall_ro("banbus_state", 1, namespace)
    assert (last_id, seq) == (stream_id, 2)
    assert epoch == await r.get(f"{{{namespace}}}:epoch")
    # The watermark is what the library wrote, not whatever is newest: a
    # hand-written entry (even with a plausible seq) does not move it.
    await r.xadd(f"{{{namespace}}}:log", {"op": "ban", "target": "1.2.3.4", "seq": "99"})
    assert (await r.fcall_ro("banbus_state", 1, namespace))[:3] == [stream_id, 2, epoch]
    # The stream deleted away entirely: the head still says where the record is.
    await r.delete(f"{{{namespace}}}:log")
    assert (await r.fcall_ro("banbus_state", 1, namespace))[:3] == [stream_id, 2, epoch]


@pytest.mark.anyio
async def test_epoch_is_set_once(r: AsyncRedis, namespace: str) -> None:
    await fcall(r, "banbus_ban", namespace, "192.0.2.1", "60")
    epoch = await r.get(f"{{{namespace}}}:epoch")
    await fcall(r, "banbus_unban", namespace, "192.0.2.1")
    await fcall(r, "banbus_allow", namespace, "192.0.2.1", "0")
    assert await r.get(f"{{{namespace}}}:epoch") == epoch
    eids = [fields["eid"] for _, fields in await r.xrange(f"{{{namespace}}}:log")]
    assert eids == [f"{epoch}-1", f"{epoch}-2", f"{epoch}-3"]


# --------------------------------------------------------------------------- translate_error


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ("BANBUS_UNSAFE 0.0.0.0/0 would match every IPv4 address; refused", UnsafeBan),
        ("BANBUS_INVALID target 'x' is not an IP address", InvalidTarget),
        ("BANBUS_INVALID ttl '1.5' is not a whole number", InvalidTTL),
        ("BANBUS_INVALID reason is 513 bytes long", InvalidReason),
        ("BANBUS_INVALID origin 'a b' must be", InvalidReason),
        ("BANBUS_INVALID eid '' must be", InvalidReason),
        ("BANBUS_INVALID option 'X' is unknown", InvalidInput),
        ("BANBUS_INVALID usage: FCALL banbus_ban ...", InvalidInput),
        ("BANBUS_CONFIG {b}:config maxlen 'x' is not a whole number", ServerError),
        ("ERR Function not found", ServerError),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", ServerError),
        ("", ServerError),
    ],
)
def test_translate_error(message: str, error: type[BanbusError]) -> None:
    translated = translate_error(ResponseError(message))
    assert type(translated) is error
    if error is not ServerError:
        assert not str(translated).startswith("BANBUS_")
        assert str(translated) in message


# --------------------------------------------------------------------------- redis-cli


def _redis_cli(server: RedisProcess | EmbeddedRedis, command: str) -> str:
    binary = shutil.which("redis-cli")
    assert binary is not None
    done = subprocess.run(
        [binary, "-h", server.host, "-p", str(server.port), *shlex.split(command)],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    # redis-cli 7.0 exits 0 on error replies and prints them unmarked off a
    # terminal: the output is what tells.
    return done.stdout + done.stderr


cli_only = pytest.mark.skipif(shutil.which("redis-cli") is None, reason="no redis-cli on PATH")


@pytest.mark.real_redis
@cli_only
@pytest.mark.anyio
async def test_redis_cli_operator_commands(
    r: AsyncRedis, redis_server: RedisProcess | EmbeddedRedis, namespace: str
) -> None:
    ns = f"{{{namespace}}}"
    out = _redis_cli(redis_server, f'FCALL banbus_ban 1 {namespace} 203.0.113.7 3600 "scanner"')
    lines = out.split()
    assert "BANBUS" not in out and "ERR" not in out, out
    assert lines[0] == "1" and lines[2] == "203.0.113.7", out
    expires = int(lines[3])
    assert json.loads(await r.hget(f"{ns}:bans", "203.0.113.7"))[:4] == [
        expires,
        "scanner",
        "fcall",
        1,
    ]
    assert (await r.xrange(f"{ns}:log"))[0][1]["reason"] == "scanner"

    out = _redis_cli(redis_server, f"FCALL banbus_unban 1 {namespace} 203.0.113.7")
    assert out.split()[:1] == ["2"] and "BANBUS" not in out, out
    assert await r.hlen(f"{ns}:bans") == 0

    out = _redis_cli(redis_server, f'FCALL banbus_allow 1 {namespace} 10.0.0.0/8 0 "office"')
    assert out.split()[0] == "3" and "BANBUS" not in out, out
    assert json.loads(await r.hget(f"{ns}:allow", "10.0.0.0/8"))[:4] == [0, "office", "fcall", 3]

    out = _redis_cli(redis_server, f"FCALL banbus_disallow 1 {namespace} 10.0.0.0/8")
    assert out.split()[0] == "4" and "BANBUS" not in out, out
    assert await r.hlen(f"{ns}:allow") == 0
    ops = [fields["op"] for _, fields in await r.xrange(f"{ns}:log")]
    assert ops == ["ban", "unban", "allow", "disallow"]


@pytest.mark.real_redis
@cli_only
@pytest.mark.anyio
async def test_redis_cli_refusal_is_readable(
    r: AsyncRedis, redis_server: RedisProcess | EmbeddedRedis, namespace: str
) -> None:
    out = _redis_cli(redis_server, f"FCALL banbus_ban 1 {namespace} 0.0.0.0/0 3600")
    assert "BANBUS_UNSAFE 0.0.0.0/0 would match every IPv4 address; refused" in out
    out = _redis_cli(redis_server, f'FCALL banbus_ban 1 {namespace} 10.0.0.1/8 0 ""')
    assert "BANBUS_INVALID target '10.0.0.1/8' has host bits set; did you mean 10.0.0.0/8?" in out
    assert await r.keys(f"{{{namespace}}}*") == []


# --------------------------------------------------------------------------- ensure_library


@pytest.fixture(params=["real", "fakeredis"])
async def fresh(request: pytest.FixtureRequest) -> AsyncIterator[AsyncRedis]:
    """A server of its own (the tests below load other versions of the library)."""
    client: AsyncRedis
    if request.param == "real":
        factory: Callable[..., RedisProcess] = request.getfixturevalue("redis_factory")
        client = AsyncRedis.from_url(factory().url, decode_responses=True)
    else:
        client = fakeredis.FakeAsyncRedis(
            server=fakeredis.FakeServer(version=(7,)), decode_responses=True
        )
    yield client
    await client.aclose()


async def _libraries(client: AsyncRedis) -> list[dict[str, Any]]:
    """FUNCTION LIST WITHCODE as dicts (RESP2 replies are flat lists)."""

    def pairs(flat: Any) -> dict[str, Any]:
        return dict(zip(flat[::2], flat[1::2], strict=True)) if isinstance(flat, list) else flat

    libraries = [pairs(lib) for lib in await client.function_list(withcode=True)]
    for lib in libraries:
        lib["functions"] = [pairs(f) for f in lib["functions"]]
    return libraries


async def _server_version(client: AsyncRedis) -> int:
    return int(await client.fcall_ro("banbus_version", 0))


@pytest.mark.anyio
async def test_ensure_library_loads_once(fresh: AsyncRedis) -> None:
    assert await fresh.function_list() == []
    assert await ensure_library(fresh) == LIBRARY_VERSION
    listing = await _libraries(fresh)
    assert [lib["library_name"] for lib in listing] == [LIBRARY_NAME]
    assert listing[0]["library_code"] == LIBRARY_CODE
    names = {f["name"] for f in listing[0]["functions"]}
    assert names == {
        "banbus_ban",
        "banbus_allow",
        "banbus_unban",
        "banbus_disallow",
        "banbus_clear",
        "banbus_repair",
        "banbus_state",
        "banbus_digest",
        "banbus_check",
        "banbus_version",
        "banbus_report",
        "banbus_policy",
        "banbus_policies",
    }
    read_only = {f["name"] for f in listing[0]["functions"] if "no-writes" in f["flags"]}
    assert read_only == {"banbus_state", "banbus_digest", "banbus_check", "banbus_version",
                         "banbus_policies"}  # fmt: skip
    # A second call finds it and loads nothing: a marker library stays put.
    await fresh.function_load(code_with_version(LIBRARY_VERSION), replace=True)
    marker = code_with_version(LIBRARY_VERSION) + "\n-- marker\n"
    await fresh.function_load(marker, replace=True)
    assert await ensure_library(fresh) == LIBRARY_VERSION
    assert (await _libraries(fresh))[0]["library_code"] == marker


@pytest.mark.anyio
async def test_ensure_library_keeps_newer_replaces_older(
    fresh: AsyncRedis, caplog: pytest.LogCaptureFixture
) -> None:
    await fresh.function_load(code_with_version(LIBRARY_VERSION + 1))
    with caplog.at_level(logging.INFO, logger="banbus"):
        assert await ensure_library(fresh) == LIBRARY_VERSION + 1
    assert await _server_version(fresh) == LIBRARY_VERSION + 1
    assert "newer" in caplog.text
    await fresh.function_load(code_with_version(LIBRARY_VERSION - 1), replace=True)
    assert await ensure_library(fresh) == LIBRARY_VERSION
    assert await _server_version(fresh) == LIBRARY_VERSION


@pytest.mark.anyio
async def test_ensure_library_replaces_a_foreign_library(fresh: AsyncRedis) -> None:
    # A library of that name without banbus_version (say, a hand-made one).
    await fresh.function_load(
        "#!lua name=banbus\nredis.register_function('other', function() return 1 end)"
    )
    assert await ensure_library(fresh) == LIBRARY_VERSION
    assert await _server_version(fresh) == LIBRARY_VERSION


@pytest.mark.anyio
async def test_ensure_library_concurrently(fresh: AsyncRedis) -> None:
    results: list[int] = []

    async def one() -> None:
        results.append(await ensure_library(fresh))

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(one)
    assert results == [LIBRARY_VERSION] * 8
    assert await _server_version(fresh) == LIBRARY_VERSION


@pytest.mark.anyio
async def test_ensure_library_unreachable() -> None:
    client = AsyncRedis(
        host="127.0.0.1", port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    try:
        with pytest.raises(RedisUnavailable) as info:
            await ensure_library(client)
        assert isinstance(info.value.__cause__, redis.exceptions.ConnectionError)
    finally:
        await client.aclose()


@pytest.mark.anyio
@pytest.mark.real_redis  # fakeredis does not enforce ACLs on FUNCTION
async def test_ensure_library_refused(redis_factory: Callable[..., RedisProcess]) -> None:
    fresh = AsyncRedis.from_url(redis_factory().url, decode_responses=True)
    await fresh.function_load(code_with_version(LIBRARY_VERSION - 1))
    # A client that may not load functions (as on a replica or under an ACL).
    await fresh.execute_command("ACL", "SETUSER", "reader", "on", ">pw", "~*", "+@all", "-function")
    url = f"redis://reader:pw@{fresh.connection_pool.connection_kwargs['host']}:" + str(
        fresh.connection_pool.connection_kwargs["port"]
    )
    reader = AsyncRedis.from_url(url)
    try:
        with pytest.raises(ServerError, match="cannot load"):
            await ensure_library(reader)
    finally:
        await reader.aclose()
        await fresh.aclose()


# --------------------------------------------------------------------------- fakeredis


@pytest.mark.anyio
async def test_library_runs_on_fakeredis() -> None:
    """The embedded fallback server runs the same library (lupa, no `bit`)."""
    client = fakeredis.FakeAsyncRedis(
        server=fakeredis.FakeServer(version=(7,)), decode_responses=True
    )
    try:
        await ensure_library(client)
        ns = "fake"
        seq, _, target, expires, *_ = await fcall(
            client, "banbus_ban", ns, "::FFFF:203.0.113.7", "3600", 'a "quoted" reason'
        )
        assert (seq, target) == (1, "203.0.113.7")
        assert json.loads(await client.hget("{fake}:bans", target))[:4] == [
            expires,
            'a "quoted" reason',
            "fcall",
            1,
        ]
        assert (await fcall(client, "banbus_ban", ns, target, "60"))[3] == expires
        assert (await fcall(client, "banbus_ban", ns, target, "0", "", "EID", "e1"))[3] == 0
        retried = await fcall(client, "banbus_ban", ns, target, "0", "", "EID", "e1", "RETRY", 0)
        assert (retried[0], retried[4]) == (3, "duplicate")
        assert (await fcall(client, "banbus_unban", ns, target))[0] == 4
        assert (await fcall(client, "banbus_unban", ns, target))[4] == "absent"
        state = await client.fcall_ro("banbus_state", 1, ns)
        assert state[1] == 5 and state[4] == LIBRARY_VERSION
        with pytest.raises(UnsafeBan):
            await fcall(client, "banbus_ban", ns, "::/0", "60")
        with pytest.raises(InvalidTTL):
            await fcall(client, "banbus_ban", ns, target, "1.5")
        assert await client.xlen("{fake}:log") == 5
        sync = fakeredis.FakeRedis(server=fakeredis.FakeServer(version=(7,)))
        sync.function_load(LIBRARY_CODE)
        for text, expected in TRICKY_TARGETS:
            assert _outcome_lua(sync, "fake", text, False) == _expected(expected), text
        sync.close()
    finally:
        await client.aclose()


def test_library_code_ships_with_the_package() -> None:
    assert LIBRARY_CODE.startswith("#!lua name=banbus\n")
    assert isinstance(LIBRARY_VERSION, int) and LIBRARY_VERSION >= 1


_IPV4 = st.integers(0, 2**32 - 1).map(lambda v: str(ipaddress.IPv4Address(v)))
_IPV6 = st.integers(0, 2**128 - 1).map(lambda v: str(ipaddress.IPv6Address(v)))
_EXPIRES = st.one_of(st.just(0), st.integers(1, 4_294_967_295_000))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    entries=st.lists(
        st.tuples(st.sampled_from(["ban", "allow"]), st.one_of(_IPV4, _IPV6), _EXPIRES),
        max_size=12,
        unique_by=lambda e: (e[0], e[1]),
    )
)
def test_digest_matches_python(
    sync_client: redis.Redis, entries: list[tuple[str, str, int]]
) -> None:
    """The library's digest (Lua, doubles) equals banbus._digest's (Python, big ints)."""
    from banbus._digest import Digest, entry_hash

    ns = "digest-parity"
    sync_client.delete("{digest-parity}:bans", "{digest-parity}:allow", "{digest-parity}:head")
    expected = Digest()
    for kind, target, expires in entries:
        key = "{digest-parity}:bans" if kind == "ban" else "{digest-parity}:allow"
        sync_client.hset(key, target, json.dumps([expires, "", "x", 1]))
        expected = expected.add(entry_hash(kind, target, expires))
    sync_client.fcall("banbus_repair", 1, ns)
    _, _, status, d1, d2, n = sync_client.fcall_ro("banbus_digest", 1, ns, 0)
    assert status == b"ok"
    assert Digest(d1, d2, n) == expected


@pytest.mark.anyio
async def test_short_reply_without_status(r: AsyncRedis, namespace: str) -> None:
    """Without STATUS a write answers as library v3 did: nodes of that version keep working."""
    reply = await r.fcall("banbus_ban", 1, namespace, "203.0.113.7", 60, "", "EID", "v3-node.1")
    assert len(reply) == 4 and reply[0] == 1 and reply[2] == "203.0.113.7"
    assert len(await r.fcall("banbus_unban", 1, namespace, "203.0.113.7")) == 4
    assert len(await r.fcall("banbus_clear", 1, namespace)) == 4
