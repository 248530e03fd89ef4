"""rabbitkeys' tooling: the one home of what runs *around* the runtime, never inside it.

``rabbitkeys demo`` (:mod:`.demo`), ``rabbitkeys chaos`` (:mod:`.chaos`) and ``rabbitkeys
bench`` (:mod:`.bench`), and :mod:`.cluster`, which starts real registry and worker processes
for them and for the tests; :mod:`.rabbit_cluster` starts a RabbitMQ cluster on this machine
for the tests of issue 14; :mod:`.prometheus_rule` prints ``grafana/alerts.yaml`` as the
PrometheusRule of ``deploy/``. The runtime (every other module of ``rabbitkeys``) imports
nothing from here (``tests/test_units.py`` checks it), so a worker never loads the benchmark.

Public here: ``rabbitkeys.tools.demo:app``, the demo app that ``deploy/`` runs
(``rabbitkeys worker rabbitkeys.tools.demo:app``). The rest is tooling, not library API.
Internals: ``docs/internals/cli.md``.
"""

__all__: list[str] = []
