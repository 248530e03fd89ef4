"""``main``: parse the arguments with every command group's parser, load the
settings, run the command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from .._errors import RabbitkeysError
from .._settings import load_settings
from . import bench, chaos, demo, operations, registry, status, users, worker
from .base import EXIT_ERROR, EXIT_OK, EXIT_USAGE, SETTINGS_HELP, run


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except RabbitkeysError as exc:
        print(f"rabbitkeys: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=settings.log_level,
        format=f"%(asctime)s %(levelname)s [{args.command} %(process)d] %(name)s: %(message)s",
    )
    try:
        result: int = run(args.handler(settings, args))
        return result
    except RabbitkeysError as exc:
        print(f"rabbitkeys: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_ERROR
    except BrokenPipeError:
        # `rabbitkeys keys | head`: the reader has gone; say nothing more (Python would
        # print a traceback, then a second one when it flushes stdout at exit)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The whole ``rabbitkeys`` parser, every command on it: what ``main`` parses with, and
    what the documentation's CLI reference (``docs/reference/cli.md``) renders."""
    return _parser()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rabbitkeys",
        description="Strict order per key, full concurrency across keys, on RabbitMQ.",
        epilog=SETTINGS_HELP,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (registry, worker, status, operations, demo, chaos, users, bench):
        group.add_parser(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
