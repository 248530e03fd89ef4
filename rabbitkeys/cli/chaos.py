"""``rabbitkeys chaos``: keyed traffic while workers, a registry (and the broker) fail."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .._settings import Settings
from .base import EXIT_ERROR, EXIT_OK, EXIT_USAGE, SETTINGS_HELP


def add_parser(commands: Any) -> None:
    chaos = commands.add_parser(
        "chaos",
        help="run keyed traffic while workers, a registry (and the broker) fail",
        description="Start 2 registries and workers as processes, publish KEYS x MESSAGES, "
        "SIGKILL a worker, start workers, SIGTERM one, SIGKILL the leading registry, "
        "optionally restart the local broker; print sent, handled, lost, duplicates, order "
        "violations and failover gaps. Exits 1 on any loss or order violation.",
        epilog=SETTINGS_HELP,
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


async def _chaos(settings: Settings, args: argparse.Namespace) -> int:
    from ..tools.chaos import ChaosReport, own_rabbit_cluster, run_chaos

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
