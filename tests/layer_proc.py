"""Subprocess helper for the layer tests (run as a script, never imported by pytest).

Modes:
  receive <redis_url> <prefix> <channel>
      Receive on <channel> until stdin closes. Prints READY once the first receive() is
      pending, then `GOT <n>` for every message (its "n" field), then BYE.
  validate <redis_url> <prefix>
      Check name/message validation (meant to run under `python -O`); prints one JSON line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")


async def receive_mode(url: str, prefix: str, channel: str) -> None:
    from channels_distrib.layers import DistributedChannelLayer

    layer = DistributedChannelLayer(hosts=[url], prefix=prefix)
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


def main() -> None:
    mode = sys.argv[1]
    if mode == "receive":
        asyncio.run(receive_mode(*sys.argv[2:5]))
    elif mode == "validate":
        print(json.dumps(asyncio.run(validate_mode(*sys.argv[2:4]))), flush=True)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
