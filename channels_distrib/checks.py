"""Django system checks for ``CHANNEL_LAYERS`` entries that use this library's layer.

Run by ``manage.py check`` (and before ``runserver``/``migrate``); only with
``"channels_distrib"`` in ``INSTALLED_APPS``. Select them alone with
``manage.py check --tag channels_distrib``. Validation is the layer's own: the check builds
the layer from the entry's ``CONFIG`` exactly as Channels would, which validates every
option without connecting to Redis, and reports what the layer raised.

=========================  ==============================================================
``channels_distrib.E001``  ``CHANNEL_LAYERS`` is not a dict of alias → layer settings.
``channels_distrib.E002``  An entry using our backend has a ``CONFIG`` that is not a dict.
``channels_distrib.E003``  A ``BACKEND`` under ``channels_distrib`` cannot be imported.
``channels_distrib.E004``  The layer rejected the entry's ``CONFIG`` (the message says why).
``channels_distrib.W001``  The app is installed but no entry uses ``DistributedChannelLayer``.
``channels_distrib.W002``  Two entries share one Redis and one ``prefix``: they would see
                           each other's groups, nodes and messages.
=========================  ==============================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning
from django.utils.module_loading import import_string

from .masking import scrub

TAG = "channels_distrib"
BACKEND = "channels_distrib.layers.DistributedChannelLayer"
DEFAULT_PREFIX = "asgi"


def check_channel_layers(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """Validate every ``CHANNEL_LAYERS`` entry whose ``BACKEND`` is our layer (or a subclass)."""
    layers = getattr(settings, "CHANNEL_LAYERS", {})
    if not isinstance(layers, Mapping):
        return [
            Error(
                f"CHANNEL_LAYERS must be a dict of alias → settings; got {type(layers).__name__}.",
                hint=f'Write CHANNEL_LAYERS = {{"default": {{"BACKEND": "{BACKEND}", "CONFIG": '
                '{"hosts": ["redis://127.0.0.1:6379/0"]}}}.',
                id="channels_distrib.E001",
            )
        ]
    messages: list[CheckMessage] = []
    ours: dict[str, Mapping[str, Any]] = {}
    for alias, entry in layers.items():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("BACKEND"), str):
            continue  # not recognisably ours; Channels reports it when the layer is used
        found, problem = _resolve(alias, entry["BACKEND"])
        if problem is not None:
            messages.append(problem)
        elif found:
            config = entry.get("CONFIG", {})
            if not isinstance(config, Mapping):
                messages.append(
                    Error(
                        f"CONFIG must be a dict of layer options; got {type(config).__name__}.",
                        hint='Write e.g. "CONFIG": {"hosts": ["redis://127.0.0.1:6379/0"]}.',
                        obj=_obj(alias),
                        id="channels_distrib.E002",
                    )
                )
                continue
            ours[alias] = config
            messages.extend(_validate(alias, entry["BACKEND"], config))
    if not ours:
        messages.append(
            Warning(
                "channels_distrib is installed but no CHANNEL_LAYERS entry uses its layer, so "
                "its consumers, registry and presence cannot work.",
                hint=f'Set CHANNEL_LAYERS["default"]["BACKEND"] = "{BACKEND}".',
                id="channels_distrib.W001",
            )
        )
    messages.extend(_shared_prefixes(ours))
    return messages


def _obj(alias: str) -> str:
    return f"CHANNEL_LAYERS[{alias!r}]"


def _resolve(alias: str, backend: str) -> tuple[bool, CheckMessage | None]:
    """(uses our layer, problem): a channels_distrib path that does not import is a problem;
    any other path is ours only if it imports and subclasses DistributedChannelLayer."""
    named_ours = backend.split(".", 1)[0] == "channels_distrib"
    try:
        cls = import_string(backend)
    except Exception as exc:  # ImportError, or any error raised while importing the module
        if not named_ours:
            return False, None
        return False, Error(
            f"BACKEND {backend!r} cannot be imported: {type(exc).__name__}: {exc}",
            hint=f'Write "BACKEND": "{BACKEND}".',
            obj=_obj(alias),
            id="channels_distrib.E003",
        )
    if named_ours:
        return True, None
    try:
        from channels_distrib.layers import DistributedChannelLayer
    except Exception:  # our layer is unimportable: then no other backend can subclass it
        return False, None
    return isinstance(cls, type) and issubclass(cls, DistributedChannelLayer), None


def _validate(alias: str, backend: str, config: Mapping[str, Any]) -> list[CheckMessage]:
    """Build the layer as Channels would (``backend(**CONFIG)``); it validates without I/O."""
    try:
        import_string(backend)(**config)
    except Exception as exc:  # ImproperlyConfigured, TypeError (unknown option), ValueError...
        return [
            Error(
                f"The layer rejected its CONFIG: {type(exc).__name__}: {scrub(str(exc))}",
                hint="Fix the option named above; DESIGN.md and the README list every option.",
                obj=_obj(alias),
                id="channels_distrib.E004",
            )
        ]
    return []


def _shared_prefixes(ours: Mapping[str, Mapping[str, Any]]) -> list[CheckMessage]:
    seen: dict[tuple[str, str], str] = {}
    messages: list[CheckMessage] = []
    for alias, config in ours.items():
        key = (str(config.get("prefix", DEFAULT_PREFIX)), repr(config.get("hosts")))
        if key in seen:
            messages.append(
                Warning(
                    f"Entries {seen[key]!r} and {alias!r} use the same Redis and prefix "
                    f"{key[0]!r}: they would share groups, nodes and messages.",
                    hint=f'Give {alias!r} its own "prefix" in CONFIG.',
                    obj=_obj(alias),
                    id="channels_distrib.W002",
                )
            )
        else:
            seen[key] = alias
    return messages
