"""The ``banbus`` command line (also ``python -m banbus``).

Exit codes: 0 success (``check``: not banned), 1 ``check``: banned,
2 error (bad input, Redis unreachable, server refused) — one line on stderr,
nothing written.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import fnmatch
import io
import json
import math
import os
import re
import socket
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

import msgspec
import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from ._blocklist import Parsed, parse_lines
from ._exceptions import BanbusError, InvalidInput, RedisUnavailable
from ._heartbeat import Beat, node_key, nodes_key
from ._keys import namespace_keys
from ._library import LIBRARY_VERSION, ensure_library, translate_error
from ._model import (
    Entry,
    Notice,
    check_origin,
    check_reason,
    decode_entry,
    entry_decoder,
    parse_ttl,
)
from ._policy import BUILTIN_POLICIES, check_kind, check_weight, escape_text, sanitise_detail
from ._targets import format_target, parse_target
from ._topology import open_topology, redirected
from ._version import __version__

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Sequence

__all__ = ["main"]

DEFAULT_URL = "redis://127.0.0.1:6379/0"
#: Commands that write nothing (``--origin`` is a filter there, or absent).
READING = ("list", "status", "export")
EXIT_OK, EXIT_BANNED, EXIT_ERROR = 0, 1, 2


def _default_origin() -> str:
    """``cli@<host>``: who made a CLI change, in the record and the stream."""
    host = re.sub(r"[^A-Za-z0-9._:@-]", "-", socket.gethostname())
    return f"cli@{host}"[:64]


def _globals(parser: argparse.ArgumentParser, defaults: bool, origin: bool = True) -> None:
    """--redis, --namespace, --origin: before the command (with defaults) or after it.

    (Commands that write nothing take ``--origin`` as a filter, or not at all.)
    """

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--redis", metavar="URL",
        default=default(os.environ.get("BANBUS_REDIS_URL", DEFAULT_URL)),
        help="Redis URL: redis://, rediss://, unix://, redis+sentinel://, redis+cluster:// "
        "(env BANBUS_REDIS_URL; default " + DEFAULT_URL + ")",
    )  # fmt: skip
    parser.add_argument(
        "--namespace", "-n", default=default(os.environ.get("BANBUS_NAMESPACE", "banbus")),
        help="namespace (env BANBUS_NAMESPACE; default banbus)",
    )  # fmt: skip
    if not origin:
        return
    parser.add_argument(
        "--origin", default=default(os.environ.get("BANBUS_ORIGIN") or _default_origin()),
        help="who makes this change, as recorded (env BANBUS_ORIGIN; default cli@HOSTNAME)",
    )  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="banbus",
        description="Cluster-wide IP bans over Redis: ban, unban, allow, inspect, follow.",
        epilog="Exit codes: 0 ok (check: not banned), 1 check: banned, 2 error. "
        "Options --redis, --namespace and --origin go before or after the command.",
    )
    parser.add_argument("--version", action="version", version=f"banbus {__version__} "
                        f"(function library v{LIBRARY_VERSION})")  # fmt: skip
    _globals(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _globals(common, defaults=False)
    reading = argparse.ArgumentParser(add_help=False)
    _globals(reading, defaults=False, origin=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    real_add = sub.add_parser

    def add_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        if name != "demo":
            kwargs.setdefault("parents", [reading if name in READING else common])
        return real_add(name, **kwargs)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    for name, text in (("ban", "ban an address or CIDR network everywhere"),
                       ("allow", "allowlist an address or network (beats every ban)")):  # fmt: skip
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("target", help="IPv4/IPv6 address or CIDR network")
        p.add_argument("--ttl", default="0", help="90s, 10m, 1h, 7d, 2w or seconds; 0 = permanent")
        p.add_argument("--reason", default="", help="free text, at most 512 bytes")
        p.add_argument("--force", action="store_true",
                       help="accept a prefix wider than the minimum (never /0)")  # fmt: skip
        p.add_argument("--replace", action="store_true",
                       help="set the expiry exactly instead of keeping the later one")  # fmt: skip
    removals = (
        ("unban", "lift a ban (exactly this target)"),
        ("disallow", "remove an allowlist entry (exactly this target)"),
    )
    for name, text in removals:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("target")
    p = sub.add_parser(
        "clear",
        help="delete every ban and allowlist entry of the namespace",
        description="Empty the namespace on purpose (one 'clear' event in the log).  Running "
        "nodes drop what they hold; nobody re-seeds it (they would after an accidental loss).",
    )
    p.add_argument("--yes", action="store_true", help="really do it (required)")
    p = sub.add_parser(
        "repair",
        help="repair the namespace's bookkeeping after hand edits",
        description="Recompute the record's digest from the record (after HSET/HDEL by hand; "
        "nodes then reload) and reset a stream whose ids were pushed far into the future "
        "(a hand-written XADD).  Costs one pass over the record inside Redis.",
    )
    p = sub.add_parser("list", help="list current bans and allowlist entries")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--reason", dest="reason_filter", help="only entries whose reason has this")
    p.add_argument(
        "--origin", dest="origin_filter", metavar="ORIGIN",
        help="only entries last written by this origin ('cli@*' patterns too)",
    )  # fmt: skip
    p.add_argument("--covering", metavar="IP", help="only entries that cover this address")
    p.add_argument("--limit", type=int, default=0, help="at most this many of each kind")
    p = sub.add_parser("check", help="is this IP banned? (exit 0 no, 1 yes, 2 error)")
    p.add_argument("ip")
    p = sub.add_parser("watch", help="follow the event stream live, one line per event")
    p.add_argument(
        "--from", dest="start", default="$",
        help="stream id to start after ('0' = from the beginning; default: new events)",
    )  # fmt: skip
    p.add_argument("--count", type=int, default=0, help="exit after this many events")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p = sub.add_parser(
        "report", help="count an offense (the report that crosses the kind's policy bans)"
    )
    p.add_argument("ip", help="the address that offended")
    p.add_argument("kind", help="the policy: scan, auth, or one set with 'policy set'")
    p.add_argument("--weight", type=int, default=1, help="offenses it counts for (default 1)")
    p.add_argument("--detail", default="", help="context for the reason (sanitised)")
    policy = sub.add_parser("policy", help="auto-ban policies: set, list, delete")
    psub = policy.add_subparsers(dest="action", metavar="ACTION", required=True)
    real_padd = psub.add_parser

    def add_action(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs.setdefault("parents", [common])
        return real_padd(name, **kwargs)

    psub.add_parser = add_action  # type: ignore[method-assign]
    p = psub.add_parser(
        "set", help="create or change a policy",
        description="Ban an address when THRESHOLD offenses fall within WINDOW.  Options not "
        "given keep their current value (a new policy needs --threshold, --window and --ttl).",
    )  # fmt: skip
    p.add_argument("kind")
    p.add_argument("--threshold", type=int, help="offenses within the window that ban")
    p.add_argument("--window", help="the sliding window: 90s, 10m, 1h, 1d …")
    p.add_argument("--ttl", help="the first ban's length (0 = permanent)")
    p.add_argument("--escalate", help="each further ban within --forget lasts this many times "
                   "longer (1 = no escalation)")  # fmt: skip
    p.add_argument("--max-ttl", dest="max_ttl", help="the longest an escalated ban lasts")
    p.add_argument("--forget", help="strikes are forgotten this long after the last ban ended")
    p.add_argument("--ipv4-prefix", dest="ipv4_prefix", type=int,
                   help="count and ban IPv4 addresses as this prefix (default 32)")  # fmt: skip
    p.add_argument("--ipv6-prefix", dest="ipv6_prefix", type=int,
                   help="count and ban IPv6 addresses as this prefix (default 64)")  # fmt: skip
    shadow = p.add_mutually_exclusive_group()
    shadow.add_argument("--shadow", dest="shadow", action="store_const", const=1,
                        help="count, and record 'would ban', but ban nothing")  # fmt: skip
    shadow.add_argument("--enforce", dest="shadow", action="store_const", const=0,
                        help="leave shadow mode")  # fmt: skip
    p = psub.add_parser("list", help="the policies in force (built-in ones included)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = psub.add_parser("delete", help="delete a policy (a built-in one reverts to its default)")
    p.add_argument("kind")
    p = sub.add_parser(
        "status", help="the namespace and its live nodes (heartbeats)",
        description="The namespace (bans, allowlist, stream, function library) and every node "
        "that sent a heartbeat within three of its intervals: lag, bans held, connections "
        "tracked and cut, outbox.",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser(
        "import", help="ban every target of a blocklist (plain, FireHOL, Spamhaus DROP, CSV)",
        description="Read a blocklist — one address or network per line with # or ; comments "
        "(plain, FireHOL .netset/.ipset, Spamhaus DROP/EDROP), or CSV target,ttl,reason — "
        "validate every line, then ban them all, pipelined.  Invalid lines are reported with "
        "their number and skipped (--strict: nothing is written).",
    )  # fmt: skip
    p.add_argument("file", help="the list, or - for standard input")
    p.add_argument("--format", dest="fmt", choices=("auto", "plain", "csv"), default="auto")
    p.add_argument("--ttl", default="0", help="for lines without one (default: permanent)")
    p.add_argument("--reason", default=None,
                   help="for lines without one (default: the list's comment, else 'import "
                   "FILE')")  # fmt: skip
    p.add_argument("--force", action="store_true", help="accept prefixes wider than the minimum")
    p.add_argument("--strict", action="store_true", help="any invalid line: write nothing")
    p.add_argument("--dry-run", action="store_true", help="validate and count; write nothing")
    p.add_argument("--allow", action="store_true", help="import into the allowlist instead")
    p = sub.add_parser("export", help="write the bans (or --allow: the allowlist) as a list")
    p.add_argument("--format", dest="fmt", choices=("plain", "csv", "json"), default="plain",
                   help="plain: one target per line; csv: target,ttl,reason (what import "
                   "reads back); json: as list --json")  # fmt: skip
    p.add_argument("--allow", action="store_true", help="the allowlist instead of the bans")
    p = sub.add_parser(
        "agent", help="enforce for every server on this host: nftables + socket destroy",
        description="Follow the namespace and mirror it into nftables (table inet banbus), and "
        "destroy established inbound TCP connections from each banned target.  Needs root or "
        "CAP_NET_ADMIN.  'banbus agent status' prints the table's element counts.",
    )  # fmt: skip
    p.add_argument("action", nargs="?", choices=("run", "status"), default="run")
    p.add_argument("--table", default="banbus", help="nftables table (family inet)")
    p.add_argument("--hook-priority", type=int, default=-10, help="input hook priority")
    p.add_argument("--ports", type=_ports, default=[],
                   help="only these local TCP ports: 25,443,8000-8010")  # fmt: skip
    p.add_argument("--action", dest="verdict", choices=("drop", "reject"), default="drop")
    p.add_argument("--keep", action="store_true", help="leave the table in place on exit")
    p.add_argument("--dry-run", action="store_true", help="print the ruleset and elements")
    p.add_argument("--node-id", default=None, help="default agent@HOSTNAME")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="serve Prometheus metrics here (banbus[metrics])")  # fmt: skip
    sub.add_parser(
        "load-library",
        help="load the function library into Redis (after a restart without persistence)",
        description="Load (or upgrade) the banbus function library, so that redis-cli FCALL "
        "works before any node or CLI call has run.  Any other command does it too.",
    )  # fmt: skip
    p = sub.add_parser("demo", help="run the live demo (3 nodes, a scanner, a ban)",
                       add_help=False)  # fmt: skip
    p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if args_list and args_list[0] == "demo":
        from ._demo import main as demo_main

        code: int = demo_main(args_list[1:])
        return code
    args = parser.parse_args(args_list)
    if args.command == "demo":  # `banbus --redis URL demo …`
        from ._demo import main as demo_main

        code = demo_main(["--redis", args.redis, *args.rest])
        return code
    try:
        namespace_keys(args.namespace)
        check_origin(args.origin)
        if args.command == "agent":
            return _agent(args)
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return EXIT_OK if args.command == "watch" else 130
    except BanbusError as exc:
        return _fail(_for_cli(str(exc)))
    except (redis_errors.RedisError, OSError, UnicodeError, ValueError) as exc:
        # Not Redis at that address, a protocol error, text that cannot be
        # sent…: one line, exit 2 — never the 1 that `check` uses for "banned".
        if os.environ.get("BANBUS_DEBUG"):
            raise
        hint = ""
        if isinstance(exc, redis_errors.InvalidResponse):
            hint = f" — is something other than Redis listening at {_safe_url(args.redis)}?"
        return _fail(f"{type(exc).__name__}: {exc}{hint}")


def _ports(text: str) -> list[int]:
    ports: list[int] = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a list of ports like 25,443,8000-8010"
            )
        first, last = int(low), int(high or low)
        if not 1 <= first <= last <= 65535:
            raise argparse.ArgumentTypeError(f"port range {part!r} is outside 1-65535")
        ports.extend(range(first, last + 1))
    return ports


def _agent(args: argparse.Namespace) -> int:
    from . import agent
    from ._nft import NftError, NftUnavailable

    try:
        if args.action == "status":
            beat, now = asyncio.run(_agent_beat(args))
            print(agent.agent_status(args.table, beat, now))
            return EXIT_OK
        args.action = args.verdict
        return asyncio.run(agent.run_agent(args))
    except (NftUnavailable, NftError) as exc:
        hint = ""
        if "Operation not permitted" in str(exc):
            hint = " (the agent needs root or CAP_NET_ADMIN)"
        return _fail(f"nftables: {exc}{hint}")


async def _agent_beat(args: argparse.Namespace) -> tuple[Beat | None, int]:
    """This host's agent heartbeat, if Redis answers (status works without it)."""
    node_id = args.node_id or f"agent@{socket.gethostname()}"[:64]
    topology = open_topology(args.redis, namespace_keys(args.namespace))
    try:
        await topology.start(0.0 if topology.kind == "server" else 5.0)
        seconds, micros = await topology.client.time()
        raw = await topology.client.get(node_key(args.namespace, node_id))
        now = int(seconds) * 1000 + int(micros) // 1000
        return (msgspec.json.decode(raw, type=Beat) if raw else None), now
    except (BanbusError, redis_errors.RedisError, OSError, msgspec.DecodeError):
        return None, 0
    finally:
        await topology.aclose()


