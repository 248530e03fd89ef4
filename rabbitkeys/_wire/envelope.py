"""The envelope of a job message: the one home of what a publisher writes around a body and
what a worker reads back from it, ``encode`` beside ``decode``, and of the headers a
dead-lettered copy gets. A change of the wire format of job messages starts here.

A job message is its body and AMQP properties: ``delivery_mode`` (persistent when the
namespace is durable) and a headers table holding the application's headers and rabbitkeys'
own, all named ``x-rabbitkeys-*`` (a prefix applications may not use):

* ``x-rabbitkeys-key``: the key as the publisher wrote it (a hashed queue name cannot give
  it back), and ``x-rabbitkeys-job-type``;
* ``x-rabbitkeys-publisher`` and ``x-rabbitkeys-seq``: which publisher sent it, and its
  place in that publisher's order (what dedup and order checks read);
* ``x-rabbitkeys-published-at``: when, in integer epoch microseconds (pamqp carries a
  Python float as a 32-bit float, which would round an epoch timestamp to minutes).

A **batch** (several jobs of one key in one message, :mod:`.batch`) has the same headers,
the sequence number and time of its first job, and two more: ``x-rabbitkeys-batch``, the
format version of its body (1), and ``x-rabbitkeys-jobs``, how many jobs it holds. Its
content type is ``application/x-rabbitkeys-batch``; each job's own is in its record.
:func:`jobs_of` gives the jobs of any delivery: one for a plain message, each of a batch,
with the headers each would have had as a plain message.

Anyone who can publish into a key queue can put anything there: :func:`decode_envelope` never
raises, and a missing or garbled header reads as None.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import pamqp.frame
import pamqp.header
from pamqp import commands as spec

from .._errors import InvalidMessageError, failure_text
from .batch import BATCH_FORMAT_VERSION, BatchFormatError, Record, pack, unpack
from .topology import KeyRef

__all__ = [
    "BATCH_CONTENT_TYPE",
    "HEADER_ATTEMPTS",
    "HEADER_BATCH",
    "HEADER_ERROR",
    "HEADER_FAILED_AT",
    "HEADER_JOBS",
    "HEADER_JOB_TYPE",
    "HEADER_KEY",
    "HEADER_PUBLISHED_AT",
    "HEADER_PUBLISHER",
    "HEADER_SEQUENCE",
    "HEADER_WORKER",
    "RESERVED_HEADER_PREFIX",
    "Envelope",
    "Job",
    "dead_letter_headers",
    "decode_envelope",
    "encode_envelope",
    "encode_batch",
    "header_frame_size",
    "header_text",
    "jobs_of",
]

#: Header names applications may not use: rabbitkeys' own.
RESERVED_HEADER_PREFIX = "x-rabbitkeys-"

HEADER_KEY = "x-rabbitkeys-key"
HEADER_JOB_TYPE = "x-rabbitkeys-job-type"
HEADER_PUBLISHER = "x-rabbitkeys-publisher"
HEADER_SEQUENCE = "x-rabbitkeys-seq"
HEADER_PUBLISHED_AT = "x-rabbitkeys-published-at"
# a batch's
HEADER_BATCH = "x-rabbitkeys-batch"
HEADER_JOBS = "x-rabbitkeys-jobs"
BATCH_CONTENT_TYPE = "application/x-rabbitkeys-batch"
# added to a dead-lettered copy
HEADER_ERROR = "x-rabbitkeys-error"
HEADER_ATTEMPTS = "x-rabbitkeys-attempts"
HEADER_FAILED_AT = "x-rabbitkeys-failed-at"
HEADER_WORKER = "x-rabbitkeys-worker"
#: on a message the registry put back at the head of its key (``rabbitkeys redrive``): the
#: redrive's id. The worker runs it as new (no duplicate check: its publisher and sequence
#: were seen before, when it failed)
HEADER_REDRIVE = "x-rabbitkeys-redrive"

# The error text a dead-lettered copy carries is cut to this many characters.
_MAX_ERROR_CHARS = 4096
# aiormq gives every message a message_id (a short string of 32 hex digits) if it has none.
_MESSAGE_ID_BYTES = 1 + 32


@dataclass(frozen=True, slots=True)
class Envelope:
    """What a delivered job message says about itself, read once per delivery. A field is
    None when its header is missing or not of its type (a message not published by a
    :class:`~rabbitkeys.Publisher`)."""

    key: str | None
    job_type: str | None
    publisher_id: str | None
    #: the publishing connection's user, as the broker checked it (the ``user_id`` property)
    user_id: str | None
    sequence: int | None
    #: epoch microseconds
    published_at: int | None
    #: the whole headers table, rabbitkeys' own included (what a handler is shown), read-only
    headers: Mapping[str, Any]

    @property
    def origin(self) -> tuple[str, int] | None:
        """(publisher, sequence number): the message's identity for dedup and order checks;
        None unless both are there. The publisher is its id *within its user*: a publisher
        id is chosen by the publisher, the user is vouched for by the broker, so one user
        cannot make another's messages count as duplicates (length-prefixed: unambiguous)."""
        if not self.publisher_id or self.sequence is None:
            return None
        if not self.user_id:
            return (self.publisher_id, self.sequence)
        return (f"{len(self.user_id)}:{self.user_id}/{self.publisher_id}", self.sequence)


