"""The suite's markdown report, made from its JSON results (``results.json``), so a report
can be regenerated from a saved run: ``python -m benchmarks._report bench-results/results.json``
prints it, and with file names after it puts it between the results markers of each file
(the READMEs' results sections).

Every table compares the layers of one run; ratios are against channels_redis' layers of the
same run ("vs pub/sub", "vs core"); every table about messages has a loss column.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from typing import Any

Row = dict[str, Any]


def pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def med(values: list[float]) -> float:
    values = [v for v in values if v is not None and v == v]
    return statistics.median(values) if values else float("nan")


def num(value: float | None, digits: int = 0) -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:,.{digits}f}"


def ms(value: float | None) -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def ratio(ours: float | None, base: float | None) -> str:
    if not ours or not base or ours != ours or base != base:
        return "n/a"
    return f"{ours / base:.2f}x"


# -- phase figures (a PhaseResult as a dict) ---------------------------------------------------


def deliveries_per_s(phase: Row) -> float:
    return phase["received"] / phase["elapsed"] if phase["elapsed"] else 0.0


def lost_pct(phase: Row) -> float:
    expected = phase["expected"]
    if not expected:
        return 0.0
    return 100.0 * max(0, expected - (phase["received"] - phase["dups"])) / expected


def node_us(phase: Row) -> float:
    received = phase["received"]
    return 1e6 * phase["cpu_seconds"].get("nodes", 0.0) / received if received else float("nan")


def node_us_net(phase: Row) -> float:
    """Node CPU per delivery less the benchmark's own receive loop (measured by each node
    before the run; 0 in results made before it was)."""
    return node_us(phase) - phase.get("harness_us", 0.0)


def call_ms(phase: Row, q: float) -> float:
    return 1000 * pct(sorted(phase["call_times"]), q)


def spread(values: list[float], fmt: Callable[[float], str]) -> str:
    """``median (min-max)`` of per-round values, or the one value."""
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(med(values))} ({fmt(min(values))}–{fmt(max(values))})"


# -- tables --------------------------------------------------------------------------------


def layers_summary(rounds: dict[str, list[Row]]) -> dict[str, Row]:
    """Per layer, medians over its completed rounds of the figures the issue names."""
    out: dict[str, Row] = {}
    for key, runs in rounds.items():
        done = [r for r in runs if r.get("paced") and r.get("max")]
        if not done:
            out[key] = {"label": runs[-1]["label"] if runs else key,
                        "skipped": next((r["skipped"] for r in runs if r["skipped"]), "no rounds")}
            continue
        out[key] = {
            "label": done[0]["label"], "rounds": len(done),
            "fanout": [deliveries_per_s(r["max"]) for r in done],
            "p50": [r["paced"]["latencies_ms"]["p50"] for r in done],
            "p99": [r["paced"]["latencies_ms"]["p99"] for r in done],
            "call_p50": [call_ms(r["paced"], 0.5) for r in done],
            "call_idle": [call_ms(r["idle"], 0.5) for r in done if r.get("idle")],
            "idle_others": [r["idle"]["cpu"].get("others", 0.0) for r in done if r.get("idle")],
            "node_us": [node_us(r["max"]) for r in done],
            "node_net": [node_us_net(r["max"]) for r in done],
            "harness": [r["max"].get("harness_us", 0.0) for r in done],
            "lost_paced": max(lost_pct(r["paced"]) for r in done),
            "lost_max": max(lost_pct(r["max"]) for r in done),
            "dups": sum(r["paced"]["dups"] + r["max"]["dups"] for r in done),
            "others": [r["max"]["cpu"].get("others", 0.0) for r in done],
        }
    return out


def layers_table(section: Row) -> list[str]:
    args = section["args"]
    summary = layers_summary(section["rounds"])
    core, pubsub = summary.get("core", {}), summary.get("pubsub", {})
    lines = [
        f"Fan-out and paced: {args['nodes']} node processes x {args['channels']} members in one "
        f"group; fan-out = group_sends back to back (up to {args['max_count']:,} or "
        f"{args['max_seconds']:g} s), paced = {args['rate']:g} group_sends/s for "
        f"{args['paced_seconds']:g} s; median (range) of {args['rounds']} alternating rounds. "
        "Other load: cores used by processes outside the run during fan-out (2 cores in all). "
        "The group_send call p50 is the paced phase's (nodes busy receiving) and, idle, that of "
        "sends one at a time 30 ms apart (nodes idle; other load then in brackets). Node CPU "
        "per delivery net: less the benchmark's own receive loop, which each node measures "
        "before the run (the same for every layer; in brackets).",
        "",
        "| layer | fan-out deliveries/s | vs core | vs pub/sub | paced p50 / p99 (ms) "
        "| p99 vs pub/sub | group_send call p50 (ms) | call p50, nodes idle (ms) "
        "| node CPU µs / delivery | vs pub/sub | net of the bench loop (loop) | vs pub/sub "
        "| lost paced / fan-out | dups | other load, cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary.values():
        if "skipped" in s:
            lines.append(f"| {s['label']} | skipped: {s['skipped']} |" + " |" * 13)
            continue
        fan, p99, cpu = med(s["fanout"]), med(s["p99"]), med(s["node_us"])
        net = med(s["node_net"])
        idle = (f"{spread(s['call_idle'], lambda v: f'{v:.2f}')} "
                f"({spread(s['idle_others'], lambda v: f'{v:.2f}')})" if s["call_idle"] else "n/a")
        lines.append(
            f"| {s['label']} | {spread(s['fanout'], num)} "
            f"| {ratio(fan, med(core.get('fanout', [])))} "
            f"| {ratio(fan, med(pubsub.get('fanout', [])))} "
            f"| {ms(med(s['p50']))} / {spread(s['p99'], ms)} "
            f"| {ratio(p99, med(pubsub.get('p99', [])))} | {spread(s['call_p50'], lambda v: f'{v:.2f}')} "
            f"| {idle} "
            f"| {spread(s['node_us'], lambda v: f'{v:.1f}')} "
            f"| {ratio(cpu, med(pubsub.get('node_us', [])))} "
            f"| {spread(s['node_net'], lambda v: f'{v:.1f}')} ({med(s['harness']):.1f}) "
            f"| {ratio(net, med(pubsub.get('node_net', [])))} "
            f"| {s['lost_paced']:.2f}% / {s['lost_max']:.2f}% | {s['dups']} "
            f"| {spread(s['others'], lambda v: f'{v:.2f}')} |")
    return lines


def memory_table(rows: list[Row]) -> list[str]:
    lines = [
        "Redis memory per membership: process-local channels added to groups; `INFO memory` "
        "delta without client buffers, and the sum of `MEMORY USAGE` of the layer's keys.",
        "",
        "| layer | memberships | groups | bytes / membership | vs core "
        "| keys | bytes / membership (keys) | group_adds/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    core = {r["groups"]: r for r in rows if r.get("key") == "core" and not r["skipped"]}
    for r in rows:
        if r["skipped"]:
            lines.append(f"| {r['label']} | {r['memberships']:,} | {r['groups']} "
                         f"| skipped: {r['skipped']} | | | | |")
            continue
        per = r["used_delta"] / r["memberships"]
        base = core.get(r["groups"])
        lines.append(
            f"| {r['label']} | {r['memberships']:,} | {r['groups']} | {per:,.0f} "
            f"| {ratio(per, base['used_delta'] / base['memberships'] if base else None)} "
            f"| {r['keys']:,} | {r['key_bytes'] / r['memberships']:,.0f} "
            f"| {num(r['memberships'] / r['seconds'] if r['seconds'] else None)} |")
    return lines


def big_table(section: Row) -> list[str]:
    args, rows = section["args"], section["results"]
    pubsub = next((r for r in rows if r["key"] == "pubsub" and not r["skipped"]), None)
    base = med(pubsub["last_ms"]) if pubsub else None
    lines = [
        f"Big group: {args['big_members']:,} members over {args['big_nodes']} node processes, "
        f"{args['big_sends']} group_sends one at a time (each after the previous reached all).",
        "",
        "| layer | group_send call median / p99 (ms) | send → last member median / max (ms) "
        "| vs pub/sub | lost | delivered / expected | node CPU µs / delivery "
        "| call: sender CPU median (ms) | Redis: busiest command, µs / call |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["skipped"]:
            lines.append(f"| {r['label']} | skipped: {r['skipped']} | | | | | | | |")
            continue
        cpu = med(r.get("call_cpu_ms", []))
        command = f"{r['redis_command']} {r['redis_us_per_call']:.0f}" if r.get("redis_command") else "n/a"
        calls = sorted(r["call_ms"])
        expected = r["expected"]
        lost = 100.0 * max(0, expected - r["received"] + r["dups"]) / expected if expected else 0.0
        lines.append(
            f"| {r['label']} | {ms(med(calls))} / {ms(pct(calls, 0.99))} "
            f"| {ms(med(r['last_ms']))} / {ms(max(r['last_ms'], default=float('nan')))} "
            f"| {ratio(med(r['last_ms']), base)} | {lost:.2f}% "
            f"| {r['received']:,} / {expected:,} | {r['node_us_per_delivery']:.1f} "
            f"| {num(cpu, 2)} | {command} |")
    return lines


def rooms_table(section: Row) -> list[str]:
    args, rows = section["args"], section["results"]
    done = {r["key"]: r for r in rows if r.get("paced") and r.get("max")}
    pubsub = done.get("pubsub")
    lines = [
        f"Many rooms: {args['rooms']:,} rooms of {args['room_size']} over {args['room_nodes']} "
        f"node processes, each send to a random room: paced {args['room_rate']:g} sends/s for "
        f"{args['room_seconds']:g} s (latency), then back to back for up to "
        f"{args['room_seconds']:g} s (throughput, backlog included).",
        "",
        "| layer | deliveries/s | vs pub/sub | group_sends/s | paced p50 / p99 (ms) "
        "| p99 vs pub/sub | lost paced / back to back | warm-up delivered "
        "| node CPU µs / delivery |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["key"] not in done:
            lines.append(f"| {r['label']} | skipped: {r['skipped']} | | | | | | | |")
            continue
        paced, full = r["paced"], r["max"]
        lat = paced["latencies_ms"]
        rate = full["sent"] / full["send_seconds"] if full["send_seconds"] else 0.0
        lines.append(
            f"| {r['label']} | {num(deliveries_per_s(full))} "
            f"| {ratio(deliveries_per_s(full), deliveries_per_s(pubsub['max']) if pubsub else None)} "
            f"| {num(rate)} | {ms(lat['p50'])} / {ms(lat['p99'])} "
            f"| {ratio(lat['p99'], pubsub['paced']['latencies_ms']['p99'] if pubsub else None)} "
            f"| {lost_pct(paced):.2f}% / {lost_pct(full):.2f}% | {r.get('warm_up', '')} "
            f"| {node_us(full):.1f} |")
    return lines


def e2e_table(section: Row) -> list[str]:
    args, rows = section["args"], section["results"]
    lines = [
        f"End to end: {args['nodes']} server processes, WebSocket clients (`websockets`) in "
        f"{args['rooms']} rooms, {args['seconds']:g} s of sending per stage; latency from the "
        "send to the client's frame.",
        "",
        "| server | clients | msg/s per room | layer | p50 / p99 (ms) | p99 vs pub/sub | lost "
        "| delivered / expected | server CPU µs / frame | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next((b for b in rows if b["key"] == "pubsub" and b["server"] == r["server"]
                     and b["clients"] == r["clients"] and b["rate"] == r["rate"]), None)
        lost = 100.0 * max(0, r["expected"] - r["received"]) / r["expected"] if r["expected"] else 0.0
        per = 1e6 * r["daphne_cpu"] / r["received"] if r["received"] else float("nan")
        lines.append(
            f"| {r['server']} | {r['clients']} | {r['rate']:g} | {r['label']} "
            f"| {ms(r['p50_ms'])} / {ms(r['p99_ms'])} "
            f"| {ratio(r['p99_ms'], base['p99_ms'] if base else None)} | {lost:.2f}% "
            f"| {r['received']:,} / {r['expected']:,} | {num(per)} | {'; '.join(r['notes'])} |")
    return lines


def connections_table(section: Row) -> list[str]:
    args, rows = section["args"], section["results"]
    lines = [
        f"Connections: {args['connections']:,} WebSockets over 3 {args['server']} processes, "
        f"each in one of {args['rooms']} rooms; memory growth per connection once all were "
        f"open; a broadcast = one group_send per room, {args['broadcasts']} of them.",
        "",
        "| layer | connected / wanted | server RSS per connection | Redis per connection "
        "| broadcast → all connections, median / max (ms) | lost | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lost = 100.0 * max(0, r["expected"] - r["received"]) / r["expected"] if r["expected"] else 0.0
        lines.append(
            f"| {r['label']} | {r['connected']:,} / {r['wanted']:,} "
            f"| {r['rss_per_conn'] / 1024:,.1f} KiB | {r['redis_per_conn']:,.0f} B "
            f"| {ms(med(r['reach_ms']))} / {ms(max(r['reach_ms'], default=float('nan')))} "
            f"| {lost:.2f}% | {'; '.join(r['notes'])} |")
    return lines


def presence_table(rows: list[Row]) -> list[str]:
    lines = [
        "Presence fill (channels_distrib only): N presence members joining one room at once, "
        "spread over the node processes; settled = every diff sent and read. Every member "
        "receives a state and diffs: the states alone are about N²/2 entries in all.",
        "",
        "| members | nodes | all joins returned (s) | settled (s) | Redis output (MB) "
        "| presence messages to members | their size (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['nodes']} | {r['joined_s']:.2f} | {r['settled_s']:.2f} "
                     f"| {r['redis_out_mb']:.1f} | {r['messages']:,} | {r['queued_mb']:,.1f} |")
    return lines


TABLES: dict[str, Callable[[Any], list[str]]] = {
    "layers": layers_table, "memory": memory_table, "big": big_table, "rooms": rooms_table,
    "e2e": e2e_table, "connections": connections_table, "presence": presence_table,
}


def render(data: Row) -> str:
    """The whole report: a header (machine, commit, command) and one table per scenario run."""
    head = data["header"]
    lines = [
        f"Run: `{head['command']}` at commit {head['commit']}, {head['seconds']} s"
        + (f" ({head['size']} sizes: a check of the harness, not results)"
           if head["size"] != "full" else ""),
        f"Machine: {head['machine']}",
    ]
    for name, section in data["results"].items():
        lines += ["", *TABLES[name](section)]
    for name, error in data.get("errors", {}).items():
        lines += ["", f"Scenario {name} failed: {error}"]
    return "\n".join(lines)


START, END = "<!-- benchmark results: start -->", "<!-- benchmark results: end -->"


def write_into(path: str, text: str) -> None:
    """Replace what stands between the START and END markers of ``path`` with ``text``."""
    with open(path) as fh:
        doc = fh.read()
    head, sep, rest = doc.partition(START)
    _old, sep2, tail = rest.partition(END)
    if not (sep and sep2):
        raise SystemExit(f"{path}: no {START} ... {END} block to replace")
    with open(path, "w") as fh:
        fh.write(f"{head}{START}\n{text}\n{END}{tail}")


if __name__ == "__main__":
    # python -m benchmarks._report results.json [FILE.md ...]: print the report, or put it
    # between the markers of each FILE.md (the READMEs' results sections).
    with open(sys.argv[1]) as fh:
        report = render(json.load(fh))
    for target in sys.argv[2:]:
        write_into(target, report)
    if len(sys.argv) == 2:
        print(report)
