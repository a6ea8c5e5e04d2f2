"""Result types of bench_layers and the markdown report made from them."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


@dataclass
class PhaseResult:
    sent: int = 0
    send_errors: int = 0
    send_seconds: float = 0.0
    received: int = 0
    dups: int = 0
    expected: int = 0
    elapsed: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # cores used: nodes, sender, redis...
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    latencies_ms: dict[str, float] = field(default_factory=dict)
    call_times: list[float] = field(default_factory=list, repr=False)  # group_send durations
    harness_us: float = 0.0  # CPU µs per delivery of the nodes' own receive loop (the bench's)

    def call_ms(self, q: float) -> float:
        return 1000 * percentile(sorted(self.call_times), q)

    @property
    def lost_pct(self) -> float:
        if not self.expected:
            return 0.0
        return 100.0 * max(0, self.expected - (self.received - self.dups)) / self.expected

    @property
    def deliveries_per_s(self) -> float:
        return self.received / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def node_us_per_delivery(self) -> float:
        """Receiver CPU per delivery: unlike rates, this barely moves with outside load."""
        return 1e6 * self.cpu_seconds.get("nodes", 0.0) / self.received if self.received else 0.0

    @property
    def node_us_net(self) -> float:
        """Node CPU per delivery less what the benchmark's receive loop costs by itself."""
        return self.node_us_per_delivery - self.harness_us if self.received else 0.0

    def us_per_send(self, side: str) -> float:
        return 1e6 * self.cpu_seconds.get(side, 0.0) / self.sent if self.sent else 0.0


@dataclass
class LayerResult:
    key: str
    label: str
    paced: PhaseResult | None = None
    max: PhaseResult | None = None
    idle: PhaseResult | None = None  # group_sends one at a time, nodes idle (call time)
    receive_errors: int = 0
    last_receive_error: str = ""
    keys_left: int = 0
    skipped: str = ""


def fmt_int(value: float) -> str:
    return f"{value:,.0f}"


def fmt_ms(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def cores(used: dict[str, float]) -> str:
    return " / ".join(f"{used.get(k, 0):.2f}" for k in ("nodes", "sender", "redis", "others"))


def ratio(ours: float, base: float) -> str:
    return f"{ours / base:.2f}x" if base > 0 else "n/a"


def report(results: list[LayerResult], machine: str, args: argparse.Namespace) -> str:
    by_key = {r.key: r for r in results if r.paced and r.max}
    core, pubsub = by_key.get("core"), by_key.get("pubsub")
    lines = [
        f"Machine: {machine}",
        f"Scenario: {args.nodes} node processes x {args.channels} member channels, one group; "
        f"paced {args.rate:g} group_sends/s for {args.paced_seconds:g} s; max rate up to "
        f"{args.max_count} sends / {args.max_seconds:g} s; "
        + (f"best max rate and median-p99 paced run of {args.rounds} interleaved rounds."
           if args.rounds > 1 else "one round."),
        "",
        "| layer | deliveries/s (max rate) | vs core | vs pub/sub | p50 / p99 at "
        f"{args.rate:g} sends/s (ms) | lost at {args.rate:g} sends/s | lost at max rate | dups |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if not (r.paced and r.max):
            lines.append(f"| {r.label} | skipped: {r.skipped} | | | | | | |")
            continue
        dps = r.max.deliveries_per_s
        lat = r.paced.latencies_ms
        lines.append(
            f"| {r.label} | {fmt_int(dps)} "
            f"| {ratio(dps, core.max.deliveries_per_s) if core and core.max else 'n/a'} "
            f"| {ratio(dps, pubsub.max.deliveries_per_s) if pubsub and pubsub.max else 'n/a'} "
            f"| {fmt_ms(lat['p50'])} / {fmt_ms(lat['p99'])} "
            f"| {r.paced.lost_pct:.2f}% | {r.max.lost_pct:.1f}% | {r.paced.dups + r.max.dups} |"
        )
    lines += [
        "",
        "Details: sender rate in the max-rate phase, and cores used per side during each phase "
        f"(nodes / sender / redis / other processes on the machine; {os.cpu_count()} cores in "
        "all, so a total near that means the sides were competing for CPU):",
        "",
        "| layer | group_sends/s (max) | sent | delivered | cores (max rate) "
        "| cores (paced) | node CPU µs / delivery (net of the bench loop) "
        "| sender / Redis CPU µs / group_send "
        "| group_send call p50 / p99 ms (paced) | call p50 ms, nodes idle (other load, cores) "
        "| paced p99 vs pub/sub | receive errors | keys left after flush |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if not (r.paced and r.max):
            continue
        cm, cp = r.max.cpu, r.paced.cpu
        p99_ratio = (ratio(r.paced.latencies_ms["p99"], pubsub.paced.latencies_ms["p99"])
                     if pubsub and pubsub.paced else "n/a")
        errors = f"{r.receive_errors}" + (f" ({r.last_receive_error})" if r.receive_errors else "")
        idle = (f"{r.idle.call_ms(0.5):.2f} ({r.idle.cpu.get('others', 0.0):.2f})"
                if r.idle and r.idle.call_times else "n/a")
        lines.append(
            f"| {r.label} | {fmt_int(r.max.sent / r.max.send_seconds)} | {r.max.sent:,} "
            f"| {r.max.received:,} / {r.max.expected:,} "
            f"| {cores(cm)} | {cores(cp)} | {r.max.node_us_per_delivery:.2f} "
            f"({r.max.node_us_net:.2f}) "
            f"| {r.max.us_per_send('sender'):.0f} / {r.max.us_per_send('redis'):.0f} "
            f"| {r.paced.call_ms(0.5):.2f} / {r.paced.call_ms(0.99):.2f} | {idle} "
            f"| {p99_ratio} | {errors} | {r.keys_left} |"
        )
    return "\n".join(lines)


def summarise(rounds: list[LayerResult]) -> LayerResult:
    """One row per layer from N rounds: the max-rate phase of the best round (noise from
    other processes only ever lowers a maximum) and the paced phase of the round with the
    median p99 (the upper median, so 2 rounds report the worse one)."""
    done = [r for r in rounds if r.paced and r.max]
    if not done:
        return rounds[-1]
    by_p99 = sorted(done, key=lambda r: r.paced.latencies_ms["p99"] if r.paced else 0.0)
    best = max(done, key=lambda r: r.max.deliveries_per_s if r.max else 0.0)
    median = by_p99[len(by_p99) // 2]
    out = LayerResult(best.key, best.label, paced=median.paced, max=best.max, idle=median.idle)
    out.receive_errors = sum(r.receive_errors for r in rounds)
    out.last_receive_error = next((r.last_receive_error for r in rounds if r.receive_errors), "")
    out.keys_left = max(r.keys_left for r in rounds)
    out.skipped = next((r.skipped for r in rounds if r.skipped), "")
    return out
