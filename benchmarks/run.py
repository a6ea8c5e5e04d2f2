"""The whole benchmark suite in one command: every scenario, every layer, one Redis, one report.

    python -m benchmarks --quick                      # every scenario, small sizes, < 2 min
    python -m benchmarks --chart docs/benchmarks.png  # the full suite (~25 min on 2 cores)
    python -m benchmarks --scenarios layers,big --layers pubsub,distrib

Scenarios, in this order (``--scenarios`` picks a subset):

``layers``       fan-out (3 nodes x 100 members, back to back) and paced (100 group_sends/s)
                 over ``--rounds`` alternating rounds (3; medians reported), bench_layers;
``memory``       Redis bytes per membership, 10,000 memberships in 1 and 100 groups;
``big``          one group of 10,000 members over 4 nodes, bench_groups;
``rooms``        2,000 rooms of 5 over 3 nodes, random room sends, bench_groups;
``e2e``          3 server processes under daphne and uvicorn, WebSocket clients, 150 clients
                 at 20 msg/s per room then 300 at 60, bench_e2e;
``connections``  5,000 WebSockets over 3 uvicorn nodes in 100 rooms, bench_connections;
``presence``     presence fill of 2,500 / 5,000 / 10,000 members over 4 nodes (this
                 library's feature: channels_distrib only), bench_presence.

Every layer goes through the same harness with its defaults, on the run's Redis (a private
``redis-server`` unless ``--redis-url``). ``--cluster-url URL`` adds a column: this
library's layer on that Redis Cluster node; ``--broker-url amqp://...`` adds ``broker``, its
messages through RabbitMQ. Writes ``results.json``, ``results.md`` and
``chart.png`` into ``--out`` and, with ``--chart``, the chart there too. A progress line per
phase goes to stderr; the markdown report goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from typing import Any

if not __package__:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_connections, bench_e2e, bench_groups, bench_layers, bench_memory
from benchmarks._common import (
    BROKER_KEY,
    CLUSTER_KEY,
    LAYERS,
    ROOT,
    add_broker_layer,
    add_cluster_layer,
    machine_description,
    private_redis,
    wait_quiet,
)
from benchmarks._report import render
from channels_distrib.masking import scrub

SCENARIOS = ("layers", "memory", "big", "rooms", "e2e", "connections", "presence")

# Scenario options per size: full (the figures) and quick (every path, small).
SIZES: dict[str, dict[str, list[str]]] = {
    "full": {
        "layers": ["--rounds", "3"],
        "memory": ["--memberships", "10000", "--groups", "1,100"],
        "groups": [],
        "e2e": ["--stages", "150x20,300x60", "--servers", "daphne,uvicorn"],
        "connections": ["--connections", "5000", "--conn-rooms", "100"],
        "presence": ["2500", "5000", "10000"],
    },
    "quick": {
        "layers": ["--rounds", "1", "--paced-seconds", "1.5", "--max-seconds", "1.5",
                   "--max-count", "1000", "--idle", "1", "--idle-sends", "20"],
        "memory": ["--memberships", "1000", "--groups", "10"],
        "groups": ["--big-members", "1000", "--big-sends", "4", "--rooms", "200",
                   "--room-rate", "200", "--room-seconds", "1", "--idle", "1"],
        "e2e": ["--stages", "30x10", "--servers", "daphne,uvicorn", "--seconds", "1"],
        "connections": ["--connections", "150", "--conn-rooms", "10", "--broadcasts", "2"],
        "presence": ["400"],
    },
    # The harness test (tests/test_benchmarks.py): every code path for a few seconds.
    "smoke": {
        "layers": ["--rounds", "1", "--nodes", "1", "--channels", "10", "--rate", "50",
                   "--paced-seconds", "0.5", "--max-seconds", "0.5", "--max-count", "100",
                   "--idle", "1", "--idle-sends", "5"],
        "memory": ["--memberships", "100", "--groups", "10"],
        "groups": ["--big-members", "100", "--big-nodes", "2", "--big-sends", "2",
                   "--rooms", "10", "--room-nodes", "2", "--room-rate", "50",
                   "--room-seconds", "0.5", "--idle", "1"],
        "e2e": ["--stages", "10x5", "--servers", "daphne", "--seconds", "0.5"],
        "connections": ["--connections", "20", "--conn-rooms", "4", "--broadcasts", "1"],
        "presence": ["40"],
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_const", dest="size", const="quick",
                        help="small sizes, under 2 minutes (same as --size quick)")
    parser.add_argument("--size", choices=sorted(SIZES), default="full",
                        help="full: the issue's figures; quick: every scenario small; smoke: "
                        "seconds per scenario (the harness test)")
    parser.set_defaults(size="full")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated subset of: " + ", ".join(SCENARIOS))
    parser.add_argument("--layers", default="core,pubsub,distrib",
                        help="comma-separated subset of: " + ", ".join(LAYERS))
    parser.add_argument("--redis-url", help="use this Redis instead of a private one")
    parser.add_argument("--cluster-url", help="add the layer 'cluster': channels_distrib on "
                        "this Redis Cluster node, as another column")
    parser.add_argument("--broker-url", help="add the layer 'broker': channels_distrib with "
                        "its messages through this RabbitMQ (amqp://...), as another column")
    parser.add_argument("--out", default="bench-results",
                        help="directory for results.json, results.md and chart.png")
    parser.add_argument("--chart", help="also write the chart (PNG) here, e.g. "
                        "docs/benchmarks.png")
    parser.add_argument("--presence-nodes", type=int, default=4)
    parser.add_argument("--quiet-wait", type=float, default=0.0, metavar="SECONDS",
                        help="before each scenario (and each layer of the layers scenario), "
                        "wait up to this long for the machine to be idle (< 0.3 busy cores)")
    args = parser.parse_args(argv)
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if args.cluster_url:
        add_cluster_layer(args.cluster_url)
        if CLUSTER_KEY not in args.layers.split(","):
            args.layers += f",{CLUSTER_KEY}"
    if args.broker_url:
        add_broker_layer(args.broker_url)
        if BROKER_KEY not in args.layers.split(","):
            args.layers += f",{BROKER_KEY}"
    unknown = set(args.layers.split(",")) - set(LAYERS)
    if unknown:
        parser.error(f"unknown layers: {', '.join(sorted(unknown))}")
    return args


def sub_args(add: Any, argv: list[str], **fixed: Any) -> argparse.Namespace:
    """A scenario module's options, parsed from ``argv`` by its own ``add_arguments``."""
    parser = argparse.ArgumentParser()
    add(parser)
    return argparse.Namespace(**{**vars(parser.parse_args(argv)), **fixed})


