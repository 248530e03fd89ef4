"""``rabbitkeys bench``: rabbitkeys measured against other strategies."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .._settings import Settings
from .base import EXIT_ERROR, EXIT_OK, EXIT_USAGE, SETTINGS_HELP


def add_parser(commands: Any) -> None:
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
        epilog=SETTINGS_HELP,
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
        "+ bind rate and new keys by hand; its paced phase is scaled down alike (default "
        "2000; 500 with --cluster)",
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
        help="comma-separated, of bursts,new-bursts,interleaved,slow,churn,uniform,zipf "
        "(default bursts,interleaved,slow,churn; bursts,interleaved,churn with --cluster); "
        "with churn, the by-hand new-key rate is measured beside it on each broker",
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
    bench.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run everything this many times (all workloads on all brokers, then again) and "
        "report the run of median jobs/s of each row, the median by-hand and declare rates "
        "(default 1)",
    )
    bench.add_argument(
        "--plot",
        metavar="DIR",
        help="write PNG plots there (needs matplotlib); with several --broker, into DIR/NAME each",
    )
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
        "--broker",
        action="append",
        metavar="NAME=AMQP_URL,MANAGEMENT_URL",
        help="a broker to run every workload on, repeatable: the runs alternate between the "
        "brokers (each strategy on each workload on one broker, then on the next), and the "
        "report has one column per broker for each figure and ratio, with each broker's "
        "version from its management API (e.g. --broker 3.10=amqp://guest:guest@localhost:"
        "5672/,http://guest:guest@localhost:15672/ --broker 4.0=amqp://...:5710/,http://..."
        ":15710/). Default: the one broker of RABBITKEYS_AMQP_URL and "
        "RABBITKEYS_MANAGEMENT_URL",
    )
    bench.add_argument(
        "--cluster-port-base",
        type=int,
        default=5740,
        help="the cluster's ports: AMQP base+1..3, management base+10001..3, distribution "
        "base+20001..3 (default 5740)",
    )
    celery = bench.add_argument_group(
        "--celery",
        "instead: the same Celery task, keys and handler time (--work-ms) on plain Celery "
        "and on the Celery bridge (rabbitkeys worker --celery), --workers worker processes "
        "each, on the local broker: order violations per 10,000 jobs, jobs/s, worker and "
        "broker CPU per job, bridge / Celery (needs celery and redis-py, and a Redis)",
    )
    celery.add_argument("--celery", action="store_true", help="run the Celery comparison instead")
    celery.add_argument("--keys", type=int, default=100, help="(default 100)")
    celery.add_argument(
        "--jobs-per-key", type=int, default=100, help="published interleaved (default 100)"
    )
    celery.add_argument(
        "--burst",
        type=int,
        default=1,
        help="jobs of a key published one after another before the next key's (default 1: "
        "job 0 of every key, then job 1 of every key...)",
    )
    celery.add_argument(
        "--threads",
        type=int,
        default=8,
        help="tasks each worker process runs at once, on both sides: plain Celery's "
        "--concurrency, the bridge's RABBITKEYS_SYNC_HANDLER_THREADS (default 8)",
    )
    celery.add_argument(
        "--celery-pool",
        choices=("threads", "solo"),
        default="threads",
        help="plain Celery's pool (default threads; solo: one task at a time a process, "
        "and the bridge's workers one at a time too)",
    )
    celery.add_argument(
        "--celery-acks",
        choices=("late", "early"),
        default="late",
        help="plain Celery's acks: late (after the task, as the bridge; default) or early "
        "(on receipt, Celery's default)",
    )
    celery.add_argument(
        "--redis",
        default="redis://127.0.0.1:6379/7",
        metavar="URL",
        help="where the tasks record their runs (default redis://127.0.0.1:6379/7; the "
        "run's lists are deleted at the end)",
    )
    bench.set_defaults(handler=_bench)


async def _bench(settings: Settings, args: argparse.Namespace) -> int:
    if (args.broker or args.rounds != 1) and (args.scale or args.cluster or args.celery):
        print(
            "rabbitkeys: --broker and --rounds are not with --scale, --cluster or --celery",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.rounds < 1:
        print("rabbitkeys: --rounds must be 1 or more", file=sys.stderr)
        return EXIT_USAGE
    if args.celery:
        return await _bench_celery(settings, args)
    if args.scale:
        return await _bench_scale(settings, args)
    if args.cluster:
        return await _bench_cluster(settings, args)
    if args.transient:
        settings = settings.model_copy(update={"durable": False})
    from ..tools.bench.brokers import BenchBroker, BrokerSpecError, parse_broker
    from ..tools.bench.side_by_side import BenchPlan, run_side_by_side

    try:
        brokers = [parse_broker(value, settings) for value in args.broker or ()]
    except BrokerSpecError as exc:
        print(f"rabbitkeys: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if len({broker.name for broker in brokers}) < len(brokers):
        print("rabbitkeys: --broker: each broker needs a name of its own", file=sys.stderr)
        return EXIT_USAGE
    args.messages = 10_000 if args.messages is None else args.messages
    args.churn_messages = 2_000 if args.churn_messages is None else args.churn_messages
    args.workloads = args.workloads or "bursts,interleaved,slow,churn"
    brokers = brokers or [BenchBroker("local", settings)]
    plan = BenchPlan(
        workloads=args.workloads.split(","),
        strategies=args.strategies.split(","),
        messages=args.messages,
        churn_messages=args.churn_messages,
        paced_messages=args.paced_messages,
        rate=args.rate,
        workers=args.workers,
        partitions=args.partitions,
        work_ms=args.work_ms,
        rounds=args.rounds,
    )
    columns, failures = await run_side_by_side(brokers, plan)
    _print_report(brokers, columns, args)
    for failure in failures:
        print(f"\nFAILED: {failure}")
    if args.plot:
        from ..tools.bench.plots import write_plots

        for column in columns:
            directory = args.plot if len(columns) == 1 else f"{args.plot}/{column.name}"
            for path in write_plots(column.results, directory):
                print(f"wrote {path}", file=sys.stderr)
    return EXIT_ERROR if failures else EXIT_OK


def _print_report(brokers: list[Any], columns: list[Any], args: argparse.Namespace) -> None:
    from ..tools.bench import machine_description, markdown
    from ..tools.bench.brokers import rabbitmq_version
    from ..tools.bench.report import side_by_side_markdown

    versions = {broker.name: rabbitmq_version(broker.settings) for broker in brokers}
    print(f"Machine: {machine_description(versions)}")
    print(
        f"{args.workers} worker processes, {args.messages:,} messages per run then "
        f"{args.paced_messages:,} at {args.rate:,.0f}/s (churn: {args.churn_messages:,} "
        f"then {args.paced_messages * args.churn_messages // max(1, args.messages):,}); "
        f"{'transient' if args.transient else 'durable queues, persistent messages'}"
        + ("" if len(brokers) == 1 else "; runs alternating between the brokers")
        + ("" if args.rounds == 1 else f"; median of {args.rounds} rounds")
        + "\n"
    )
    if len(columns) == 1:
        column = columns[0]
        print(markdown(column.results, declare_rate=column.declare_rate, by_hand=column.by_hand))
        return
    for column in columns:
        print(f"### {column.name}: RabbitMQ {versions[column.name] or '(version unknown)'}\n")
        print(markdown(column.results, declare_rate=column.declare_rate, by_hand=column.by_hand))
        print()
    print("### Side by side\n")
    print(side_by_side_markdown(columns))


async def _bench_scale(settings: Settings, args: argparse.Namespace) -> int:
    from ..tools.bench import machine_description
    from ..tools.bench.scale import HEADER, run_scale

    rows = []
    for keys in args.scale.split(","):
        scaled = await run_scale(settings, keys=int(keys), workers=args.workers)
        rows.append(scaled.markdown())
        print(rows[-1], file=sys.stderr)
    print(f"Machine: {machine_description()}\n\n{HEADER}")
    print("\n".join(rows))
    return EXIT_OK


async def _bench_cluster(settings: Settings, args: argparse.Namespace) -> int:
    from ..tools.bench import machine_description
    from ..tools.bench.queue_types import (
        CLUSTER_CHURN_MESSAGES,
        CLUSTER_MESSAGES,
        CLUSTER_WORKLOADS,
        compare_queue_types,
    )
    from ..tools.rabbit_cluster import ClusterError

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


async def _bench_celery(settings: Settings, args: argparse.Namespace) -> int:
    from ..tools.bench import machine_description
    from ..tools.bench.brokers import rabbitmq_version

    try:
        from ..tools.bench.celery_side_by_side import CeleryPlan, run_celery_side_by_side
    except ImportError as exc:
        print(f"rabbitkeys: bench --celery needs Celery: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if min(args.keys, args.jobs_per_key, args.workers, args.threads, args.burst) < 1:
        print(
            "rabbitkeys: --keys, --jobs-per-key, --workers, --threads, --burst: 1 or more",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.transient:
        print(
            "rabbitkeys: --celery compares durable queues and persistent messages (Celery's "
            "default): not with --transient",
            file=sys.stderr,
        )
        return EXIT_USAGE
    plan = CeleryPlan(
        keys=args.keys,
        jobs_per_key=args.jobs_per_key,
        workers=args.workers,
        work_ms=args.work_ms,
        threads=args.threads,
        pool=args.celery_pool,
        acks_late=args.celery_acks == "late",
        redis_url=args.redis,
        burst=args.burst,
    )
    try:
        comparison = await run_celery_side_by_side(settings, plan)
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"rabbitkeys: bench --celery failed: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(f"Machine: {machine_description({'local': rabbitmq_version(settings)})}")
    print(f"{comparison.conditions()}\n")
    print(comparison.markdown())
    return EXIT_OK
