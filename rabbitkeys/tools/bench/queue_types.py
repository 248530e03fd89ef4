"""``rabbitkeys bench --cluster``: classic against quorum key queues on a three-node cluster.

One run starts a ``RabbitCluster`` of its own (port base 5740 unless told), runs the
rabbitkeys strategy on each workload with ``queue_type`` classic and then quorum, on the same
cluster, and stops and removes the cluster at the end, also when the run fails or is
interrupted (Ctrl-C). Each (workload, queue type) run has a vhost of its own on the cluster
(``broker.run_vhost``), so the second type never meets the first one's queues.

Per queue type: jobs/s and AMQP msg/s (bursts, interleaved); the broker's CPU per job,
summed over the three nodes' ``beam.smp``; new keys/s (churn: every message a new key,
declare + bind + first message handled); broker memory per live key, summed over the nodes
(interleaved): the nodes' Erlang memory, computed by each node when asked (``mem_used`` is
refreshed every 5 s and lags a short run), and their RSS (which the allocator keeps after a
previous run's queues are gone, so it under-counts a run that follows another); how the
key queues' leaders spread over the nodes. Then quorum / classic for each figure, the only
comparison that means anything on a shared 2-core machine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from ..._errors import ConfigError
from ..._settings import Settings
from ..rabbit_cluster import RabbitCluster
from .runner import Result, run_strategy
from .workloads import make_workload

__all__ = [
    "CLUSTER_CHURN_MESSAGES",
    "CLUSTER_MESSAGES",
    "CLUSTER_WORKLOADS",
    "DEFAULT_PORT_BASE",
    "QUEUE_TYPES",
    "ClusterComparison",
    "check_settings",
    "cluster_settings",
    "compare_queue_types",
]

logger = logging.getLogger(__name__)

#: far from the test cluster's 5680 (AMQP 5681-5683) and the machine's broker
DEFAULT_PORT_BASE = 5740
QUEUE_TYPES = ("classic", "quorum")
#: bursts and interleaved give jobs/s, CPU and memory per key; churn the new-key rate
CLUSTER_WORKLOADS = ("bursts", "interleaved", "churn")
#: run sizes: both types, each workload, in about 2.5 minutes on 2 quiet cores
CLUSTER_MESSAGES = 6_000  # bursts of 10 on 600 keys
CLUSTER_CHURN_MESSAGES = 500
#: the run's figures, in the order of the report: name, unit, how to read it off the results
_Figure = tuple[str, str, Callable[["ClusterComparison", str], float | None]]


@dataclass
class ClusterComparison:
    """The results of one ``--cluster`` run: every (workload, queue type) the run did."""

    results: list[Result]
    #: Result.workload + queue type -> the result (a Result does not know its queue type)
    by_type: dict[tuple[str, str], Result]
    nodes: list[str]
    #: seconds the cluster took to boot and cluster its nodes
    start_seconds: float

    def get(self, workload: str, queue_type: str) -> Result | None:
        return self.by_type.get((workload, queue_type))

    def markdown(self) -> str:
        """The per-run table, the ratios quorum / classic and the key queues per node."""
        lines = [
            "| workload | queue type | jobs/s | AMQP msg/s | broker CPU ms/job (3 nodes) "
            "| new keys/s | broker memory / key (3 nodes) | lost | order violations |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for (workload, queue_type), r in self.by_type.items():
            memory = r.extra.get("broker_erlang_bytes_per_key")
            new_keys = r.extra.get("new_keys_per_second") if workload == "churn" else None
            lines.append(
                f"| {workload} | {queue_type} | {r.throughput:,.0f} | {r.amqp_rate:,.0f} | "
                f"{_num(r.broker_cpu_ms, '.2f')} | {_num(new_keys, ',.0f')} | "
                f"{_kib(memory)} | {r.lost} | {r.order_violations:,} |"
            )
        lines += [
            "",
            "| figure | classic | quorum | quorum / classic |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name, fmt, read in _FIGURES:
            classic, quorum = read(self, "classic"), read(self, "quorum")
            if classic is None and quorum is None:
                continue
            ratio = "-" if not classic or quorum is None else f"{quorum / classic:.2f} x"
            lines.append(f"| {name} | {_num(classic, fmt)} | {_num(quorum, fmt)} | {ratio} |")
        lines += [
            "",
            "Key queues per node (the leader's node for quorum queues), per run:",
            "",
            "| workload | queue type | " + " | ".join(self.nodes) + " |",
            "| --- | --- |" + " ---: |" * len(self.nodes),
        ]
        for (workload, queue_type), r in self.by_type.items():
            counts = [f"{r.key_queue_nodes.get(node, 0):,}" for node in self.nodes]
            lines.append(f"| {workload} | {queue_type} | " + " | ".join(counts) + " |")
        return "\n".join(lines)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _kib(value: float | None) -> str:
    return "-" if value is None else f"{value / 1024:,.1f} KiB"


def _throughput(workload: str) -> Callable[[ClusterComparison, str], float | None]:
    def read(run: ClusterComparison, queue_type: str) -> float | None:
        r = run.get(workload, queue_type)
        return None if r is None else r.throughput

    return read


def _amqp(workload: str) -> Callable[[ClusterComparison, str], float | None]:
    def read(run: ClusterComparison, queue_type: str) -> float | None:
        r = run.get(workload, queue_type)
        return None if r is None else r.amqp_rate

    return read


def _cpu(workload: str) -> Callable[[ClusterComparison, str], float | None]:
    def read(run: ClusterComparison, queue_type: str) -> float | None:
        r = run.get(workload, queue_type)
        return None if r is None else r.broker_cpu_ms

    return read


def _extra(workload: str, name: str, scale: float = 1.0) -> Callable[..., float | None]:
    def read(run: ClusterComparison, queue_type: str) -> float | None:
        r = run.get(workload, queue_type)
        value = None if r is None else r.extra.get(name)
        return None if value is None else value / scale

    return read


_FIGURES: list[_Figure] = [
    ("bursts: jobs/s", ",.0f", _throughput("bursts")),
    ("bursts: AMQP msg/s", ",.0f", _amqp("bursts")),
    ("bursts: broker CPU ms/job (3 nodes)", ".2f", _cpu("bursts")),
    ("interleaved: jobs/s", ",.0f", _throughput("interleaved")),
    ("interleaved: AMQP msg/s", ",.0f", _amqp("interleaved")),
    ("interleaved: broker CPU ms/job (3 nodes)", ".2f", _cpu("interleaved")),
    (
        "churn: new keys/s (declare + bind + first job)",
        ",.0f",
        _extra("churn", "new_keys_per_second"),
    ),
    ("churn: broker CPU ms/new key (3 nodes)", ".2f", _cpu("churn")),
    (
        "interleaved: broker memory KiB / live key (3 nodes' Erlang VMs)",
        ",.1f",
        _extra("interleaved", "broker_erlang_bytes_per_key", 1024),
    ),
    (
        "interleaved: broker RSS KiB / live key (3 nodes' beam.smp)",
        ",.1f",
        _extra("interleaved", "broker_rss_bytes_per_key", 1024),
    ),
]


def check_settings(settings: Settings) -> None:
    """Refuse settings that one of the two queue types cannot run with (before minutes of
    cluster start, not after the classic half)."""
    if not settings.durable:
        raise ConfigError("--cluster compares durable queues: quorum queues are always durable")
    if settings.max_buffered_messages is not None:
        # quorum refuses it; one type with it and one without would compare two things
        raise ConfigError("--cluster: unset RABBITKEYS_MAX_BUFFERED_MESSAGES (quorum refuses it)")


def cluster_settings(settings: Settings, cluster: RabbitCluster, queue_type: str) -> Settings:
    """``settings`` pointed at every node of ``cluster`` (AMQP and management), with
    ``queue_type`` for the key, registry and dead-letter queues."""
    if queue_type not in QUEUE_TYPES:
        raise ConfigError(f"queue type {queue_type!r}: one of {', '.join(QUEUE_TYPES)}")
    check_settings(settings)
    return settings.model_copy(
        update={
            "amqp_url": SecretStr(",".join(cluster.amqp_urls())),
            "amqp_url_file": None,
            "management_url": SecretStr(",".join(cluster.management_urls())),
            "management_url_file": None,
            "queue_type": queue_type,
        }
    )


async def compare_queue_types(
    settings: Settings,
    *,
    port_base: int = DEFAULT_PORT_BASE,
    workloads: tuple[str, ...] = CLUSTER_WORKLOADS,
    messages: int = CLUSTER_MESSAGES,
    churn_messages: int = CLUSTER_CHURN_MESSAGES,
    workers: int = 3,
    work_ms: float = 1.0,
    timeout: float = 300.0,
    directory: Path | None = None,
    progress: Callable[[str], None] = logger.info,
) -> ClusterComparison:
    """Start a cluster on ``port_base``, run rabbitkeys with classic then quorum key queues
    on each workload, stop the cluster (whatever happens) and return the figures.

    A failed run (one workload, one type) raises: a comparison missing one side is no
    comparison. The cluster's directory is fixed by the port base (the nodes run as the
    rabbitmq user, who cannot enter private temporary directories), so a run killed
    outright leaves it for the next run on that port base to stop and remove.
    """
    check_settings(settings)
    cluster = RabbitCluster(
        directory or Path(f"/tmp/rabbitkeys-bench-cluster-{port_base}"), port_base=port_base
    )
    cluster.stop_at_exit()  # a backstop: the finally below is the way it stops
    try:
        progress(f"starting a {len(cluster.nodes)}-node cluster on port base {port_base}")
        # blocking on purpose: nothing else runs yet, and a Ctrl-C meanwhile cancels the
        # run at its first await, after which the finally stops what started
        cluster.start()
        start_seconds = sum(cluster.timings.values())
        by_type: dict[tuple[str, str], Result] = {}
        for name in workloads:
            count = churn_messages if name == "churn" else messages
            workload = make_workload(name, count)
            for queue_type in QUEUE_TYPES:
                result = await run_strategy(
                    "rabbitkeys",
                    workload,
                    cluster_settings(settings, cluster, queue_type),
                    workers=workers,
                    partitions=1,
                    work_ms=work_ms,
                    timeout=timeout,
                )
                by_type[(name, queue_type)] = result
                progress(
                    f"{name:>11} {queue_type:>7}: {result.throughput:8,.0f} jobs/s "
                    f"{result.amqp_rate:8,.0f} AMQP msg/s, broker CPU "
                    f"{_num(result.broker_cpu_ms, '.2f')} ms/job, key queues per node "
                    f"{result.key_queue_nodes}"
                )
        return ClusterComparison(
            results=list(by_type.values()),
            by_type=by_type,
            nodes=[node.name for node in cluster.nodes],
            start_seconds=start_seconds,
        )
    finally:
        progress("stopping the cluster")
        cluster.stop()