def plain(value: Any) -> Any:
    """Results as JSON-ready data (dataclasses to dicts, NaN kept as null)."""
    if is_dataclass(value) and not isinstance(value, type):
        return plain(asdict(value))
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value


def scenario_runners(url: str, args: argparse.Namespace) -> dict[str, Callable[[], Any]]:
    """Scenario name -> a function running it with the options of ``--size``."""
    size = SIZES[args.size]
    keys = args.layers.split(",")
    gargs = sub_args(bench_groups.add_arguments, size["groups"])

    def layers() -> Any:
        largs = bench_layers.parse_args(["--layers", ",".join(keys), *size["layers"],
                                         "--quiet-wait", str(args.quiet_wait)])
        return {"args": vars(largs), "rounds": bench_layers.run_rounds(url, largs)}

    def memory() -> Any:
        rows = []
        mem = bench_memory.parse_args(size["memory"])
        for groups in [int(g) for g in mem.groups.split(",")]:
            for key in keys:
                print(f"... memory: {key}, {mem.memberships:,} memberships in {groups} groups",
                      file=sys.stderr, flush=True)
                rows.append(bench_memory.measure(LAYERS[key], url, mem.memberships, groups))
        return rows

    def e2e() -> Any:
        eargs = sub_args(bench_e2e.add_arguments, size["e2e"], nodes=3)
        return {"args": vars(eargs), "results": bench_e2e.run_all(url, keys, eargs)}

    def connections() -> Any:
        cargs = sub_args(bench_connections.add_arguments, size["connections"], nodes=3, idle=5.0)
        return {"args": vars(cargs), "results": bench_connections.run_all(url, keys, cargs)}

    def presence() -> Any:
        from benchmarks import bench_presence

        nodes = args.presence_nodes if args.size == "full" else 2
        return bench_presence.fill(url, [int(n) for n in size["presence"]], nodes)

    return {
        "layers": layers, "memory": memory,
        "big": lambda: {"args": vars(gargs), "results": bench_groups.run_big(url, keys, gargs)},
        "rooms": lambda: {"args": vars(gargs),
                          "results": bench_groups.run_rooms(url, keys, gargs)},
        "e2e": e2e, "connections": connections, "presence": presence,
    }


