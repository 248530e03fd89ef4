"""Publisher failure paths: bad input is refused before anything is sent; no registry means a
clear error, never a message reported as published."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from rabbitkeys import (
    InvalidKeyError,
    InvalidMessageError,
    Publisher,
    PublishError,
    RegistryUnavailableError,
    Settings,
)

from .support import make_settings, running_registry


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"key": ""}, InvalidKeyError),
        ({"key": 7}, InvalidKeyError),
        ({"key": "k", "job_type": "has.dot"}, InvalidKeyError),
        ({"key": "k", "body": "not bytes"}, InvalidMessageError),
        ({"key": "k", "headers": {"x-rabbitkeys-seq": 1}}, InvalidMessageError),
        ({"key": "k", "headers": {"when": object()}}, InvalidMessageError),
    ],
)
async def test_bad_input_is_refused_and_nothing_is_sent(
    settings: Settings, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    arguments = {"body": b"x", **kwargs}
    async with running_registry(settings) as registry, Publisher(settings) as publisher:
        with pytest.raises(error):
            await publisher.publish(**arguments)
        # and the publisher still works afterwards
        await publisher.publish("k", b"fine")
        assert list(registry._keys) == ["default/k"]


async def test_without_a_registry_publish_raises_registry_unavailable(
    amqp_url: str, namespace: str
) -> None:
    settings = make_settings(amqp_url, namespace, ensure_timeout=0.5)
    async with Publisher(settings) as publisher:
        with pytest.raises(RegistryUnavailableError, match="no registry answered"):
            await publisher.publish("k", b"x")


async def test_a_publish_made_before_the_registry_starts_waits_for_it(
    settings: Settings,
) -> None:
    async with Publisher(settings) as publisher:
        pending = asyncio.create_task(publisher.publish("k", b"x"))
        await asyncio.sleep(0.5)
        assert not pending.done()
        async with running_registry(settings):
            await asyncio.wait_for(pending, 10)


async def test_publish_before_start_is_a_clear_error(settings: Settings) -> None:
    with pytest.raises(PublishError, match="not started"):
        await Publisher(settings).publish("k", b"x")
