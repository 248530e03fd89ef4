"""publish(key, payload): what each kind of payload becomes on the wire (body and
content_type, read raw from the key's queue), invalid payloads refused before anything is
sent, the size limits applied to the encoded body, and a publish's own timeout."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import aio_pika
import pytest
from pydantic import BaseModel

from rabbitkeys import InvalidMessageError, Publisher, PublishError, Settings
from rabbitkeys._wire.payload import JSON, TEXT
from rabbitkeys._wire.topology import KeyRef, Names

from ..support import make_settings, running_registry


class Comment(BaseModel):
    post: str
    text: str


@dataclasses.dataclass
class Like:
    post: str
    by: str


KINDS: list[tuple[str, object, bytes, str | None]] = [
    ("bytes", b"\x00raw\xff", b"\x00raw\xff", None),
    ("bytearray", bytearray(b"raw"), b"raw", None),
    ("memoryview", memoryview(b"xxrawxx")[2:5], b"raw", None),
    ("str", "héllo", "héllo".encode(), TEXT),
    ("model", Comment(post="post A", text="hi"), b'{"post":"post A","text":"hi"}', JSON),
    ("dict", {"text": "hi", "n": [1, 2]}, b'{"text":"hi","n":[1,2]}', JSON),
    ("list", [1, "two", None], b'[1,"two",null]', JSON),
    ("dataclass", Like(post="post A", by="bo"), b'{"post":"post A","by":"bo"}', JSON),
    ("int", 7, b"7", JSON),
]


async def _take_raw(amqp_url: str, settings: Settings, key: str) -> aio_pika.IncomingMessage:
    """The one message waiting in ``key``'s queue, as the broker has it."""
    queue_name = Names(settings.namespace).key_queue(KeyRef.of(key))
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(queue_name, ensure=False)
        message = await queue.get(no_ack=True, timeout=5)
        assert message is not None
        assert await queue.get(no_ack=True, fail=False) is None, "one message was expected"
        return message
    finally:
        await connection.close()


async def test_each_kind_of_payload_arrives_with_its_body_and_content_type(
    amqp_url: str, settings: Settings
) -> None:
    async with running_registry(settings), Publisher(settings) as publisher:
        for name, payload, _, _ in KINDS:
            await publisher.publish(f"key-{name}", payload)
        for name, _, body, content_type in KINDS:
            message = await _take_raw(amqp_url, settings, f"key-{name}")
            assert (name, message.body, message.content_type) == (name, body, content_type)
            if content_type == JSON:
                json.loads(message.body)  # what any consumer can read back
            assert message.headers["x-rabbitkeys-key"] == f"key-{name}"


async def test_bytes_are_sent_as_the_same_object(settings: Settings) -> None:
    """Zero cost for bytes: no encode, no copy, on the way into the publisher."""
    body = b"x" * 1000
    seen: list[bytes] = []
    async with running_registry(settings), Publisher(settings) as publisher:
        original = publisher._carrier._send

        def spy(send: Any) -> None:
            seen.extend(entry.body for entry in send.entries)
            original(send)

        publisher._carrier._send = spy  # type: ignore[method-assign]
        await publisher.publish("k", body)
    assert len(seen) == 1 and seen[0] is body


@pytest.mark.parametrize(
    "payload",
    [object(), {"when": object()}, [1, {"b": b"\xff"}], print],
    ids=["object", "dict-with-object", "bytes-not-utf8-inside", "function"],
)
async def test_a_payload_json_cannot_carry_is_refused_before_anything_is_sent(
    settings: Settings, payload: object
) -> None:
    async with running_registry(settings) as registry, Publisher(settings) as publisher:
        with pytest.raises(InvalidMessageError, match="as JSON"):
            await publisher.publish("k", payload)
        assert publisher.pending_messages == 0
        assert not registry._book.keys  # not even the key was asked for
        await publisher.publish("k", {"fine": True})  # and the publisher still works


async def test_size_limits_count_the_encoded_body(amqp_url: str, namespace: str) -> None:
    settings = make_settings(amqp_url, namespace, max_message_bytes=1000)
    async with running_registry(settings) as registry, Publisher(settings) as publisher:
        # 600 characters, 1,200 bytes in UTF-8: over the limit
        with pytest.raises(InvalidMessageError, match="1200 bytes; the maximum is 1000"):
            await publisher.publish("k", "é" * 600)
        # 500 items, 1,001 bytes as JSON
        with pytest.raises(InvalidMessageError, match="1001 bytes"):
            await publisher.publish("k", [1] * 500)
        assert not registry._book.keys
        await publisher.publish("k", "é" * 500)  # exactly 1,000 bytes


async def test_a_publish_with_its_own_timeout_gives_up_at_it(amqp_url: str, namespace: str) -> None:
    # no registry: the key is never routed; the publisher's own timeout is long
    settings = make_settings(amqp_url, namespace, publish_timeout=60, ensure_timeout=2)
    async with Publisher(settings) as publisher:
        with pytest.raises(PublishError, match=r"not sent within 0\.3s") as refused:
            await publisher.publish("k", {"n": 1}, timeout=0.3)
        assert "withdrawn" in str(refused.value)
        assert publisher.pending_messages == 0
