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
    """Delete every queue of ``settings.namespace`` and its exchanges; return how many
    queues were asked to go. The durable control queues (the registry's, the dead letters)
    and the exchanges go by name, over AMQP; the key queues are listed through the
    management API. Without one at ``management_urls`` (not set for a broker on another
    port than 5672, the guess is another broker's or nobody's) the key queues are not
    listed and expire (``x-expires``). Never raises for an unreachable broker: it runs in
    ``finally`` blocks."""
    names = Names(settings.namespace)
    control_queues = [names.registry_queue, names.dead_letter_queue]
    try:
        listed = [q.name for q in await list_queues(settings, f"{settings.namespace}.")]
    except BrokerUnavailableError:
        listed = []
    queues = control_queues + [name for name in listed if name not in control_queues]
    job_types = {DEFAULT_JOB_TYPE}
    job_types.update(ref.job_type for name in listed if (ref := names.key_of_queue(name)))
    exchanges = [*names.control_exchanges, *(names.jobs_exchange(t) for t in sorted(job_types))]
    try:
        connection = await connect(settings, "cleanup")
    except BrokerUnavailableError:
        return 0  # the broker went away meanwhile: x-expires still removes the key queues
    try:
        channel = await connection.channel()
        # deleting a queue or exchange that is not there is no error in RabbitMQ
        for queue in queues:
            with contextlib.suppress(*CHANNEL_ERRORS):
                await channel.queue_delete(queue)
        for exchange in exchanges:
            with contextlib.suppress(*CHANNEL_ERRORS):
                await channel.exchange_delete(exchange)
    finally:
        await connection.close()
    return len(queues)