def encode_envelope(
    ref: KeyRef,
    *,
    publisher_id: str,
    sequence: int,
    delivery_mode: int,
    user_id: str | None = None,
    content_type: str | None = None,
    headers: Mapping[str, Any] | None = None,
    published_at: int | None = None,
) -> spec.Basic.Properties:
    """The properties of a job message for ``ref``: the application's ``headers`` with
    rabbitkeys' own added, the publishing user and the payload's content type.
    ``published_at`` (epoch microseconds) defaults to now.

    Raises :class:`InvalidMessageError` for a header name that is not a str or is reserved,
    and for a value AMQP cannot carry: here, in the caller, rather than as a channel the
    broker closes later."""
    table: dict[str, Any] = {}
    if headers:
        for name, value in headers.items():
            if not isinstance(name, str) or name.startswith(RESERVED_HEADER_PREFIX):
                raise InvalidMessageError(
                    f"header name {name!r} is not a str or is reserved ({RESERVED_HEADER_PREFIX}*)"
                )
            table[name] = value
    table[HEADER_KEY] = ref.key
    table[HEADER_JOB_TYPE] = ref.job_type
    table[HEADER_PUBLISHER] = publisher_id
    table[HEADER_SEQUENCE] = sequence
    table[HEADER_PUBLISHED_AT] = time.time_ns() // 1000 if published_at is None else published_at
    # aiormq adds a random message_id, which it needs to match a basic.return
    # user_id: the broker refuses the message unless it is the connection's user, so the
    # worker can trust it (the publisher's identity for dedup, Envelope.origin);
    # content_type: what _payload made of the payload (None for bytes)
    properties = spec.Basic.Properties(
        delivery_mode=delivery_mode, headers=table, user_id=user_id, content_type=content_type
    )
    properties.timestamp = _seconds(table[HEADER_PUBLISHED_AT])  # the broker's head age
    if headers:  # rabbitkeys' own headers always encode
        try:
            spec.Basic.Properties.marshal(properties)
        except Exception as exc:
            raise InvalidMessageError(f"headers cannot be encoded in AMQP: {exc}") from None
    return properties