def _fail(message: str) -> int:
    print(f"banbus: error: {_human(message)}", file=sys.stderr)
    return EXIT_ERROR


def _for_cli(message: str) -> str:
    """Error texts name the Python or FCALL spelling of an option: say the CLI's."""
    return (
        message.replace("pass force=True to override", "add --force to override")
        .replace("pass FORCE to override", "add --force to override")
        .replace("pass force=True", "add --force")
    )


async def _run(args: argparse.Namespace) -> int:
    commands: dict[str, Callable[[aioredis.Redis, argparse.Namespace], Coroutine[Any, Any, int]]]
    commands = {
        "ban": _cmd_write, "allow": _cmd_write, "unban": _cmd_remove, "disallow": _cmd_remove,
        "list": _cmd_list, "check": _cmd_check, "watch": _cmd_watch, "clear": _cmd_clear,
        "repair": _cmd_repair, "report": _cmd_report, "policy": _cmd_policy,
        "load-library": _cmd_load_library, "status": _cmd_status, "import": _cmd_import,
        "export": _cmd_export,
    }  # fmt: skip
    # Validate before connecting: bad input writes nothing and needs no server.
    if args.command in ("ban", "allow"):
        # Syntax here; the prefix limits are the namespace's (its {ns}:config may
        # loosen them), checked by the function library.
        args.canonical = parse_target(args.target, force=True).text
        args.seconds = parse_ttl(args.ttl)
        args.reason = check_reason(args.reason)
    elif args.command in ("unban", "disallow"):
        args.canonical = parse_target(args.target, force=True).text
    elif args.command == "clear" and not args.yes:
        raise InvalidInput(
            f"clear deletes every ban of namespace {args.namespace!r}; add --yes to confirm"
        )
    elif args.command == "import":
        args.parsed = _read_blocklist(args)
        if args.dry_run or (args.strict and args.parsed.errors):
            return _import_report(args, written=0)
    elif args.command == "list" and args.covering:
        target = parse_target(args.covering)
        if target.is_network:
            raise InvalidInput(f"--covering takes one address, not the network {target.text}")
        args.covering = target.text
    elif args.command == "report":
        target = parse_target(args.ip, force=True)
        if target.is_network:
            raise InvalidInput(f"report takes the address that offended, not {target.text}")
        args.canonical = target.text
        check_kind(args.kind)
        check_weight(args.weight)
    elif args.command == "policy":
        if args.action != "list":
            check_kind(args.kind)
        if args.action == "set":
            args.fields = _policy_fields(args)
    elif args.command == "check":
        from ._targets import normalize_peer

        target = parse_target(args.ip)
        if target.is_network:
            raise InvalidInput(f"check takes one address, not the network {target.text}")
        args.canonical = normalize_peer(target.text)
    # The same URLs as Node: one server, Sentinels, or a cluster (any node).
    topology = open_topology(args.redis, namespace_keys(args.namespace))
    client = topology.client
    try:
        try:
            await topology.start(
                0.0 if topology.kind == "server" else 15.0,
                probe=None if args.command == "watch" else ensure_library,
            )
        except RedisUnavailable as exc:
            raise RedisUnavailable(f"cannot reach Redis at {_safe_url(args.redis)}: {exc}") from exc
        args.topology = topology
        if args.command != "watch":
            return await commands[args.command](client, args)
        async with asyncio.TaskGroup() as tg:  # follows the primary while watching
            follow = tg.create_task(topology.run())
            try:
                return await commands[args.command](client, args)
            finally:
                follow.cancel()
    except redis_errors.ResponseError as exc:
        raise translate_error(exc) from exc
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        raise RedisUnavailable(f"cannot reach Redis at {_safe_url(args.redis)}: {exc}") from exc
    finally:
        await topology.aclose()


