"""HTTP pages of the demo: the chat page, the dashboard, a health check."""

from __future__ import annotations

import os
import socket

from channels.layers import get_channel_layer
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render


def _node_id() -> str:
    layer = get_channel_layer()
    return str(getattr(layer, "node_id", "") or "")


def chat(request: HttpRequest) -> HttpResponse:
    username = request.user.get_username() if request.user.is_authenticated else ""
    return render(request, "chat.html", {"node_id": _node_id(), "username": username})


def dashboard(request: HttpRequest) -> HttpResponse:
    return render(request, "dashboard.html", {"node_id": _node_id()})


_became_node = False


async def health(request: HttpRequest) -> JsonResponse:
    """For load balancers and the demo launcher: this process answers HTTP.

    The first call also makes this process a node (a process becomes one when it first
    creates a process-local channel), so the dashboard lists every node the launcher
    started, not only those somebody has connected to already. That channel is never
    received on, so it is not counted in the node's connections.
    """
    global _became_node
    if not _became_node:
        layer = get_channel_layer()
        if layer is not None:
            await layer.new_channel()
        _became_node = True
    return JsonResponse({"ok": True, "node_id": _node_id(), "host": socket.gethostname(),
                         "pid": os.getpid()})
