"""Django app config: add ``"channels_distrib"`` to ``INSTALLED_APPS`` to get the system checks
and the ``distrib_*`` management commands. Importing this module does nothing else."""

from __future__ import annotations

from django.apps import AppConfig


class ChannelsDistribConfig(AppConfig):
    """Registers the ``channels_distrib`` system checks when Django starts."""

    name = "channels_distrib"
    verbose_name = "Channels Distrib"

    def ready(self) -> None:
        # Imported here, not at module level, so loading the app registry stays cheap and
        # side-effect free until Django is ready.
        from django.core import checks

        from channels_distrib.checks import TAG, check_channel_layers

        checks.register(check_channel_layers, TAG)

        # The metrics extra: export the layers' figures to prometheus_client's registry.
        # Without prometheus_client nothing is imported (find_spec only looks for it).
        import importlib.util

        if importlib.util.find_spec("prometheus_client") is not None:
            import channels_distrib.metrics  # noqa: F401
