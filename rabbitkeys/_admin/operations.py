"""The operator's requests to the leading registry (``rabbitkeys keys``, ``pause``,
``resume``, ``skip``, ``redrive``) and how their answers are printed.

They travel through ``Names.operations_exchange``, on which only the registry's role (or an
administrator) may write: a publisher's or a worker's credential is refused by the broker,
and that refusal is reported as such, not as a registry that does not answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Literal, TypeVar

import aiormq
from aio_pika.abc import AbstractConnection

from .._broker.amqp import fresh_channel
from .._broker.connection import connect
from .._broker.control import ControlClient
from .._errors import RabbitkeysError, RegistryUnavailableError
from .._settings import Settings
from .._wire.protocol import (
    ControlMessage,
    HoldReply,
    HoldRequest,
    KeyInfo,
    KeysPage,
    KeysRequest,
    RedriveReply,
    RedriveRequest,
    Refused,
)
from .._wire.topology import Names

__all__ = [
    "OperationRefusedError",
    "fetch_keys",
    "format_age",
    "format_hold",
    "format_key_rows",
    "format_keys",
    "format_keys_header",
    "format_keys_summary",
    "format_redrive",
    "hold",
    "iterate_keys",
    "redrive",
]

HoldAction = Literal["pause", "resume", "skip"]

#: how long a redrive waits for a leading registry before it fails (it may wait minutes
#: for the answer itself)
_LEADER_WAIT = 15.0
_LEADER_POLL = 0.5

_CREDENTIAL_HINT = (
    "these commands need the registry's credential (its RABBITKEYS_AMQP_URL) or an administrator's"
)


class OperationRefusedError(RabbitkeysError):
    """The broker refused the request: this login may not write on the namespace's
    operations exchange."""


@contextlib.asynccontextmanager
async def _operator(
    settings: Settings, *, leader_within: float | None = None
) -> AsyncIterator[ControlClient]:
    """A control client on the operations exchange, for one or more requests;
    ``leader_within``: first wait that long at most for a leading registry."""
    names = Names(settings.namespace)
    connection = await connect(settings, "operator")
    try:
        client = ControlClient(
            connection, names, settings.amqp_user, exchange=names.operations_exchange
        )
        try:
            if leader_within is not None:
                await _wait_for_a_leader(connection, names, leader_within)
            await client.start()
            yield client
        except aiormq.exceptions.ChannelAccessRefused as exc:
            raise OperationRefusedError(
                f"the broker refused user {settings.amqp_user!r} on "
                f"{names.operations_exchange}: {_CREDENTIAL_HINT} ({exc})"
            ) from None
        except (aiormq.exceptions.AMQPError, ConnectionError) as exc:
            raise RabbitkeysError(f"the request to the registry failed: {exc}") from None
    finally:
        await connection.close()


_Reply = TypeVar("_Reply", KeysPage, HoldReply, RedriveReply)


def _expect(reply: ControlMessage, kind: type[_Reply]) -> _Reply:
    if isinstance(reply, Refused):  # the registry failed to answer it
        raise RabbitkeysError(f"the registry could not answer: {reply.reason}")
    if not isinstance(reply, kind):
        raise RabbitkeysError(f"unexpected reply from the registry: {reply!r}")
    return reply


async def fetch_keys(settings: Settings, request: KeysRequest, *, timeout: float) -> KeysPage:
    """One page of keys, as the leading registry sees them."""
    async with _operator(settings) as client:
        return _expect(await client.request(request, timeout=timeout), KeysPage)


async def iterate_keys(
    settings: Settings, request: KeysRequest, *, timeout: float
) -> AsyncIterator[KeysPage]:
    """Every page from ``request.offset`` on, one request each (``timeout`` each), on one
    connection. Keys change meanwhile: a key may move from one page to another between
    requests (pages of a sort by backlog or age most of all), so a caller that needs each
    key once drops repeats by key id."""
    async with _operator(settings) as client:
        offset: int | None = request.offset
        while offset is not None:
            asked = request.model_copy(update={"offset": offset})
            page = _expect(await client.request(asked, timeout=timeout), KeysPage)
            yield page
            offset = page.next_offset


async def hold(
    settings: Settings,
    action: HoldAction,
    job_type: str,
    key: str | None,
    *,
    timeout: float,
) -> HoldReply:
    """Pause or resume a key (or with ``key`` None its whole job type), or skip a parked
    key's head. A refusal is a reply with ``ok`` False, not an exception."""
    request = HoldRequest(action=action, job_type=job_type, key=key)
    async with _operator(settings) as client:
        return _expect(await client.request(request, timeout=timeout), HoldReply)


async def _leader_consumes(connection: AbstractConnection, names: Names) -> bool:
    """Whether a registry consumes the namespace's registry queue now (only the leader
    does); a passive declare, which needs no permission."""
    with contextlib.suppress(aiormq.exceptions.ChannelNotFoundEntity):
        async with fresh_channel(connection) as channel:
            declared = await channel.queue_declare(names.registry_queue, passive=True)
            return bool(declared.consumer_count)
    return False


async def _wait_for_a_leader(connection: AbstractConnection, names: Names, within: float) -> None:
    """Before a request that may take minutes to answer: fail in ``within`` seconds, not
    at its timeout, if no registry leads (a failover takes a few seconds)."""
    deadline = time.monotonic() + within
    while not await _leader_consumes(connection, names):
        if time.monotonic() >= deadline:
            raise RegistryUnavailableError(
                f"no registry leads namespace {names.namespace!r} (nothing consumes "
                f"{names.registry_queue} for {within:g}s): is `rabbitkeys registry` running?"
            )
        await asyncio.sleep(_LEADER_POLL)


