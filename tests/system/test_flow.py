"""Publisher → registry → worker, in one process, against the real broker."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from rabbitkeys import App, Message, Publisher, Settings

from ..support import eventually, running_registry, running_worker


async def test_messages_of_a_key_are_handled_in_publish_order(settings: Settings) -> None:
    seen: dict[str, list[int]] = defaultdict(list)
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        seen[message.key].append(int(message.body))

    async with running_registry(settings), running_worker(settings, app):
        async with Publisher(settings) as publisher:
            # overlapping calls, not awaited one by one: order is the order of the calls
            await asyncio.gather(
                *(
                    publisher.publish(f"post-{k}", str(n).encode())
                    for n in range(30)
                    for k in range(10)
                )
            )
        await eventually(lambda: sum(map(len, seen.values())) == 300)
    assert all(seen[f"post-{k}"] == list(range(30)) for k in range(10))
