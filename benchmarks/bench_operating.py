"""Operating: importing a large blocklist.

* ``import_100k_s``: ``banbus import`` of a 100k-line list (the console script,
  a subprocess: parsing, validation, pipelined ``FCALL banbus_ban``), against
  the same 100k calls pipelined by a bare redis-py client in batches of 2,000.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from _common import Result

from banbus._keys import namespace_keys
from banbus._library import ensure_library

if TYPE_CHECKING:
    from _context import Context


async def run_import(ctx: Context) -> list[Result]:
    count = 20_000 if ctx.quick else 100_000
    ns_cli, ns_bare = ctx.ns("import"), ctx.ns("importbare")
    targets = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(count)]
    client = aioredis.Redis.from_url(ctx.url)
    try:
        await ensure_library(client)
        key = namespace_keys(ns_bare).function_key
        started = time.perf_counter()
        for start in range(0, count, 2000):
            pipe = client.pipeline(transaction=False)
            for target in targets[start : start + 2000]:
                pipe.fcall("banbus_ban", 1, key, target, 86400, "bench", "ORIGIN", "bare")
            await pipe.execute()
        bare_s = time.perf_counter() - started
    finally:
        await client.aclose()
    with tempfile.NamedTemporaryFile("w", suffix=".netset", delete=False) as f:
        f.write("# generated\n" + "\n".join(targets) + "\n")
        path = f.name
    try:
        argv = [os.path.join(os.path.dirname(sys.executable), "banbus"), "--redis", ctx.url,
                "-n", ns_cli, "import", path, "--ttl", "1d", "--reason", "bench"]  # fmt: skip
        started = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True)
        cli_s = time.perf_counter() - started
    finally:
        os.unlink(path)
    ctx.log(f"  {result.stdout.strip()}")
    ctx.log(f"  banbus import {cli_s:.2f} s, bare pipelined FCALL {bare_s:.2f} s ({count:,})")
    name = "import_100k_s" if count == 100_000 else "import_20k_s"
    return [Result(name, cli_s, "s", bare_s, "bare redis-py pipelined FCALL, same targets")]


async def run_agent(ctx: Context) -> list[Result]:
    """``bench_agent.py`` in a private network namespace (needs root: skipped, and
    said, without)."""
    import json as _json

    import anyio

    script = os.path.join(os.path.dirname(__file__), "bench_agent.py")
    argv = ["unshare", "-n", sys.executable, script, *(["--quick"] if ctx.quick else [])]
    result = await anyio.run_process(argv, check=False)
    for line in result.stderr.decode().splitlines():
        if line.startswith("  "):
            ctx.log(line)
    if result.returncode != 0:
        ctx.log(f"  agent benchmark not run: {result.stderr.decode().strip()[-300:]}")
        return []
    rows = _json.loads(result.stdout.decode().strip().splitlines()[-1])
    out = []
    for row in rows:
        baseline, name = row.get("baseline"), row.get("baseline_name", "")
        out.append(Result(row["name"], row["value"], row["unit"], baseline, name))
    return out