def _key(args: argparse.Namespace) -> str:
    """KEYS[1] of a function call: a key of the namespace (ACLs scoped to ``~{ns}:*``)."""
    return namespace_keys(args.namespace).function_key


def _safe_url(url: str) -> str:
    if "@" in url.partition("?")[0]:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return url


async def _cmd_write(client: aioredis.Redis, args: argparse.Namespace) -> int:
    extra = [*(["FORCE"] if args.force else []), *(["REPLACE"] if args.replace else [])]
    reply = await client.fcall(
        f"banbus_{args.command}", 1, _key(args), args.canonical, args.seconds, args.reason,
        *extra, "ORIGIN", args.origin,
    )  # fmt: skip
    seq, sid, target, expires = reply[:4]
    verb = "banned" if args.command == "ban" else "allowlisted"
    print(f"{verb} {_s(target)} {_until(int(expires))} (seq {int(seq)})")
    written_ms = int(_s(sid).partition("-")[0] or 0)
    asked = written_ms + args.seconds * 1000 if args.seconds else 0
    if not args.replace and int(expires) != asked and (asked == 0 or int(expires) > asked + 1000):
        # The later of the existing and the new expiry wins (permanent wins).
        print(f"  kept the existing {'permanent ' if not int(expires) else ''}expiry, later "
              f"than the {args.ttl} asked for; --replace sets it to exactly that")  # fmt: skip
    return EXIT_OK


