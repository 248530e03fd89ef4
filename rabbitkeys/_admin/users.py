"""The three users of a namespace (publisher, worker, registry), made on the broker through
the management HTTP API with the rights of ``_admin.permissions``' table and nothing more.

What is pure (the plan: names, tags, permissions; the AMQP URL of a role) is apart from what
calls the broker (:func:`create_users`, :func:`delete_users`, run in a thread like
``_broker.management``). The caller's login (the AMQP URL's, or the management URL's) must be an
administrator's: only an administrator can create users and grant permissions.

Tags: the registry's user has ``management``, which lets it list the queues and bindings of
the vhosts it has permissions in (``_broker.management``: it adopts unconsumed key queues after a
failover); it cannot see users, other vhosts, or change anything through the API. The
publisher and the worker have no tag: they cannot use the management API at all.

Re-running :func:`create_users` sets the permissions and tags again (a user whose rights
drifted is put back to the table) and keeps each existing user's password unless a new one
is asked for: the management API clears a password that a ``PUT`` omits, so the stored hash
is sent back.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shlex
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from .._broker.management import endpoint, request
from .._errors import ConfigError, RabbitkeysError
from .._settings import Settings
from .._wire.topology import Names
from .permissions import Permissions, Role, permissions_for

__all__ = [
    "ROLE_SUMMARY",
    "ROLE_TAGS",
    "CreatedUser",
    "RoleUser",
    "amqp_url_for",
    "create_users",
    "default_user_name",
    "delete_users",
    "format_json",
    "format_rabbitmqctl",
    "format_table",
    "password_variable",
    "role_users",
    "url_file",
    "write_url_file",
]

#: management tags per role: only the registry reads the management API
ROLE_TAGS: dict[Role, tuple[str, ...]] = {
    Role.PUBLISHER: (),
    Role.WORKER: (),
    Role.REGISTRY: ("management",),
}

#: what each role's rights come to, for people reading the table
ROLE_SUMMARY: dict[Role, str] = {
    Role.PUBLISHER: "publishes jobs and requests to the registry; declares and reads only "
    "its own reply queue",
    Role.WORKER: "reports to the registry; declares only its own inbox; consumes key queues",
    Role.REGISTRY: "declares, binds and deletes the namespace's shared exchanges and queues; "
    "never a worker's inbox or a client's reply queue",
}


@dataclass(frozen=True, slots=True)
class RoleUser:
    """One role's user in one vhost: its name, management tags and permissions."""

    role: Role
    name: str
    namespace: str
    vhost: str
    tags: tuple[str, ...]
    permissions: Permissions


@dataclass(frozen=True, slots=True)
class CreatedUser:
    """What :func:`create_users` did for one role."""

    user: RoleUser
    #: True if the user did not exist before
    created: bool
    #: the password set now; None when an existing user kept its password (unknown here)
    password: SecretStr | None
    #: the role's AMQP URL (broker and vhost of the settings; a comma-separated list, one per
    #: node, for a cluster), when the password is known
    amqp_url: SecretStr | None


def default_user_name(namespace: str, role: Role) -> str:
    return f"{namespace}-{role.value}"


def role_users(
    namespace: str, vhost: str, user_names: Mapping[Role, str] | None = None
) -> list[RoleUser]:
    """The three users of ``namespace`` in ``vhost`` (names ``<namespace>-<role>`` unless
    given in ``user_names``), in the order publisher, worker, registry."""
    names = Names(namespace)
    given = user_names or {}
    users = [
        RoleUser(
            role=role,
            name=given.get(role) or default_user_name(namespace, role),
            namespace=namespace,
            vhost=vhost,
            tags=ROLE_TAGS[role],
            permissions=permissions_for(role, names),
        )
        for role in Role
    ]
    if len({user.name for user in users}) != len(users):
        raise ConfigError("each role needs a user of its own: two roles have the same user name")
    return users


