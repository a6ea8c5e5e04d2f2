"""``manage.py distrib_prune``: remove dead nodes and their memberships now."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import CommandParser

from channels_distrib.management.commands._base import LayerCommand


class Command(LayerCommand):
    help = (
        "Prune now: every node silent for longer than node_timeout is removed with all "
        "its memberships, and presence leaves are sent. Live nodes do this on their own "
        "every heartbeat; this is for clusters where no node is left running."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--json", action="store_true", help="Print the pruned ids as JSON.")

    def handle(self, *args: Any, **options: Any) -> None:
        async def prune(layer: Any) -> list[str]:
            return list(await layer.prune())

        removed = sorted(self.run_on_layer(options["layer"], options["timeout"], prune))
        if options["json"]:
            self.stdout.write(json.dumps({"pruned": removed}))
        elif removed:
            noun = "node" if len(removed) == 1 else "nodes"
            self.stdout.write(f"Pruned {len(removed)} dead {noun}: {', '.join(removed)}")
        else:
            self.stdout.write("No dead nodes to prune.")
