"""PNG plots of a benchmark run (``rabbitkeys bench --plot DIR``; needs matplotlib, the
``plots`` extra): jobs/s, AMQP messages/s, CPU per job and fast-key p99 latency per workload
and strategy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..._errors import ConfigError
from .runner import STRATEGIES, Result

__all__ = ["write_plots"]


def write_plots(results: list[Result], directory: str | Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install 'rabbitkeys[plots]'") from None
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    workloads = list(dict.fromkeys(r.workload for r in results))
    strategies = [s for s in STRATEGIES if any(r.strategy == s for r in results)]
    figures: dict[str, tuple[str, Callable[[Result], float]]] = {
        "throughput.png": ("jobs per second (as fast as confirmed)", lambda r: r.throughput),
        "amqp_messages.png": (
            "AMQP messages per second (fewer than jobs once batches form)",
            lambda r: r.amqp_rate,
        ),
        "cpu_per_job.png": (
            "CPU ms per job, all processes (broker, publisher, workers, registry)",
            lambda r: r.total_cpu_ms or 0.0,
        ),
        "latency_p99.png": (
            "p99 latency of fast keys, ms (paced)",
            lambda r: r.fast_p99_ms if r.fast_p99_ms is not None else r.p99_ms,
        ),
    }
    written = []
    for filename, (title, measure) in figures.items():
        figure, axes = plt.subplots(figsize=(8, 4.5))
        width = 0.8 / max(1, len(strategies))
        for i, strategy in enumerate(strategies):
            heights = []
            for workload in workloads:
                found = [r for r in results if r.strategy == strategy and r.workload == workload]
                heights.append(measure(found[0]) if found else 0.0)
            positions = [w + i * width for w in range(len(workloads))]
            axes.bar(positions, heights, width, label=strategy)
        axes.set_xticks([w + width * (len(strategies) - 1) / 2 for w in range(len(workloads))])
        axes.set_xticklabels(workloads)
        axes.set_title(title)
        if filename.startswith(("latency", "cpu")):  # key churn is 10-100 x the others
            axes.set_yscale("log")
        axes.legend()
        figure.tight_layout()
        path = out / filename
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written
