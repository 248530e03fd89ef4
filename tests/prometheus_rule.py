"""The alert rules of ``grafana/alerts.yaml`` as a Prometheus Operator ``PrometheusRule``.

Prometheus reads ``grafana/alerts.yaml`` from a file (docker-compose mounts it); on Kubernetes
the Prometheus Operator only loads rules from ``PrometheusRule`` objects. One source keeps the
two from drifting: this module wraps the file's groups unchanged, and
``deploy/kubernetes/components/prometheusrule/prometheusrule.yaml`` is its committed output,
which ``tests/deploy/test_deploy.py`` compares with a fresh run::

    python -m tests.prometheus_rule > \\
        deploy/kubernetes/components/prometheusrule/prometheusrule.yaml

Every alert gets a ``runbook_url`` (kube-prometheus convention) pointing at its anchor in
the alerts table of the documentation (``docs/operate/alerts.md``), unless the rule already
sets one.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

# PyYAML is a test/dev dependency (not the runtime's) and ships no type stubs.
import yaml  # type: ignore[import-untyped]

__all__ = ["RUNBOOK_BASE", "main", "prometheus_rule", "render", "runbook_url"]

RUNBOOK_BASE = "https://github.com/rabbitkeys/rabbitkeys/blob/main/docs/operate/alerts.md"
DEFAULT_ALERTS = Path("grafana") / "alerts.yaml"
HEADER = (
    "# GENERATED from grafana/alerts.yaml by `python -m tests.prometheus_rule`:\n"
    "# do not edit (tests/deploy/test_deploy.py checks it is in sync). Change grafana/alerts.yaml\n"
    "# and run the command again.\n"
)


def runbook_url(alert: str) -> str:
    """Where an alert's runbook lives: its anchor in the alerts table of
    ``docs/operate/alerts.md``."""
    return f"{RUNBOOK_BASE}#alert-{alert.lower()}"


def prometheus_rule(alerts: dict[str, Any], name: str = "rabbitkeys") -> dict[str, Any]:
    """A ``PrometheusRule`` holding the groups of a Prometheus rule file; the input is not
    modified."""
    groups = copy.deepcopy(alerts["groups"])
    for group in groups:
        for rule in group["rules"]:
            if "alert" in rule:
                annotations = rule.setdefault("annotations", {})
                annotations.setdefault("runbook_url", runbook_url(rule["alert"]))
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "rabbitkeys"}},
        "spec": {"groups": groups},
    }


def render(alerts_file: Path = DEFAULT_ALERTS) -> str:
    """The manifest's text, as committed: the header, then the object."""
    alerts = yaml.safe_load(alerts_file.read_text())
    body = yaml.safe_dump(prometheus_rule(alerts), sort_keys=False, width=100, allow_unicode=True)
    return HEADER + str(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.prometheus_rule",
        description="Print grafana/alerts.yaml as a Prometheus Operator PrometheusRule.",
    )
    parser.add_argument(
        "alerts",
        nargs="?",
        type=Path,
        default=DEFAULT_ALERTS,
        help="the Prometheus rule file (default: grafana/alerts.yaml, from the repository root)",
    )
    args = parser.parse_args(argv)
    sys.stdout.write(render(args.alerts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
