"""What the inbox reader's read costs: ARM_INBOX (the reader's read while it has a bell)
against a plain ``XREAD``, per read and per entry, at the batch sizes a loaded reader sees.

The question it answers (issue 9's follow-up): under load the reader keeps finding entries,
so ARM_INBOX never arms, and it does what an ``XREAD`` would do, through a Lua script. Is
the script's overhead worth reading once with ``XREAD`` first and calling ARM_INBOX only when
that read came back empty? Measured on a private redis-server, one stream of ``--entries``
inbox entries of the shape the fan-out writes (``g`` group, ``m`` a ``--payload``-byte
message), read from the start to the end in reads of ``COUNT`` entries each way:

* client µs per read: wall time of the reads / reads (one connection, one read at a time);
* Redis µs per read: ``INFO commandstats`` usec delta of ``xread`` or ``evalsha`` / reads;
* going idle: ARM_INBOX on an empty stream (one round trip, armed atomically) against the
  ``XREAD`` + ``SET PX`` a plain reader would need (two round trips, and an entry appended
  between them rings no bell: the reader then waits out its block time).

    python -m benchmarks.bench_inbox_read --entries 20000 --payload 200
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

if not __package__:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import redis_info, run_on_redis, run_prefix

BATCHES = (1, 10, 100, 500)
_PREFIX = run_prefix("inbox")  # this run's keys, so runs can share a server
STREAM = _PREFIX + "{n.x}:i"
ARMED = _PREFIX + "{n.x}:armed"


def _usec(url: str, command: str) -> tuple[int, int]:
    stats = redis_info(url, "commandstats").get(f"cmdstat_{command}", {})
    return int(stats.get("usec", 0)), int(stats.get("calls", 0))


async def _fill(client: Any, entries: int, payload: int) -> None:
    body = b"x" * payload
    for start in range(0, entries, 1000):
        pipe = client.pipeline(transaction=False)
        for _ in range(start, min(entries, start + 1000)):
            pipe.xadd(STREAM, {"g": "room", "m": body})
        await pipe.execute()


async def _read_all(client: Any, script: Any, batch: int, how: str) -> int:
    """Read the whole stream in reads of ``batch``; returns the reads made."""
    cursor, reads = b"0-0", 0
    while True:
        reads += 1
        if how == "xread":
            reply = await client.xread({STREAM: cursor}, count=batch)
            entries = reply[0][1] if reply else []
        else:
            entries = await script(keys=[STREAM, ARMED], args=[cursor, batch, 2000])
        if not entries:
            return reads
        cursor = entries[-1][0]


async def _per_read(url: str, client: Any, script: Any, batch: int, how: str) -> tuple[float, float]:
    """(client µs, Redis µs) per read of ``batch`` entries, ``how`` = xread or arm."""
    command = "xread" if how == "xread" else "evalsha"
    usec0, calls0 = _usec(url, command)
    start = time.perf_counter()
    reads = await _read_all(client, script, batch, how)
    wall = time.perf_counter() - start
    usec1, calls1 = _usec(url, command)
    return wall / reads * 1e6, (usec1 - usec0) / max(1, calls1 - calls0)


async def _going_idle(url: str, client: Any, script: Any, times: int) -> dict[str, float]:
    """Client µs to go idle on an empty stream: ARM_INBOX vs XREAD then SET PX."""
    await client.delete(STREAM)
    await client.xadd(STREAM, {"g": "room", "m": b"x"})
    last = (await client.xrange(STREAM))[-1][0]
    start = time.perf_counter()
    for _ in range(times):
        await script(keys=[STREAM, ARMED], args=[last, 500, 2000])
    arm = (time.perf_counter() - start) / times * 1e6
    start = time.perf_counter()
    for _ in range(times):
        await client.xread({STREAM: last}, count=500)
        await client.set(ARMED, "1", px=2000)
    plain = (time.perf_counter() - start) / times * 1e6
    return {"ARM_INBOX": arm, "XREAD + SET PX": plain}


async def run(url: str, args: argparse.Namespace) -> None:
    import redis.asyncio as aioredis

    from channels_distrib.scripts import ARM_INBOX

    client = aioredis.from_url(url)
    try:
        await client.delete(STREAM, ARMED)
        await _fill(client, args.entries, args.payload)
        script = client.register_script(ARM_INBOX)
        await _read_all(client, script, 500, "arm")  # warm: the script is loaded, pages hot
        print(f"{args.entries} entries of {args.payload} B, {args.rounds} rounds, medians\n")
        print("| entries per read | XREAD client / Redis µs | ARM_INBOX client / Redis µs |")
        print("|---|---|---|")
        for batch in BATCHES:
            figures: dict[str, list[tuple[float, float]]] = {"xread": [], "arm": []}
            for _ in range(args.rounds):
                for how in ("xread", "arm"):
                    figures[how].append(await _per_read(url, client, script, batch, how))
            cells = [_cell(figures[how]) for how in ("xread", "arm")]
            print(f"| {batch} | {cells[0]} | {cells[1]} |")
        idle = await _going_idle(url, client, script, args.idle_reads)
        print("\ngoing idle (empty stream, client µs per idle transition): "
              + ", ".join(f"{name} {value:.1f}" for name, value in idle.items()))
    finally:
        await client.delete(STREAM, ARMED)
        await client.aclose()


def _cell(samples: list[tuple[float, float]]) -> str:
    client = sorted(s[0] for s in samples)[len(samples) // 2]
    server = sorted(s[1] for s in samples)[len(samples) // 2]
    return f"{client:.1f} / {server:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--payload", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle-reads", type=int, default=2000)
    parser.add_argument("--redis-url", help="use this server instead of a private one")
    run_on_redis(run, parser.parse_args())


if __name__ == "__main__":
    main()
