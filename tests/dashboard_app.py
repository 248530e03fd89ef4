"""The app the dashboard test's workers run: a short handler that fails on ``b"fail"``.

Failing bodies make retries and dead letters happen, so the failure panels have data; in
job type ``parking`` (``on_failure="park"``) a failing message parks its key instead, so
the held-key panels have one.
"""

from __future__ import annotations

import asyncio

from rabbitkeys import App, Message

app = App()


class DeliberateFailure(Exception):
    pass


@app.handler()
async def handle(message: Message) -> None:
    await asyncio.sleep(0.005)
    if message.body == b"fail":
        raise DeliberateFailure(f"{message.key}: asked to fail")


@app.handler("parking", on_failure="park")
async def handle_or_park(message: Message) -> None:
    if message.body == b"fail":
        raise DeliberateFailure(f"{message.key}: asked to fail, and parks its key")


@app.handler("slow", timeout=0.2)
async def run_past_the_limit(message: Message) -> None:
    await asyncio.sleep(5)