def amqp_url_for(url: str, user: str, password: str, vhost: str) -> str:
    """``url`` (scheme, host, port, query options kept) logging in as ``user`` into ``vhost``."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "localhost"
    netloc = f"{_quote(user)}:{_quote(password)}@{f'[{host}]' if ':' in host else host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, path="/" + _quote(vhost)))


async def create_users(
    settings: Settings,
    *,
    namespace: str | None = None,
    vhost: str | None = None,
    user_names: Mapping[Role, str] | None = None,
    passwords: Mapping[Role, str] | None = None,
    reset_passwords: bool = False,
) -> list[CreatedUser]:
    """Create or update the three users of ``namespace`` (default: the settings') in
    ``vhost`` (default: the AMQP URL's), through the management API with the settings'
    login, which must be an administrator's.

    A new user gets the password given in ``passwords`` or a generated one; an existing one
    keeps its password unless ``passwords`` names one or ``reset_passwords`` is set.
    Permissions in ``vhost`` and tags are set to the table each time. Raises
    :class:`ConfigError` (no administrator, no such vhost, a name that is the caller's or
    an administrator's) or :class:`BrokerUnavailableError`.
    """
    plan = role_users(namespace or settings.namespace, vhost or settings.vhost, user_names)
    return await asyncio.to_thread(_create, settings, plan, dict(passwords or {}), reset_passwords)


async def delete_users(
    settings: Settings,
    *,
    namespace: str | None = None,
    vhost: str | None = None,
    user_names: Mapping[Role, str] | None = None,
) -> list[str]:
    """Remove the three users' permissions in ``vhost``, and each user that then has none
    left in any vhost (a namespace of the same name in another vhost keeps its users).
    Returns the names of the users deleted; absent users are skipped."""
    plan = role_users(namespace or settings.namespace, vhost or settings.vhost, user_names)
    return await asyncio.to_thread(_delete, settings, plan)


def password_variable(role: Role) -> str:
    """The environment variable the ``rabbitmqctl`` script takes ``role``'s password from
    (not ``RABBITKEYS_*``: rabbitkeys refuses variables of its prefix it does not know)."""
    return f"RK_{role.value.upper()}_PASSWORD"


def format_table(users: list[RoleUser]) -> str:
    """The users and their rights, for people."""
    first = users[0]
    lines = [
        f"Users of namespace {first.namespace!r} "
        f"in vhost {first.vhost!r}: RabbitMQ permission regexes, matched against the names "
        "of exchanges and queues (configure: declare and delete; write: publish, bind a "
        "queue; read: consume, bind to an exchange).",
    ]
    for user in users:
        tags = ", ".join(user.tags) or "none"
        lines += [
            "",
            f"{user.role.value:<10} user {user.name}  (tags: {tags})",
            f"  {ROLE_SUMMARY[user.role]}",
            f"  configure  {user.permissions.configure}",
            f"  write      {user.permissions.write}",
            f"  read       {user.permissions.read}",
        ]
    return "\n".join(lines)


def format_json(users: list[RoleUser]) -> str:
    """The users and their rights, for tools."""
    return json.dumps(
        {
            "namespace": users[0].namespace,
            "vhost": users[0].vhost,
            "users": [
                {
                    "role": user.role.value,
                    "user": user.name,
                    "tags": list(user.tags),
                    "permissions": {
                        "configure": user.permissions.configure,
                        "write": user.permissions.write,
                        "read": user.permissions.read,
                    },
                }
                for user in users
            ],
        },
        indent=2,
    )


def format_rabbitmqctl(users: list[RoleUser]) -> str:
    """A shell script that makes the users with ``rabbitmqctl``; the passwords come from
    environment variables (:func:`password_variable`), never from the script."""
    namespace, vhost = users[0].namespace, users[0].vhost
    variables = [password_variable(user.role) for user in users]
    lines = [
        "#!/bin/sh",
        f"# The rabbitkeys users of namespace {namespace!r} in vhost {vhost!r}, with the",
        "# permissions of `rabbitkeys users permissions`. Run it where rabbitmqctl reaches the",
        "# broker, with the passwords in the environment:",
        "#",
        *(f"#   {variable}=..." for variable in variables),
        "#",
        "# An existing user keeps its password; permissions and tags are set again.",
        "# rabbitmqctl takes a new user's password as an argument: it shows in the process",
        "# list while add_user runs (`rabbitkeys users create` sends it over the management",
        "# API instead).",
        "set -eu",
        *(f': "${{{variable}:?set {variable}}}"' for variable in variables),
        "",
        "user_exists() {",
        '  rabbitmqctl -s list_users | cut -f1 | grep -Fqx -- "$1"',
        "}",
        "",
        "add_user() {  # NAME PASSWORD",
        '  if user_exists "$1"; then',
        '    echo "user $1 exists: its password is kept"',
        "  else",
        '    rabbitmqctl add_user "$1" "$2"',
        "  fi",
        "}",
    ]
    for user, variable in zip(users, variables, strict=True):
        name, rights = shlex.quote(user.name), user.permissions
        lines += [
            "",
            f"# {user.role.value}: {ROLE_SUMMARY[user.role]}",
            f'add_user {name} "${variable}"',
            f"rabbitmqctl set_user_tags {name}" + "".join(f" {tag}" for tag in user.tags),
            f"rabbitmqctl set_permissions -p {shlex.quote(vhost)} {name} \\",
            f"  {shlex.quote(rights.configure)} \\",
            f"  {shlex.quote(rights.write)} \\",
            f"  {shlex.quote(rights.read)}",
        ]
    return "\n".join(lines)


def write_url_file(directory: Path, user: RoleUser, url: SecretStr) -> Path:
    """Write ``url`` to ``<directory>/<user name>.url``, readable by the owner only, for
    ``RABBITKEYS_AMQP_URL_FILE``. Replaces an older file at once (no half-written file)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = url_file(directory, user)
    scratch = directory / f".{user.name}.url.{secrets.token_hex(4)}"
    descriptor = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(descriptor, 0o600)  # whatever the umask
        os.write(descriptor, (url.get_secret_value() + "\n").encode())
        os.fsync(descriptor)
    except BaseException:
        os.close(descriptor)
        scratch.unlink(missing_ok=True)
        raise
    os.close(descriptor)
    os.replace(scratch, path)
    return path


def url_file(directory: Path, user: RoleUser) -> Path:
    """Where :func:`write_url_file` puts ``user``'s URL."""
    return directory / f"{user.name}.url"


# --------------------------------------------------------------------------- the API calls


def _create(
    settings: Settings, plan: list[RoleUser], passwords: dict[Role, str], reset: bool
) -> list[CreatedUser]:
    admin = endpoint(settings)[1]
    _check_vhost(settings, plan[0].vhost)
    done = []
    for user in plan:
        if user.name == admin:
            raise ConfigError(
                f"user {user.name!r} is the administrator this command logs in as: give each "
                "role a user of its own"
            )
        existing = _call(settings, "GET", f"users/{_quote(user.name)}")
        if existing is not None and "administrator" in _tags(existing):
            raise ConfigError(
                f"user {user.name!r} exists and is an administrator: a role's user must not be "
                "(choose other user names, or remove that user first)"
            )
        password = passwords.get(user.role)
        if password is None and (existing is None or reset):
            password = secrets.token_urlsafe(24)
        body: dict[str, Any] = {"tags": ",".join(user.tags)}
        if password is not None:
            body["password"] = password
        else:  # keep the password: a PUT without one would clear it
            assert existing is not None
            body["password_hash"] = existing.get("password_hash", "")
            body["hashing_algorithm"] = existing.get("hashing_algorithm")
        _call(settings, "PUT", f"users/{_quote(user.name)}", body)
        rights = user.permissions
        _call(
            settings,
            "PUT",
            f"permissions/{_quote(user.vhost)}/{_quote(user.name)}",
            {"configure": rights.configure, "write": rights.write, "read": rights.read},
        )
        url = None
        if password is not None:
            # every node of the settings' (a cluster's), with the role's login
            url = SecretStr(
                ",".join(
                    amqp_url_for(node, user.name, password, user.vhost)
                    for node in settings.amqp_urls
                )
            )
        done.append(
            CreatedUser(
                user=user,
                created=existing is None,
                password=None if password is None else SecretStr(password),
                amqp_url=url,
            )
        )
    return done


def _delete(settings: Settings, plan: list[RoleUser]) -> list[str]:
    admin = endpoint(settings)[1]
    deleted = []
    for user in plan:
        if user.name == admin:
            raise ConfigError(f"user {user.name!r} is the administrator this command logs in as")
        name = _quote(user.name)
        existing = _call(settings, "GET", f"users/{name}")
        if existing is None:
            continue
        if "administrator" in _tags(existing):
            raise ConfigError(f"user {user.name!r} is an administrator: not a role's user")
        _call(settings, "DELETE", f"permissions/{_quote(user.vhost)}/{name}")
        if not _call(settings, "GET", f"users/{name}/permissions"):
            _call(settings, "DELETE", f"users/{name}")
            deleted.append(user.name)
    return deleted


def _check_vhost(settings: Settings, vhost: str) -> None:
    if _call(settings, "GET", f"vhosts/{_quote(vhost)}") is None:
        raise ConfigError(
            f"vhost {vhost!r} does not exist on the broker (create it first, or pass another "
            "--vhost / the vhost in RABBITKEYS_AMQP_URL)"
        )


def _tags(user: dict[str, Any]) -> set[str]:
    tags = user.get("tags") or []
    # RabbitMQ 3.x before 3.9 (and some since) answer a comma-separated string
    return set(tags.split(",") if isinstance(tags, str) else tags)


def _call(settings: Settings, method: str, path: str, body: Any = None) -> Any:
    """One management API request; its JSON answer, or None for 404 (or an empty answer)."""
    try:
        return request(settings, path, method=method, body=body)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        detail = _reason(exc)
        if exc.code in (401, 403):
            base, user = endpoint(settings)[:2]
            raise ConfigError(
                f"the management API at {base} refused {user!r} ({detail}): creating users "
                "needs an administrator's login (RABBITKEYS_AMQP_URL, or "
                "RABBITKEYS_MANAGEMENT_URL with the login in it)"
            ) from None
        raise RabbitkeysError(f"management API {method} {path}: {exc.code} {detail}") from None


def _reason(exc: urllib.error.HTTPError) -> str:
    try:
        answer = json.loads(exc.read() or b"{}")
    except (OSError, ValueError):
        return str(exc.reason)
    return str(answer.get("reason") or exc.reason) if isinstance(answer, dict) else str(answer)


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="")
