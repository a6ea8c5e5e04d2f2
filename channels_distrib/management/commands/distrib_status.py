"""``manage.py distrib_status``: live nodes, groups with their sizes, a group's members."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from django.core.management.base import CommandParser

from channels_distrib.management.commands._base import LayerCommand


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return ["  " + fmt.format(*headers).rstrip()] + ["  " + fmt.format(*r).rstrip() for r in rows]


class Command(LayerCommand):
    help = (
        "Show the cluster as the channel layer's registry sees it: live nodes, the groups "
        "their channels are in with each group's size, and with --group the members of one "
        "group (any group, including ones with only normal channels)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--json", action="store_true", help="Print one JSON object.")
        parser.add_argument("--group", help="Also list the members of this group.")

    def handle(self, *args: Any, **options: Any) -> None:
        group: str | None = options["group"]

        async def collect(layer: Any) -> dict[str, Any]:
            return await gather_status(layer, group)

        status = self.run_on_layer(options["layer"], options["timeout"], collect)
        if options["json"]:
            self.stdout.write(json.dumps(status, indent=2, sort_keys=True))
        else:
            self.stdout.write("\n".join(render_text(status)))


async def gather_status(layer: Any, group: str | None) -> dict[str, Any]:
    """Nodes, the groups of their channels with sizes, and optionally one group's members.

    Groups are discovered through the live nodes' channels (``node_channels`` then
    ``channel_groups``), since the registry keeps no list of all groups; a group holding
    only normal (shared-queue) channels shows up with ``--group`` only.
    """
    nodes = sorted(await layer.nodes(), key=lambda n: n.node_id)
    channel_sets = await asyncio.gather(*(layer.node_channels(n.node_id) for n in nodes))
    channels = sorted(set().union(*channel_sets)) if channel_sets else []
    group_sets = await asyncio.gather(*(layer.channel_groups(c) for c in channels))
    groups = sorted(set().union(*group_sets)) if group_sets else []
    sizes = await asyncio.gather(*(layer.group_size(g) for g in groups))
    status: dict[str, Any] = {
        "now": time.time(),
        "nodes": [n._asdict() for n in nodes],
        "groups": dict(zip(groups, sizes, strict=True)),
    }
    if group is not None:
        members = sorted(await layer.group_members(group), key=lambda m: (m.joined_at, m.channel))
        status["group"] = group
        status["members"] = [
            {"channel": m.channel, "node_id": m.node_id, "meta": m.meta, "joined_at": m.joined_at}
            for m in members
        ]
    return status


def render_text(status: dict[str, Any]) -> list[str]:
    now: float = status["now"]
    lines = [f"Nodes: {len(status['nodes'])} live"]
    if status["nodes"]:
        lines += _table(
            ["NODE", "HOST", "PID", "UPTIME", "LAST SEEN", "CHANNELS"],
            [
                [
                    n["node_id"],
                    n["hostname"],
                    str(n["pid"]),
                    _age(now - n["started_at"]),
                    _age(now - n["last_seen"]) + " ago",
                    str(n["channel_count"]),
                ]
                for n in status["nodes"]
            ],
        )
    lines.append(f"Groups: {len(status['groups'])}")
    if status["groups"]:
        lines += _table(["GROUP", "SIZE"], [[g, str(s)] for g, s in status["groups"].items()])
    if "group" in status:
        lines.append(f"Members of {status['group']}: {len(status['members'])}")
        if status["members"]:
            lines += _table(
                ["CHANNEL", "NODE", "JOINED", "META"],
                [
                    [
                        m["channel"],
                        m["node_id"] or "-",
                        _age(now - m["joined_at"]) + " ago",
                        json.dumps(m["meta"], sort_keys=True) if m["meta"] is not None else "-",
                    ]
                    for m in status["members"]
                ],
            )
    return lines
