"""Prometheus metrics of the channel layers in this process (the ``metrics`` extra).

Importing this module registers one collector with ``prometheus_client``'s default registry;
``channels_distrib``'s app config imports it when ``prometheus_client`` is installed, so any
exporter you already run (``prometheus_client.start_http_server``, django-prometheus) shows
the figures, and :func:`metrics_view` serves them from Django. The collector reads the
layers' plain counters at scrape time (see :mod:`channels_distrib.stats`): the message path
never calls into ``prometheus_client``.

Layers are found in Channels' ``channel_layers`` (every configured alias that is a
:class:`~channels_distrib.layers.DistributedChannelLayer`), plus any passed to
:func:`register`. Figures of several layers are added up (``nodes_alive`` and
``heartbeat_lag_seconds`` take the largest).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

try:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "channels_distrib.metrics needs prometheus_client: "
        "pip install 'channels-distrib[metrics]'"
    ) from exc

from .stats import figures
from .types import DROP_REASONS, SENT_KINDS

if TYPE_CHECKING:
    from django.http import HttpRequest, HttpResponse
    from prometheus_client.metrics_core import Metric

    from .layers import DistributedChannelLayer

_extra: weakref.WeakSet[DistributedChannelLayer] = weakref.WeakSet()


def register(layer: DistributedChannelLayer) -> None:
    """Export a layer that is not in Channels' ``channel_layers`` (made by hand)."""
    _extra.add(layer)


def layers() -> list[DistributedChannelLayer]:
    """The layers whose figures are exported now."""
    from .layers import DistributedChannelLayer

    found: dict[int, DistributedChannelLayer] = {}
    try:
        from channels.layers import channel_layers

        backends = list(channel_layers.backends.values())
    except Exception:  # Channels not configured (no settings): only registered layers
        backends = []
    for layer in [*backends, *list(_extra)]:
        if isinstance(layer, DistributedChannelLayer):
            found[id(layer)] = layer
    return list(found.values())


def _total(rows: list[dict[str, Any]], *path: str) -> float:
    total = 0.0
    for row in rows:
        value: Any = row
        for key in path:
            value = value[key]
        total += value
    return total


def _by_label(
    rows: list[dict[str, Any]], name: str, doc: str, field: tuple[str, str, Iterable[str]]
) -> CounterMetricFamily:
    """A counter with one label: ``field`` is (figure name, label name, label values)."""
    figure, label, values = field
    family = CounterMetricFamily(name, doc, labels=[label])
    for value in values:
        family.add_metric([value], _total(rows, figure, value))
    return family


class LayerCollector(Collector):
    """Reads the exported layers' figures (or those ``source`` returns) when Prometheus scrapes."""

    def __init__(self, source: Callable[[], list[DistributedChannelLayer]] = layers) -> None:
        self.source = source

    def collect(self) -> Iterable[Metric]:
        rows = [figures(layer) for layer in self.source()]
        yield _by_label(
            rows,
            "channels_distrib_messages_sent",
            "Messages this process sent, by kind: direct (to a process-local channel), "
            "group (copies group_send wrote: one per node with members, one per normal-channel "
            "member) and named (to a normal channel).",
            ("sent", "kind", SENT_KINDS),
        )
        yield CounterMetricFamily(
            "channels_distrib_messages_delivered",
            "Messages receive() handed to a consumer in this process.",
            value=_total(rows, "delivered"),
        )
        yield _by_label(
            rows,
            "channels_distrib_messages_dropped",
            "Messages dropped in this process, by reason: capacity (a consumer past its "
            "budget, a full normal channel), expired (unread past expiry), corrupt "
            "(undecodable), no_channel (for a channel this node no longer has), trimmed "
            "(gone from the inbox stream before the consumer had room).",
            ("dropped", "reason", DROP_REASONS),
        )
        yield CounterMetricFamily(
            "channels_distrib_group_sends",
            "group_send() calls in this process.",
            value=_total(rows, "group_sends"),
        )
        yield GaugeMetricFamily(
            "channels_distrib_nodes_alive",
            "Live nodes at this node's last heartbeat, itself included (aggregate with max).",
            value=max((row["nodes_alive"] for row in rows), default=0),
        )
        yield CounterMetricFamily(
            "channels_distrib_prunes",
            "Dead nodes this process pruned.",
            value=_total(rows, "prunes"),
        )
        yield CounterMetricFamily(
            "channels_distrib_reconnects",
            "Times this process lost its connection to Redis or could not open one.",
            value=_total(rows, "reconnects"),
        )
        yield GaugeMetricFamily(
            "channels_distrib_connections",
            "DistributedConsumer WebSocket connections open on this node.",
            value=_total(rows, "connections"),
        )
        yield GaugeMetricFamily(
            "channels_distrib_heartbeat_lag_seconds",
            "How far this node's last confirmed heartbeat is overdue (0 while beats are on "
            "time; near node_timeout the node is about to be pruned).",
            value=max((row["heartbeat_lag"] for row in rows), default=0.0),
        )


COLLECTOR = LayerCollector()


def install(registry: CollectorRegistry = REGISTRY) -> None:
    """Register the collector with ``registry`` (done for the default one on import)."""
    try:
        registry.register(COLLECTOR)
    except ValueError:  # already registered
        pass


def metrics_view(request: HttpRequest) -> HttpResponse:
    """A Django view serving the default registry in Prometheus' text format."""
    from django.http import HttpResponse

    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)


install()

__all__ = ["COLLECTOR", "LayerCollector", "install", "layers", "metrics_view", "register"]
