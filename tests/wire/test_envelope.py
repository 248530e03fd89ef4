"""The envelope of job messages (``rabbitkeys._wire.envelope``): what the publisher encodes is
what the worker decodes, through pamqp's own marshalling, and whatever else a key queue
may hold decodes without raising. No broker."""

from __future__ import annotations

from typing import Any

import pamqp.frame
import pamqp.header
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp import commands as spec

from rabbitkeys import InvalidKeyError, InvalidMessageError
from rabbitkeys._wire.envelope import (
    HEADER_ATTEMPTS,
    HEADER_ERROR,
    HEADER_FAILED_AT,
    HEADER_JOB_TYPE,
    HEADER_KEY,
    HEADER_PUBLISHED_AT,
    HEADER_PUBLISHER,
    HEADER_SEQUENCE,
    HEADER_WORKER,
    RESERVED_HEADER_PREFIX,
    Envelope,
    dead_letter_headers,
    decode_envelope,
    encode_envelope,
    header_frame_size,
)
from rabbitkeys._wire.topology import KeyRef


def over_the_wire(properties: spec.Basic.Properties, body_size: int = 0) -> spec.Basic.Properties:
    """The properties as a worker receives them: marshalled into a content header frame
    and read back by pamqp, as aiormq does on both ends."""
    frame = pamqp.frame.marshal(pamqp.header.ContentHeader(0, body_size, properties), 1)
    _, _, received = pamqp.frame.unmarshal(frame)
    assert isinstance(received, pamqp.header.ContentHeader)
    return received.properties


# values an AMQP table carries back unchanged (floats are sent as 32-bit: not exact)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.text(max_size=50),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(min_size=1, max_size=10), inner, max_size=4)
    ),
    max_leaves=10,
)
application_headers = st.dictionaries(
    st.text(min_size=1, max_size=20).filter(lambda n: not n.startswith(RESERVED_HEADER_PREFIX)),
    values,
    max_size=6,
)
job_types = st.from_regex(r"[A-Za-z0-9_:-]{1,64}", fullmatch=True)


@given(
    key=st.text(min_size=1, max_size=300),
    job_type=job_types,
    publisher_id=st.text(min_size=1, max_size=64),
    sequence=st.integers(1, 2**63 - 1),
    published_at=st.integers(0, 2**62),
    delivery_mode=st.sampled_from([1, 2]),
    headers=application_headers,
)
def test_what_the_publisher_encodes_the_worker_decodes(
    key: str,
    job_type: str,
    publisher_id: str,
    sequence: int,
    published_at: int,
    delivery_mode: int,
    headers: dict[str, Any],
) -> None:
    try:
        ref = KeyRef.of(key, job_type)
    except InvalidKeyError:
        return
    properties = encode_envelope(
        ref,
        publisher_id=publisher_id,
        sequence=sequence,
        delivery_mode=delivery_mode,
        headers=headers,
        published_at=published_at,
    )
    received = over_the_wire(properties, body_size=10)
    envelope = decode_envelope(received)
    assert envelope.key == key
    assert envelope.job_type == job_type
    assert envelope.publisher_id == publisher_id
    assert envelope.sequence == sequence
    assert envelope.published_at == published_at
    assert envelope.origin == (publisher_id, sequence)
    assert received.delivery_mode == delivery_mode
    # the handler sees the application's headers as sent, and rabbitkeys' own beside them
    assert {n: v for n, v in envelope.headers.items() if n in headers} == headers
    assert {n for n in envelope.headers if n not in headers} == {
        HEADER_KEY,
        HEADER_JOB_TYPE,
        HEADER_PUBLISHER,
        HEADER_SEQUENCE,
        HEADER_PUBLISHED_AT,
    }


def test_published_at_defaults_to_now_in_integer_microseconds() -> None:
    """Integer microseconds: pamqp carries a float as 32 bits, minutes off for an epoch."""
    properties = encode_envelope(KeyRef.of("k"), publisher_id="p", sequence=1, delivery_mode=2)
    envelope = decode_envelope(over_the_wire(properties))
    assert isinstance(envelope.published_at, int)
    assert envelope.published_at > 1_700_000_000 * 1_000_000  # after 2023, in µs


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ({HEADER_SEQUENCE: 1}, "reserved"),
        ({"x-rabbitkeys-anything": "x"}, "reserved"),
        ({7: "x"}, "not a str"),
        ({"when": object()}, "cannot be encoded in AMQP"),
    ],
)
def test_headers_an_application_may_not_send_are_refused(
    headers: dict[Any, Any], problem: str
) -> None:
    with pytest.raises(InvalidMessageError, match=problem):
        encode_envelope(
            KeyRef.of("k"), publisher_id="p", sequence=1, delivery_mode=2, headers=headers
        )


