"""A banbus node in its own process, driven line by line over stdin (test helper).

Usage: ``python tests/_node_child.py URL NAMESPACE NODE_ID [OPTIONS_JSON]``.
Prints ``ready`` once the node is in sync, then answers one line per command:

* ``ban TARGET [TTL]`` -> ``seq N`` (the ban's sequence number; 0 = queued)
* ``unban|allow|disallow TARGET [TTL]`` -> ``seq N`` / ``ok``
* ``wait SEQ IP...`` -> waits until event SEQ was applied, then
  ``banned IP=0|1 ...``
* ``sync SEQ`` -> ``synced`` once event SEQ was applied
* ``stats`` -> one JSON object: the node's statistics and its active bans
* ``dump`` -> one JSON array: ``[kind, target, expires_ms]`` of what it enforces
* ``storm IP KIND TASKS ROUNDS`` -> TASKS tasks report IP ROUNDS times each;
  one JSON object: the bans this process's reports created, the outcomes
* ``quit`` -> closes the node and exits 0

Errors of a command are answered ``error <message>`` (the node lives on).
"""

from __future__ import annotations

import json
import sys

import anyio
import anyio.to_thread
import msgspec

import banbus


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _run(node: banbus.Node, words: list[str]) -> str:
    command = words[0]
    if command in ("ban", "allow"):
        ttl = int(words[2]) if len(words) > 2 else 0
        method = node.ban if command == "ban" else node.allow
        record = await method(words[1], ttl)
        return f"seq {record.seq}"
    if command in ("unban", "disallow"):
        method = node.unban if command == "unban" else node.disallow
        return f"ok {int(await method(words[1]))}"
    if command == "wait":
        with anyio.fail_after(30):
            await node.wait_for_seq(int(words[1]))
        return "banned " + " ".join(f"{ip}={int(node.is_banned(ip))}" for ip in words[2:])
    if command == "sync":
        with anyio.fail_after(30):
            await node.wait_for_seq(int(words[1]))
        return "synced"
    if command == "stats":
        data = msgspec.to_builtins(node.statistics())
        data["bans"] = sorted(r.target for r in node.bans())
        return json.dumps(data)
    if command == "dump":
        rows = [["ban", r.target, r.expires] for r in node.bans()]
        rows += [["allow", r.target, r.expires] for r in node.allows()]
        return json.dumps(rows)
    if command == "storm":
        # storm IP KIND TASKS ROUNDS: TASKS tasks each report ROUNDS times.
        ip, kind, tasks, rounds = words[1], words[2], int(words[3]), int(words[4])
        outcomes: list[str] = []
        banned: list[str] = []

        async def reporter() -> None:
            for _ in range(rounds):
                report = await node.report(ip, kind)
                outcomes.append(report.status)
                if report.banned is not None:
                    banned.append(report.banned.target)
                await anyio.sleep(0)

        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(reporter)
        counts = {s: outcomes.count(s) for s in sorted(set(outcomes))}
        return json.dumps({"banned": banned, "outcomes": counts,
                           "banned_here": node.is_banned(ip)})  # fmt: skip
    return f"error unknown command {command!r}"


async def main(url: str, namespace: str, node_id: str, options: str = "{}") -> None:
    async with banbus.Node(
        url, namespace=namespace, node_id=node_id, **json.loads(options)
    ) as node:
        _say("ready")
        while True:
            line = await anyio.to_thread.run_sync(sys.stdin.readline)
            words = line.split()
            if not words or words[0] == "quit":
                break
            try:
                _say(await _run(node, words))
            except banbus.BanbusError as exc:
                _say(f"error {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:5])