async def _cmd_status(client: aioredis.Redis, args: argparse.Namespace) -> int:
    keys = namespace_keys(args.namespace)
    async with client.pipeline(transaction=True) as pipe:
        pipe.time()
        pipe.hlen(keys.bans)
        pipe.hlen(keys.allow)
        pipe.xlen(keys.log)
        pipe.fcall_ro("banbus_state", 1, keys.function_key)
        pipe.zrange(nodes_key(args.namespace), 0, -1, withscores=True)
        (seconds, micros), bans, allows, length, state, members = await pipe.execute()
    now = int(seconds) * 1000 + int(micros) // 1000
    head_id, head_seq, epoch, _server, version = (_s(x) if isinstance(x, bytes) else x
                                                   for x in state)  # fmt: skip
    ids = [_s(m) for m, until in members if until > now]  # the dead are not listed
    raw = await client.mget([node_key(args.namespace, i) for i in ids]) if ids else []
    nodes = []
    for node_id, value in zip(ids, raw, strict=True):
        if value is None:
            continue  # expired between the two reads
        try:
            beat = msgspec.json.decode(value, type=Beat)
        except (msgspec.DecodeError, msgspec.ValidationError):
            print(f"banbus: warning: malformed heartbeat of {_human(node_id)} skipped",
                  file=sys.stderr)  # fmt: skip
            continue
        nodes.append(beat)
    nodes.sort(key=lambda b: b.node_id)
    summary = {
        "namespace": args.namespace, "server_time_ms": now, "library_version": int(version),
        "epoch": _s(epoch), "head_seq": int(head_seq), "head_id": _s(head_id),
        "bans": int(bans), "allows": int(allows), "stream_length": int(length),
    }  # fmt: skip
    if args.json:
        out = {**summary, "nodes": nodes}
        sys.stdout.write(msgspec.json.encode(out).decode() + "\n")
        return EXIT_OK
    print(f"namespace {args.namespace!r} at {_safe_url(args.redis)}: function library "
          f"v{int(version)}, event seq {int(head_seq)}, epoch {_s(epoch) or '-'}")  # fmt: skip
    print(f"  {int(bans):,} bans, {int(allows):,} allowlist entries, "
          f"{int(length):,} events in the stream")  # fmt: skip
    print(f"nodes ({len(nodes)} live):")
    if not nodes:
        return EXIT_OK
    rows = [("node", "host", "version", "behind", "lag", "bans", "tracked", "cut", "outbox",
             "seen")]  # fmt: skip
    for b in nodes:
        behind = max(0, int(head_seq) - b.seq)
        link = "" if b.connected else " (offline)"
        rows.append((
            _human(b.node_id) + link, _human(b.host), _human(b.version), f"{behind}",
            f"{b.lag_ms:.1f} ms", f"{b.bans:,}", f"{b.tracked:,}", f"{b.cut:,}", f"{b.outbox}",
            f"{_duration((now - b.sent_ms) / 1000)} ago",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))).rstrip())
    return EXIT_OK


