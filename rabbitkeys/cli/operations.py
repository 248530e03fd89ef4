"""``rabbitkeys keys``, ``pause``, ``resume``, ``skip``, ``redrive``: the operator's
requests to the leading registry."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from typing import TYPE_CHECKING, Any

import pydantic

from .._settings import Settings

if TYPE_CHECKING:
    from .._wire.protocol import HoldRequest, KeysRequest, RedriveRequest

from .base import EXIT_ERROR, EXIT_OK, SETTINGS_HELP, invalid, usage

_CREDENTIAL = (
    " Needs the registry's credential (its RABBITKEYS_AMQP_URL) or an administrator's: "
    "the broker refuses these requests from a publisher's or a worker's login."
)


def add_parser(commands: Any) -> None:
    """``keys``, ``pause`` and ``resume``, ``skip``, ``redrive``: in this order in ``--help``."""
    _add_keys(commands)
    _add_holds(commands)
    _add_skip(commands)
    _add_redrive(commands)


def _add_timeout(parser: argparse.ArgumentParser, default: float = 10.0, why: str = "") -> None:
    parser.add_argument(
        "--timeout",
        type=float,
        default=default,
        help=f"seconds to wait for the registry's answer (default {default:g}){why}",
    )


def _add_keys(commands: Any) -> None:
    from .._wire.protocol import MAX_KEYS_PER_PAGE, KeyStateFilter

    keys = commands.add_parser(
        "keys",
        help="list keys: state, owner, holds, backlog, oldest message, last error",
        description="Ask the leading registry for its keys, filtered and sorted, one page at "
        "a time. BACKLOG (ready + unacked) and AGE (of the oldest waiting message) come from "
        "the registry's last listing of the key queues (the management API), printed above "
        "the table; '-' when unknown. HOLDS says why no worker takes a key: paused, parked "
        "(its head failed every attempt), type_paused, redrive." + _CREDENTIAL,
        epilog=SETTINGS_HELP,
    )
    keys.add_argument("--job-type", metavar="T", help="only keys of this job type")
    keys.add_argument("--worker", metavar="W", help="only keys this worker consumes")
    keys.add_argument(
        "--state",
        metavar="S",
        choices=typing.get_args(KeyStateFilter),
        help="only keys in this state: " + ", ".join(typing.get_args(KeyStateFilter)) + " "
        "(retiring: any of its four steps; parked, paused: held so; failing: its head "
        "failed and waits for its next attempt)",
    )
    keys.add_argument(
        "--sort",
        choices=("key", "backlog", "age"),
        default="key",
        help="key: by job type and key (default); backlog: most messages first; age: oldest "
        "waiting message first (unknown figures last)",
    )
    keys.add_argument(
        "--limit",
        type=int,
        help=f"keys per page, 1 to {MAX_KEYS_PER_PAGE} (default 100)",
    )
    keys.add_argument(
        "--offset", type=int, default=0, help="skip this many matching keys (default 0)"
    )
    keys.add_argument(
        "--all",
        action="store_true",
        help=f"every page from --offset on ({MAX_KEYS_PER_PAGE} keys per request unless "
        "--limit); a key that moves between pages meanwhile is printed once",
    )
    keys.add_argument("--json", action="store_true", help="print JSON for scripts")
    _add_timeout(keys)
    keys.set_defaults(handler=_keys)


def _add_holds(commands: Any) -> None:
    for action, summary, description in (
        (
            "pause",
            "stop giving a key (or a whole job type) to workers",
            "Pause KEY of JOB_TYPE, or without KEY the whole job type: its owner lets it go "
            "(after its in-flight job) and no worker takes it until 'resume'. Messages keep "
            "arriving and wait in its queue; the pause survives a registry failover. A key "
            "the registry does not know yet is declared and paused (paused before its "
            "first message).",
        ),
        (
            "resume",
            "give a paused or parked key (or a job type) to workers again",
            "Resume KEY of JOB_TYPE, or without KEY the whole job type. A parked key is "
            "resumed too: its head job runs again with fresh attempts.",
        ),
    ):
        parser = commands.add_parser(
            action, help=summary, description=description + _CREDENTIAL, epilog=SETTINGS_HELP
        )
        parser.add_argument("job_type", metavar="JOB_TYPE")
        parser.add_argument("key", metavar="KEY", nargs="?", help="one key (default: all)")
        _add_timeout(parser)
        parser.set_defaults(handler=_hold)


def _add_skip(commands: Any) -> None:
    skip = commands.add_parser(
        "skip",
        help="dead-letter a parked key's head job and resume the key",
        description="KEY of JOB_TYPE is parked (its head job failed every attempt, and its "
        "job type's policy is 'park'): dead-letter that head (with its error; 'rabbitkeys "
        "redrive' can bring it back) and give the key to a worker again, which goes on with "
        "the next message. Only a parked key, once its worker has let it go." + _CREDENTIAL,
        epilog=SETTINGS_HELP,
    )
    skip.add_argument("job_type", metavar="JOB_TYPE")
    skip.add_argument("key", metavar="KEY")
    _add_timeout(skip, 30.0, ": it answers once the head is dead-lettered")
    skip.set_defaults(handler=_hold)


def _add_redrive(commands: Any) -> None:
    redrive = commands.add_parser(
        "redrive",
        help="put dead letters back at the head of their keys (dry run unless --apply)",
        description="Select dead letters (of a job type, one key, or --all) and put them "
        "back at the head of their keys' queues, before what waits there, in the order they "
        "failed; their workers run them as new. Without --apply: a dry run, counts per key, "
        "nothing moves. While a key is redriven its publishes wait (a few seconds)." + _CREDENTIAL,
        epilog=SETTINGS_HELP,
    )
    redrive.add_argument("--job-type", metavar="T", help="dead letters of this job type")
    redrive.add_argument("--key", metavar="K", help="of this key only (needs --job-type)")
    redrive.add_argument("--all", action="store_true", help="every dead letter")
    redrive.add_argument("--apply", action="store_true", help="move them (default: dry run)")
    redrive.add_argument("--json", action="store_true", help="print JSON for scripts")
    _add_timeout(
        redrive,
        300.0,
        ": it answers once every selected key is done, after reading the whole dead-letter "
        "queue; a redrive goes on if this command stops waiting",
    )
    redrive.set_defaults(handler=_redrive)


def keys_request(args: argparse.Namespace) -> KeysRequest:
    """The request ``rabbitkeys keys`` sends; raises ValueError with what is wrong."""
    from .._wire.protocol import MAX_KEYS_PER_PAGE, KeysRequest

    if args.offset < 0:
        raise ValueError("--offset must be 0 or more")
    limit = args.limit
    if limit is None:  # --all: pages as big as allowed
        limit = MAX_KEYS_PER_PAGE if args.all else 100
    if not 1 <= limit <= MAX_KEYS_PER_PAGE:
        raise ValueError(f"--limit must be 1 to {MAX_KEYS_PER_PAGE} (or use --all)")
    try:
        return KeysRequest(
            job_type=args.job_type,
            worker_id=args.worker,
            state=args.state,
            sort=args.sort,
            limit=limit,
            offset=args.offset,
        )
    except pydantic.ValidationError as exc:
        raise ValueError(invalid(exc)) from None


def redrive_request(args: argparse.Namespace) -> RedriveRequest:
    """The request ``rabbitkeys redrive`` sends; raises ValueError with what is wrong."""
    from .._wire.protocol import RedriveRequest

    if args.all and (args.job_type or args.key):
        raise ValueError("--all selects every dead letter: not with --job-type or --key")
    if not args.all and not args.job_type:
        raise ValueError("say which dead letters: --job-type T [--key K], or --all")
    if args.key is not None and not args.job_type:
        raise ValueError("--key needs --job-type")
    try:
        return RedriveRequest(job_type=args.job_type, key=args.key, apply=args.apply)
    except pydantic.ValidationError as exc:
        raise ValueError(invalid(exc)) from None


def hold_request(args: argparse.Namespace) -> HoldRequest:
    """The request ``rabbitkeys pause|resume|skip`` sends; raises ValueError."""
    from .._wire.protocol import HoldRequest

    try:
        return HoldRequest(action=args.command, job_type=args.job_type, key=args.key)
    except pydantic.ValidationError as exc:
        raise ValueError(invalid(exc)) from None


async def _keys(settings: Settings, args: argparse.Namespace) -> int:
    from .._admin.operations import fetch_keys, format_keys

    try:
        request = keys_request(args)
    except ValueError as exc:
        return usage(str(exc))
    if args.all:
        return await _all_keys(settings, request, args)
    page = await fetch_keys(settings, request, timeout=args.timeout)
    if args.json:
        print(json.dumps(page.model_dump(exclude={"type"}), indent=2))
    else:
        print(format_keys(page, offset=request.offset))
    return EXIT_OK


async def _all_keys(settings: Settings, request: KeysRequest, args: argparse.Namespace) -> int:
    """Every page: the text table is printed as pages come; JSON is one object at the end
    (``keys``, ``total``: keys printed, ``listed_seconds_ago``, ``paused_job_types``). A key
    that moved between pages meanwhile is printed once."""
    from .._admin.operations import (
        format_key_rows,
        format_keys_header,
        format_keys_summary,
        iterate_keys,
    )

    seen: set[str] = set()
    listed: list[dict[str, Any]] = []
    last = None
    async for page in iterate_keys(settings, request, timeout=args.timeout):
        fresh = [info for info in page.keys if info.key_id not in seen]
        seen.update(info.key_id for info in fresh)
        if args.json:
            listed += [info.model_dump() for info in fresh]
            last = page
            continue
        if last is None:  # the summary and the header once
            print(f"{format_keys_summary(page)}\n\n{format_keys_header()}")
        for line in format_key_rows(fresh):
            print(line)
        last = page
    assert last is not None  # at least one page comes
    if args.json:
        summary = {
            "keys": listed,
            "total": len(listed),
            "listed_seconds_ago": last.listed_seconds_ago,
            "paused_job_types": last.paused_job_types,
        }
        print(json.dumps(summary, indent=2))
    elif not seen:
        print("(no keys)")
    return EXIT_OK


async def _hold(settings: Settings, args: argparse.Namespace) -> int:
    from .._admin.operations import format_hold, hold

    try:
        request = hold_request(args)
    except ValueError as exc:
        return usage(str(exc))
    reply = await hold(
        settings, request.action, request.job_type, request.key, timeout=args.timeout
    )
    text = format_hold(request.action, request.job_type, request.key, reply)
    if reply.ok:
        print(text)
        return EXIT_OK
    print(f"rabbitkeys: {text}", file=sys.stderr)
    return EXIT_ERROR


async def _redrive(settings: Settings, args: argparse.Namespace) -> int:
    from .._admin.operations import format_redrive, redrive

    try:
        request = redrive_request(args)
    except ValueError as exc:
        return usage(str(exc))
    reply = await redrive(settings, request, timeout=args.timeout)
    if args.json:
        print(json.dumps(reply.model_dump(exclude={"type"}), indent=2))
    else:
        print(format_redrive(reply))
    failed = any(summary.error is not None for summary in reply.keys)
    return EXIT_ERROR if reply.applied and failed else EXIT_OK
