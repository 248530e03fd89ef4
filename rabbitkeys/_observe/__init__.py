"""Observability shared by every role: Prometheus metrics, one container per role
(``metrics``), the HTTP endpoint that serves them with the probes (``metrics_server``), and
the OpenTelemetry plumbing (``tracing``, the optional extra ``rabbitkeys[otel]``).

Shell (``metrics_server`` does I/O); ``metrics`` and ``tracing`` only record. Imports no
role: the worker's span (``rabbitkeys._worker.tracing``) is built on ``tracing``.
Internals: ``docs/internals/observe.md``.
"""
