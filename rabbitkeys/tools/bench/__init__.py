"""``rabbitkeys bench``: rabbitkeys against the usual alternatives, measured in one run.

See ``runner`` for the strategies and ``workloads`` for the workloads; ``report`` prints the
Markdown table that ``docs/benchmarks.md`` keeps.
"""

from __future__ import annotations

from .report import machine_description, markdown
from .runner import (
    DEFAULT_STRATEGIES,
    STRATEGIES,
    Result,
    applies,
    measure_declare_rate,
    run_strategy,
)
from .workloads import DEFAULT_WORKLOADS, WORKLOADS, make_workload

__all__ = [
    "DEFAULT_STRATEGIES",
    "DEFAULT_WORKLOADS",
    "STRATEGIES",
    "WORKLOADS",
    "Result",
    "applies",
    "machine_description",
    "make_workload",
    "markdown",
    "measure_declare_rate",
    "run_strategy",
]
