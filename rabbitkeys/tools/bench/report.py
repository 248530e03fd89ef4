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


def markdown(results: list[Result], *, declare_rate: float | None = None) -> str:
    paced = {r.paced_rate for r in results if r.paced_rate}
    when = f" at {paced.pop():,.0f} msg/s" if len(paced) == 1 else ""
    lines = [
        f"msg/s: as fast as confirmed; latency (publish call to handler start): paced{when}; "
        "broker CPU: the RabbitMQ node's CPU time per message of the fast phase.",
        "",
        "| workload | strategy | msg/s | p50 ms | p99 ms | fast keys p99 ms "
        "| order violations | lost | broker CPU ms/msg |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        cpu = r.extra.get("broker_cpu_ms_per_message")
        lines.append(
            f"| {r.workload} | {r.strategy} | {r.throughput:,.0f} | {_ms(r.p50_ms)} | "
            f"{_ms(r.p99_ms)} | {_ms(r.fast_p99_ms)} | {r.order_violations:,} | {r.lost} | "
            f"{'-' if cpu is None else f'{cpu:.2f}'} |"
        )
    lines += ["", *_targets(results, declare_rate)]
    return "\n".join(lines)


def _find(results: list[Result], strategy: str, workload: str) -> Result | None:
    return next((r for r in results if r.strategy == strategy and r.workload == workload), None)


def _targets(results: list[Result], declare_rate: float | None) -> list[str]:
    lines = ["| target | measured | met |", "| --- | --- | --- |"]
    ours, shared = _find(results, "rabbitkeys", "uniform"), _find(results, "shared", "uniform")
    if ours and shared:
        ratio = ours.throughput / shared.throughput
        lines.append(
            f"| ordered throughput, 1,000 uniform keys >= 0.8 x shared queue | "
            f"{ratio:.2f} x | {'yes' if ratio >= 0.8 else 'no'} |"
        )
    slow, calm = _find(results, "rabbitkeys", "slow"), ours
    if slow and calm and slow.fast_p99_ms is not None:
        ratio = slow.fast_p99_ms / max(calm.p99_ms, 1e-9)
        lines.append(
            f"| fast keys' p99 with 1 % slow keys <= 1.5 x p99 without | {ratio:.2f} x | "
            f"{'yes' if ratio <= 1.5 else 'no'} |"
        )
        parts, parts_calm = (
            _find(results, "partitions", "slow"),
            _find(results, "partitions", "uniform"),
        )
        if parts and parts_calm and parts.fast_p99_ms is not None:
            lines.append(
                f"| (partitions, same measure) | "
                f"{parts.fast_p99_ms / max(parts_calm.p99_ms, 1e-9):.2f} x | - |"
            )
    churn = _find(results, "rabbitkeys", "churn")
    if churn and declare_rate:
        rate = churn.extra.get("new_keys_per_second", 0.0)
        lines.append(
            f"| new-key rate >= 70 % of raw declare+bind ({declare_rate:,.0f}/s) | "
            f"{rate:,.0f}/s = {rate / declare_rate:.0%} | "
            f"{'yes' if rate >= 0.7 * declare_rate else 'no'} |"
        )
    if ours and "broker_bytes_per_key" in ours.extra:
        lines.append(
            f"| broker memory per live key (uniform) | "
            f"{ours.extra['broker_bytes_per_key'] / 1024:,.1f} KiB | - |"
        )
    if ours and "worker_bytes_per_key" in ours.extra:
        lines.append(
            f"| worker memory per owned key (uniform) | "
            f"{ours.extra['worker_bytes_per_key'] / 1024:,.1f} KiB | - |"
        )
    return lines
