"""The ``rabbitkeys`` command: parse arguments, build settings, call the library."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import sys
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydantic

from ._errors import ConfigError, RabbitkeysError
from ._permissions import Role
from ._settings import DEFAULT_METRICS_PORT, ENV_PREFIX, Settings, load_settings

if TYPE_CHECKING:
    from ._protocol import HoldRequest, KeysRequest, RedriveRequest
    from ._users import RoleUser

__all__ = ["main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

_SETTINGS_HELP = "Settings come from the environment: " + ", ".join(
    f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except RabbitkeysError as exc:
        print(f"rabbitkeys: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=settings.log_level,
        format=f"%(asctime)s %(levelname)s [{args.command} %(process)d] %(name)s: %(message)s",
    )
    try:
        result: int = _run(args.handler(settings, args))
        return result
    except RabbitkeysError as exc:
        print(f"rabbitkeys: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_ERROR
    except BrokenPipeError:
        # `rabbitkeys keys | head`: the reader has gone; say nothing more (Python would
        # print a traceback, then a second one when it flushes stdout at exit)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rabbitkeys",
        description="Strict order per key, full concurrency across keys, on RabbitMQ.",
        epilog=_SETTINGS_HELP,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    registry = commands.add_parser(
        "registry",
        help="run the registry service",
        description="Run the registry: tracks workers and keys, assigns each key to one "
        "worker, retires idle keys. Run two or more; one leads, the others stand by. "
        "Stops on SIGINT/SIGTERM.",
        epilog=_SETTINGS_HELP,
    )
    registry.set_defaults(handler=_registry)

    worker = commands.add_parser(
        "worker",
        help="run a worker",
        description="Run a worker for MODULE:ATTR, a rabbitkeys.App or a "
        "handler(message) serving job type 'default'. The app's startup hooks run first; "
        "one that fails: exit 1 naming it, before joining. SIGINT/SIGTERM: finish and ack "
        "in-flight messages, tell the registry, run the shutdown hooks, exit 0.",
        epilog=_SETTINGS_HELP,
    )
    worker.add_argument("target", metavar="MODULE:ATTR", help="the app or handler to run")
    worker.add_argument("--id", dest="worker_id", help="worker id (default: random)")
    worker.set_defaults(handler=_worker)

    status = commands.add_parser(
        "status",
        help="show workers, keys per worker and backlog",
        description="Ask the leading registry for workers, keys per worker and backlog.",
        epilog=_SETTINGS_HELP,
    )
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.add_argument(
        "--no-backlog", action="store_true", help="skip counting ready messages per key"
    )
    status.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the registry"
    )
    status.set_defaults(handler=_status)

    _add_operations_parsers(commands)

    demo = commands.add_parser(
        "demo",
        help="run a registry, three workers and a publisher, and show order and spread",
        description="Start a registry and three workers as processes, publish keyed jobs "
        "(some keys slow), then show that each key ran in order and keys spread.",
        epilog=_SETTINGS_HELP,
    )
    demo.add_argument("--keys", type=int, default=30, help="number of keys (default 30)")
    demo.add_argument("--messages", type=int, default=20, help="messages per key (default 20)")
    demo.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    demo.set_defaults(handler=_demo)
    chaos = commands.add_parser(
        "chaos",
        help="run keyed traffic while workers, a registry (and the broker) fail",
        description="Start 2 registries and workers as processes, publish KEYS x MESSAGES, "
        "SIGKILL a worker, start workers, SIGTERM one, SIGKILL the leading registry, "
        "optionally restart the local broker; print sent, handled, lost, duplicates, order "
        "violations and failover gaps. Exits 1 on any loss or order violation.",
        epilog=_SETTINGS_HELP,
    )
    chaos.add_argument("--keys", type=int, default=50, help="number of keys (default 50)")
    chaos.add_argument("--messages", type=int, default=60, help="messages per key (default 60)")
    chaos.add_argument("--workers", type=int, default=3, help="workers at start (default 3)")
    chaos.add_argument(
        "--broker-restart",
        action="store_true",
        help="also stop and start the local RabbitMQ (rabbitmqctl) during the run",
    )
    chaos.add_argument(
        "--users",
        choices=("per-role", "guest"),
        help="per-role: the run creates its namespace's publisher, worker and registry users "
        "and runs each process as its role's user (needs an administrator's login and the "
        "management API), deleting them at the end; guest: every process with "
        "RABBITKEYS_AMQP_URL's login. Default: per-role when the management API answers",
    )
    chaos.add_argument(
        "--cluster",
        action="store_true",
        help="run on a three-node RabbitMQ cluster the run starts on this machine (as the "
        "rabbitmq user: run as root or rabbitmq) and removes at the end, instead of "
        "RABBITKEYS_AMQP_URL's broker; after the other events, SIGKILL the node holding most "
        "key queues and restart it while traffic flows, and report per-node figures",
    )
    chaos.add_argument(
        "--queue-type",
        choices=("classic", "quorum"),
        help="key queue type (default: RABBITKEYS_QUEUE_TYPE's); classic keys on a killed "
        "node wait for its return, quorum keys flow on",
    )
    chaos.add_argument(
        "--cluster-port-base",
        type=int,
        default=5760,
        help="with --cluster: node i listens for AMQP on BASE+i, management on BASE+10000+i, "
        "prometheus on BASE+10110+i, distribution on BASE+20000+i; files in "
        "/tmp/rabbitkeys-chaos-cluster-BASE (default 5760)",
    )
    chaos.add_argument(
        "--node-down",
        type=float,
        default=5.0,
        help="with --cluster: seconds between the node's SIGKILL and its restart, which "
        "takes ~10 s more (default 5)",
    )
    chaos.add_argument("--json", action="store_true", help="print the report as JSON")
    chaos.set_defaults(handler=_chaos)

    _add_users_parser(commands)

    bench = commands.add_parser(
        "bench",
        help="measure rabbitkeys against a shared queue, partitions and raw per-key queues",
        description="Run each strategy (shared queue, single worker, consistent-hash "
        "partitions, raw aio-pika on per-key queues, rabbitkeys) on each workload (bursts, "
        "interleaved, slow, churn; also uniform, zipf) on the local broker with the same "
        "client library and worker count, each run in a vhost of its own that is deleted "
        "afterwards; print a Markdown table: jobs/s, AMQP messages/s, batch sizes, latency, "
        "CPU per job, and issue 13's targets as ratios measured in the run. With --cluster: "
        "rabbitkeys with classic and then quorum key queues on a three-node cluster this run "
        "starts and stops.",
        epilog=_SETTINGS_HELP,
    )
    bench.add_argument(
        "--messages",
        type=int,
        help="per run (default 10000: bursts of 10 on 1,000 keys; 6000 with --cluster)",
    )
    bench.add_argument(
        "--churn-messages",
        type=int,
        help="of the churn workload, each a new key, and as many queues for the raw declare "
        "+ bind rate; its paced phase is scaled down alike (default 2000; 500 with --cluster)",
    )
    bench.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    bench.add_argument("--partitions", type=int, default=12, help="for 'partitions' (default 12)")
    bench.add_argument("--work-ms", type=float, default=1.0, help="handler time (default 1 ms)")
    bench.add_argument(
        "--strategies",
        default="shared,partitions,raw,rabbitkeys",
        help="comma-separated, of shared,single,partitions,raw,rabbitkeys",
    )
    bench.add_argument(
        "--workloads",
        help="comma-separated, of bursts,interleaved,slow,churn,uniform,zipf (default "
        "bursts,interleaved,slow,churn; bursts,interleaved,churn with --cluster)",
    )
    bench.add_argument(
        "--paced-messages",
        type=int,
        default=2_000,
        help="then this many at --rate, for latency (default 2000)",
    )
    bench.add_argument(
        "--rate", type=float, default=200.0, help="msg/s of the paced phase (default 200)"
    )
    bench.add_argument(
        "--transient",
        action="store_true",
        help="non-durable queues and messages for every strategy (RABBITKEYS_DURABLE=false)",
    )
    bench.add_argument("--plot", metavar="DIR", help="write PNG plots there (needs matplotlib)")
    bench.add_argument(
        "--scale",
        metavar="KEYS",
        help="instead: comma-separated live-key counts (e.g. 10000,100000) on --workers "
        "workers; time and CPU to assign, memory per key, settling after a worker joins",
    )
    bench.add_argument(
        "--cluster",
        action="store_true",
        help="instead: start a three-node RabbitMQ cluster on localhost (needs root or the "
        "rabbitmq user), run rabbitkeys on --workloads with classic and then quorum key "
        "queues, print jobs/s, AMQP msg/s, broker CPU per job and memory per key (summed over "
        "the nodes), new keys/s, key queues per node and quorum / classic; stop the cluster. "
        "RABBITKEYS_AMQP_URL and _MANAGEMENT_URL are replaced by the cluster's; --strategies, "
        "--partitions, --paced-messages, --rate and --plot do not apply",
    )
    bench.add_argument(
        "--cluster-port-base",
        type=int,
        default=5740,
        help="the cluster's ports: AMQP base+1..3, management base+10001..3, distribution "
        "base+20001..3 (default 5740)",
    )
    bench.set_defaults(handler=_bench)
    return parser


_CREDENTIAL = (
    " Needs the registry's credential (its RABBITKEYS_AMQP_URL) or an administrator's: "
    "the broker refuses these requests from a publisher's or a worker's login."
)


def _add_operations_parsers(commands: Any) -> None:
    from ._protocol import MAX_KEYS_PER_PAGE, KeyStateFilter

    def timeout(parser: argparse.ArgumentParser, default: float = 10.0, why: str = "") -> None:
        parser.add_argument(
            "--timeout",
            type=float,
            default=default,
            help=f"seconds to wait for the registry's answer (default {default:g}){why}",
        )

    keys = commands.add_parser(
        "keys",
        help="list keys: state, owner, holds, backlog, oldest message, last error",
        description="Ask the leading registry for its keys, filtered and sorted, one page at "
        "a time. BACKLOG (ready + unacked) and AGE (of the oldest waiting message) come from "
        "the registry's last listing of the key queues (the management API), printed above "
        "the table; '-' when unknown. HOLDS says why no worker takes a key: paused, parked "
        "(its head failed every attempt), type_paused, redrive." + _CREDENTIAL,
        epilog=_SETTINGS_HELP,
    )
    keys.add_argument("--job-type", metavar="T", help="only keys of this job type")
    keys.add_argument("--worker", metavar="W", help="only keys this worker consumes")
    keys.add_argument(
        "--state",
        metavar="S",
        choices=typing.get_args(KeyStateFilter),
        help="only keys in this state: " + ", ".join(typing.get_args(KeyStateFilter)) + " "
        "(retiring: any of its four steps; parked, paused: held so; failing: its head "
        "failed and waits for its next attempt)",
    )
    keys.add_argument(
        "--sort",
        choices=("key", "backlog", "age"),
        default="key",
        help="key: by job type and key (default); backlog: most messages first; age: oldest "
        "waiting message first (unknown figures last)",
    )
    keys.add_argument(
        "--limit",
        type=int,
        help=f"keys per page, 1 to {MAX_KEYS_PER_PAGE} (default 100)",
    )
    keys.add_argument(
        "--offset", type=int, default=0, help="skip this many matching keys (default 0)"
    )
    keys.add_argument(
        "--all",
        action="store_true",
        help=f"every page from --offset on ({MAX_KEYS_PER_PAGE} keys per request unless "
        "--limit); a key that moves between pages meanwhile is printed once",
    )
    keys.add_argument("--json", action="store_true", help="print JSON for scripts")
    timeout(keys)
    keys.set_defaults(handler=_keys)

    for action, summary, description in (
        (
            "pause",
            "stop giving a key (or a whole job type) to workers",
            "Pause KEY of JOB_TYPE, or without KEY the whole job type: its owner lets it go "
            "(after its in-flight job) and no worker takes it until 'resume'. Messages keep "
            "arriving and wait in its queue; the pause survives a registry failover. A key "
            "the registry does not know yet is declared and paused (paused before its "
            "first message).",
        ),
        (
            "resume",
            "give a paused or parked key (or a job type) to workers again",
            "Resume KEY of JOB_TYPE, or without KEY the whole job type. A parked key is "
            "resumed too: its head job runs again with fresh attempts.",
        ),
    ):
        parser = commands.add_parser(
            action, help=summary, description=description + _CREDENTIAL, epilog=_SETTINGS_HELP
        )
        parser.add_argument("job_type", metavar="JOB_TYPE")
        parser.add_argument("key", metavar="KEY", nargs="?", help="one key (default: all)")
        timeout(parser)
        parser.set_defaults(handler=_hold)

    skip = commands.add_parser(
        "skip",
        help="dead-letter a parked key's head job and resume the key",
        description="KEY of JOB_TYPE is parked (its head job failed every attempt, and its "
        "job type's policy is 'park'): dead-letter that head (with its error; 'rabbitkeys "
        "redrive' can bring it back) and give the key to a worker again, which goes on with "
        "the next message. Only a parked key, once its worker has let it go." + _CREDENTIAL,
        epilog=_SETTINGS_HELP,
    )
    skip.add_argument("job_type", metavar="JOB_TYPE")
    skip.add_argument("key", metavar="KEY")
    timeout(skip, 30.0, ": it answers once the head is dead-lettered")
    skip.set_defaults(handler=_hold)

    redrive = commands.add_parser(
        "redrive",
        help="put dead letters back at the head of their keys (dry run unless --apply)",
        description="Select dead letters (of a job type, one key, or --all) and put them "
        "back at the head of their keys' queues, before what waits there, in the order they "
        "failed; their workers run them as new. Without --apply: a dry run, counts per key, "
        "nothing moves. While a key is redriven its publishes wait (a few seconds)." + _CREDENTIAL,
        epilog=_SETTINGS_HELP,
    )
    redrive.add_argument("--job-type", metavar="T", help="dead letters of this job type")
    redrive.add_argument("--key", metavar="K", help="of this key only (needs --job-type)")
    redrive.add_argument("--all", action="store_true", help="every dead letter")
    redrive.add_argument("--apply", action="store_true", help="move them (default: dry run)")
    redrive.add_argument("--json", action="store_true", help="print JSON for scripts")
    timeout(
        redrive,
        300.0,
        ": it answers once every selected key is done, after reading the whole dead-letter "
        "queue; a redrive goes on if this command stops waiting",
    )
    redrive.set_defaults(handler=_redrive)


def _add_users_parser(commands: Any) -> None:
    users = commands.add_parser(
        "users",
        help="the per-role RabbitMQ users of a namespace: show, create, delete",
        description="A publisher, a worker and a registry each connect as their own "
        "RabbitMQ user, with permissions that let each do its part and nothing more "
        "(docs/design.md, 'The trust model'). Users are named <namespace>-publisher, "
        "<namespace>-worker and <namespace>-registry unless given.",
        epilog=_SETTINGS_HELP,
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
        epilog=_SETTINGS_HELP,
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
        epilog=_SETTINGS_HELP,
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
        epilog=_SETTINGS_HELP,
    )
    common(delete)
    delete.set_defaults(handler=_config_errors_are_usage(_users_delete))


def _run(coroutine: Coroutine[Any, Any, int]) -> int:
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:  # uvloop when installed: the client, not the broker, is the first limit
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coroutine)


def _on_signals(stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _stop_on, sig, stop)


def _stop_on(sig: signal.Signals, stop: Callable[[], None]) -> None:
    # said at WARNING: a stop nobody asked for (a signal sent to a whole process group, say)
    # must be told from a crash in the log of a process that exited 0
    logging.getLogger("rabbitkeys").warning("%s received: stopping", sig.name)
    stop()


@contextlib.asynccontextmanager
async def _metrics_endpoint(settings: Settings, ready: Callable[[], bool]) -> AsyncIterator[None]:
    """/metrics, /livez and /readyz on ``metrics_port`` while the body runs: 0, none; unset,
    9500 or, when another process on this host has it, any free port (logged)."""
    if settings.metrics_port == 0:
        yield
        return
    from ._metrics_server import MetricsServer

    explicit = settings.metrics_port is not None
    port = DEFAULT_METRICS_PORT if settings.metrics_port is None else settings.metrics_port
    server = MetricsServer(host=settings.metrics_host, port=port, ready=ready)
    try:
        await server.start()
    except OSError as exc:
        if explicit or exc.errno != errno.EADDRINUSE:
            raise ConfigError(
                f"cannot serve metrics on {settings.metrics_host}:{port} ({exc}); "
                f"set {ENV_PREFIX}METRICS_PORT to a free port, or 0 to turn the endpoint off"
            ) from None
        # A second process on this host: a registry and workers started by hand in several
        # shells must all run. Its URL is logged; Kubernetes and compose set the port.
        server.port = 0
        await server.start()
        logging.getLogger("rabbitkeys.metrics").warning(
            "port %d is taken (another rabbitkeys process on this host?): serving metrics on "
            "http://%s:%d/metrics instead; set %sMETRICS_PORT to choose the port",
            port,
            settings.metrics_host,
            server.port,
            ENV_PREFIX,
        )
    try:
        yield
    finally:
        await server.close()


async def _registry(settings: Settings, args: argparse.Namespace) -> int:
    from ._registry import Registry

    registry = Registry(settings)
    _on_signals(registry.stop)
    async with _metrics_endpoint(settings, lambda: registry.ready):
        await registry.run()
    return EXIT_OK


async def _worker(settings: Settings, args: argparse.Namespace) -> int:
    from ._app import load_app
    from ._worker import Worker

    worker = Worker(load_app(args.target), settings, worker_id=args.worker_id)
    _on_signals(worker.stop)
    async with _metrics_endpoint(settings, lambda: worker.ready):
        await worker.run()
    return EXIT_OK


async def _status(settings: Settings, args: argparse.Namespace) -> int:
    from ._status import fetch_status, format_status

    status = await fetch_status(settings, backlog=not args.no_backlog, timeout=args.timeout)
    if args.json:
        print(json.dumps(status.model_dump(exclude={"type"}), indent=2))
    else:
        print(format_status(status))
    return EXIT_OK


def _usage(message: str) -> int:
    print(f"rabbitkeys: {message}", file=sys.stderr)
    return EXIT_USAGE


def _invalid(exc: pydantic.ValidationError) -> str:
    first = exc.errors(include_input=False, include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where.replace('_', '-')}: {first['msg']}" if where else first["msg"]


def keys_request(args: argparse.Namespace) -> KeysRequest:
    """The request ``rabbitkeys keys`` sends; raises ValueError with what is wrong."""
    from ._protocol import MAX_KEYS_PER_PAGE, KeysRequest

    if args.offset < 0:
        raise ValueError("--offset must be 0 or more")
    limit = args.limit
    if limit is None:  # --all: pages as big as allowed
        limit = MAX_KEYS_PER_PAGE if args.all else 100
    if not 1 <= limit <= MAX_KEYS_PER_PAGE:
        raise ValueError(f"--limit must be 1 to {MAX_KEYS_PER_PAGE} (or use --all)")
    try:
        return KeysRequest(
            job_type=args.job_type,
            worker_id=args.worker,
            state=args.state,
            sort=args.sort,
            limit=limit,
            offset=args.offset,
        )
    except pydantic.ValidationError as exc:
        raise ValueError(_invalid(exc)) from None


def redrive_request(args: argparse.Namespace) -> RedriveRequest:
    """The request ``rabbitkeys redrive`` sends; raises ValueError with what is wrong."""
    from ._protocol import RedriveRequest

    if args.all and (args.job_type or args.key):
        raise ValueError("--all selects every dead letter: not with --job-type or --key")
    if not args.all and not args.job_type:
        raise ValueError("say which dead letters: --job-type T [--key K], or --all")
    if args.key is not None and not args.job_type:
        raise ValueError("--key needs --job-type")
    try:
        return RedriveRequest(job_type=args.job_type, key=args.key, apply=args.apply)
    except pydantic.ValidationError as exc:
        raise ValueError(_invalid(exc)) from None


def hold_request(args: argparse.Namespace) -> HoldRequest:
    """The request ``rabbitkeys pause|resume|skip`` sends; raises ValueError."""
    from ._protocol import HoldRequest

    try:
        return HoldRequest(action=args.command, job_type=args.job_type, key=args.key)
    except pydantic.ValidationError as exc:
        raise ValueError(_invalid(exc)) from None


async def _keys(settings: Settings, args: argparse.Namespace) -> int:
    from ._operations import fetch_keys, format_keys

    try:
        request = keys_request(args)
    except ValueError as exc:
        return _usage(str(exc))
    if args.all:
        return await _all_keys(settings, request, args)
    page = await fetch_keys(settings, request, timeout=args.timeout)
    if args.json:
        print(json.dumps(page.model_dump(exclude={"type"}), indent=2))
    else:
        print(format_keys(page, offset=request.offset))
    return EXIT_OK


async def _all_keys(settings: Settings, request: KeysRequest, args: argparse.Namespace) -> int:
    """Every page: the text table is printed as pages come; JSON is one object at the end
    (``keys``, ``total``: keys printed, ``listed_seconds_ago``, ``paused_job_types``). A key
    that moved between pages meanwhile is printed once."""
    from ._operations import format_key_rows, format_keys_header, format_keys_summary, iterate_keys

    seen: set[str] = set()
    listed: list[dict[str, Any]] = []
    last = None
    async for page in iterate_keys(settings, request, timeout=args.timeout):
        fresh = [info for info in page.keys if info.key_id not in seen]
        seen.update(info.key_id for info in fresh)
        if args.json:
            listed += [info.model_dump() for info in fresh]
            last = page
            continue
        if last is None:  # the summary and the header once
            print(f"{format_keys_summary(page)}\n\n{format_keys_header()}")
        for line in format_key_rows(fresh):
            print(line)
        last = page
    assert last is not None  # at least one page comes
    if args.json:
        summary = {
            "keys": listed,
            "total": len(listed),
            "listed_seconds_ago": last.listed_seconds_ago,
            "paused_job_types": last.paused_job_types,
        }
        print(json.dumps(summary, indent=2))
    elif not seen:
        print("(no keys)")
    return EXIT_OK


async def _hold(settings: Settings, args: argparse.Namespace) -> int:
    from ._operations import format_hold, hold

    try:
        request = hold_request(args)
    except ValueError as exc:
        return _usage(str(exc))
    reply = await hold(
        settings, request.action, request.job_type, request.key, timeout=args.timeout
    )
    text = format_hold(request.action, request.job_type, request.key, reply)
    if reply.ok:
        print(text)
        return EXIT_OK
    print(f"rabbitkeys: {text}", file=sys.stderr)
    return EXIT_ERROR


async def _redrive(settings: Settings, args: argparse.Namespace) -> int:
    from ._operations import format_redrive, redrive

    try:
        request = redrive_request(args)
    except ValueError as exc:
        return _usage(str(exc))
    reply = await redrive(settings, request, timeout=args.timeout)
    if args.json:
        print(json.dumps(reply.model_dump(exclude={"type"}), indent=2))
    else:
        print(format_redrive(reply))
    failed = any(summary.error is not None for summary in reply.keys)
    return EXIT_ERROR if reply.applied and failed else EXIT_OK


async def _demo(settings: Settings, args: argparse.Namespace) -> int:
    from .tools.demo import run_demo

    return await run_demo(settings, keys=args.keys, messages=args.messages, workers=args.workers)


async def _chaos(settings: Settings, args: argparse.Namespace) -> int:
    from .tools.chaos import ChaosReport, own_rabbit_cluster, run_chaos

    if args.queue_type is not None:
        settings = settings.model_copy(update={"queue_type": args.queue_type})
    if args.broker_restart and args.cluster:
        print("rabbitkeys: --broker-restart and --cluster exclude each other", file=sys.stderr)
        return EXIT_USAGE
    options: dict[str, Any] = {
        "keys": args.keys,
        "messages": args.messages,
        "workers": args.workers,
        "broker_restart": args.broker_restart,
        "users": args.users,
    }
    report: ChaosReport
    if args.cluster:
        async with own_rabbit_cluster(args.cluster_port_base) as rabbit:
            report = await run_chaos(settings, rabbit=rabbit, node_down=args.node_down, **options)
    else:
        report = await run_chaos(settings, **options)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.format())
    return EXIT_OK if report.ok else EXIT_ERROR


def _role_user_names(args: argparse.Namespace) -> dict[Role, str]:
    given = {role: getattr(args, f"{role.value}_user") for role in Role}
    return {role: name for role, name in given.items() if name}


def _role_users(settings: Settings, args: argparse.Namespace) -> list[RoleUser]:
    from ._users import role_users

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
    from ._users import format_json, format_rabbitmqctl, format_table

    users = _role_users(settings, args)
    formats = {"table": format_table, "json": format_json, "rabbitmqctl": format_rabbitmqctl}
    print(formats[args.format](users))
    return EXIT_OK


async def _users_create(settings: Settings, args: argparse.Namespace) -> int:
    from ._users import create_users, url_file, write_url_file

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
    from ._users import delete_users

    deleted = await delete_users(
        settings, namespace=args.namespace, vhost=args.vhost, user_names=_role_user_names(args)
    )
    print("deleted: " + (", ".join(deleted) or "none (no such users)"))
    return EXIT_OK


async def _bench(settings: Settings, args: argparse.Namespace) -> int:
    from .tools.bench import (
        applies,
        machine_description,
        make_workload,
        markdown,
        measure_declare_rate,
        run_strategy,
    )

    if args.scale:
        from .tools.bench.scale import HEADER, run_scale

        rows = []
        for keys in args.scale.split(","):
            scaled = await run_scale(settings, keys=int(keys), workers=args.workers)
            rows.append(scaled.markdown())
            print(rows[-1], file=sys.stderr)
        print(f"Machine: {machine_description()}\n\n{HEADER}")
        print("\n".join(rows))
        return EXIT_OK
    if args.cluster:
        return await _bench_cluster(settings, args)
    args.messages = 10_000 if args.messages is None else args.messages
    args.churn_messages = 2_000 if args.churn_messages is None else args.churn_messages
    args.workloads = args.workloads or "bursts,interleaved,slow,churn"
    if args.transient:
        settings = settings.model_copy(update={"durable": False})
    results = []
    failures: list[str] = []
    for workload_name in args.workloads.split(","):
        if workload_name == "churn":  # every message a new key: fewer, or it takes minutes
            count = args.churn_messages
            paced = args.paced_messages * count // max(1, args.messages)
        else:
            count, paced = args.messages, args.paced_messages
        workload = make_workload(workload_name, count, paced)
        for strategy in args.strategies.split(","):
            if not applies(strategy, workload_name):
                continue
            try:
                result = await run_strategy(
                    strategy,
                    workload,
                    settings,
                    workers=args.workers,
                    partitions=args.partitions,
                    work_ms=args.work_ms,
                    rate=args.rate,
                )
            except (RabbitkeysError, RuntimeError, TimeoutError) as exc:
                # one failed run must not throw away the others' figures
                print(f"{workload_name:>11} {strategy:>10}: FAILED: {exc}", file=sys.stderr)
                failures.append(f"{workload_name} / {strategy}: {exc}")
                continue
            print(
                f"{workload_name:>11} {strategy:>10}: {result.throughput:8,.0f} jobs/s "
                f"{result.amqp_rate:8,.0f} AMQP msg/s  p99 {result.p99_ms:8,.1f} ms  "
                f"violations {result.order_violations}",
                file=sys.stderr,
            )
            results.append(result)
    declare_rate = (
        await measure_declare_rate(settings, queues=args.churn_messages)
        if "churn" in args.workloads
        else None
    )
    print(f"Machine: {machine_description()}")
    print(
        f"{args.workers} worker processes, {args.messages:,} messages per run then "
        f"{args.paced_messages:,} at {args.rate:,.0f}/s (churn: {args.churn_messages:,} "
        f"then {args.paced_messages * args.churn_messages // max(1, args.messages):,}); "
        f"{'transient' if args.transient else 'durable queues, persistent messages'}\n"
    )
    print(markdown(results, declare_rate=declare_rate))
    for failure in failures:
        print(f"\nFAILED: {failure}")
    if args.plot:
        from .tools.bench.plots import write_plots

        for path in write_plots(results, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    return EXIT_ERROR if failures else EXIT_OK


async def _bench_cluster(settings: Settings, args: argparse.Namespace) -> int:
    from .tools.bench import machine_description
    from .tools.bench.queue_types import (
        CLUSTER_CHURN_MESSAGES,
        CLUSTER_MESSAGES,
        CLUSTER_WORKLOADS,
        compare_queue_types,
    )
    from .tools.rabbit_cluster import ClusterError

    if args.transient:
        print(
            "rabbitkeys: --cluster compares durable queues: not with --transient", file=sys.stderr
        )
        return EXIT_USAGE
    workloads = tuple((args.workloads or ",".join(CLUSTER_WORKLOADS)).split(","))
    messages = CLUSTER_MESSAGES if args.messages is None else args.messages
    churn = CLUSTER_CHURN_MESSAGES if args.churn_messages is None else args.churn_messages
    try:
        comparison = await compare_queue_types(
            settings,
            port_base=args.cluster_port_base,
            workloads=workloads,
            messages=messages,
            churn_messages=churn,
            workers=args.workers,
            work_ms=args.work_ms,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except (ClusterError, RuntimeError, TimeoutError) as exc:
        print(
            f"rabbitkeys: bench --cluster failed (the cluster is stopped): {exc}", file=sys.stderr
        )
        return EXIT_ERROR
    print(f"Machine: {machine_description()}")
    print(
        f"Three RabbitMQ nodes on this host (started in {comparison.start_seconds:.0f} s), "
        f"{args.workers} worker processes, {messages:,} messages per run (churn: {churn:,} "
        "new keys), durable queues, persistent messages; classic then quorum key queues, "
        "each run in a vhost of its own\n"
    )
    print(comparison.markdown())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
