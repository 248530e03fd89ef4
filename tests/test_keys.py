"""Any key inside the contract (a non-empty str of at most 1,024 UTF-8 bytes) works end to
end: its names pass the AMQP client's own checks, and the system handles it through the
broker, across retirements, a registry restart, and a declare the broker refuses."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands, frame, header

from rabbitkeys import InvalidKeyError
from rabbitkeys._protocol import EnsureKey, KeyAssignment, decode, encode
from rabbitkeys._topology import (
    HEADER_KEY,
    MAX_KEY_BYTES,
    KeyRef,
    Names,
    key_matches_token,
    key_queue_arguments,
    new_routing_key,
)

# pamqp 3.3.0 (what aio-pika 9.4-9.x resolves to) is stricter than the 4.x installed here:
# no '+'. Its check, copied from its constants.py, so names are tested against both.
PAMQP_3_QUEUE_NAME = re.compile(r"^[a-zA-Z0-9-_.:@#,/ ]*$")

# keys as people write them, and whatever else unicode holds
KEYS_PEOPLE_WRITE = [
    "post A",
    "user/123",
    "commentaire/été",
    "a=b",
    "#",
    "*",
    "tab\there",
    "line\nbreak",
    "🎉 party 🐇",
    "заказ-42",
    "https://example.com/search?q=rabbit&page=2#top",
    "user@example.com",
    "a+b",
    "~tilde",
    "a|b",
    " ",
    "x" * 120,
    "x" * 121,
    "é" * 500,  # 1,000 bytes
    "k" * MAX_KEY_BYTES,
]

special = st.sampled_from([*" /#*=|\t\n\r~+@:.,;%&?'\"\\\x00\x7f", "é", "🐇", "ж", "中"])
keys = st.one_of(
    st.text(min_size=1, max_size=400),
    st.lists(
        st.one_of(special, st.sampled_from(string.ascii_letters + string.digits)),
        min_size=1,
        max_size=300,
    ).map("".join),
    st.sampled_from(KEYS_PEOPLE_WRITE),
).filter(lambda key: 0 < len(key.encode("utf-8", "surrogatepass")) <= MAX_KEY_BYTES)
job_types = st.from_regex(r"[A-Za-z0-9_:-]{1,64}", fullmatch=True)
namespaces = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)


def marshal(command: commands.Frame) -> bytes:
    """What the client library does before anything reaches the socket: it validates the
    command (pamqp raises ValueError on a name it refuses) and encodes it."""
    return frame.marshal(command, 1)


def assert_valid_queue_name(name: str) -> None:
    assert 0 < len(name.encode()) <= 255, name
    assert PAMQP_3_QUEUE_NAME.fullmatch(name), name


@settings(max_examples=500, deadline=None)
@given(key=keys, job_type=job_types, namespace=namespaces)
def test_every_name_built_from_any_key_passes_pamqps_frames(
    key: str, job_type: str, namespace: str
) -> None:
    try:
        ref = KeyRef.of(key, job_type)
    except InvalidKeyError:
        assert any(0xD800 <= ord(c) <= 0xDFFF for c in key)  # lone surrogates only
        return
    names = Names(namespace)
    try:
        exchange = names.jobs_exchange(job_type)
    except InvalidKeyError:
        # the one combination that cannot work: AMQP caps exchange names at 127 characters
        assert len(namespace) + len(job_type) > 121
        return
    queue = names.key_queue(ref)
    routing_key = new_routing_key(ref)
    assert_valid_queue_name(queue)
    assert len(routing_key.encode()) <= 255
    marshal(commands.Exchange.Declare(exchange=exchange, exchange_type="direct", durable=True))
    marshal(
        commands.Queue.Declare(queue=queue, durable=True, arguments=key_queue_arguments(3600.0))
    )
    marshal(commands.Queue.Declare(queue=queue, passive=True))
    marshal(commands.Queue.Bind(queue=queue, exchange=exchange, routing_key=routing_key))
    marshal(commands.Queue.Unbind(queue=queue, exchange=exchange, routing_key=routing_key))
    marshal(commands.Queue.Delete(queue=queue, if_empty=True, if_unused=True))
    marshal(commands.Basic.Consume(queue=queue))
    marshal(commands.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True))
    properties = commands.Basic.Properties(delivery_mode=2, headers={HEADER_KEY: ref.key})
    header.ContentHeader(0, 10, properties).marshal()

    # the registry adopts queues by name: the name gives back the key's id and token
    by_name = names.key_of_queue(queue)
    assert by_name is not None
    assert (by_name.id, by_name.token) == (ref.id, ref.token)
    assert key_matches_token(key, by_name.token)
    # and the key travels intact in the control messages
    ensure = EnsureKey(job_type=job_type, key=key, stale_routing_key=routing_key)
    assert decode(encode(ensure)) == ensure
    assignment = KeyAssignment(
        key_id=ref.id, job_type=job_type, key=key, queue=queue, routing_key=routing_key
    )
    assert KeyAssignment.model_validate_json(assignment.model_dump_json()) == assignment


@given(a=keys, b=keys)
def test_distinct_keys_never_share_a_token(a: str, b: str) -> None:
    try:
        ref_a, ref_b = KeyRef.of(a), KeyRef.of(b)
    except InvalidKeyError:
        return
    assert (ref_a.token == ref_b.token) == (a == b)


@given(key=keys)
def test_plain_and_hashed_tokens_cannot_collide(key: str) -> None:
    """A plain token is the key itself and never holds '#'; a hashed one always does. So
    no key can be its own token and also another key's hashed token."""
    try:
        ref = KeyRef.of(key)
    except InvalidKeyError:
        return
    if ref.token == key:
        assert "#" not in ref.token
    else:
        assert "#" in ref.token
        assert not key_matches_token(ref.token + "x", ref.token)


def test_simple_keys_keep_readable_names() -> None:
    names = Names("ns")
    assert names.key_queue(KeyRef.of("post-42")) == "ns.key.default.post-42"
    assert names.key_queue(KeyRef.of("user@example.com")) == "ns.key.default.user@example.com"
    assert names.key_queue(KeyRef.of("post A")).startswith("ns.key.default.post_A#")


def test_names_of_an_older_token_scheme_are_not_adopted() -> None:
    """Queues named by an earlier release ('~' hashes, '=' or '+' in plain tokens) are not
    this version's names: adopting one would make every worker fail to declare it."""
    names = Names("ns")
    for token in ["~" + "0" * 40, "a=b", "a+b", "a b", "#", "x" * 121]:
        assert names.key_of_queue(f"ns.key.default.{token}") is None, token
    assert names.key_of_queue("ns.key.default.a_b#" + "0" * 40) is not None


def test_a_job_type_too_long_for_the_namespace_is_a_clear_error() -> None:
    with pytest.raises(InvalidKeyError, match="127"):
        Names("n" * 64).jobs_exchange("j" * 64)
    assert Names("n" * 64).jobs_exchange("j" * 57) == "n" * 64 + ".jobs." + "j" * 57
