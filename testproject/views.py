"""HTTP pages of the demo: the chat page, the dashboard, a health check."""

from __future__ import annotations

import os
import socket

from channels.layers import get_channel_layer
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from testproject import node_urls


def _node_id() -> str:
    layer = get_channel_layer()
    return str(getattr(layer, "node_id", "") or "")


def _base_url(request: HttpRequest) -> str:
    return f"{request.scheme}://{request.get_host()}/"


async def chat(request: HttpRequest) -> HttpResponse:
    user = await request.auser()
    username = user.get_username() if user.is_authenticated else ""
    await node_urls.advertise(_node_id(), _base_url(request))
    return render(request, "chat.html", {"node_id": _node_id(), "username": username})


async def nodes(request: HttpRequest) -> JsonResponse:
    """The live nodes' URLs, for the chat page's failover (testproject/node_urls.py)."""
    layer = get_channel_layer()
    await node_urls.advertise(_node_id(), _base_url(request))
    rows = await node_urls.live_urls(layer) if layer is not None else []
    response = JsonResponse({"nodes": rows})
    response["Access-Control-Allow-Origin"] = "*"  # pages of other nodes may ask too
    return response


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
    await node_urls.advertise(_node_id(), _base_url(request))
    return JsonResponse({"ok": True, "node_id": _node_id(), "host": socket.gethostname(),
                         "pid": os.getpid()})
