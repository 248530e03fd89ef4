"""The worker: ``rabbitkeys worker examples.testing_handlers.app:app`` (``BANK_URL``).

Charges for one customer must happen in the order they were published, and a charge the
bank declines must not be overtaken by that customer's later charges: the job type parks
(``on_failure="park"``), so the customer's key stops with the declined charge at its head
until an operator fixes the cause and runs ``rabbitkeys resume charges "customer 7"`` (or
``rabbitkeys skip``, which dead-letters it). Receipts just dead-letter after their retries.
"""

from __future__ import annotations

import os

from pydantic import BaseModel

import rabbitkeys


class Charge(BaseModel):
    order: str
    cents: int


class DeclinedError(Exception):
    """The bank said no."""


class Bank:
    """The real client (an HTTP API, say): what the tests replace with a fake."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def charge(self, customer: str, order: str, cents: int) -> str:
        raise NotImplementedError(f"POST {self.url}/charges")  # not part of the example


app = rabbitkeys.App()


@app.on_startup
async def open_bank(context: rabbitkeys.Context) -> None:
    context.bank = Bank(os.environ.get("BANK_URL", "https://bank.example"))
    context.receipts = []


@app.handler("charges", on_failure="park")
async def charge(message: rabbitkeys.Message[Charge]) -> str:
    charge = message.payload
    return await message.context.bank.charge(message.key, charge.order, charge.cents)


@app.handler("receipts")
def send_receipt(message: rabbitkeys.Message[Charge]) -> None:  # a plain def: in a thread
    message.context.receipts.append((message.key, message.payload.order))
