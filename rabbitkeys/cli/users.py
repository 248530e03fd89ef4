"""``rabbitkeys users``: the per-role RabbitMQ users of a namespace."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._admin.permissions import Role
from .._errors import ConfigError
from .._settings import Settings

if TYPE_CHECKING:
    from .._admin.users import RoleUser

from .base import EXIT_ERROR, EXIT_OK, EXIT_USAGE, SETTINGS_HELP


def add_parser(commands: Any) -> None:
    users = commands.add_parser(
        "users",
        help="the per-role RabbitMQ users of a namespace: show, create, delete",
        description="A publisher, a worker and a registry each connect as their own "
        "RabbitMQ user, with permissions that let each do its part and nothing more "
        "(docs/internals/admin.md, 'The trust model'). Users are named <namespace>-publisher, "
        "<namespace>-worker and <namespace>-registry unless given.",
        epilog=SETTINGS_HELP,
    )
    actions = users.add_subparsers(dest="action", required=True, metavar="ACTION")

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--namespace", help="the namespace (default: RABBITKEYS_NAMESPACE, 'rabbitkeys')"
        )
        parser.add_argument(
            "--vhost", help="the vhost (default: RABBITKEYS_AMQP_URL's, '/' when it names none)"
        )
        for role in ("publisher", "worker", "registry"):
            parser.add_argument(
                f"--{role}-user",
                metavar="NAME",
                help=f"the {role}'s user name (default: <namespace>-{role})",
            )

    permissions = actions.add_parser(
        "permissions",
        help="print each role's user, tags and permission regexes",
        description="Print each role's user, management tags and configure/write/read "
        "regexes. Needs no broker. --format rabbitmqctl prints a shell script that creates "
        "them with rabbitmqctl, taking the passwords from RK_PUBLISHER_PASSWORD, "
        "RK_WORKER_PASSWORD and RK_REGISTRY_PASSWORD.",
        epilog=SETTINGS_HELP,
    )
    common(permissions)
    permissions.add_argument(
        "--format", choices=("table", "rabbitmqctl", "json"), default="table", help="(table)"
    )
    permissions.set_defaults(handler=_config_errors_are_usage(_users_permissions))

    create = actions.add_parser(
        "create",
        help="create or update the three users through the management API",
        description="Create the three users with their permissions and tags, through the "
        "management API (RABBITKEYS_MANAGEMENT_URL, else the host of RABBITKEYS_AMQP_URL on "
        "port 15672, or 15671 for amqps) logged in as RABBITKEYS_AMQP_URL's user, who must "
        "be an administrator. A new user gets a generated password. Run again, it sets "
        "permissions and tags again and keeps passwords (unless --reset-passwords). Each "
        "role's AMQP URL (this broker and vhost, its user and password) is written to "
        "--secrets-dir, or printed once.",
        epilog=SETTINGS_HELP,
    )
    common(create)
    create.add_argument(
        "--secrets-dir",
        metavar="DIR",
        type=Path,
        help="write each role's AMQP URL to DIR/<user>.url (mode 0600), for "
        "RABBITKEYS_AMQP_URL_FILE; without it the URLs are printed",
    )
    create.add_argument(
        "--reset-passwords",
        action="store_true",
        help="give existing users new passwords too (their processes must get the new URLs)",
    )
    create.set_defaults(handler=_config_errors_are_usage(_users_create))

    delete = actions.add_parser(
        "delete",
        help="remove the three users (their permissions in the vhost)",
        description="Remove the three users' permissions in the vhost, and each user that "
        "has no permissions left in any vhost, through the management API as "
        "'create' does.",
        epilog=SETTINGS_HELP,
    )
    common(delete)
    delete.set_defaults(handler=_config_errors_are_usage(_users_delete))


def _role_user_names(args: argparse.Namespace) -> dict[Role, str]:
    given = {role: getattr(args, f"{role.value}_user") for role in Role}
    return {role: name for role, name in given.items() if name}


def _role_users(settings: Settings, args: argparse.Namespace) -> list[RoleUser]:
    from .._admin.users import role_users

    return role_users(
        args.namespace or settings.namespace, args.vhost or settings.vhost, _role_user_names(args)
    )


_Command = Callable[[Settings, argparse.Namespace], Awaitable[int]]


def _config_errors_are_usage(command: _Command) -> _Command:
    """The users commands: a ConfigError (a vhost that does not exist, a login that is no
    administrator's) is a usage error, exit 2."""

    async def run(settings: Settings, args: argparse.Namespace) -> int:
        try:
            return await command(settings, args)
        except ConfigError as exc:
            print(f"rabbitkeys: {exc}", file=sys.stderr)
            return EXIT_USAGE

    return run


async def _users_permissions(settings: Settings, args: argparse.Namespace) -> int:
    from .._admin.users import format_json, format_rabbitmqctl, format_table

    users = _role_users(settings, args)
    formats = {"table": format_table, "json": format_json, "rabbitmqctl": format_rabbitmqctl}
    print(formats[args.format](users))
    return EXIT_OK


async def _users_create(settings: Settings, args: argparse.Namespace) -> int:
    from .._admin.users import create_users, url_file, write_url_file

    done = await create_users(
        settings,
        namespace=args.namespace,
        vhost=args.vhost,
        user_names=_role_user_names(args),
        reset_passwords=args.reset_passwords,
    )
    unknown = []
    for item in done:
        state = "created" if item.created else "updated"
        line = f"{item.user.role.value:<10} {item.user.name:<24} {state}"
        if item.amqp_url is None:
            line += ", password kept"
            if args.secrets_dir and not url_file(args.secrets_dir, item.user).exists():
                unknown.append(item.user.name)
        elif args.secrets_dir:
            path = write_url_file(args.secrets_dir, item.user, item.amqp_url)
            line += f": RABBITKEYS_AMQP_URL_FILE={path}"
        else:
            line += f": RABBITKEYS_AMQP_URL={item.amqp_url.get_secret_value()}"
        print(line)
    if any(item.amqp_url for item in done) and not args.secrets_dir:
        print(
            "rabbitkeys: WARNING: the URLs above hold the passwords and are shown only this "
            "once; store them in your secret store now (or use --secrets-dir)",
            file=sys.stderr,
        )
    if unknown:
        print(
            f"rabbitkeys: no URL file in {args.secrets_dir} for {', '.join(unknown)}: an "
            "existing user's password is kept and not known here; run again with "
            "--reset-passwords to give them new ones",
            file=sys.stderr,
        )
        return EXIT_ERROR
    return EXIT_OK


async def _users_delete(settings: Settings, args: argparse.Namespace) -> int:
    from .._admin.users import delete_users

    deleted = await delete_users(
        settings, namespace=args.namespace, vhost=args.vhost, user_names=_role_user_names(args)
    )
    print("deleted: " + (", ".join(deleted) or "none (no such users)"))
    return EXIT_OK
