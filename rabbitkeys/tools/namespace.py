"""Removing what a tool's own namespace left on the broker: ``rabbitkeys demo`` and
``rabbitkeys chaos`` make a fresh namespace per run, and its durable control queues (the
registry's, the dead letters) have no expiry. Thousands of leftover queues slow the broker's
boot and every listing, so each run removes its namespace once its processes have stopped.
"""

from __future__ import annotations

import contextlib

from .._broker.amqp import CHANNEL_ERRORS
from .._broker.connection import connect
from .._broker.management import list_queues
from .._errors import BrokerUnavailableError
from .._settings import Settings
from .._wire.topology import DEFAULT_JOB_TYPE, Names

__all__ = ["remove_namespace"]


async def remove_namespace(settings: Settings) -> int:
    """Delete every queue of ``settings.namespace`` (listed through the management API)
    and its exchanges; return how many queues went. Without the management API nothing is
    listed: key queues still expire (``x-expires``), the control queues stay. Never raises
    for an unreachable broker: it runs in ``finally`` blocks."""
    names = Names(settings.namespace)
    try:
        queues = await list_queues(settings, f"{settings.namespace}.")
    except BrokerUnavailableError:
        return 0
    job_types = {DEFAULT_JOB_TYPE}
    job_types.update(ref.job_type for q in queues if (ref := names.key_of_queue(q.name)))
    exchanges = [*names.control_exchanges, *(names.jobs_exchange(t) for t in sorted(job_types))]
    try:
        connection = await connect(settings, "cleanup")
    except BrokerUnavailableError:
        return 0  # the broker went away meanwhile: x-expires still removes the key queues
    try:
        channel = await connection.channel()
        for queue in queues:
            with contextlib.suppress(*CHANNEL_ERRORS):
                await channel.queue_delete(queue.name)
        for exchange in exchanges:
            with contextlib.suppress(*CHANNEL_ERRORS):
                await channel.exchange_delete(exchange)
    finally:
        await connection.close()
    return len(queues)
