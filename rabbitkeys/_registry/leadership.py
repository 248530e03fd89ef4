"""Which registry leads a namespace: the one home of the leader lock.

Leadership is an exclusive queue, ``<namespace>.registry.leader`` (only registries may
declare it: :mod:`rabbitkeys._admin.permissions`): the broker gives it to
one connection and frees it the moment that connection dies, so a standby takes over
without any lease to expire or clock to trust.
"""

from __future__ import annotations

import asyncio
import logging

import aiormq
from aio_pika.abc import AbstractConnection

from .._broker.amqp import open_channel, sleep_unless
from .._wire.topology import Names

__all__ = ["take_leadership"]

log = logging.getLogger("rabbitkeys.registry")

# How often a standby tries to take the lock.
_RETRY = 1.0


async def take_leadership(
    connection: AbstractConnection, names: Names, registry_id: str, stopping: asyncio.Event
) -> None:
    """Hold the namespace's leader lock (until ``connection`` closes), or return once
    ``stopping`` is set."""
    lock_name = names.leader_lock
    waiting_logged = False
    while not stopping.is_set():
        channel = await open_channel(connection)  # closed by RESOURCE_LOCKED
        try:
            await channel.declare_queue(lock_name, exclusive=True, auto_delete=True)
            return
        except aiormq.exceptions.ChannelLockedResource:
            if not waiting_logged:
                log.info("registry %s is standby: another registry leads", registry_id)
                waiting_logged = True
        await sleep_unless(stopping, _RETRY)
