"""The namespace's control names as a first registry declares them, against the broker: a
client that starts in between must never send on a name that is not there yet."""

from __future__ import annotations

from typing import Any

import aio_pika
import pytest

from rabbitkeys import RegistryUnavailableError
from rabbitkeys._broker.control import ControlClient, declare_control_topology
from rabbitkeys._wire.protocol import StatusRequest
from rabbitkeys._wire.topology import Names


async def test_a_client_that_found_the_replies_exchange_can_send_its_request(
    amqp_url: str, namespace: str
) -> None:
    """A ``ControlClient`` binds its reply queue to ``NS.replies`` when it starts and, having
    found it, sends its requests at once on ``NS.requests``. After each exchange a first
    registry declares, a client starts and, if it found ``NS.replies``, sends a status
    request: with no registry consuming, each must end as "no registry answered", never
    NOT_FOUND on a name not declared yet (seen once: ``NS.replies`` used to come first)."""
    names = Names(namespace)
    outcomes: list[str] = []
    async with (
        await aio_pika.connect(amqp_url) as registry_side,
        await aio_pika.connect(amqp_url) as client_side,
    ):
        channel = await registry_side.channel()
        declare_exchange = channel.declare_exchange

        async def declare_then_start_a_client(name: str, *args: Any, **kwargs: Any) -> Any:
            exchange = await declare_exchange(name, *args, **kwargs)
            client = ControlClient(client_side, names, "guest")
            await client.start()
            try:
                if client._registry_seen:
                    with pytest.raises(RegistryUnavailableError):
                        await client.request(StatusRequest(), timeout=0.5)
                    outcomes.append(f"after {name}: sent, unanswered")
            finally:
                await client.close()
            return exchange

        channel.declare_exchange = declare_then_start_a_client  # type: ignore[method-assign]
        await declare_control_topology(registry_side, channel, names, "classic")
    # the replies exchange is the last one: only the client started after it sends
    assert outcomes == [f"after {names.replies_exchange}: sent, unanswered"]
