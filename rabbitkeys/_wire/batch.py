"""The body of a batch message: several jobs of one key in one AMQP message, pure bytes in
and out. What goes around the body (the batch's headers) is in :mod:`.envelope`.

A publisher sends the jobs of one key that are waiting in its lane as one message when there
are several (docs/internals/publisher.md, "Batches"): the broker then stores, indexes,
delivers and acks one message for many jobs, and per-key order is free (they are one key's
jobs, in order).

Format version 1, written so that a publisher in any language can produce it: the body is
the jobs one after the other, each a record of

==============  ========================================================================
field           encoding
==============  ========================================================================
sequence        unsigned 64-bit big-endian: the job's place in its publisher's order
published_at    unsigned 64-bit big-endian: epoch microseconds
content_type    unsigned 8-bit length, then that many bytes of UTF-8 (0: no content type)
headers         an AMQP 0-9-1 field table, as in a ``basic.properties`` headers table: an
                unsigned 32-bit big-endian length, then the table's entries (0: none)
body            unsigned 32-bit big-endian length, then the job's body
==============  ========================================================================

and nothing after the last record. The batch's headers say how many records there are.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pamqp.decode
import pamqp.encode

__all__ = [
    "BATCH_FORMAT_VERSION",
    "RECORD_OVERHEAD",
    "BatchFormatError",
    "Record",
    "encode_headers",
    "pack",
    "unpack",
]

#: The version this code writes and the only one it reads (the ``x-rabbitkeys-batch``
#: header). A worker dead-letters a batch of a version it does not know, never drops it.
BATCH_FORMAT_VERSION = 1

_FIXED = struct.Struct(">QQB")  # sequence, published_at, content type length
_LENGTH = struct.Struct(">I")
_NO_HEADERS = b"\x00\x00\x00\x00"
#: Bytes a record adds to its job's content type, headers and body.
RECORD_OVERHEAD = _FIXED.size + 2 * _LENGTH.size


class BatchFormatError(ValueError):
    """A batch body that does not hold what its headers say (truncated, trailing bytes, a
    length past the end, an undecodable table or content type)."""


@dataclass(frozen=True, slots=True)
class Record:
    """One job of a batch. ``headers`` is the application's headers as an encoded AMQP
    field table (:func:`encode_headers`; empty: none), so a publisher encodes them once,
    when the job is published, and a worker decodes them only for the job it runs."""

    sequence: int
    published_at: int
    body: bytes
    content_type: str | None = None
    headers: bytes = b""

    @property
    def size(self) -> int:
        """Bytes this record takes in a batch body."""
        content_type = len(self.content_type.encode()) if self.content_type else 0
        headers = len(self.headers) if self.headers else _LENGTH.size
        return _FIXED.size + content_type + headers + _LENGTH.size + len(self.body)

    def decoded_headers(self) -> dict[str, Any]:
        """The application's headers as a dict (empty when it has none). Raises
        :class:`BatchFormatError` if the table cannot be read."""
        if len(self.headers) <= _LENGTH.size:
            return {}
        try:
            used, table = pamqp.decode.field_table(self.headers)
        except Exception as exc:
            raise BatchFormatError(f"job {self.sequence}: unreadable headers: {exc}") from None
        if used != len(self.headers):
            raise BatchFormatError(f"job {self.sequence}: headers table has trailing bytes")
        return dict(table)


def encode_headers(headers: Mapping[str, Any] | None) -> bytes:
    """Application headers as the field table a record carries (b"" for none). Raises
    whatever pamqp raises for a value AMQP cannot carry (the caller turns it into
    ``InvalidMessageError``)."""
    if not headers:
        return b""
    return bytes(pamqp.encode.field_table(dict(headers)))


def pack(records: Iterable[Record]) -> bytes:
    """The batch body of ``records``, in order."""
    parts: list[bytes] = []
    append = parts.append
    for record in records:
        content_type = record.content_type.encode() if record.content_type else b""
        if len(content_type) > 255:
            raise ValueError("a content type longer than 255 bytes cannot be batched")
        append(_FIXED.pack(record.sequence, record.published_at, len(content_type)))
        append(content_type)
        append(record.headers or _NO_HEADERS)
        append(_LENGTH.pack(len(record.body)))
        append(record.body)
    return b"".join(parts)


def unpack(body: bytes, count: int) -> list[Record]:
    """The ``count`` records of a batch body, in order. Raises :class:`BatchFormatError` if
    the body is not exactly ``count`` well-formed records."""
    view = memoryview(body)
    records: list[Record] = []
    offset = 0
    try:
        for _ in range(count):
            sequence, published_at, type_length = _FIXED.unpack_from(view, offset)
            offset += _FIXED.size
            content_type = bytes(view[offset : offset + type_length]).decode() or None
            offset += type_length
            (table_length,) = _LENGTH.unpack_from(view, offset)
            headers = bytes(view[offset : offset + _LENGTH.size + table_length])
            offset += _LENGTH.size + table_length
            (body_length,) = _LENGTH.unpack_from(view, offset)
            offset += _LENGTH.size
            job_body = bytes(view[offset : offset + body_length])
            offset += body_length
            if offset > len(view):
                raise BatchFormatError(f"record {len(records) + 1} of {count} runs past the end")
            records.append(
                Record(
                    sequence=sequence,
                    published_at=published_at,
                    body=job_body,
                    content_type=content_type,
                    headers=headers if table_length else b"",
                )
            )
    except (struct.error, UnicodeDecodeError) as exc:
        raise BatchFormatError(f"record {len(records) + 1} of {count}: {exc}") from None
    if offset != len(view):
        raise BatchFormatError(f"{len(view) - offset} bytes after the last of {count} records")
    return records
