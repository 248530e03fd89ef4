"""Per-task figures of the Celery bridge, for those who watched them in Flower: on the
worker's ``/metrics`` (prometheus_client's global registry, which a worker serves), by task
name. The names are the app's registered tasks, so the series are bounded by the app; a job
naming a task the worker does not know counts as ``(unregistered)``."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from .._observe.metrics import SECONDS_BUCKETS, _metric

__all__ = ["UNREGISTERED", "TaskMetrics"]

#: the ``task`` label of a job whose task the worker does not know
UNREGISTERED = "(unregistered)"


class TaskMetrics:
    """``rabbitkeys_celery_task_runs_total{task, state}`` and
    ``rabbitkeys_celery_task_duration_seconds{task}``."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.runs = _metric(
            registry,
            Counter,
            "rabbitkeys_celery_task_runs",
            "Celery task attempts the bridge ran, by task and the state Celery gave them: "
            "SUCCESS, FAILURE, RETRY (retried in place), REVOKED (expired), IGNORED, "
            "REJECTED.",
            labelnames=("task", "state"),
        )
        self.duration = _metric(
            registry,
            Histogram,
            "rabbitkeys_celery_task_duration_seconds",
            "Time in a Celery task, per attempt (the tracer's: signals and the result "
            "backend's store included).",
            labelnames=("task",),
            buckets=SECONDS_BUCKETS,
        )

    def ran(self, task: str, state: str, seconds: float | None = None) -> None:
        self.runs.labels(task=task, state=state).inc()
        if seconds is not None:
            self.duration.labels(task=task).observe(seconds)
