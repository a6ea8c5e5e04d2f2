"""Each node is judged by its own node_timeout, so a rolling change of the setting is safe."""

from __future__ import annotations

import asyncio
import time
from typing import Any


async def test_a_node_is_judged_by_its_own_timeout(make_layer: Any) -> None:
    patient = make_layer(heartbeat_interval=10, node_timeout=30)  # beats rarely, allows it
    strict = make_layer(heartbeat_interval=0.2, node_timeout=1)  # prunes quickly
    dying = make_layer(heartbeat_interval=0.2, node_timeout=1)
    await patient.new_channel()
    await strict.new_channel()
    await dying.new_channel()
    await dying._node.stop(deregister=False)  # silent from now on, as if SIGKILLed
    await asyncio.sleep(2.5)  # > 1 s (strict's timeout), < 30 s (patient's)
    alive = {node.node_id for node in await strict.nodes()}
    assert patient.node_id in alive, "pruned by another node's shorter node_timeout"
    assert dying.node_id not in alive, "a node past its own deadline must be pruned"
    (info,) = [node for node in await strict.nodes() if node.node_id == patient.node_id]
    assert 2.0 <= time.time() - info.last_seen <= 10.5
