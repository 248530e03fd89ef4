"""``rabbitkeys users``: the three role users of a namespace, made on the real broker through
the management API, with the permissions of ``_permissions``' table; and the command line.

Every test removes the users it made (fixture ``made_users``), also when it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import urllib.error
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest
from pydantic import SecretStr

from rabbitkeys import BrokerUnavailableError, ConfigError, Settings
from rabbitkeys._admin.permissions import Role, permissions_for
from rabbitkeys._admin.users import (
    ROLE_TAGS,
    amqp_url_for,
    create_users,
    default_user_name,
    delete_users,
    format_json,
    format_rabbitmqctl,
    password_variable,
    role_users,
    url_file,
    write_url_file,
)
from rabbitkeys._broker.management import list_bindings, list_queues
from rabbitkeys._wire.topology import Names
from rabbitkeys.tools.chaos import ChaosReport, _role_settings
from rabbitkeys.tools.cluster import LocalCluster, _settings_env

from ..conftest import Broker
from ..support import make_settings, two_names_of_the_broker
from ..trust_support import settings_as


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def _user(broker: Broker, name: str) -> dict[str, object] | None:
    try:
        answer = broker.api(f"users/{_quote(name)}")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
    assert isinstance(answer, dict)
    return answer


def _tags(user: dict[str, object]) -> set[str]:
    tags = user["tags"]
    assert isinstance(tags, (str, list))
    return set(filter(None, tags.split(",") if isinstance(tags, str) else tags))


def _permissions(broker: Broker, vhost: str, name: str) -> dict[str, str]:
    answer = broker.api(f"permissions/{_quote(vhost)}/{_quote(name)}")
    return {right: answer[right] for right in ("configure", "write", "read")}


async def _can_log_in(url: str) -> bool:
    try:
        connection = await aio_pika.connect(url, timeout=10)
    except aio_pika.exceptions.ProbableAuthenticationError:
        return False
    await connection.close()
    return True


@pytest.fixture
def made_users(broker: Broker, namespace: str) -> Iterator[dict[Role, str]]:
    """The default user names of the test's namespace; whatever of them exists at the end
    is deleted."""
    names = {role: default_user_name(namespace, role) for role in Role}
    yield names
    for name in names.values():
        with contextlib.suppress(urllib.error.HTTPError):
            broker.api(f"users/{_quote(name)}", "DELETE")


@pytest.fixture
def vhost(session_vhost: str) -> str:
    return session_vhost


# --------------------------------------------------------------------------- pure


def test_role_users_follow_the_permission_table() -> None:
    users = role_users("shop", "prod")
    assert [user.role for user in users] == [Role.PUBLISHER, Role.WORKER, Role.REGISTRY]
    assert [user.name for user in users] == ["shop-publisher", "shop-worker", "shop-registry"]
    for user in users:
        assert user.vhost == "prod" and user.namespace == "shop"
        assert user.permissions == permissions_for(user.role, Names("shop"))
    # only the registry reads the management API
    assert {user.role: user.tags for user in users} == ROLE_TAGS
    assert ROLE_TAGS[Role.REGISTRY] == ("management",)
    assert not ROLE_TAGS[Role.PUBLISHER] and not ROLE_TAGS[Role.WORKER]


def test_user_names_can_be_given_but_not_shared() -> None:
    users = role_users("shop", "/", {Role.WORKER: "svc-worker"})
    assert [user.name for user in users] == ["shop-publisher", "svc-worker", "shop-registry"]
    with pytest.raises(ConfigError, match="user of its own"):
        role_users("shop", "/", {Role.WORKER: "svc", Role.REGISTRY: "svc"})


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://admin:pw@rabbit:5672/", "amqp://u%40x:p%2F%3A%40w@rabbit:5672/v%2F1"),
        ("amqps://admin:pw@rabbit/old?heartbeat=10", "amqps://u%40x:p%2F%3A%40w@rabbit/v%2F1"),
        ("amqp://admin:pw@[::1]:5673/%2F", "amqp://u%40x:p%2F%3A%40w@[::1]:5673/v%2F1"),
    ],
)
def test_a_role_url_keeps_the_broker_and_replaces_login_and_vhost(url: str, expected: str) -> None:
    made = amqp_url_for(url, "u@x", "p/:@w", "v/1")
    query = urllib.parse.urlsplit(url).query
    assert made == expected + (f"?{query}" if query else "")
    # and rabbitkeys reads back what was meant
    settings = Settings(amqp_url=made)
    assert settings.vhost == "v/1"
    parts = urllib.parse.urlsplit(made)
    assert urllib.parse.unquote(parts.username or "") == "u@x"
    assert urllib.parse.unquote(parts.password or "") == "p/:@w"


def test_json_holds_the_table() -> None:
    users = role_users("shop", "/")
    document = json.loads(format_json(users))
    assert document["namespace"] == "shop" and document["vhost"] == "/"
    for item, user in zip(document["users"], users, strict=True):
        assert item["role"] == user.role.value and item["user"] == user.name
        assert item["tags"] == list(user.tags)
        assert item["permissions"] == {
            "configure": user.permissions.configure,
            "write": user.permissions.write,
            "read": user.permissions.read,
        }


def test_the_rabbitmqctl_script_sets_the_table_with_passwords_from_the_environment() -> None:
    users = role_users("shop", "my vhost")
    script = format_rabbitmqctl(users)
    if shutil.which("sh"):
        assert subprocess.run(["sh", "-n"], input=script, text=True).returncode == 0
    commands = [shlex.split(line) for line in _logical_lines(script)]
    for user in users:
        variable = password_variable(user.role)
        assert not variable.startswith("RABBITKEYS_")  # rabbitkeys refuses unknown ones
        # the password is a variable, required before anything runs
        assert f': "${{{variable}:?set {variable}}}"' in script
        assert f'add_user {user.name} "${variable}"' in script
        rights = user.permissions
        assert [
            "rabbitmqctl", "set_permissions", "-p", "my vhost", user.name,
            rights.configure, rights.write, rights.read,
        ] in commands  # fmt: skip
        assert ["rabbitmqctl", "set_user_tags", user.name, *user.tags] in commands


def _logical_lines(script: str) -> list[str]:
    """The script's lines with backslash continuations joined, comments left out."""
    joined = script.replace("\\\n", " ")
    return [line for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def test_a_url_file_is_the_owners_only_and_replaced_whole(tmp_path: Path) -> None:
    [user, *_] = role_users("shop", "/")
    directory = tmp_path / "secrets"
    path = write_url_file(directory, user, SecretStr("amqp://a:b@h/"))
    assert path == url_file(directory, user) == directory / "shop-publisher.url"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert Settings(amqp_url_file=path).amqp_url.get_secret_value() == "amqp://a:b@h/"
    write_url_file(directory, user, SecretStr("amqp://a:c@h/"))
    assert path.read_text() == "amqp://a:c@h/\n"
    assert sorted(p.name for p in directory.iterdir()) == ["shop-publisher.url"]


# --------------------------------------------------------------------------- on the broker


async def test_create_makes_the_three_users_with_the_table(
    broker: Broker, settings: Settings, vhost: str, made_users: dict[Role, str]
) -> None:
    done = await create_users(settings)
    assert [item.user.role for item in done] == list(Role)
    for item in done:
        user = item.user
        assert user.name == made_users[user.role] and user.vhost == vhost
        assert item.created and item.password is not None and item.amqp_url is not None
        stored = _user(broker, user.name)
        assert stored is not None and _tags(stored) == set(ROLE_TAGS[user.role])
        assert _permissions(broker, vhost, user.name) == {
            "configure": user.permissions.configure,
            "write": user.permissions.write,
            "read": user.permissions.read,
        }
        # permissions in this vhost only
        assert [p["vhost"] for p in broker.api(f"users/{_quote(user.name)}/permissions")] == [vhost]
        url = item.amqp_url.get_secret_value()
        assert Settings(amqp_url=url).vhost == vhost
        assert await _can_log_in(url), user.name


async def test_a_cluster_s_role_urls_list_every_node_with_the_role_s_login(
    broker: Broker, amqp_url: str, namespace: str, vhost: str, made_users: dict[Role, str]
) -> None:
    nodes = two_names_of_the_broker(amqp_url)
    settings = make_settings(",".join(nodes), namespace)
    for item in await create_users(settings):
        assert item.amqp_url is not None
        role = Settings(amqp_url=item.amqp_url.get_secret_value())
        hosts = [urllib.parse.urlsplit(url).hostname for url in role.amqp_urls]
        assert hosts == [urllib.parse.urlsplit(url).hostname for url in nodes]
        assert (role.amqp_user, role.vhost) == (item.user.name, vhost)
        for url in role.amqp_urls:
            assert await _can_log_in(url), url


async def test_the_registry_user_reads_the_management_api_and_the_others_cannot(
    broker: Broker, settings: Settings, vhost: str, made_users: dict[Role, str]
) -> None:
    """The ``management`` tag is enough for what the registry reads after a failover (its
    vhost's queues and bindings, whatever its permission regexes); without a tag the API
    refuses."""
    names = Names(settings.namespace)
    queue, exchange = f"{settings.namespace}.key.default.k1", names.jobs_exchange("default")
    quoted = _quote(vhost)
    # durable: RabbitMQ 4.3 refuses a transient queue that is not exclusive
    broker.api(f"queues/{quoted}/{_quote(queue)}", "PUT", {"durable": True})
    broker.api(f"exchanges/{quoted}/{_quote(exchange)}", "PUT", {"type": "direct"})
    broker.api(
        f"bindings/{quoted}/e/{_quote(exchange)}/q/{_quote(queue)}", "POST", {"routing_key": "r"}
    )
    done = {item.user.role: item for item in await create_users(settings)}

    def as_role(role: Role) -> Settings:
        url = done[role].amqp_url
        assert url is not None
        return settings_as(url.get_secret_value(), settings.namespace)

    registry = as_role(Role.REGISTRY)
    assert [q.name for q in await list_queues(registry, f"{settings.namespace}.")] == [queue]
    assert await list_bindings(registry, exchange) == [(queue, "r")]
    for role in (Role.PUBLISHER, Role.WORKER):
        with pytest.raises(BrokerUnavailableError, match="401"):
            await list_queues(as_role(role), f"{settings.namespace}.")


async def test_running_again_restores_the_table_and_keeps_passwords(
    broker: Broker, settings: Settings, vhost: str, made_users: dict[Role, str]
) -> None:
    first = {item.user.role: item for item in await create_users(settings)}
    worker = made_users[Role.WORKER]
    # rights drifted: broader permissions and a tag
    broker.api(
        f"permissions/{_quote(vhost)}/{_quote(worker)}",
        "PUT",
        {"configure": ".*", "write": ".*", "read": ".*"},
    )
    broker.api(f"users/{_quote(worker)}", "PUT", {"password": "drift", "tags": "monitoring"})
    before = _user(broker, made_users[Role.PUBLISHER])

    again = {item.user.role: item for item in await create_users(settings)}

    for role, item in again.items():
        assert not item.created and item.password is None and item.amqp_url is None
        rights = item.user.permissions
        assert _permissions(broker, vhost, item.user.name) == {
            "configure": rights.configure,
            "write": rights.write,
            "read": rights.read,
        }
        stored = _user(broker, item.user.name)
        assert stored is not None and _tags(stored) == set(ROLE_TAGS[role])
    # the untouched user's password is the same (hash unchanged), and it still logs in
    assert _user(broker, made_users[Role.PUBLISHER]) == before
    for role in (Role.PUBLISHER, Role.REGISTRY):
        url = first[role].amqp_url
        assert url is not None and await _can_log_in(url.get_secret_value())
    # the worker keeps the password it was given meanwhile: nothing resets it unasked
    drifted = amqp_url_for(settings.amqp_url.get_secret_value(), worker, "drift", vhost)
    assert await _can_log_in(drifted)


async def test_passwords_change_only_when_asked(
    settings: Settings, made_users: dict[Role, str]
) -> None:
    first = {item.user.role: item for item in await create_users(settings)}
    given = await create_users(settings, passwords={Role.WORKER: "chosen-one"})
    by_role = {item.user.role: item for item in given}
    assert by_role[Role.WORKER].password == SecretStr("chosen-one")
    assert by_role[Role.PUBLISHER].password is None
    reset = {item.user.role: item for item in await create_users(settings, reset_passwords=True)}
    for role in Role:
        old, new = first[role].amqp_url, reset[role].amqp_url
        assert old is not None and new is not None and old != new
        assert not reset[role].created
        assert await _can_log_in(new.get_secret_value())
        assert not await _can_log_in(old.get_secret_value())


async def test_delete_removes_the_users_and_only_them(
    broker: Broker, settings: Settings, made_users: dict[Role, str]
) -> None:
    await create_users(settings)
    admin = urllib.parse.unquote(urllib.parse.urlsplit(broker.amqp_url).username or "guest")
    deleted = await delete_users(settings)
    assert deleted == [made_users[role] for role in Role]
    for name in made_users.values():
        assert _user(broker, name) is None
    assert _user(broker, admin) is not None
    assert await delete_users(settings) == []  # nothing left: nothing to do


async def test_delete_keeps_a_user_the_same_namespace_has_in_another_vhost(
    broker: Broker, settings: Settings, vhost: str, made_users: dict[Role, str]
) -> None:
    other = f"{vhost}-other"
    broker.api(f"vhosts/{_quote(other)}", "PUT", {})
    try:
        await create_users(settings)
        await create_users(settings, vhost=other)
        assert await delete_users(settings, vhost=other) == []
        for name in made_users.values():
            vhosts = [p["vhost"] for p in broker.api(f"users/{_quote(name)}/permissions")]
            assert vhosts == [vhost]
        assert len(await delete_users(settings)) == 3
    finally:
        broker.api(f"vhosts/{_quote(other)}", "DELETE")


async def test_refusals(broker: Broker, settings: Settings, made_users: dict[Role, str]) -> None:
    admin = urllib.parse.unquote(urllib.parse.urlsplit(broker.amqp_url).username or "guest")
    with pytest.raises(ConfigError, match="does not exist"):
        await create_users(settings, vhost="rabbitkeys-no-such-vhost")
    with pytest.raises(ConfigError, match="administrator this command logs in as"):
        await create_users(settings, user_names={Role.REGISTRY: admin})
    assert _user(broker, admin) is not None and "administrator" in _tags(_user(broker, admin) or {})
    # a role's own login cannot make users
    done = {item.user.role: item for item in await create_users(settings)}
    url = done[Role.REGISTRY].amqp_url
    assert url is not None
    as_registry = settings_as(url.get_secret_value(), settings.namespace)
    with pytest.raises(ConfigError, match="administrator's login"):
        await create_users(as_registry, namespace=f"{settings.namespace}-x")


# --------------------------------------------------------------------------- the CLI


def _cli(*args: str, settings: Settings) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITKEYS_")}
    return subprocess.run(
        [sys.executable, "-m", "rabbitkeys", "users", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, **_settings_env(settings)},
    )


@pytest.mark.processes
async def test_the_command_line_creates_writes_url_files_and_deletes(
    broker: Broker, settings: Settings, vhost: str, made_users: dict[Role, str], tmp_path: Path
) -> None:
    secrets_dir = tmp_path / "secrets"
    created = _cli("create", "--secrets-dir", str(secrets_dir), settings=settings)
    assert created.returncode == 0, created.stderr
    for role, name in made_users.items():
        path = secrets_dir / f"{name}.url"
        assert f"RABBITKEYS_AMQP_URL_FILE={path}" in created.stdout
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        # what a process started with RABBITKEYS_AMQP_URL_FILE reads
        url = Settings(amqp_url_file=path).amqp_url.get_secret_value()
        assert url.split("@")[0].rpartition(":")[2] not in created.stdout + created.stderr
        assert urllib.parse.unquote(urllib.parse.urlsplit(url).username or "") == name
        assert await _can_log_in(url)
        stored = _user(broker, name)
        assert stored is not None and _tags(stored) == set(ROLE_TAGS[role])
    kept = {name: (secrets_dir / f"{name}.url").read_text() for name in made_users.values()}

    again = _cli("create", "--secrets-dir", str(secrets_dir), settings=settings)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("password kept") == 3
    assert kept == {name: (secrets_dir / f"{name}.url").read_text() for name in kept}

    # another directory has no URL for users whose password is kept: say so, exit 1
    elsewhere = _cli("create", "--secrets-dir", str(tmp_path / "new"), settings=settings)
    assert elsewhere.returncode == 1
    assert "--reset-passwords" in elsewhere.stderr

    table = _cli("permissions", "--format", "json", settings=settings)
    assert table.returncode == 0, table.stderr
    document = json.loads(table.stdout)
    assert document["vhost"] == vhost
    for item in document["users"]:
        assert _permissions(broker, vhost, item["user"]) == item["permissions"]

    deleted = _cli("delete", settings=settings)
    assert deleted.returncode == 0, deleted.stderr
    for name in made_users.values():
        assert name in deleted.stdout and _user(broker, name) is None


@pytest.mark.processes
def test_the_command_line_prints_urls_once_with_a_warning(
    settings: Settings, made_users: dict[Role, str]
) -> None:
    result = _cli("create", settings=settings)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("RABBITKEYS_AMQP_URL=amqp") == 3
    assert "shown only this once" in result.stderr
    bad = _cli("create", "--vhost", "rabbitkeys-no-such-vhost", settings=settings)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


@pytest.mark.processes
def test_the_command_line_permissions_need_no_broker() -> None:
    unreachable = Settings(amqp_url="amqp://nobody:s3cr3t-admin@127.0.0.1:1/", namespace="shop")
    table = _cli("permissions", settings=unreachable)
    assert table.returncode == 0, table.stderr
    for user in role_users("shop", "/"):
        assert user.name in table.stdout and user.permissions.read in table.stdout
    script = _cli("permissions", "--format", "rabbitmqctl", "--vhost", "v", settings=unreachable)
    assert script.returncode == 0
    assert script.stdout == format_rabbitmqctl(role_users("shop", "v")) + "\n"
    assert "s3cr3t" not in script.stdout + table.stdout


@pytest.mark.processes
@pytest.mark.parametrize("action", ["", "permissions", "create", "delete"])
def test_every_users_command_has_help_naming_the_settings(action: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rabbitkeys", "users", *filter(None, [action]), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "RABBITKEYS_AMQP_URL" in result.stdout


# --------------------------------------------------------------------------- rabbitkeys chaos


async def test_chaos_runs_each_role_as_its_own_user(
    broker: Broker, settings: Settings, made_users: dict[Role, str], tmp_path: Path
) -> None:
    """What ``rabbitkeys chaos`` starts: registries with the registry's URL file, workers
    with the worker's, and publishes and asks for status with the publisher's."""
    report = ChaosReport()
    roles = await _role_settings(settings, tmp_path / "secrets", None, report)
    assert report.users == "per-role" and set(roles) == set(Role)
    for role, given in roles.items():
        assert given.namespace == settings.namespace
        path = given.amqp_url_file
        assert path is not None and stat.S_IMODE(path.stat().st_mode) == 0o600
        url = Settings(amqp_url_file=path).amqp_url.get_secret_value()
        assert url == given.amqp_url.get_secret_value()
        assert urllib.parse.unquote(urllib.parse.urlsplit(url).username or "") == made_users[role]
        assert await _can_log_in(url)
        # the management API with the role's own login, never the administrator's
        if given.management_url is not None:
            assert "@" not in given.management_url.get_secret_value()
    cluster = LocalCluster(
        roles[Role.PUBLISHER],
        role_settings={"registry": roles[Role.REGISTRY], "worker": roles[Role.WORKER]},
    )
    assert cluster.settings is roles[Role.PUBLISHER]
    for command, role in (
        ("registry", Role.REGISTRY),
        ("worker", Role.WORKER),
        ("x", Role.PUBLISHER),
    ):
        env = cluster._role_env.get(command, cluster._env)
        assert env["RABBITKEYS_AMQP_URL_FILE"] == str(roles[role].amqp_url_file), command
        assert "RABBITKEYS_AMQP_URL" not in env, command
    assert await delete_users(settings) == [made_users[role] for role in Role]


async def test_chaos_falls_back_to_one_login_only_when_not_asked_for_per_role_users(
    settings: Settings, made_users: dict[Role, str], tmp_path: Path
) -> None:
    done = {item.user.role: item for item in await create_users(settings)}
    url = done[Role.PUBLISHER].amqp_url
    assert url is not None
    not_admin = settings_as(url.get_secret_value(), f"{settings.namespace}-x")
    report = ChaosReport()
    assert await _role_settings(not_admin, tmp_path, None, report) == {}
    assert report.users == "guest"
    assert "one login for every process" in report.events[0]
    with pytest.raises(ConfigError, match="administrator"):
        await _role_settings(not_admin, tmp_path, "per-role", ChaosReport())
