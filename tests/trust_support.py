"""Helpers for the trust tests: real RabbitMQ users per role, and an attacker that is a plain
aio-pika client holding one of their credentials.

The users get exactly what ``rabbitkeys._admin.permissions.permissions_for`` gives their role in
the test's namespace, so a test shows what the table allows, not what a test user happens
to be granted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import urllib.error
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from rabbitkeys import Settings
from rabbitkeys._admin.permissions import Role, permissions_for
from rabbitkeys._wire.topology import Names

from .support import make_settings

if TYPE_CHECKING:
    from .conftest import Broker

#: What the broker answers a refused operation with: ACCESS_REFUSED (a permission) or
#: PRECONDITION_FAILED (a ``user_id`` that is not the connection's user).
BROKER_REFUSALS = (
    aiormq.exceptions.ChannelAccessRefused,
    aiormq.exceptions.ChannelPreconditionFailed,
    # another connection's exclusive queue
    aiormq.exceptions.ChannelLockedResource,
)


def settings_as(url: str, namespace: str, **overrides: Any) -> Settings:
    """Test settings (:func:`make_settings`) that reach the broker, and its management API,
    with ``url``'s login alone. A ``RABBITKEYS_TEST_MANAGEMENT_URL`` with a login of its own
    (the administrator's, as for the RabbitMQ 4 broker beside the developers' 3.10) would
    otherwise be the login of every management call, and a role's claims about the API
    would be tried with the administrator's rights."""
    settings = make_settings(url, namespace, **overrides)
    if settings.management_url is None or "management_url" in overrides:
        return settings
    bare = [
        given._replace(netloc=given.netloc.rpartition("@")[2]).geturl()
        for given in map(urllib.parse.urlsplit, settings.management_urls)
    ]
    return make_settings(url, namespace, **overrides, management_url=",".join(bare))


@dataclass(frozen=True)
class RoleUser:
    """One RabbitMQ user holding one role's permissions in one namespace."""

    role: Role
    name: str
    password: str
    url: str


@dataclass
class RoleUsers:
    """The users of a test's namespace, one per role (and any extra ones a test adds);
    :meth:`remove_all` deletes every one of them."""

    broker: Broker
    vhost: str
    namespace: str
    made: list[RoleUser] = field(default_factory=list)

    def add(self, role: Role, label: str | None = None) -> RoleUser:
        """Create a user with ``role``'s permissions; ``label`` tells two users of one role
        apart (default: the role's name)."""
        name = f"{self.namespace}-{label or role.value}"
        password = secrets.token_urlsafe(18)
        quoted_user = urllib.parse.quote(name, safe="")
        quoted_vhost = urllib.parse.quote(self.vhost, safe="")
        tags = "management" if role is Role.REGISTRY else ""
        # recorded first, so that a failure below still removes the user
        user = RoleUser(role, name, password, self._url(name, password))
        self.made.append(user)
        self.broker.api(f"users/{quoted_user}", "PUT", {"password": password, "tags": tags})
        permissions = permissions_for(role, Names(self.namespace))
        self.broker.api(
            f"permissions/{quoted_vhost}/{quoted_user}",
            "PUT",
            {
                "configure": permissions.configure,
                "write": permissions.write,
                "read": permissions.read,
            },
        )
        return user

    def _url(self, user: str, password: str) -> str:
        parts = urllib.parse.urlsplit(self.broker.url_in(self.vhost))
        host = parts.hostname or "localhost"
        netloc = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}"
        netloc += f"@{host}" + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

    def of(self, role: Role) -> RoleUser:
        """The first user made for ``role``."""
        return next(user for user in self.made if user.role is role)

    @property
    def publisher(self) -> RoleUser:
        return self.of(Role.PUBLISHER)

    @property
    def worker(self) -> RoleUser:
        return self.of(Role.WORKER)

    @property
    def registry(self) -> RoleUser:
        return self.of(Role.REGISTRY)

    def remove_all(self) -> None:
        for user in reversed(self.made):
            with contextlib.suppress(urllib.error.URLError, OSError):
                quoted = urllib.parse.quote(user.name, safe="")
                self.broker.api(f"users/{quoted}", "DELETE")
        self.made.clear()


# --- forged control messages ------------------------------------------------------------


def session() -> str:
    """A session secret as workers make them (and an attacker can too: just not the
    victim's)."""
    return secrets.token_hex(16)


def assignment(names: Names, key: str, job_type: str = "default", **fields: Any) -> dict[str, Any]:
    """A key assignment, as the registry sends in an Assign and a worker in a Released."""
    return {
        "key_id": f"{job_type}/{key}",
        "job_type": job_type,
        "key": key,
        "queue": f"{names.namespace}.key.{job_type}.{key}",
        "routing_key": f"{key}|0123456789abcdef",
        **fields,
    }