def _read_blocklist(args: argparse.Namespace) -> Parsed:
    args.default_ttl = parse_ttl(args.ttl)
    if args.reason is not None:
        check_reason(args.reason)
    name = "stdin" if args.file == "-" else os.path.basename(args.file)
    args.default_reason = args.reason
    args.fallback_reason = check_reason(sanitise_detail(f"import {name}", 200))
    try:
        if args.file == "-":
            stream = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
            return parse_lines(stream, fmt=args.fmt, force=args.force)
        with open(args.file, encoding="utf-8", errors="replace") as f:
            return parse_lines(f, fmt=args.fmt, force=args.force)
    except OSError as exc:
        raise InvalidInput(f"cannot read {args.file}: {exc.strerror or exc}") from exc


def _import_report(args: argparse.Namespace, written: int) -> int:
    parsed: Parsed = args.parsed
    for number, text, why in parsed.errors[:20]:
        if text:
            print(f"banbus: {args.file}:{number}: {_human(why)} ({_quoted(text)})",
                  file=sys.stderr)  # fmt: skip
    if len(parsed.errors) > 20:
        print(f"banbus: … and {len(parsed.errors) - 20} more invalid lines", file=sys.stderr)
    valid, bad = len(parsed.lines), len(parsed.errors)
    what = "allowlisted" if args.allow else "banned"
    if args.dry_run:
        print(f"{valid:,} valid targets, {bad:,} invalid lines, {parsed.duplicates:,} "
              f"duplicates; nothing written (--dry-run)")  # fmt: skip
        return EXIT_OK if not (args.strict and bad) else EXIT_ERROR
    if args.strict and bad:
        print(f"banbus: error: {bad:,} invalid lines; nothing written (--strict)",
              file=sys.stderr)  # fmt: skip
        return EXIT_ERROR
    print(f"{what} {written:,} of {valid:,} targets ({bad:,} invalid lines skipped, "
          f"{parsed.duplicates:,} duplicates)")  # fmt: skip
    return EXIT_OK


async def _cmd_import(client: aioredis.Redis, args: argparse.Namespace) -> int:
    parsed: Parsed = args.parsed
    function = "banbus_allow" if args.allow else "banbus_ban"
    key = _key(args)
    total = len(parsed.lines)
    progress = _Progress(total, sys.stderr)
    written = 0
    batch = 2000
    for start in range(0, total, batch):
        pipe = client.pipeline(transaction=False)
        for line in parsed.lines[start : start + batch]:
            ttl = args.default_ttl if line.ttl is None else line.ttl
            reason = args.default_reason or line.reason or args.fallback_reason
            extra = ["FORCE"] if args.force else []
            pipe.fcall(function, 1, key, line.target, ttl, reason, *extra,
                       "ORIGIN", args.origin)  # fmt: skip
        replies = await pipe.execute(raise_on_error=False)
        for line, reply in zip(parsed.lines[start : start + batch], replies, strict=True):
            if isinstance(reply, Exception):
                parsed.errors.append((line.number, line.target, _for_cli(str(reply))))
            else:
                written += 1
        progress.update(min(start + batch, total))
    progress.done()
    return _import_report(args, written)


class _Progress:
    """A progress bar on a terminal; nothing otherwise (the summary line says it all)."""

    def __init__(self, total: int, out: TextIO) -> None:
        self.total, self.out = total, out
        self.tty = out.isatty() and total > 0
        self.started = time.monotonic()

    def update(self, done: int) -> None:
        if not self.tty:
            return
        width = 30
        filled = int(width * done / self.total)
        rate = done / max(time.monotonic() - self.started, 1e-6)
        self.out.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done:,}/{self.total:,} "
                       f"({rate:,.0f}/s)")  # fmt: skip
        self.out.flush()

    def done(self) -> None:
        if self.tty:
            self.out.write("\n")