def test_a_message_without_headers_decodes_to_an_empty_envelope() -> None:
    for properties in (spec.Basic.Properties(), spec.Basic.Properties(headers={})):
        envelope = decode_envelope(over_the_wire(properties))
        assert envelope == Envelope(None, None, None, None, None, None, {})
        assert envelope.origin is None


def test_garbled_headers_read_as_missing_not_as_an_error() -> None:
    """A raw publish into a key queue can hold anything: wrong types read as None."""
    properties = spec.Basic.Properties(
        headers={
            HEADER_KEY: 42,
            HEADER_JOB_TYPE: ["x"],
            HEADER_PUBLISHER: "",
            HEADER_SEQUENCE: "7",
            HEADER_PUBLISHED_AT: 1.5,
        }
    )
    envelope = decode_envelope(over_the_wire(properties))
    assert (envelope.key, envelope.job_type, envelope.sequence, envelope.published_at) == (
        None,
        None,
        None,
        None,
    )
    assert envelope.publisher_id == ""
    assert envelope.origin is None  # an empty publisher id is no identity


def test_a_boolean_is_not_a_sequence_number() -> None:
    envelope = decode_envelope(
        spec.Basic.Properties(headers={HEADER_PUBLISHER: "p", HEADER_SEQUENCE: True})
    )
    assert envelope.sequence is None and envelope.origin is None


def test_a_key_that_is_not_utf8_is_read_with_replacement_characters() -> None:
    # pamqp hands back a long string that is not UTF-8 as bytes
    envelope = decode_envelope(spec.Basic.Properties(headers={HEADER_KEY: b"caf\xe9"}))
    assert envelope.key == "caf\ufffd"


@given(st.dictionaries(st.text(max_size=30), values | st.binary(max_size=20) | st.floats()))
def test_decode_never_raises_and_each_field_has_its_type(headers: dict[str, Any]) -> None:
    envelope = decode_envelope(spec.Basic.Properties(headers=headers))
    for text in (envelope.key, envelope.job_type, envelope.publisher_id):
        assert text is None or isinstance(text, str)
    for number in (envelope.sequence, envelope.published_at):
        assert number is None or (isinstance(number, int) and not isinstance(number, bool))
    assert dict(envelope.headers) == headers


def test_the_envelope_headers_are_read_only_and_a_copy() -> None:
    table = {"a": 1}
    envelope = decode_envelope(spec.Basic.Properties(headers=table))
    with pytest.raises(TypeError):
        envelope.headers["a"] = 2  # type: ignore[index]
    table["a"] = 3
    assert envelope.headers["a"] == 1


def test_dead_letter_headers_keep_the_original_and_say_why() -> None:
    properties = encode_envelope(
        KeyRef.of("post 9"),
        publisher_id="p",
        sequence=4,
        delivery_mode=2,
        headers={"tenant": "t1"},
        published_at=123,
    )
    envelope = decode_envelope(over_the_wire(properties))
    headers = dead_letter_headers(
        envelope,
        error=ValueError("cannot parse"),
        attempts=3,
        worker_id="w1",
        failed_at=456,
    )
    assert headers == {
        **envelope.headers,
        HEADER_ERROR: "ValueError: cannot parse",
        HEADER_ATTEMPTS: 3,
        HEADER_FAILED_AT: 456,
        HEADER_WORKER: "w1",
    }
    assert headers["tenant"] == "t1" and headers[HEADER_KEY] == "post 9"
    assert HEADER_ERROR not in envelope.headers  # the envelope is left as it was
    # and they travel: a dead letter is a message like any other
    over_the_wire(spec.Basic.Properties(headers=headers))


def test_a_dead_letter_always_has_a_key_header_and_a_bounded_error() -> None:
    headers = dead_letter_headers(
        decode_envelope(spec.Basic.Properties()),
        error=RuntimeError("x" * 10_000),
        attempts=1,
        worker_id="w",
    )
    assert headers[HEADER_KEY] == ""
    assert len(headers[HEADER_ERROR]) == 4096
    assert headers[HEADER_ERROR].startswith("RuntimeError: xxx")
    assert isinstance(headers[HEADER_FAILED_AT], int)


@given(headers=application_headers, body_size=st.integers(0, 2**40))
def test_header_frame_size_counts_the_message_id_aiormq_adds(
    headers: dict[str, Any], body_size: int
) -> None:
    properties = encode_envelope(
        KeyRef.of("k"), publisher_id="p", sequence=1, delivery_mode=2, headers=headers
    )
    with_id = spec.Basic.Properties(
        delivery_mode=properties.delivery_mode,
        headers=properties.headers,
        message_id="a" * 32,
        timestamp=properties.timestamp,
    )
    sent = pamqp.frame.marshal(pamqp.header.ContentHeader(0, body_size, with_id), 1)
    assert header_frame_size(properties, body_size) == len(sent)
    assert header_frame_size(with_id, body_size) == len(sent)