def forged_messages(names: Names, worker_id: str, key: str) -> dict[str, dict[str, Any]]:
    """One instance of every control message type, as raw JSON objects (what a plain client
    can send), about the live ``worker_id`` and its ``key``; worker messages carry a session
    that is not the worker's."""
    keys = [assignment(names, key)]
    return {
        "worker_join": {
            "type": "worker_join",
            "worker_id": worker_id,
            "session": session(),
            "inbox": names.worker_inbox(worker_id),
            "job_types": ["default"],
            "keys": [],
        },
        "worker_heartbeat": {
            "type": "worker_heartbeat",
            "worker_id": worker_id,
            "session": session(),
            "idle_keys": [f"default/{key}"],
        },
        "released": {
            "type": "released",
            "worker_id": worker_id,
            "session": session(),
            "keys": keys,
        },
        "worker_leave": {"type": "worker_leave", "worker_id": worker_id, "session": session()},
        "assign": {"type": "assign", "keys": keys},
        "release": {"type": "release", "key_ids": [f"default/{key}"]},
        "sync": {"type": "sync"},
        "ensured": {"type": "ensured", "routing_key": f"{key}|0123456789abcdef"},
        "refused": {"type": "refused", "reason": "forged"},
        "status": {
            "type": "status",
            "namespace": names.namespace,
            "registry_id": "forged",
            "workers": [],
            "keys": 0,
            "unassigned_keys": 0,
            "retiring_keys": 0,
        },
        "ensure_key": {"type": "ensure_key", "job_type": "default", "key": key},
        "status_request": {"type": "status_request", "backlog": False},
    }


#: The messages a publisher may send (to the registry, through NS.requests).
REQUESTS = ("ensure_key", "status_request")
#: The messages only a worker may send (through NS.membership).
WORKER_REPORTS = ("worker_join", "worker_heartbeat", "released", "worker_leave")


def control(payload: dict[str, Any], **properties: Any) -> aio_pika.Message:
    return aio_pika.Message(
        json.dumps(payload).encode(),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
        **properties,
    )


# --- the attacker -----------------------------------------------------------------------


@dataclass
class Attacker:
    """A plain aio-pika client logged in as ``user``: what someone holding that credential
    can do without rabbitkeys' code."""

    user: RoleUser
    names: Names
    connection: AbstractConnection

    async def channel(self) -> AbstractChannel:
        # confirms: a publish the broker refuses fails here, not on a later call
        return await self.connection.channel(publisher_confirms=True)

    async def refused(self, action: Callable[[AbstractChannel], Awaitable[Any]]) -> Exception:
        """Run ``action`` on a fresh channel; the broker must refuse it (and closes the
        channel: the connection stays usable). Returns the broker's error."""
        channel = await self.channel()
        try:
            await asyncio.wait_for(action(channel), 10)
        except BROKER_REFUSALS as exc:
            return exc
        finally:
            if not channel.is_closed:
                await channel.close()
        raise AssertionError(f"the broker let {self.user.name} do it")

    async def allowed(self, action: Callable[[AbstractChannel], Awaitable[Any]]) -> Any:
        """Run ``action`` on a fresh channel; the broker lets it through."""
        channel = await self.channel()
        try:
            return await asyncio.wait_for(action(channel), 10)
        finally:
            if not channel.is_closed:
                await channel.close()

    async def publish(
        self, exchange: str, message: aio_pika.Message, routing_key: str = ""
    ) -> None:
        """Publish (with a confirm) through ``exchange``; the broker accepts it."""

        async def send(channel: AbstractChannel) -> None:
            target = await channel.get_exchange(exchange, ensure=False)
            await target.publish(message, routing_key=routing_key)

        await self.allowed(send)

    async def publish_refused(
        self, exchange: str, message: aio_pika.Message, routing_key: str = ""
    ) -> Exception:
        """Publish through ``exchange`` (``""``: the default exchange); the broker refuses."""

        async def send(channel: AbstractChannel) -> None:
            if exchange:
                target = await channel.get_exchange(exchange, ensure=False)
            else:
                target = channel.default_exchange
            await target.publish(message, routing_key=routing_key)

        return await self.refused(send)

    async def ensure(
        self, key: str, job_type: str = "default", stale_routing_key: str | None = None
    ) -> str:
        """Ask the registry for ``key``'s routing key as any publisher may (its own reply
        queue, its own user_id); returns the routing key."""
        reply_queue = self.names.reply_queue(uuid.uuid4().hex)
        channel = await self.channel()
        try:
            queue = await channel.declare_queue(reply_queue, exclusive=True, auto_delete=True)
            replies = await channel.get_exchange(self.names.replies_exchange, ensure=False)
            await queue.bind(replies, routing_key=reply_queue)
            requests = await channel.get_exchange(self.names.requests_exchange, ensure=False)
            request = {"type": "ensure_key", "job_type": job_type, "key": key}
            if stale_routing_key is not None:
                request["stale_routing_key"] = stale_routing_key
            await requests.publish(
                control(
                    request,
                    user_id=self.user.name,
                    reply_to=reply_queue,
                    correlation_id=uuid.uuid4().hex,
                ),
                routing_key="",
            )
            deadline = asyncio.get_running_loop().time() + 10
            while (reply := await queue.get(fail=False, no_ack=True)) is None:
                assert asyncio.get_running_loop().time() < deadline, "the registry did not answer"
                await asyncio.sleep(0.02)
            answer = json.loads(reply.body)
            assert answer["type"] == "ensured", answer
            return str(answer["routing_key"])
        finally:
            if not channel.is_closed:
                await channel.close()


@contextlib.asynccontextmanager
async def attacker(user: RoleUser, names: Names) -> AsyncIterator[Attacker]:
    connection = await aio_pika.connect(user.url, client_properties={"connection_name": "attacker"})
    try:
        yield Attacker(user, names, connection)
    finally:
        await connection.close()
