"""Observability shared by every role: Prometheus metrics, one container per role
(``metrics``), the HTTP endpoint that serves them with the probes (``metrics_server``), and
the OpenTelemetry plumbing (``tracing``, the optional extra ``rabbitkeys[otel]``).

Shell (``metrics_server`` does I/O); ``metrics`` and ``tracing`` only record. ``tracing``
still names the worker's ``Message``, ``Route`` and ``RetryPolicy`` for its handle span (for
type checking, and one lazy import): the one arrow that runs up from here, until that span
is handed the worker's decision instead (issue 24, part 2).
"""
