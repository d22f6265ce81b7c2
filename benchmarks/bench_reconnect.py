"""Bans lost when a subscriber's connection drops during a burst: pub/sub vs banbus.

The coordinator issues a burst of bans, each both as ``FCALL banbus_ban`` (read
by a banbus node from the stream) and as ``PUBLISH`` (read by a plain redis-py
pub/sub subscriber, fire-and-forget).  A third of the way through it kills
both readers' connections with ``CLIENT KILL ID``; both reconnect with the
same first backoff (25–50 ms).  Afterwards the banbus node is given time to
catch up (``wait_for_seq``) and each side counts the bans it does not have.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from _common import (
    Resp,
    Result,
    client_id,
    command,
    source_ip,
    start_workers,
    stop_workers,
)

if TYPE_CHECKING:
    from _context import Context


async def run(ctx: Context) -> list[Result]:
    ns = ctx.ns("reconnect")
    channel = "{" + ctx.ns("pubsub") + "}:bans"
    n = 2000 if ctx.quick else 5000
    kill_at = n // 3
    per_ms = 2  # bans per millisecond-ish step: the burst lasts ~n/2 ms plus overhead
    node_id = f"reconnect-{ctx.run_id}"
    sub_name = f"bench-pubsub-{ctx.run_id}"
    workers = await start_workers(
        [
            ("reconnect-node", "node", ["--redis", ctx.url, "--ns", ns, "--node-id", node_id]),
            (
                "reconnect-pubsub",
                "pubsub",
                ["--redis", ctx.url, "--channel", channel, "--name", sub_name],
            ),
        ]
    )
    node, sub = workers
    resp = await Resp.open(ctx.url, name="bench-burst")
    targets = [source_ip(60 + i // 60000, i % 60000) for i in range(n)]
    try:
        await node.request("record", all=False, target=None)
        reader_id = client_id(ctx.url, f"banbus-reader:{node_id}")
        sub_id = client_id(ctx.url, sub_name)
        if reader_id is None or sub_id is None:
            raise RuntimeError(f"could not find the reader ({reader_id}) or subscriber ({sub_id})")
        last = None
        for i, ip in enumerate(targets):
            last = resp.call("FCALL", "banbus_ban", 1, ns, ip, 3600, "burst")
            resp.call("PUBLISH", channel, ip)
            if i == kill_at:
                await resp.call("CLIENT", "KILL", "ID", reader_id)
                await resp.call("CLIENT", "KILL", "ID", sub_id)
            if i % per_ms == 0:
                await asyncio.sleep(0.001)
        assert last is not None
        seq = int((await last)[0])
        await node.request("wait_seq", seq=seq, wait=30.0)
        await asyncio.sleep(0.2)  # let the subscriber drain what it has
        banbus_missing = (await node.request("missing", targets=targets))["missing"]
        sub_reply = await sub.request("count", targets=targets)
        stats = await node.request("stats")
    finally:
        resp.close()
        await stop_workers(workers)
    ctx.log(
        f"  burst of {n} bans, readers killed after {kill_at}: pub/sub missed "
        f"{sub_reply['missing']} (subscribes={sub_reply['subscribes']}), banbus missed "
        f"{banbus_missing} (reconnects={stats['reconnects']}, resyncs={stats['resyncs']})"
    )
    if command(ctx.url, "PING") != "PONG":
        raise RuntimeError("redis went away")
    return [
        Result(
            "pubsub_lost_during_reconnect",
            float(sub_reply["missing"]),
            "bans",
            note=f"of a {n}-ban burst, subscriber killed once",
        ),
        Result(
            "banbus_lost_during_reconnect",
            float(banbus_missing),
            "bans",
            target=("<=", 0),
            note=f"of the same {n}-ban burst, reader killed once",
        ),
    ]
