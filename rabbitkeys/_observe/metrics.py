"""Prometheus metrics: one container per role (publisher, worker, registry).

Each container takes the ``prometheus_client`` registry to register on (the global one by
default). Names carry the ``rabbitkeys_`` prefix and base units (``_seconds``, ``_total``).
No metric has a label per key: a namespace with 100,000 keys exports as many series as one
with ten.

Several publishers, workers or registries in one process (tests, an application with two
publishers) share the counters and histograms of their registry, and the gauges read at
scrape time add up over all of them, so a process always exports one series per name.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any, Protocol, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .._version import __version__
from .._wire.senders import REFUSAL_REASONS

__all__ = ["PublisherMetrics", "RegistryMetrics", "WorkerMetrics"]

#: From a fast in-memory job to a minute-long one; also fits handoffs and failovers.
SECONDS_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

#: Jobs per AMQP message: 1 unbatched, up to batch_max_jobs.
JOBS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

_M = TypeVar("_M", Counter, Gauge, Histogram)

# Metric objects by registry and name: a second container on the same registry reuses them
# (prometheus_client refuses to register a name twice).
_created: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, Any]] = weakref.WeakKeyDictionary()


def _metric(registry: CollectorRegistry, kind: type[_M], name: str, doc: str, **kw: Any) -> _M:
    known = _created.setdefault(registry, {})
    if name not in known:
        known[name] = kind(name, doc, registry=registry, **kw)
    metric = known[name]
    assert isinstance(metric, kind)
    return metric


def _counter(registry: CollectorRegistry, name: str, doc: str) -> Counter:
    return _metric(registry, Counter, name, doc)


def _refusals(registry: CollectorRegistry) -> Counter:
    """Control messages refused, by reason (``_wire.senders.REFUSAL_REASONS``, a closed set);
    every reason pre-created, so a rate over it is 0, not absent, until the first one."""
    counter = _metric(
        registry,
        Counter,
        "rabbitkeys_refused_control_messages",
        "Control messages refused, by reason: malformed, from a sender that may not send "
        "them, or asking for what the receiver may not do.",
        labelnames=("reason",),
    )
    for reason in REFUSAL_REASONS:
        counter.labels(reason=reason)
    return counter


def _histogram(registry: CollectorRegistry, name: str, doc: str) -> Histogram:
    return _metric(registry, Histogram, name, doc, buckets=SECONDS_BUCKETS)


def _mark_role(registry: CollectorRegistry, role: str) -> None:
    info = _metric(
        registry,
        Gauge,
        "rabbitkeys_info",
        "1 per role this process plays; the version in a label.",
        labelnames=["role", "version"],
    )
    info.labels(role=role, version=__version__).set(1)


class StateSource(Protocol):
    """An object whose current state some gauges report (a worker, a registry)."""

    def gauge_values(self) -> dict[str, float]: ...


class _StateGauges(Collector):
    """Gauges read from the live sources at scrape time, summed: nothing to keep in step
    at every change, and nothing left behind when a source goes away."""

    def __init__(self, docs: dict[str, str]) -> None:
        self._docs = docs
        self._sources: weakref.WeakSet[Any] = weakref.WeakSet()

    def add(self, source: StateSource) -> None:
        self._sources.add(source)

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [GaugeMetricFamily(name, doc) for name, doc in self._docs.items()]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        totals = dict.fromkeys(self._docs, 0.0)
        for source in list(self._sources):
            for name, value in source.gauge_values().items():
                totals[name] += value
        return [
            GaugeMetricFamily(name, doc, value=totals[name]) for name, doc in self._docs.items()
        ]


def _state_gauges(registry: CollectorRegistry, role: str, docs: dict[str, str]) -> _StateGauges:
    known = _created.setdefault(registry, {})
    name = f"state gauges of {role}"
    if name not in known:
        known[name] = _StateGauges(docs)
        registry.register(known[name])
    gauges = known[name]
    assert isinstance(gauges, _StateGauges)
    return gauges


class PublisherMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = REGISTRY if registry is None else registry
        self.published = _counter(
            registry, "rabbitkeys_published_messages", "Messages the broker confirmed."
        )
        self.publish_failures = _counter(
            registry,
            "rabbitkeys_publish_failures",
            "publish() calls that raised (refused, timed out, no registry).",
        )
        self.returned = _counter(
            registry,
            "rabbitkeys_returned_messages",
            "Messages the broker returned unroutable (key retired or queue gone), re-routed.",
        )
        self.resent = _counter(
            registry,
            "rabbitkeys_resent_messages",
            "Messages sent again after a lost connection.",
        )
        self.publish_duration = _histogram(
            registry,
            "rabbitkeys_publish_duration_seconds",
            "From the publish() call to the broker's confirm.",
        )
        self.batch_jobs = _metric(
            registry,
            Histogram,
            "rabbitkeys_publish_batch_jobs",
            "Jobs per AMQP message sent (1: a message of its own; more: a batch of one key).",
            buckets=JOBS_BUCKETS,
        )


class WorkerMetrics:
    GAUGES = {
        "rabbitkeys_owned_keys": "Keys this worker consumes.",
        "rabbitkeys_in_flight_messages": "Handlers running now.",
        "rabbitkeys_buffered_messages": "Messages delivered to this worker, not started yet.",
    }

    def __init__(self, source: StateSource, registry: CollectorRegistry | None = None) -> None:
        registry = REGISTRY if registry is None else registry
        _mark_role(registry, "worker")
        _state_gauges(registry, "worker", self.GAUGES).add(source)
        self.handled = _counter(
            registry, "rabbitkeys_handled_messages", "Messages whose handler succeeded."
        )
        self.handler_failures = _counter(
            registry, "rabbitkeys_handler_failures", "Handler attempts that raised."
        )
        self.retried = _counter(
            registry, "rabbitkeys_retried_messages", "Handler attempts that were retries."
        )
        # by job type: a worker's job types are its app's handlers, a bounded set
        self.job_timeouts = _metric(
            registry,
            Counter,
            "rabbitkeys_job_timeouts",
            "Handler attempts that ran past their time limit (counted in handler failures "
            "too), by job type.",
            labelnames=("job_type",),
        )
        self.overdue_handler_threads = _metric(
            registry,
            Gauge,
            "rabbitkeys_overdue_handler_threads",
            "Threads still running a sync handler whose attempt ended (its time limit, or "
            "its session's end): each keeps its place in the pool, and its key waits for it.",
        )
        self.dead_lettered = _counter(
            registry,
            "rabbitkeys_dead_lettered_messages",
            "Messages moved to the dead-letter queue after the last attempt.",
        )
        self.order_violations = _counter(
            registry,
            "rabbitkeys_order_violations",
            "Messages of a key that arrived after a later one of the same publisher "
            "(should stay 0).",
        )
        self.duplicates_dropped = _counter(
            registry,
            "rabbitkeys_duplicates_dropped",
            "Messages recognised as already handled and acked without running the handler.",
        )
        self.keys_released = _counter(
            registry, "rabbitkeys_keys_released", "Keys this worker let go (moves, retirements)."
        )
        self.parked = _counter(
            registry,
            "rabbitkeys_parked",
            "Keys this worker parked: a head job failed its last attempt under the park policy.",
        )
        self.malformed = _counter(
            registry,
            "rabbitkeys_malformed_messages",
            "Control messages dropped (malformed or invalid).",
        )
        self.refused = _refusals(registry)
        self.handler_duration = _histogram(
            registry, "rabbitkeys_handler_duration_seconds", "Time in the handler, per attempt."
        )
        self.end_to_end_latency = _histogram(
            registry,
            "rabbitkeys_end_to_end_latency_seconds",
            "From the publish() call to the handler's first start (clocks of two hosts).",
        )
        self.release_duration = _histogram(
            registry,
            "rabbitkeys_release_duration_seconds",
            "Letting go of a key: finish the running message, cancel, hand back the rest.",
        )
        self.delivery_jobs = _metric(
            registry,
            Histogram,
            "rabbitkeys_delivery_jobs",
            "Jobs per delivery received (1: a message of its own; more: a batch of one key).",
            buckets=JOBS_BUCKETS,
        )


class RegistryMetrics:
    GAUGES = {
        "rabbitkeys_leader": "1 while this registry leads its namespace.",
        "rabbitkeys_live_keys": "Keys the leading registry knows.",
        "rabbitkeys_unassigned_keys": "Keys with no worker now (moving, or no worker).",
        "rabbitkeys_unavailable_keys": "Keys whose queue was unavailable when last declared "
        "(on a cluster, its node is down): their publishes wait for it. Counted until the "
        "key is declared again, its lease renewed, or it is retired.",
        "rabbitkeys_live_workers": "Workers the leading registry knows.",
        "rabbitkeys_backlog_messages": "Messages in key queues, per the management API "
        "(leader only, polled).",
        "rabbitkeys_key_queues": "Key queues on the broker, per the management API "
        "(leader only, polled).",
        "rabbitkeys_parked_keys": "Keys parked after their head's last attempt failed "
        "(a job type with on_failure='park'): stopped until an operator resumes or skips them.",
        "rabbitkeys_paused_keys": "Keys held by an operator's pause, of the key or of its job "
        "type: not consumed, their messages kept.",
        "rabbitkeys_paused_job_types": "Job types an operator paused.",
    }

    def __init__(self, source: StateSource, registry: CollectorRegistry | None = None) -> None:
        registry = REGISTRY if registry is None else registry
        _mark_role(registry, "registry")
        _state_gauges(registry, "registry", self.GAUGES).add(source)
        self.rebalances = _counter(
            registry, "rabbitkeys_rebalances", "Rebalances that moved at least one key."
        )
        self.keys_moved = _counter(
            registry, "rabbitkeys_keys_moved", "Keys moved from one live worker to another."
        )
        self.leadership_acquired = _counter(
            registry, "rabbitkeys_leadership_acquired", "Times this registry started leading."
        )
        self.keys_created = _counter(
            registry, "rabbitkeys_keys_created", "Key queues declared and bound."
        )
        self.keys_retired = _counter(
            registry, "rabbitkeys_keys_retired", "Idle keys retired (queue deleted)."
        )
        self.malformed = _counter(
            registry,
            "rabbitkeys_malformed_messages",
            "Control messages dropped (malformed or invalid).",
        )
        self.refused = _refusals(registry)
        self.quota_refusals = _counter(
            registry,
            "rabbitkeys_quota_refusals",
            "New keys refused by a quota (max_keys, max_job_types, the vhost's max-queues).",
        )
        self.handoff_duration = _histogram(
            registry,
            "rabbitkeys_handoff_duration_seconds",
            "A key's move: from the release request to the old owner's report.",
        )
        self.failover_gap = _histogram(
            registry,
            "rabbitkeys_failover_gap_seconds",
            "A lost worker's last sign of life to its keys being assigned again.",
        )
        self.redriven_messages = _counter(
            registry,
            "rabbitkeys_redriven_messages",
            "Dead letters put back at the head of their key.",
        )
        self.skipped_messages = _counter(
            registry,
            "rabbitkeys_skipped_messages",
            "Heads of parked keys dead-lettered by `rabbitkeys skip`.",
        )
        self.oldest_message_age = _metric(
            registry,
            Gauge,
            "rabbitkeys_oldest_message_age_seconds",
            "Age of the oldest waiting message over a job type's key queues, from the "
            "registry's last listing of the broker's queues.",
            labelnames=("job_type",),
        )
        self._aged_job_types: set[str] = set()

    def set_oldest_ages(self, ages: dict[str, float]) -> None:
        """The oldest waiting message's age per job type, from the leader's last listing
        (0 for a job type with none waiting); the job types this registry set before and
        that are no longer listed lose their series. ``{}`` when leadership ends: only the
        leader reports ages. A label per job type, not per key: job types are few
        (``max_job_types``)."""
        for job_type in self._aged_job_types - ages.keys():
            self.oldest_message_age.remove(job_type)
        for job_type, age in ages.items():
            self.oldest_message_age.labels(job_type=job_type).set(age)
        self._aged_job_types = set(ages)
