"""channels_rabbitmq's layer under the harness's ``make(hosts=..., prefix=...)`` call.

channels_rabbitmq pins pamqp 3 while aiormq needs pamqp 4, so it runs from a virtualenv of
its own (README "RabbitMQ"): ``--extra-layer rabbitmq=benchmarks._rabbitmq_layer.Layer``
with ``BENCH_BROKER_URL`` set. The prefix becomes its groups exchange; ``hosts`` (Redis) is
ignored, it needs none.
"""

from __future__ import annotations

import os
from typing import Any

from channels_rabbitmq.core import RabbitmqChannelLayer


class Layer(RabbitmqChannelLayer):  # type: ignore[misc]
    """RabbitmqChannelLayer on ``BENCH_BROKER_URL``, its groups exchange named by ``prefix``."""

    def __init__(self, hosts: Any = None, prefix: str = "groups", **config: Any) -> None:
        super().__init__(
            host=os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/"),
            groups_exchange=prefix.strip("-") or "groups",
            **config,
        )
