from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.urls import path

from testproject import views

try:  # the metrics extra: every node serves its own figures to Prometheus
    from channels_distrib.metrics import metrics_view
except ImportError:  # prometheus_client not installed
    metrics_urls: list[Any] = []
else:
    metrics_urls = [path("metrics", metrics_view, name="metrics")]

urlpatterns = [
    *metrics_urls,
    path("", views.chat, name="chat"),
    path("dashboard/", views.dashboard, name="dashboard"),
    path("healthz/", views.health, name="health"),
    path("nodes/", views.nodes, name="nodes"),
    path("admin/", admin.site.urls),
]
