"""WebSocket routes of the demo."""

from __future__ import annotations

from django.urls import path

from testproject.consumers import ChatConsumer, DashboardConsumer

websocket_urlpatterns = [
    path("ws/chat/", ChatConsumer.as_asgi()),
    path("ws/dashboard/", DashboardConsumer.as_asgi()),
]