def _seconds(published_at: int) -> datetime.datetime | None:
    """The AMQP ``timestamp`` (whole seconds) of a message published at ``published_at``
    (epoch microseconds): the management API's ``head_message_timestamp`` reads it. None
    for a time no datetime holds."""
    try:
        return datetime.datetime.fromtimestamp(max(0, published_at // 1_000_000), datetime.UTC)
    except (OverflowError, ValueError, OSError):
        return None


def decode_envelope(properties: spec.Basic.Properties) -> Envelope:
    """The envelope of a delivered message; never raises."""
    raw = properties.headers
    headers = dict(raw) if isinstance(raw, Mapping) else {}
    return Envelope(
        key=header_text(headers.get(HEADER_KEY)),
        job_type=header_text(headers.get(HEADER_JOB_TYPE)),
        publisher_id=header_text(headers.get(HEADER_PUBLISHER)),
        user_id=properties.user_id or None,
        sequence=_integer(headers.get(HEADER_SEQUENCE)),
        published_at=_integer(headers.get(HEADER_PUBLISHED_AT)),
        headers=MappingProxyType(headers),
    )


@dataclass(frozen=True, slots=True)
class Job:
    """One job of a delivery: its envelope (the headers it would have had as a message of
    its own), body and content type."""

    envelope: Envelope
    body: bytes
    content_type: str | None


def encode_batch(
    ref: KeyRef,
    records: list[Record],
    *,
    publisher_id: str,
    delivery_mode: int,
    user_id: str | None = None,
) -> tuple[bytes, spec.Basic.Properties]:
    """The body and properties of one message carrying ``records`` (jobs of ``ref``, in
    order; at least one). Each record's headers were checked when it was published."""
    first = records[0]
    table: dict[str, Any] = {
        HEADER_KEY: ref.key,
        HEADER_JOB_TYPE: ref.job_type,
        HEADER_PUBLISHER: publisher_id,
        HEADER_SEQUENCE: first.sequence,
        HEADER_PUBLISHED_AT: first.published_at,
        HEADER_BATCH: BATCH_FORMAT_VERSION,
        HEADER_JOBS: len(records),
    }
    properties = spec.Basic.Properties(
        delivery_mode=delivery_mode,
        headers=table,
        user_id=user_id,
        content_type=BATCH_CONTENT_TYPE,
        timestamp=_seconds(first.published_at),  # the broker's head_message_timestamp
    )
    return pack(records), properties


def jobs_of(properties: spec.Basic.Properties, body: bytes) -> list[Job]:
    """The jobs a delivered message carries, in order: itself for a plain message, each
    record of a batch. Raises :class:`~.batch.BatchFormatError` for a batch that
    cannot be read (an unknown version, a count or body that do not match): the caller
    dead-letters it whole, never drops it."""
    envelope = decode_envelope(properties)
    raw = envelope.headers
    if HEADER_BATCH not in raw:
        return [Job(envelope, body, properties.content_type)]
    version, count = raw.get(HEADER_BATCH), _integer(raw.get(HEADER_JOBS))
    if version != BATCH_FORMAT_VERSION:
        raise BatchFormatError(
            f"batch format version {version!r}; this worker reads {BATCH_FORMAT_VERSION}"
        )
    if count is None or count < 1:
        raise BatchFormatError(f"{HEADER_JOBS} is {raw.get(HEADER_JOBS)!r}")
    shared = {name: value for name, value in raw.items() if name not in (HEADER_BATCH, HEADER_JOBS)}
    jobs = []
    for record in unpack(body, count):
        headers = record.decoded_headers()
        headers.update(shared)
        headers[HEADER_SEQUENCE] = record.sequence
        headers[HEADER_PUBLISHED_AT] = record.published_at
        jobs.append(
            Job(
                Envelope(
                    key=envelope.key,
                    job_type=envelope.job_type,
                    publisher_id=envelope.publisher_id,
                    user_id=envelope.user_id,
                    sequence=record.sequence,
                    published_at=record.published_at,
                    headers=MappingProxyType(headers),
                ),
                record.body,
                record.content_type,
            )
        )
    return jobs


def header_frame_size(properties: spec.Basic.Properties, body_size: int) -> int:
    """Bytes of the content header frame these properties make once sent (the broker
    refuses a frame over the connection's frame_max by closing the whole connection)."""
    frame = pamqp.frame.marshal(pamqp.header.ContentHeader(0, body_size, properties), 1)
    return len(frame) + (0 if properties.message_id else _MESSAGE_ID_BYTES)


def dead_letter_headers(
    envelope: Envelope,
    *,
    error: BaseException,
    attempts: int,
    worker_id: str,
    failed_at: int | None = None,
) -> dict[str, Any]:
    """The headers of a dead-lettered copy: the original's, with why, how many attempts,
    when (epoch microseconds, default now) and which worker. The key header is always there
    (empty when the original had none), so a dead letter can be sorted by key."""
    headers = dict(envelope.headers)
    headers.update(
        {
            HEADER_ERROR: failure_text(error)[:_MAX_ERROR_CHARS],
            HEADER_ATTEMPTS: attempts,
            HEADER_FAILED_AT: time.time_ns() // 1000 if failed_at is None else failed_at,
            HEADER_WORKER: worker_id,
        }
    )
    headers.setdefault(HEADER_KEY, "")
    return headers


def header_text(value: Any) -> str | None:
    """A header value as text: pamqp hands back a long string it cannot decode as UTF-8
    as bytes (and the event exchange sends its strings as bytes)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
