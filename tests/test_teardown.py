"""Every task of the layer ends when its event loop shuts down, even with the layer unclosed.

``asyncio.run`` and pytest-asyncio's loop teardown cancel the leftover tasks once and wait for
them. A node task that lets redis-py swallow that cancellation blocks in its next read and
the interpreter never exits (issue 8: channels_redis's own tests, which leave layers
unclosed, hung about half the time). The rounds run in a subprocess with a deadline, each
with a message arriving through Redis just before teardown, which made the hang certain.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.helpers_layers import own_layer

ROUNDS = 20

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, time
    from channels_distrib.layers import DistributedChannelLayer

    url, prefix, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])

    async def one_round(i):
        a = DistributedChannelLayer(hosts=[url], prefix=f"{prefix}{i}")
        b = DistributedChannelLayer(hosts=[url], prefix=f"{prefix}{i}")
        mine, theirs = await a.new_channel(), await b.new_channel()
        await b.send(mine, {"type": "x"})
        await a.receive(mine)
        await a.send(theirs, {"type": "y"})  # read by b's inbox reader during teardown
        await b.send(mine, {"type": "z"})
        # no close(): the loop's shutdown must end every task by itself

    worst = 0.0
    for i in range(rounds):
        started = time.monotonic()
        asyncio.run(one_round(i))
        worst = max(worst, time.monotonic() - started)
    print(f"worst round {worst:.3f} s")
    """
)


async def test_unclosed_layers_never_hang_the_loop_shutdown(redis_url, prefix):
    try:
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, redis_url, prefix, str(ROUNDS)],
            capture_output=True,
            text=True,
            timeout=ROUNDS * 1.5 + 10,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"an event loop never finished shutting down: {exc.stdout!r}") from exc
    assert done.returncode == 0, done.stderr
    worst = float(done.stdout.split()[-2])
    # Each round is a few Redis round trips; a task that refused to end would add seconds.
    assert worst < 1.5, done.stdout
    for i in range(ROUNDS):  # the rounds' nodes were never closed: clean up what they left
        async with own_layer(hosts=[redis_url], prefix=f"{prefix}{i}"):
            pass
