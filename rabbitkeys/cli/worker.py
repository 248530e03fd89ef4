"""``rabbitkeys worker``: run a worker for an app."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .._settings import Settings
from .base import EXIT_OK, SETTINGS_HELP, metrics_endpoint, on_signals


def add_parser(commands: Any) -> None:
    worker = commands.add_parser(
        "worker",
        help="run a worker",
        description="Run a worker for MODULE:ATTR, a rabbitkeys.App or a "
        "handler(message) serving job type 'default'. The app's startup hooks run first; "
        "one that fails: exit 1 naming it, before joining. SIGINT/SIGTERM: finish and ack "
        "in-flight messages, tell the registry, run the shutdown hooks, exit 0.",
        epilog=SETTINGS_HELP,
    )
    worker.add_argument("target", metavar="MODULE:ATTR", help="the app or handler to run")
    worker.add_argument(
        "--celery",
        action="store_true",
        help="MODULE:ATTR is a Celery app (or MODULE, found as `celery -A MODULE` finds "
        "it): run its tasks, one job at a time per key, in the order they were sent with "
        "rabbitkeys.celery.ordered (needs rabbitkeys[celery])",
    )
    worker.add_argument(
        "--on-failure",
        choices=("dead_letter", "park"),
        type=lambda value: value.replace("-", "_"),  # dead-letter too
        help="with --celery: what follows a task's last failed attempt: the job goes to the "
        "dead-letter queue and its key goes on (dead_letter, the default), or the key waits "
        "for `rabbitkeys resume` or `skip` (park)",
    )
    worker.add_argument("--id", dest="worker_id", help="worker id (default: random)")
    worker.set_defaults(handler=_worker)


async def _worker(settings: Settings, args: argparse.Namespace) -> int:
    from .._errors import ConfigError
    from .._worker.app import load_app
    from .._worker.worker import Worker

    if args.celery:
        try:
            from ..celery import worker_app
        except ImportError as exc:
            raise ConfigError(str(exc)) from None

        app = worker_app(_celery_app(args.target), on_failure=args.on_failure or "dead_letter")
    elif args.on_failure is not None:
        raise ConfigError(
            "--on-failure is for --celery: an App sets it per handler "
            "(@app.handler(on_failure=...))"
        )
    else:
        app = load_app(args.target)
    worker = Worker(app, settings, worker_id=args.worker_id)
    on_signals(worker.stop)
    async with metrics_endpoint(settings, lambda: worker.ready):
        await worker.run()
    return EXIT_OK


def _celery_app(target: str) -> Any:
    """The Celery app that ``celery -A TARGET`` runs, found by Celery's own code:
    ``MODULE:ATTR``, ``MODULE.ATTR``, or a module's ``app``, its ``celery``, its
    ``celery`` submodule's app, or the one Celery app among its names."""
    from celery.app.utils import find_app

    from .._errors import ConfigError
    from .._worker.app import load_object

    if ":" in target:
        return load_object(target, "a Celery app")
    if "" not in sys.path:  # the current directory, as `celery -A` and `python -m` look
        sys.path.insert(0, "")
    try:
        return find_app(target)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"no Celery app in {target!r} (looked as `celery -A {target}` looks: "
            f"{target}:app, {target}:celery, {target}.celery:app, a Celery app among its "
            f"names): {type(exc).__name__}: {exc}"
        ) from None
