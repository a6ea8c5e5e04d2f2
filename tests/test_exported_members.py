"""The package's public surface is exactly ``__all__``, sorted, and each name is the real object."""

from __future__ import annotations

import importlib
import types

import channels_distrib

EXPECTED = {
    "ChannelFull": "channels.exceptions",
    "ClientError": "channels_distrib.consumers",
    "DistribError": "channels_distrib.exceptions",
    "DistributedChannelLayer": "channels_distrib.layers",
    "DistributedConsumer": "channels_distrib.consumers",
    "DistributedMixin": "channels_distrib.consumers",
    "Member": "channels_distrib.types",
    "MessageTooLarge": "channels.exceptions",
    "NodeInfo": "channels_distrib.types",
    "NodeStats": "channels_distrib.types",
    "RedisUnavailable": "channels_distrib.exceptions",
}


def test_all_is_sorted_and_complete():
    assert channels_distrib.__all__ == sorted(EXPECTED)


def test_each_export_is_the_defining_modules_object():
    for name, module in EXPECTED.items():
        assert getattr(channels_distrib, name) is getattr(importlib.import_module(module), name)


IMPORT_HELPERS = {"annotations", "TYPE_CHECKING", "Any"}  # __future__ and typing, not API


def test_no_undeclared_public_names():
    public = {
        name
        for name, value in vars(channels_distrib).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)  # submodules appear once imported
        and name not in IMPORT_HELPERS
    }
    # Names may be loaded lazily (module __getattr__), so they need not all be in vars() yet.
    assert public <= set(channels_distrib.__all__)


def test_version_is_a_string():
    assert isinstance(channels_distrib.__version__, str)