async def _cmd_export(client: aioredis.Redis, args: argparse.Namespace) -> int:
    keys = namespace_keys(args.namespace)
    now = await _server_ms(client)
    args.covering = args.origin_filter = args.reason_filter = None
    args.limit = 0
    kind = "allow" if args.allow else "ban"
    records = await _records(client, keys.allow if args.allow else keys.bans, kind, now, args)
    out = sys.stdout
    if args.fmt == "json":
        out.write(msgspec.json.encode(records).decode() + "\n")
    elif args.fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["target", "ttl", "reason"])
        for r in records:
            ttl = 0 if r.remaining_s is None else max(1, math.ceil(r.remaining_s))
            writer.writerow([r.target, ttl, r.reason])
    else:
        name = "allowlist" if args.allow else "bans"
        out.write(f"# banbus {name} of namespace {args.namespace}: {len(records)} entries\n")
        for r in records:
            out.write(r.target + "\n")
    return EXIT_OK


async def _cmd_load_library(client: aioredis.Redis, args: argparse.Namespace) -> int:
    version = await ensure_library(client)  # done on connecting already: this reports it
    print(f"function library v{version} is loaded ({_safe_url(args.redis)})")
    return EXIT_OK


async def _cmd_clear(client: aioredis.Redis, args: argparse.Namespace) -> int:
    reply = await client.fcall("banbus_clear", 1, _key(args), "ORIGIN", args.origin)
    print(f"cleared namespace {args.namespace!r} (seq {int(reply[0])})")
    return EXIT_OK


async def _cmd_repair(client: aioredis.Redis, args: argparse.Namespace) -> int:
    fixed, before, after = await client.fcall("banbus_repair", 1, _key(args))
    before, after = _s(before), _s(after)
    if int(fixed):
        print(f"reset the ids of the stream of {args.namespace!r} ({int(fixed) - 1} entries "
              "from the future deleted)")  # fmt: skip
    if before == after:
        print(f"digest of {args.namespace!r} was right ({after})")
    else:
        print(f"digest of {args.namespace!r} recomputed: {before} -> {after}; nodes reload")
    return EXIT_OK


def _policy_fields(args: argparse.Namespace) -> list[str | int]:
    """``banbus policy set`` options as the library's words (durations in seconds)."""
    fields: list[str | int] = []
    for name in ("threshold", "window", "ttl", "escalate", "max_ttl", "forget", "ipv4_prefix",
                 "ipv6_prefix", "shadow"):  # fmt: skip
        value = getattr(args, name)
        if value is None:
            continue
        if name in ("window", "ttl", "max_ttl", "forget"):
            value = parse_ttl(value)
            if name in ("window", "max_ttl") and value == 0:
                raise InvalidInput(f"--{name.replace('_', '-')} must be longer than 0")
        elif name == "escalate":
            try:
                factor = float(value)
            except ValueError:
                raise InvalidInput(f"--escalate {value!r} is not a number") from None
            if not 1 <= factor <= 100:
                raise InvalidInput(f"--escalate {value} is outside 1..100")
            value = f"{factor:g}"
        fields += [name.upper(), value]
    return fields


async def _cmd_report(client: aioredis.Redis, args: argparse.Namespace) -> int:
    extra = ["DETAIL", args.detail] if args.detail else []
    reply = await client.fcall(
        "banbus_report", 1, _key(args), args.canonical, args.kind, args.weight,
        "ORIGIN", args.origin, *extra,
    )  # fmt: skip
    status, count, threshold, target, seq, _sid, expires, strike, window, ttl, reason = (
        _s(x) if isinstance(x, bytes | str) else x for x in reply
    )
    head = (
        f"{args.kind} {_human(target)}: {int(count)}/{int(threshold)} in {_duration(int(window))}"
    )
    if status == "banned":
        print(f"{head}: banned {_until(int(expires))} (strike {int(strike)}, seq {int(seq)}), "
              f"reason={_quoted(str(reason))}")  # fmt: skip
    elif status == "shadow":
        print(f"{head}: would ban for {_duration(int(ttl))} (policy in shadow mode)")
    elif status == "already":
        print(f"{head}: crossed, already banned")
    elif status == "allowed":
        print(f"{head}: crossed, but the allowlist covers it")
    else:
        print(head)
    return EXIT_OK


async def _cmd_policy(client: aioredis.Redis, args: argparse.Namespace) -> int:
    if args.action == "set":
        kind, text = await client.fcall("banbus_policy", 1, _key(args), "SET", args.kind,
                                        *args.fields)  # fmt: skip
        print(f"{_s(kind)}: {_s(text)}")
        return EXIT_OK
    if args.action == "delete":
        removed = await client.fcall("banbus_policy", 1, _key(args), "DELETE", args.kind)
        if args.kind in BUILTIN_POLICIES:
            print(f"{args.kind}: back to the built-in default")
        elif int(removed):
            print(f"{args.kind}: deleted")
        else:
            print(f"{args.kind}: no such policy; nothing to do")
        return EXIT_OK
    rows = await client.fcall_ro("banbus_policies", 1, _key(args))
    items = []
    for row in rows:
        kind, text, source, crossings = _s(row[0]), _s(row[1]), _s(row[2]), int(row[3])
        items.append({"kind": kind, "policy": text, "source": source,
                      "shadow_crossings": crossings})  # fmt: skip
    if args.json:
        print(json.dumps(items))  # exact, and only ASCII on the terminal
        return EXIT_OK
    for item in items:
        extra = (
            f"  (shadow crossings: {item['shadow_crossings']})" if item["shadow_crossings"] else ""
        )
        print(f"{_human(str(item['kind'])):<12} {_human(str(item['policy']))}  "
              f"[{_human(str(item['source']))}]{extra}")  # fmt: skip
    return EXIT_OK


