"""A Django Channels layer on Redis that makes many ASGI servers act as one."""

from __future__ import annotations

__version__ = "0.1.0"
