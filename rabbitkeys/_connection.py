"""Opening AMQP connections: named after their role, with errors that never show a password."""

from __future__ import annotations

import aio_pika
from aio_pika.abc import AbstractConnection

from ._errors import BrokerUnavailableError
from ._settings import Settings

__all__ = ["connect"]


async def connect(settings: Settings, role: str) -> AbstractConnection:
    """A plain (not robust) connection: rabbitkeys decides itself what to redeclare after a
    reconnect, because aio-pika's robust channel would redeclare every key queue at once."""
    try:
        return await aio_pika.connect(
            settings.amqp_url.get_secret_value(),
            client_properties={"connection_name": f"rabbitkeys {settings.namespace} {role}"},
        )
    except Exception as exc:
        # The original exception is not chained: some carry the URL, password included.
        raise BrokerUnavailableError(
            f"cannot connect to {settings.amqp_url_masked}: {type(exc).__name__}: {exc}"
        ) from None