async def _cmd_remove(client: aioredis.Redis, args: argparse.Namespace) -> int:
    reply = await client.fcall(
        f"banbus_{args.command}", 1, _key(args), args.canonical, "ORIGIN", args.origin, "STATUS"
    )
    seq = int(reply[0])
    what = "ban on" if args.command == "unban" else "allowlist entry for"
    if _s(reply[4]) != "absent":
        print(f"removed {what} {args.canonical} (seq {seq})")
        return EXIT_OK
    print(f"no {what} {args.canonical}; nothing to do (the removal is remembered)")
    if "/" not in args.canonical:
        keys = namespace_keys(args.namespace)
        table = keys.bans if args.command == "unban" else keys.allow
        covering = await _covering(client, table, args.canonical)
        if covering is not None:
            verb = "unban" if args.command == "unban" else "disallow"
            net, entry = covering
            print(f"  {args.canonical} is covered by {net} ({_until(entry.expires)}); "
                  f"banbus {verb} {net} lifts it")  # fmt: skip
    return EXIT_OK


async def _covering(client: aioredis.Redis, table: str, address: str) -> tuple[str, Entry] | None:
    """The live entry of *table* that covers *address* (itself or a network), if any."""
    candidates = _candidates(address)
    async with client.pipeline(transaction=True) as pipe:
        pipe.time()
        pipe.hmget(table, candidates)
        (seconds, micros), values = await pipe.execute()
    return _active(candidates, values, int(seconds) * 1000 + int(micros) // 1000)


def _active(
    candidates: list[str], values: list[bytes | None], now: int
) -> tuple[str, Entry] | None:
    for target, value in zip(candidates, values, strict=True):
        if value is None:
            continue
        try:
            entry = entry_decoder.decode(value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        if not entry.expires or entry.expires > now:
            return target, entry
    return None


async def _server_ms(client: aioredis.Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


class _Listed(msgspec.Struct, kw_only=True):
    """One entry as ``banbus list`` shows it (``--json``: these keys)."""

    target: str
    kind: str
    #: Server ms; 0 = permanent.
    expires: int
    #: Seconds left (None: permanent).
    remaining_s: float | None
    #: Server ms the entry was first written while live (None: written by an
    #: older library, which did not keep it).
    created: int | None
    #: Who last wrote it.
    origin: str
    reason: str
    seq: int


class _Stored(msgspec.Struct, array_like=True):
    expires: int
    reason: str = ""
    origin: str = ""
    seq: int = 0
    created: int = 0


_stored_decoder = msgspec.json.Decoder(_Stored)


async def _records(
    client: aioredis.Redis, key: str, kind: str, now: int, args: argparse.Namespace
) -> list[_Listed]:
    out: list[_Listed] = []
    covering = set(_candidates(args.covering)) if args.covering else None
    async for field, value in client.hscan_iter(key, count=5000):
        target = _s(field)
        try:
            entry = _stored_decoder.decode(value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            print(f"banbus: warning: malformed record {key}[{_human(repr(target))}] skipped",
                  file=sys.stderr)  # fmt: skip
            continue
        if entry.expires and entry.expires <= now:
            continue  # expired: the next write purges it
        if covering is not None and target not in covering:
            continue
        if args.origin_filter and not fnmatch.fnmatchcase(entry.origin, args.origin_filter):
            continue
        if args.reason_filter and args.reason_filter.lower() not in entry.reason.lower():
            continue
        remaining = (entry.expires - now) / 1000 if entry.expires else None
        out.append(_Listed(target=target, kind=kind, expires=entry.expires,
                           remaining_s=remaining, created=entry.created or None,
                           origin=entry.origin, reason=entry.reason, seq=entry.seq))  # fmt: skip
    out.sort(key=lambda r: r.target)
    return out[: args.limit] if args.limit else out


async def _cmd_list(client: aioredis.Redis, args: argparse.Namespace) -> int:
    keys = namespace_keys(args.namespace)
    now = await _server_ms(client)
    bans = await _records(client, keys.bans, "ban", now, args)
    allows = await _records(client, keys.allow, "allow", now, args)
    if args.json:
        out = {"server_time_ms": now, "bans": bans, "allow": allows}
        sys.stdout.write(msgspec.json.encode(out).decode() + "\n")
        return EXIT_OK
    _table(sys.stdout, "bans", bans, now)
    _table(sys.stdout, "allowlist", allows, now)
    return EXIT_OK


def _table(out: TextIO, title: str, records: list[_Listed], now: int) -> None:
    out.write(f"{title} ({len(records)}):\n")
    if not records:
        return
    width = max(len(_human(r.target)) for r in records)
    for r in records:
        left = "permanent" if r.remaining_s is None else f"{_duration(r.remaining_s)} left"
        made = f"made {_duration((now - r.created) / 1000)} ago" if r.created else "made ?"
        reason = f"  {_quoted(r.reason)}" if r.reason else ""
        out.write(f"  {_human(r.target):<{width}}  {left:<16} {made:<17} by "
                  f"{_human(r.origin) or '?'}{reason}\n")  # fmt: skip


def _candidates(ip: str) -> list[str]:
    """*ip* and every network that could cover it, in canonical text."""
    t = parse_target(ip)
    bits = 32 if t.version == 4 else 128
    return [
        format_target(t.version, (t.value >> (bits - plen)) << (bits - plen), plen)
        for plen in range(bits, 0, -1)
    ]


async def _cmd_check(client: aioredis.Redis, args: argparse.Namespace) -> int:
    keys = namespace_keys(args.namespace)
    candidates = _candidates(args.canonical)
    async with client.pipeline(transaction=True) as pipe:
        pipe.time()
        pipe.hmget(keys.bans, candidates)
        pipe.hmget(keys.allow, candidates)
        (seconds, micros), bans, allows = await pipe.execute()
    now = int(seconds) * 1000 + int(micros) // 1000
    allowed, banned = _active(candidates, allows, now), _active(candidates, bans, now)
    if banned is None:
        print(f"{args.canonical} is not banned")
        return EXIT_OK
    target, entry = banned
    if allowed is not None:
        print(f"{args.canonical} is not banned: allowlisted by {allowed[0]} "
              f"(ban {target} is overridden)")  # fmt: skip
        return EXIT_OK
    how = "" if target == args.canonical else f" by {target}"
    reason = f", reason {_quoted(entry.reason)}" if entry.reason else ""
    origin = f", by {_human(entry.origin)}" if entry.origin else ""
    print(f"{args.canonical} is banned{how} {_until(entry.expires, now)}{origin}{reason}")
    return EXIT_BANNED


async def _cmd_watch(client: aioredis.Redis, args: argparse.Namespace) -> int:
    key = namespace_keys(args.namespace).log
    cursor = args.start
    if cursor == "$":
        last: Any = await client.xrevrange(key, count=1)
        cursor = _s(last[0][0]) if last else "0-0"
    seen = 0
    topology = args.topology
    while True:
        try:
            reply: Any = await client.xread({key: cursor}, count=100, block=1000)
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            # A failover, a slot move, a restart: find the primary, read on
            # from the last entry printed.
            print(f"banbus: lost Redis ({exc}); reconnecting", file=sys.stderr)
            topology.suspect(str(exc))
            await asyncio.sleep(0.5)
            continue
        except redis_errors.ResponseError as exc:
            if not redirected(exc):
                raise
            topology.suspect(str(exc))
            await asyncio.sleep(0.2)
            continue
        for _stream, entries in reply or ():
            for entry_id, raw in entries:
                cursor = _s(entry_id)
                fields = {_s(k): _s(v) for k, v in raw.items()}
                print(_event_line(cursor, fields, args.json), flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    return EXIT_OK


def _event_line(entry_id: str, fields: dict[str, str], as_json: bool) -> str:
    stamp = dt.datetime.fromtimestamp(int(entry_id.partition("-")[0]) / 1000, dt.UTC)
    when = stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    try:
        event = decode_entry(fields)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        if as_json:
            return json.dumps({"id": entry_id, "malformed": str(exc), "fields": fields})
        return _human(f"{when}  {entry_id}  malformed entry skipped by nodes: {exc}  {fields}")
    if as_json:
        data = msgspec.to_builtins(event)
        return json.dumps({"id": entry_id, "time": when, **data}, ensure_ascii=False)
    if isinstance(event, Notice):
        if event.name != "would_ban":
            return (f"{when}  {entry_id}  {_human(event.name)}: not an op of this version, "
                    "skipped by nodes (a newer version's notice, or written by hand)")  # fmt: skip
        return "  ".join([
            when, "would ban", _human(event.target), f"for {_duration(event.ttl)}",
            f"reason={_quoted(event.reason)}",
            f"origin={_human(event.origin) or '?'}", "(shadow mode)",
        ])  # fmt: skip
    op = type(event).__name__.lower()
    parts = [when, f"{op:<8}", _human(getattr(event, "target", "*"))]
    expires = getattr(event, "expires", None)
    if expires is not None:
        parts.append(_until(expires, int(entry_id.partition("-")[0])))
    reason = getattr(event, "reason", "")
    if reason:
        parts.append(f"reason={_quoted(reason)}")
    parts += [f"origin={_human(event.origin) or '?'}", f"seq={event.seq}"]
    return "  ".join(parts)


def _quoted(text: str) -> str:
    """*text* in double quotes for a terminal (JSON escapes, then C1/bidi escaped)."""
    return _human(json.dumps(text, ensure_ascii=False))


def _until(expires: int, now: int | None = None) -> str:
    if not expires:
        return "permanently"
    stamp = dt.datetime.fromtimestamp(expires / 1000, dt.UTC).isoformat(timespec="seconds")
    stamp = stamp.replace("+00:00", "Z")
    if now is None:
        return f"until {stamp}"
    return f"until {stamp} ({_duration((expires - now) / 1000)})"


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}{_duration(seconds % size) if seconds % size else ''}"
    return f"{seconds}s"


_human = escape_text  # everything printed for humans goes through it


def _s(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
