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
