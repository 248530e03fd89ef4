"""``rabbitkeys registry``: run the registry service."""

from __future__ import annotations

import argparse
from typing import Any

from .._settings import Settings
from .base import EXIT_OK, SETTINGS_HELP, metrics_endpoint, on_signals


def add_parser(commands: Any) -> None:
    registry = commands.add_parser(
        "registry",
        help="run the registry service",
        description="Run the registry: tracks workers and keys, assigns each key to one "
        "worker, retires idle keys. Run two or more; one leads, the others stand by. "
        "Stops on SIGINT/SIGTERM.",
        epilog=SETTINGS_HELP,
    )
    registry.set_defaults(handler=_registry)


async def _registry(settings: Settings, args: argparse.Namespace) -> int:
    from .._registry.registry import Registry

    registry = Registry(settings)
    on_signals(registry.stop)
    async with metrics_endpoint(settings, lambda: registry.ready):
        await registry.run()
    return EXIT_OK
