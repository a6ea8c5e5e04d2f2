"""Subprocess helper for the layer tests (run as a script, never imported by pytest).

Modes:
  receive <redis_url> <prefix> <channel>
      Receive on <channel> until stdin closes. Prints READY once the first receive() is
      pending, then `GOT <n>` for every message (its "n" field), then BYE.
  validate <redis_url> <prefix>
      Check name/message validation (meant to run under `python -O`); prints one JSON line.
  unclosed <redis_url> <prefix> <rounds>
      <rounds> times asyncio.run(...) of a layer that becomes a node, receives a message sent
      through Redis by another layer, gets one more just before returning, and is never
      closed (asyncio.run cancels what is left). Prints one JSON line per round with its
      duration, so a parent with a timeout sees which round hung.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")


def path_options() -> dict[str, Any]:
    """CONFIG["broker"] from LAYER_PROC_BROKER, when the parent test runs on the broker path,
    and CONFIG["capacity"] from LAYER_PROC_CAPACITY (on the broker path a named channel's
    limit is the one its first declarer gave, which may be this receiver)."""
    options: dict[str, Any] = {}
    if broker := os.environ.get("LAYER_PROC_BROKER"):
        options["broker"] = broker
    if capacity := os.environ.get("LAYER_PROC_CAPACITY"):
        options["capacity"] = int(capacity)
    return options


async def receive_mode(url: str, prefix: str, channel: str) -> None:
    from channels_distrib.layers import DistributedChannelLayer

    layer = DistributedChannelLayer(hosts=[url], prefix=prefix, **path_options())
    loop = asyncio.get_running_loop()
    stop = loop.run_in_executor(None, sys.stdin.read)  # returns at EOF
    try:
        first = True
        while True:
            getter = asyncio.ensure_future(layer.receive(channel))
            if first:
                await asyncio.sleep(0.05)  # let the first receive reach Redis
                print("READY", flush=True)
                first = False
            done, _ = await asyncio.wait({getter, stop}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                message = getter.result()
                print(f"GOT {message['n']}", flush=True)
                continue
            # stdin closed: cancel the pending receive (cancellation-safe by contract).
            getter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                message = await getter
                print(f"GOT {message['n']}", flush=True)
            break
    finally:
        await layer.close()
    print("BYE", flush=True)


async def validate_mode(url: str, prefix: str) -> dict[str, object]:
    from django.core.exceptions import ImproperlyConfigured

    from channels_distrib.layers import DistributedChannelLayer

    results: dict[str, object] = {"optimize": sys.flags.optimize}
    layer = DistributedChannelLayer(hosts=[url], prefix=prefix)
    good = {"type": "x"}
    local = await layer.new_channel()
    cases = {
        "send_local_nondict": lambda: layer.send(local, "not a dict"),
        "send_local_bad_name": lambda: layer.send(local + "!x", good),
        "send_bad_channel": lambda: layer.send("bad name!!", good),
        "send_long_channel": lambda: layer.send("a" * 100, good),
        "send_nonstr_channel": lambda: layer.send(123, good),
        "send_nondict": lambda: layer.send("ok.channel", "not a dict"),
        "send_list": lambda: layer.send("ok.channel", ["type", "x"]),
        "receive_bad_channel": lambda: layer.receive("bad name"),
        "group_add_bad_group": lambda: layer.group_add("bad group", "ok.channel"),
        "group_add_bad_channel": lambda: layer.group_add("okgroup", "bad channel"),
        "group_discard_bad_group": lambda: layer.group_discard("bad!group", "ok.channel"),
        "group_discard_bad_channel": lambda: layer.group_discard("okgroup", "bad channel"),
        "group_send_bad_group": lambda: layer.group_send("bad group", good),
        "group_send_nondict": lambda: layer.group_send("okgroup", "not a dict"),
    }
    for name, make in cases.items():
        try:
            await asyncio.wait_for(make(), 5)
        except TypeError as exc:
            results[name] = f"TypeError: {exc}"
        except Exception as exc:  # noqa: BLE001 - reported to the test
            results[name] = f"{type(exc).__name__}: {exc}"
        else:
            results[name] = "no error"
    try:
        DistributedChannelLayer(hosts=[url], prefix=prefix, capactiy=5)
    except ImproperlyConfigured:
        results["unknown_option"] = "ImproperlyConfigured"
    except Exception as exc:  # noqa: BLE001
        results["unknown_option"] = f"{type(exc).__name__}: {exc}"
    else:
        results["unknown_option"] = "no error"
    await layer.flush()
    await layer.close()
    return results


async def unclosed_round(url: str, prefix: str, index: int) -> None:
    from channels_distrib.layers import DistributedChannelLayer

    # Sub-second settings as a test suite would use; the default ones behave the same.
    layer = DistributedChannelLayer(
        hosts=[url], prefix=prefix, heartbeat_interval=0.2, node_timeout=0.8
    )
    other = DistributedChannelLayer(hosts=[url], prefix=prefix)  # not the owner: via Redis
    channel = await layer.new_channel()
    await other.send(channel, {"type": "m", "n": 1})
    await layer.receive(channel)
    await other.send(channel, {"type": "m", "n": 2})
    # Return while the second message is on its way (or just read): vary the moment.
    await asyncio.sleep((index % 5) * 0.001)


def unclosed_mode(url: str, prefix: str, rounds: int) -> None:
    import time

    import channels_distrib.layers  # noqa: F401 - imported before the clock starts

    print(json.dumps({"ready": True}), flush=True)
    for index in range(rounds):
        started = time.monotonic()
        asyncio.run(unclosed_round(url, prefix, index))
        print(json.dumps({"round": index, "seconds": time.monotonic() - started}), flush=True)


def main() -> None:
    mode = sys.argv[1]
    if mode == "receive":
        asyncio.run(receive_mode(*sys.argv[2:5]))
    elif mode == "validate":
        print(json.dumps(asyncio.run(validate_mode(*sys.argv[2:4]))), flush=True)
    elif mode == "unclosed":
        unclosed_mode(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
