"""The suite's PNG chart: the layers side by side, one panel per headline figure.

Made from the suite's JSON results (so ``python -m benchmarks._chart results.json out.png``
redraws a saved run). Panels whose scenario was not run are left out. Needs matplotlib
(the ``bench`` dependency group); it draws off-screen (Agg).
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from benchmarks._report import deliveries_per_s, layers_summary, med, node_us

COLOURS = {"core": "#9e9e9e", "pubsub": "#4c72b0", "distrib": "#dd8452", "cluster": "#55a868"}
SHORT = {"core": "channels_redis core", "pubsub": "channels_redis pub/sub",
         "distrib": "channels_distrib", "cluster": "channels_distrib (Cluster)"}

# title, unit, layer key -> value, layer key -> % lost (shown on the bar when above 0)
Panel = tuple[str, str, dict[str, float], dict[str, float]]


def lost(expected: int, received: int, dups: int = 0) -> float:
    return 100.0 * max(0, expected - (received - dups)) / expected if expected else 0.0


def panels(data: dict[str, Any]) -> list[Panel]:
    res = data["results"]
    out: list[Panel] = []
    if "layers" in res:
        summary = {k: s for k, s in layers_summary(res["layers"]["rounds"]).items()
                   if "skipped" not in s}
        out.append(("Fan-out, 3 nodes x 100 members", "deliveries/s (higher is better)",
                    {k: med(s["fanout"]) for k, s in summary.items()},
                    {k: s["lost_max"] for k, s in summary.items()}))
        out.append(("Paced 100 group_sends/s: p99", "ms (lower is better)",
                    {k: med(s["p99"]) for k, s in summary.items()},
                    {k: s["lost_paced"] for k, s in summary.items()}))
        out.append(("Node CPU per delivery (fan-out)", "µs (lower is better)",
                    {k: med(s["node_us"]) for k, s in summary.items()}, {}))
    if "memory" in res:
        rows = [r for r in res["memory"] if not r["skipped"]]
        groups = min((r["groups"] for r in rows), default=0)
        out.append((f"Redis memory per membership ({groups} group(s))", "bytes (lower is better)",
                    {r["key"]: r["used_delta"] / r["memberships"] for r in rows
                     if r["groups"] == groups}, {}))
    if "big" in res:
        n = res["big"]["args"]["big_members"]
        rows = [r for r in res["big"]["results"] if not r["skipped"]]
        out.append((f"Group of {n:,}: send → last member", "ms, median (lower is better)",
                    {r["key"]: med(r["last_ms"]) for r in rows},
                    {r["key"]: lost(r["expected"], r["received"], r["dups"]) for r in rows}))
    if "rooms" in res:
        n = res["rooms"]["args"]["rooms"]
        rows = [r for r in res["rooms"]["results"] if r.get("max")]
        out.append((f"{n:,} rooms, random sends", "deliveries/s (higher is better)",
                    {r["key"]: deliveries_per_s(r["max"]) for r in rows},
                    {r["key"]: lost(r["max"]["expected"], r["max"]["received"],
                                    r["max"]["dups"]) for r in rows}))
        out.append((f"{n:,} rooms: node CPU per delivery", "µs (lower is better)",
                    {r["key"]: node_us(r["max"]) for r in rows}, {}))
    if "e2e" in res:
        rows = res["e2e"]["results"]
        for stage in sorted({(r["clients"], r["rate"]) for r in rows}):
            mine = [r for r in rows if (r["clients"], r["rate"]) == stage]
            worst = {}  # per layer, the server with the higher p99
            for r in mine:
                if r["key"] not in worst or r["p99_ms"] > worst[r["key"]]["p99_ms"]:
                    worst[r["key"]] = r
            out.append((f"WebSockets, {stage[0]} clients at {stage[1]:g} msg/s/room: p99",
                        "ms, worse of the servers (lower is better)",
                        {k: r["p99_ms"] for k, r in worst.items()},
                        {k: lost(r["expected"], r["received"]) for k, r in worst.items()}))
    if res.get("connections", {}).get("results"):
        rows = res["connections"]["results"]
        out.append((f"{rows[0]['wanted']:,} WebSockets: broadcast → all",
                    "ms, median (lower is better)",
                    {r["key"]: med(r["reach_ms"]) for r in rows},
                    {r["key"]: lost(r["expected"], r["received"]) for r in rows}))
    if "presence" in res:
        out.append(("Presence fill (channels_distrib): settled", "s, by members joining",
                    {f"{r['n']:,}": r["settled_s"] for r in res["presence"]}, {}))
    return out


def chart(data: dict[str, Any], path: str) -> None:
    """Write the chart to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [p for p in panels(data) if any(v == v for v in p[2].values())]
    if not shown:
        return
    columns = min(4, len(shown))
    rows = math.ceil(len(shown) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.6 * rows + 0.8),
                             squeeze=False)
    for ax, (title, unit, values, losses) in zip(axes.flat, shown, strict=False):
        keys = [k for k in COLOURS if k in values] + [k for k in values if k not in COLOURS]
        heights = [values[k] if values[k] == values[k] else 0.0 for k in keys]
        bars = ax.bar(range(len(keys)), heights, color=[COLOURS.get(k, "#8172b3") for k in keys])
        labels = [(f"{h:,.0f}" if h >= 100 else f"{h:,.1f}")
                  + (f"\n{losses[k]:.1f}% lost" if losses.get(k, 0) > 0 else "")
                  for k, h in zip(keys, heights, strict=True)]
        ax.bar_label(bars, labels=labels, fontsize=8)
        ax.set_xticks(range(len(keys)), [SHORT.get(k, k).replace(" ", "\n", 1) for k in keys],
                      fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.margins(y=0.25)
        positive = [h for h in heights if h > 0]
        if positive and max(positive) / min(positive) > 50:  # one layer off the scale
            ax.set_yscale("log")
            ax.set_ylabel(unit + ", log scale", fontsize=8)
    for ax in list(axes.flat)[len(shown):]:
        ax.set_visible(False)
    head = data["header"]
    fig.suptitle(f"{head['command']} · commit {head['commit']} · {head['machine'][:80]}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        chart(json.load(fh), sys.argv[2])
