"""The batch wire format (rabbitkeys/_wire/batch.py and the batch headers in _wire/envelope.py):
what a publisher in another language must write, read back exactly, and every malformed body
refused with BatchFormatError (the worker dead-letters it whole; it is never dropped)."""

from __future__ import annotations

import struct

import pytest

from rabbitkeys._wire.batch import BatchFormatError, Record, encode_headers, pack, unpack
from rabbitkeys._wire.envelope import (
    BATCH_CONTENT_TYPE,
    HEADER_BATCH,
    HEADER_JOBS,
    HEADER_SEQUENCE,
    encode_batch,
    encode_envelope,
    jobs_of,
)
from rabbitkeys._wire.topology import KeyRef

REF = KeyRef.of("post A/ünïcode", "comments")


def records() -> list[Record]:
    return [
        Record(sequence=7, published_at=1_700_000_000_000_001, body=b""),
        Record(
            sequence=9,
            published_at=1_700_000_000_000_002,
            body=b"\x00\xffbinary",
            content_type="application/json",
            headers=encode_headers({"trace": "abc", "n": 3, "nested": {"a": [1, 2]}}),
        ),
        Record(sequence=12, published_at=1_700_000_000_000_003, body="é".encode() * 1000),
    ]


def test_round_trip_gives_each_job_the_headers_of_a_plain_message() -> None:
    body, properties = encode_batch(
        REF, records(), publisher_id="pub", delivery_mode=2, user_id="alice"
    )
    assert properties.content_type == BATCH_CONTENT_TYPE
    assert properties.headers[HEADER_BATCH] == 1 and properties.headers[HEADER_JOBS] == 3
    jobs = jobs_of(properties, body)
    assert [job.envelope.sequence for job in jobs] == [7, 9, 12]
    assert [job.body for job in jobs] == [r.body for r in records()]
    assert [job.content_type for job in jobs] == [None, "application/json", None]
    second = jobs[1].envelope
    assert second.key == REF.key and second.job_type == "comments"
    assert second.user_id == "alice" and second.origin == ("5:alice/pub", 9)
    assert second.headers["trace"] == "abc" and second.headers["nested"] == {"a": [1, 2]}
    assert second.headers[HEADER_SEQUENCE] == 9
    assert HEADER_BATCH not in second.headers and HEADER_JOBS not in second.headers
    plain = jobs_of(
        encode_envelope(REF, publisher_id="pub", sequence=9, delivery_mode=2, user_id="alice"), b"x"
    )
    assert len(plain) == 1 and plain[0].body == b"x" and plain[0].envelope.sequence == 9


def test_the_format_is_plain_struct_packing() -> None:
    """What docs/internals/publisher.md documents, written by hand as another language would."""
    by_hand = (
        struct.pack(">QQB", 5, 6, 4) + b"text" + b"\x00\x00\x00\x00" + struct.pack(">I", 2) + b"hi"
    )
    assert pack([Record(5, 6, b"hi", "text")]) == by_hand
    assert unpack(by_hand, 1) == [Record(5, 6, b"hi", "text")]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda body: body[:-1],  # truncated
        lambda body: body + b"\x00",  # trailing bytes
        lambda body: body[:20],  # cut inside a record
        lambda body: b"",
    ],
)
def test_malformed_bodies_are_refused(mutate) -> None:  # type: ignore[no-untyped-def]
    body = pack(records())
    with pytest.raises(BatchFormatError):
        unpack(mutate(body), 3)


def test_count_and_version_are_checked() -> None:
    body, properties = encode_batch(REF, records(), publisher_id="p", delivery_mode=2)
    with pytest.raises(BatchFormatError):
        unpack(body, 2)
    for name, value in ((HEADER_BATCH, 2), (HEADER_JOBS, 0), (HEADER_JOBS, "3")):
        bad = dict(properties.headers)
        bad[name] = value
        properties.headers = bad
        with pytest.raises(BatchFormatError):
            jobs_of(properties, body)
        properties.headers = dict(bad, **{name: 1 if name == HEADER_BATCH else 3})


def test_unreadable_headers_table_is_refused() -> None:
    record = Record(1, 1, b"", headers=b"\x00\x00\x00\x03\x01a?")
    body = pack([record])
    (job,) = unpack(body, 1)
    with pytest.raises(BatchFormatError):
        job.decoded_headers()


def test_record_size_is_what_it_takes() -> None:
    for record in records():
        assert record.size == len(pack([record]))
