"""The benchmark's Markdown report: the machine, the table, the targets."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass

from .by_hand import BY_HAND_LANES, ByHand
from .runner import Result

__all__ = ["BrokerColumn", "machine_description", "markdown", "side_by_side_markdown"]


def machine_description(versions: dict[str, str | None] | None = None) -> str:
    """The machine and the brokers: ``versions`` maps each broker's name in the report to
    its version as its management API reports it (None: unknown); without it, the local
    broker's, from ``rabbitmqctl`` (the cluster and scale runs)."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if versions is not None:
        brokers = [
            f"RabbitMQ {version or '(version unknown)'}"
            + ("" if len(versions) == 1 else f" ({name})")
            for name, version in versions.items()
        ]
        broker = f"{', '.join(brokers)} on the same host"
    else:
        broker = _local_broker()
    return (
        f"{os.cpu_count()} cores ({cpu}), {broker}, Python {platform.python_version()}; "
        "broker, publisher and workers share the cores"
    )


def _local_broker() -> str:
    try:
        version = subprocess.run(
            ["rabbitmqctl", "version"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        version = ""
    return f"RabbitMQ {version} on the same host" if version else "RabbitMQ (version unknown)"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _batch(r: Result) -> str:
    return f"{r.batch_mean:.1f} ({r.batch_p50:g} / {r.batch_p99:g})"


def markdown(
    results: list[Result], *, declare_rate: float | None = None, by_hand: ByHand | None = None
) -> str:
    paced = {r.paced_rate for r in results if r.paced_rate}
    when = f" at {paced.pop():,.0f} jobs/s" if len(paced) == 1 else ""
    lines = [
        "A job is one `publish()`; an AMQP message carries one job or, batched, several of "
        "one key. jobs/s and AMQP msg/s: as fast as confirmed, until the last job is handled; "
        "jobs per message: mean (p50 / p99, bucket bounds of the publisher's "
        "`rabbitkeys_publish_batch_jobs`); latency (publish call to handler start): "
        f"paced{when}; CPU: ms per job in the fast phase, of the broker (`beam.smp`) and of "
        "all processes together (broker, publisher, workers, registry).",
        "",
        "| workload | strategy | jobs/s | AMQP msg/s | jobs per msg | p50 ms | p99 ms "
        "| fast keys p99 ms | order violations | lost | broker CPU ms/job | all CPU ms/job |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.workload} | {r.strategy} | {r.throughput:,.0f} | {r.amqp_rate:,.0f} | "
            f"{_batch(r)} | {_ms(r.p50_ms)} | {_ms(r.p99_ms)} | {_ms(r.fast_p99_ms)} | "
            f"{r.order_violations:,} | {r.lost} | {_cpu(r.broker_cpu_ms)} | "
            f"{_cpu(r.total_cpu_ms)} |"
        )
    lines += ["", "| target | measured | met |", "| --- | --- | --- |"]
    lines += [
        f"| {row} | {measured} | {met} |"
        for row, measured, met in _targets(results, declare_rate, by_hand)
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class BrokerColumn:
    """One broker's figures of a run: its column in the side-by-side tables."""

    name: str
    results: list[Result]
    declare_rate: float | None = None
    by_hand: ByHand | None = None


def side_by_side_markdown(columns: list[BrokerColumn]) -> str:
    """Each figure and each target's ratio with one column per broker, measured in one run
    (the runs alternated between the brokers)."""
    head = " | ".join(column.name for column in columns)
    align = " | ".join("---:" for _ in columns)
    figures: dict[str, list[str]] = {}
    for index, column in enumerate(columns):
        for r in column.results:
            for figure, value in (
                ("jobs/s", f"{r.throughput:,.0f}"),
                ("p99 ms", _ms(r.p99_ms)),
                ("lost / order violations", f"{r.lost} / {r.order_violations:,}"),
            ):
                row = figures.setdefault(
                    f"{r.workload} / {r.strategy}: {figure}", ["-"] * len(columns)
                )
                row[index] = value
    targets: dict[str, list[str]] = {}
    for index, column in enumerate(columns):
        for label, measured, met in _targets(column.results, column.declare_rate, column.by_hand):
            row = targets.setdefault(label, ["-"] * len(columns))
            row[index] = measured if met == "-" else f"{measured} ({met})"
    lines = [f"| figure | {head} |", f"| --- | {align} |"]
    lines += [f"| {label} | {' | '.join(cells)} |" for label, cells in figures.items()]
    lines += ["", f"| target | {head} |", f"| --- | {align} |"]
    lines += [f"| {label} | {' | '.join(cells)} |" for label, cells in targets.items()]
    return "\n".join(lines)


def _find(results: list[Result], strategy: str, workload: str) -> Result | None:
    return next((r for r in results if r.strategy == strategy and r.workload == workload), None)


def _verdict(met: bool) -> str:
    return "yes" if met else "**no**"


#: throughput targets, rabbitkeys / shared queue, same workers, same workload: issue 13's
#: (bursts of known keys, interleaved) and issue 25's (bursts of new keys)
THROUGHPUT_TARGETS = {"bursts": 1.0, "interleaved": 0.65, "new-bursts": 1.0}
SLOW_P99_TARGET = 1.5
NEW_KEYS_TARGET = 0.7
#: issue 25: rabbitkeys' new keys per second against doing it by hand
BY_HAND_TARGET = 1.0


Row = tuple[str, str, str]


def _targets(
    results: list[Result], declare_rate: float | None, by_hand: ByHand | None = None
) -> list[Row]:
    """The targets' rows: what is compared, the measured ratio, whether it is met ("-":
    no target, a figure to read)."""
    return [
        *_throughput_targets(results),
        *_slow_key_targets(results),
        *_new_key_targets(results, declare_rate, by_hand),
        *_ceiling_rows(results),
        *_memory_rows(results),
    ]


def _throughput_targets(results: list[Result]) -> list[Row]:
    rows = []
    for workload, target in THROUGHPUT_TARGETS.items():
        ours, shared = _find(results, "rabbitkeys", workload), _find(results, "shared", workload)
        if ours and shared:
            ratio = ours.throughput / shared.throughput
            ordered = ours.order_violations == 0 and ours.lost == 0
            rows.append(
                (
                    f"{workload}: rabbitkeys >= {target:.2f} x shared queue (jobs/s), "
                    "0 order violations",
                    f"{ours.throughput:,.0f} / {shared.throughput:,.0f} = {ratio:.2f} x, "
                    f"{ours.order_violations:,} violations",
                    _verdict(ratio >= target and ordered),
                )
            )
    return rows


def _slow_key_targets(results: list[Result]) -> list[Row]:
    slow = _find(results, "rabbitkeys", "slow")
    calm = _find(results, "rabbitkeys", "interleaved") or _find(results, "rabbitkeys", "uniform")
    if not (slow and calm and slow.fast_p99_ms is not None):
        return []
    ratio = slow.fast_p99_ms / max(calm.p99_ms, 1e-9)
    rows = [
        (
            f"fast keys' p99 with 1 % slow keys <= {SLOW_P99_TARGET} x p99 without "
            f"({calm.workload})",
            f"{slow.fast_p99_ms:,.1f} / {calm.p99_ms:,.1f} ms = {ratio:.2f} x",
            _verdict(ratio <= SLOW_P99_TARGET),
        )
    ]
    for other in ("raw", "partitions"):
        theirs, theirs_calm = _find(results, other, "slow"), _find(results, other, calm.workload)
        if theirs and theirs_calm and theirs.fast_p99_ms is not None:
            rows.append(
                (
                    f"({other}, same measure)",
                    f"{theirs.fast_p99_ms / max(theirs_calm.p99_ms, 1e-9):.2f} x",
                    "-",
                )
            )
    return rows


#: the by-hand row's steps, as the report names them
BY_HAND = (
    "declare a durable SAC queue, bind, consume, publish one persistent message, get it "
    f"acked, {BY_HAND_LANES} lanes in parallel"
)


def _new_key_targets(
    results: list[Result], declare_rate: float | None, by_hand: ByHand | None
) -> list[Row]:
    rows: list[Row] = []
    churn = _find(results, "rabbitkeys", "churn")
    if declare_rate and not churn:
        rows.append(
            (
                "raw declare + bind (durable SAC queues, 16 channels)",
                f"{declare_rate:,.0f} per s",
                "-",
            )
        )
    if churn and declare_rate:
        rate = churn.extra.get("new_keys_per_second", 0.0)
        rows.append(
            (
                f"new keys >= {NEW_KEYS_TARGET} x raw declare + bind (durable SAC queues, "
                "16 channels, same run)",
                f"{rate:,.0f} / {declare_rate:,.0f} per s = {rate / declare_rate:.2f} x",
                _verdict(rate >= NEW_KEYS_TARGET * declare_rate),
            )
        )
    if by_hand:
        rows.append((f"new keys by hand: {BY_HAND}", f"{by_hand.rate:,.0f} per s", "-"))
    if churn and by_hand:
        # churn's jobs/s: each job a new key, first publish to the last handler's end, as
        # the by-hand rate runs from the first declare to the last ack
        ratio = churn.throughput / by_hand.rate
        intact = churn.lost == 0 and churn.order_violations == 0
        rows.append(
            (
                f"new keys: rabbitkeys >= {BY_HAND_TARGET:.1f} x by hand (new keys/s, churn, "
                "nothing lost)",
                f"{churn.throughput:,.0f} / {by_hand.rate:,.0f} per s = {ratio:.2f} x",
                _verdict(ratio >= BY_HAND_TARGET and intact),
            )
        )
    if churn and by_hand and churn.broker_cpu_ms and by_hand.broker_cpu_ms:
        # where the broker shares the cores, its work per key sets both rates
        rows.append(
            (
                "broker CPU per new key: rabbitkeys (churn) / by hand",
                f"{churn.broker_cpu_ms:.2f} / {by_hand.broker_cpu_ms:.2f} ms = "
                f"{churn.broker_cpu_ms / by_hand.broker_cpu_ms:.2f} x",
                "-",
            )
        )
    return rows


def _ceiling_rows(results: list[Result]) -> list[Row]:
    rows: list[Row] = []
    for workload in dict.fromkeys(r.workload for r in results):
        ours, raw = _find(results, "rabbitkeys", workload), _find(results, "raw", workload)
        shared = _find(results, "shared", workload)
        if ours and raw:
            rows.append(
                (
                    f"{workload}: rabbitkeys / raw per-key queues (jobs/s)",
                    f"{ours.throughput / raw.throughput:.2f} x",
                    "-",
                )
            )
        if raw and shared:
            rows.append(
                (
                    f"{workload}: raw per-key queues / shared queue (jobs/s), the ceiling "
                    "without batching",
                    f"{raw.throughput / shared.throughput:.2f} x",
                    "-",
                )
            )
    return rows


def _memory_rows(results: list[Result]) -> list[Row]:
    rows: list[Row] = []
    memory = _find(results, "rabbitkeys", "interleaved") or _find(results, "rabbitkeys", "bursts")
    if memory and "broker_bytes_per_key" in memory.extra:
        rows.append(
            (
                f"broker memory per live key ({memory.workload})",
                f"{memory.extra['broker_bytes_per_key'] / 1024:,.1f} KiB",
                "-",
            )
        )
    if memory and "worker_bytes_per_key" in memory.extra:
        rows.append(
            (
                f"worker memory per owned key ({memory.workload})",
                f"{memory.extra['worker_bytes_per_key'] / 1024:,.1f} KiB",
                "-",
            )
        )
    return rows
