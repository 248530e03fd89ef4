"""``rabbitkeys status``: workers, keys per worker and backlog."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .._settings import Settings
from .base import EXIT_OK, SETTINGS_HELP


def add_parser(commands: Any) -> None:
    status = commands.add_parser(
        "status",
        help="show workers, keys per worker and backlog",
        description="Ask the leading registry for workers, keys per worker and backlog.",
        epilog=SETTINGS_HELP,
    )
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.add_argument(
        "--no-backlog", action="store_true", help="skip counting ready messages per key"
    )
    status.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the registry"
    )
    status.set_defaults(handler=_status)


async def _status(settings: Settings, args: argparse.Namespace) -> int:
    from .._admin.status import fetch_status, format_status

    status = await fetch_status(settings, backlog=not args.no_backlog, timeout=args.timeout)
    if args.json:
        print(json.dumps(status.model_dump(exclude={"type"}), indent=2))
    else:
        print(format_status(status))
    return EXIT_OK
