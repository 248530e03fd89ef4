"""The benchmark's Markdown report: the machine, the table, the targets."""

from __future__ import annotations

import os
import platform
import subprocess

from .runner import Result

__all__ = ["machine_description", "markdown"]


def machine_description() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    broker = "RabbitMQ (version unknown)"
    try:
        version = subprocess.run(
            ["rabbitmqctl", "version"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        if version:
            broker = f"RabbitMQ {version} on the same host"
    except (OSError, subprocess.SubprocessError):
        pass
    return (
        f"{os.cpu_count()} cores ({cpu}), {broker}, Python {platform.python_version()}; "
        "broker, publisher and workers share the cores"
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _batch(r: Result) -> str:
    return f"{r.batch_mean:.1f} ({r.batch_p50:g} / {r.batch_p99:g})"


def markdown(results: list[Result], *, declare_rate: float | None = None) -> str:
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
    lines += ["", *_targets(results, declare_rate)]
    return "\n".join(lines)


def _find(results: list[Result], strategy: str, workload: str) -> Result | None:
    return next((r for r in results if r.strategy == strategy and r.workload == workload), None)


def _verdict(met: bool) -> str:
    return "yes" if met else "**no**"


#: issue 13's throughput targets: rabbitkeys / shared queue, same workers, same workload
THROUGHPUT_TARGETS = {"bursts": 1.0, "interleaved": 0.65}
SLOW_P99_TARGET = 1.5
NEW_KEYS_TARGET = 0.7


def _targets(results: list[Result], declare_rate: float | None) -> list[str]:
    lines = ["| target | measured | met |", "| --- | --- | --- |"]
    for workload, target in THROUGHPUT_TARGETS.items():
        ours, shared = _find(results, "rabbitkeys", workload), _find(results, "shared", workload)
        if ours and shared:
            ratio = ours.throughput / shared.throughput
            ordered = ours.order_violations == 0 and ours.lost == 0
            lines.append(
                f"| {workload}: rabbitkeys >= {target:.2f} x shared queue (jobs/s), "
                f"0 order violations | {ours.throughput:,.0f} / {shared.throughput:,.0f} = "
                f"{ratio:.2f} x, {ours.order_violations:,} violations | "
                f"{_verdict(ratio >= target and ordered)} |"
            )
    slow = _find(results, "rabbitkeys", "slow")
    calm = _find(results, "rabbitkeys", "interleaved") or _find(results, "rabbitkeys", "uniform")
    if slow and calm and slow.fast_p99_ms is not None:
        ratio = slow.fast_p99_ms / max(calm.p99_ms, 1e-9)
        lines.append(
            f"| fast keys' p99 with 1 % slow keys <= {SLOW_P99_TARGET} x p99 without "
            f"({calm.workload}) | {slow.fast_p99_ms:,.1f} / {calm.p99_ms:,.1f} ms = "
            f"{ratio:.2f} x | {_verdict(ratio <= SLOW_P99_TARGET)} |"
        )
        for other in ("raw", "partitions"):
            theirs, theirs_calm = (
                _find(results, other, "slow"),
                _find(results, other, calm.workload),
            )
            if theirs and theirs_calm and theirs.fast_p99_ms is not None:
                lines.append(
                    f"| ({other}, same measure) | "
                    f"{theirs.fast_p99_ms / max(theirs_calm.p99_ms, 1e-9):.2f} x | - |"
                )
    churn = _find(results, "rabbitkeys", "churn")
    if declare_rate and not churn:
        lines.append(
            f"| raw declare + bind (durable SAC queues, 16 channels) | {declare_rate:,.0f} per s "
            "| - |"
        )
    if churn and declare_rate:
        rate = churn.extra.get("new_keys_per_second", 0.0)
        lines.append(
            f"| new keys >= {NEW_KEYS_TARGET} x raw declare + bind (durable SAC queues, "
            f"16 channels, same run) | {rate:,.0f} / {declare_rate:,.0f} per s = "
            f"{rate / declare_rate:.2f} x | {_verdict(rate >= NEW_KEYS_TARGET * declare_rate)} |"
        )
    for workload in dict.fromkeys(r.workload for r in results):
        ours, raw = _find(results, "rabbitkeys", workload), _find(results, "raw", workload)
        shared = _find(results, "shared", workload)
        if ours and raw:
            lines.append(
                f"| {workload}: rabbitkeys / raw per-key queues (jobs/s) | "
                f"{ours.throughput / raw.throughput:.2f} x | - |"
            )
        if raw and shared:
            lines.append(
                f"| {workload}: raw per-key queues / shared queue (jobs/s), the ceiling "
                f"without batching | {raw.throughput / shared.throughput:.2f} x | - |"
            )
    memory = _find(results, "rabbitkeys", "interleaved") or _find(results, "rabbitkeys", "bursts")
    if memory and "broker_bytes_per_key" in memory.extra:
        lines.append(
            f"| broker memory per live key ({memory.workload}) | "
            f"{memory.extra['broker_bytes_per_key'] / 1024:,.1f} KiB | - |"
        )
    if memory and "worker_bytes_per_key" in memory.extra:
        lines.append(
            f"| worker memory per owned key ({memory.workload}) | "
            f"{memory.extra['worker_bytes_per_key'] / 1024:,.1f} KiB | - |"
        )
    return lines