def run_scenarios(url: str, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """Every scenario of ``--scenarios``, in the suite's order: (results, errors). A scenario
    that raises is reported as an error; the others still run."""
    chosen = args.scenarios.split(",")
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, runner in scenario_runners(url, args).items():
        if name not in chosen:
            continue
        if args.quiet_wait > 0 and name != "layers":  # layers waits before every layer
            busy = wait_quiet(args.quiet_wait)
            print(f"... {name}: other load before start {busy:.2f} cores", file=sys.stderr,
                  flush=True)
        try:
            results[name] = runner()
        except Exception as exc:  # one broken scenario must not lose the others' figures
            errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"... {name} failed: {errors[name]}", file=sys.stderr, flush=True)
    return results, errors


def commit() -> str:
    """The checkout's commit (with ``+dirty`` for uncommitted changes), or "unknown"."""
    git = shutil.which("git")
    if not git:
        return "unknown"
    try:
        head = subprocess.run([git, "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run([git, "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    if args.redis_url:
        return run_all(args.redis_url, args, started)
    with private_redis() as url:
        return run_all(url, args, started)


def run_all(url: str, args: argparse.Namespace, started: float) -> int:
    machine, at = machine_description(url), commit()  # the code measured, before any edit
    results, errors = run_scenarios(url, args)
    header = {"machine": machine, "commit": at, "size": args.size,
              "command": "python -m benchmarks " + " ".join(sys.argv[1:]),
              "seconds": round(time.monotonic() - started)}
    # Credentials in a URL (--redis-url, --broker-url, an error quoting one) never reach the
    # report or the files: the whole result is scrubbed as text.
    data = json.loads(scrub(json.dumps(plain(
        {"header": header, "results": results, "errors": errors}))))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(data, fh, indent=1)
    text = render(data)
    with open(os.path.join(args.out, "results.md"), "w") as fh:
        fh.write(text + "\n")
    print(text)
    from benchmarks._chart import chart

    chart(data, os.path.join(args.out, "chart.png"))
    if args.chart:
        chart(data, args.chart)
    print(f"\n(suite took {time.monotonic() - started:.0f} s; results in {args.out}/)",
          file=sys.stderr)
    return 0 if not failures(data) else 1


def failures(data: dict[str, Any]) -> list[str]:
    """Every row that was skipped or failed, so the exit status says the run was incomplete."""
    found = [f"{name}: {error}" for name, error in data.get("errors", {}).items()]
    for name, value in data["results"].items():
        rows = value.get("results", value.get("rounds", value)) if isinstance(value, dict) else value
        if isinstance(rows, dict):  # layers: key -> rounds
            rows = [r for v in rows.values() for r in v]
        for row in rows:
            if isinstance(row, dict) and (row.get("skipped") or row.get("notes")):
                found.append(f"{name}: {row.get('key') or row.get('label')}")
    return found


if __name__ == "__main__":
    sys.exit(main())
