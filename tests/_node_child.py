"""A banbus node in its own process, driven line by line over stdin (test helper).

Usage: ``python tests/_node_child.py URL NAMESPACE NODE_ID``.  Prints ``ready``
once the node is in sync, then answers one line per command:

* ``ban TARGET`` -> ``seq N`` (the ban's sequence number)
* ``wait SEQ IP...`` -> waits until event SEQ was applied, then
  ``banned IP=0|1 ...``
* ``stats`` -> one JSON object: the node's statistics and its active bans
* ``quit`` -> closes the node and exits 0
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


async def main(url: str, namespace: str, node_id: str) -> None:
    async with banbus.Node(url, namespace=namespace, node_id=node_id) as node:
        _say("ready")
        while True:
            line = await anyio.to_thread.run_sync(sys.stdin.readline)
            words = line.split()
            if not words or words[0] == "quit":
                break
            if words[0] == "ban":
                record = await node.ban(words[1])
                _say(f"seq {record.seq}")
            elif words[0] == "wait":
                with anyio.fail_after(30):
                    await node.wait_for_seq(int(words[1]))
                _say("banned " + " ".join(f"{ip}={int(node.is_banned(ip))}" for ip in words[2:]))
            elif words[0] == "stats":
                data = msgspec.to_builtins(node.statistics())
                data["bans"] = sorted(r.target for r in node.bans())
                _say(json.dumps(data))
            else:
                _say(f"error unknown command {words[0]!r}")


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:4])
