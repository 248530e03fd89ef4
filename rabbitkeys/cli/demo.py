"""``rabbitkeys demo``: a registry, three workers and a publisher, on this machine."""

from __future__ import annotations

import argparse
from typing import Any

from .._settings import Settings
from .base import SETTINGS_HELP


def add_parser(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        help="run a registry, three workers and a publisher, and show order and spread",
        description="Start a registry and three workers as processes, publish keyed jobs "
        "(some keys slow), then show that each key ran in order and keys spread.",
        epilog=SETTINGS_HELP,
    )
    demo.add_argument("--keys", type=int, default=30, help="number of keys (default 30)")
    demo.add_argument("--messages", type=int, default=20, help="messages per key (default 20)")
    demo.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    demo.set_defaults(handler=_demo)


async def _demo(settings: Settings, args: argparse.Namespace) -> int:
    from ..tools.demo import run_demo

    return await run_demo(settings, keys=args.keys, messages=args.messages, workers=args.workers)