async def redrive(settings: Settings, request: RedriveRequest, *, timeout: float) -> RedriveReply:
    """Put dead letters back at the head of their keys (``request.apply``), or count them.
    The registry answers when it is done with every key; a redrive it started goes on if
    ``timeout`` passes first."""
    async with _operator(settings, leader_within=_LEADER_WAIT) as client:
        try:
            reply = await client.request(request, timeout=timeout)
        except RegistryUnavailableError as exc:
            if not request.apply:
                raise
            raise RegistryUnavailableError(
                f"{exc}; if a registry runs, the redrive may still be under way: see "
                "'rabbitkeys keys --state redriving', and wait longer with --timeout"
            ) from None
        return _expect(reply, RedriveReply)


# --- text -------------------------------------------------------------------------------


def format_age(seconds: float | None) -> str:
    """``3s``, ``5m``, ``2h``, ``4d``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _shown(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters: control characters escaped (a key is any
    Unicode), the end cut with an ellipsis."""
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= width else text[: width - 1] + "…"


_COLUMNS = (
    # title, width, right-aligned
    ("JOB TYPE", 12, False),
    ("KEY", 26, False),
    ("STATE", 9, False),
    ("OWNER", 14, False),
    ("HOLDS", 12, False),
    ("BACKLOG", 7, True),
    ("AGE", 4, True),
    ("FAILS", 5, True),
)
_MIN_ERROR_WIDTH = 20


def _terminal_width() -> int:
    return shutil.get_terminal_size((120, 24)).columns


def _row(cells: Sequence[str], error: str, width: int) -> str:
    parts = []
    for cell, (_, size, right) in zip(cells, _COLUMNS, strict=True):
        shown = _shown(cell, size)
        parts.append(f"{shown:>{size}}" if right else f"{shown:<{size}}")
    line = " ".join(parts)
    if error:
        line += " " + _shown(error, max(_MIN_ERROR_WIDTH, width - len(line) - 1))
    return line.rstrip()


def format_keys_header(width: int | None = None) -> str:
    return _row([title for title, _, _ in _COLUMNS], "LAST ERROR", width or _terminal_width())


def format_key_rows(keys: Iterable[KeyInfo], width: int | None = None) -> list[str]:
    """One line per key; LAST ERROR gets what is left of ``width`` (the terminal's)."""
    width = width or _terminal_width()
    return [
        _row(
            [
                info.job_type,
                info.key,
                info.state,
                info.owner or "-",
                ",".join(info.holds) or "-",
                "-" if info.backlog is None else str(info.backlog),
                format_age(info.oldest_age_seconds),
                str(info.failures) if info.failures else "-",
            ],
            # one line: an error's own line breaks would break the table
            " ".join((info.last_error or "").split()),
            width,
        )
        for info in keys
    ]


def format_keys_summary(page: KeysPage) -> str:
    """How many keys match, how old the figures are, which job types are paused."""
    total, listed_seconds_ago, paused = page.total, page.listed_seconds_ago, page.paused_job_types
    line = f"{total:,} key{'s' if total != 1 else ''}"
    if listed_seconds_ago is None:
        line += "; backlog and age unknown (no listing of the key queues yet)"
    else:
        line += f"; backlog and age as of {format_age(listed_seconds_ago)} ago"
    if paused:
        line += f"\npaused job types: {', '.join(paused)}"
    return line


def format_keys(page: KeysPage, *, offset: int = 0, width: int | None = None) -> str:
    """A page as a table, with where it sits among the matching keys and how to get the
    next one."""
    lines = [format_keys_summary(page)]
    if page.keys:
        lines.append(f"showing {offset + 1:,}-{offset + len(page.keys):,}")
    lines += ["", format_keys_header(width), *format_key_rows(page.keys, width)]
    if not page.keys:
        lines.append("(no keys)" if page.total == 0 else "(no keys at this offset)")
    if page.next_offset is not None:
        lines.append(f"\nmore: --offset {page.next_offset} (or --all)")
    return "\n".join(lines)


def format_hold(action: HoldAction, job_type: str, key: str | None, reply: HoldReply) -> str:
    """The registry's words when done; when refused, what was asked too."""
    if reply.ok:
        return reply.detail
    what = f"job type {job_type}" if key is None else f"key {job_type}/{_shown(key, 60)}"
    return f"{action} {what} refused: {reply.detail}"


def format_redrive(reply: RedriveReply) -> str:
    lines = [f"{'JOB TYPE':<14} {'KEY':<40} {'MESSAGES':>8}  ERROR"]
    for summary in reply.keys:
        lines.append(
            f"{_shown(summary.job_type, 14):<14} {_shown(summary.key, 40):<40} "
            f"{summary.messages:>8}  {' '.join((summary.error or '').split())}".rstrip()
        )
    if not reply.keys:
        lines.append("(no dead letters selected)")
    lines.append("")
    failed = [s for s in reply.keys if s.error is not None]
    keys = f"{len(reply.keys):,} key{'s' if len(reply.keys) != 1 else ''}"
    if reply.applied:
        moved = reply.messages - sum(s.messages for s in failed)
        lines.append(f"redriven: {moved:,} dead letter{'s' if moved != 1 else ''} of {keys}")
        if failed:
            lines.append(
                f"{len(failed):,} key(s) failed: their dead letters stay in the dead-letter "
                "queue; run again"
            )
    else:
        lines.append(f"selected: {reply.messages:,} dead letters of {keys}")
    lines.append(
        f"left in the dead-letter queue: {reply.not_selected:,} not selected, "
        f"{reply.unreadable:,} unreadable (no key or job type header)"
    )
    if not reply.applied:
        lines.append("dry run: nothing moved; add --apply")
    return "\n".join(lines)
