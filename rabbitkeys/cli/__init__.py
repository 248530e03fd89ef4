"""The ``rabbitkeys`` command: parse arguments, build settings, call the library.

Thin, one module per command group (as celery's ``celery/bin/``): ``registry``, ``worker``,
``status``, ``operations`` (keys, pause, resume, skip, redrive), ``users``, and the tooling's
``demo``, ``chaos`` and ``bench`` (which import :mod:`rabbitkeys.tools` only inside their
command functions). ``entry`` gathers their parsers into :func:`main`; ``base`` holds what
they share (exit codes, running a command, signals, the metrics endpoint). All shell: the
decisions are the library's.
Internals: ``docs/internals/cli.md``.
"""

from .base import EXIT_ERROR, EXIT_OK, EXIT_USAGE
from .entry import main
from .operations import hold_request, keys_request, redrive_request

__all__ = [
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_USAGE",
    "hold_request",
    "keys_request",
    "main",
    "redrive_request",
]
