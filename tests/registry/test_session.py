"""What a registry has before it first leads: no leading session to reach for, and it says so.
No broker. A registry's leading session is an object built when it leads
(``_registry/session.py``); before that its place holds a state that has none of its parts.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from rabbitkeys import Registry, Settings
from rabbitkeys._registry.session import NOT_LEADING


def test_a_registry_that_has_not_led_has_no_leading_session_and_reports_standing_by() -> None:
    registry = Registry(Settings(), metrics_registry=CollectorRegistry())
    assert registry._lead is NOT_LEADING
    assert registry.gauge_values() == {"rabbitkeys_leader": 0}
    for part in ("connection", "control", "runner", "reconciler", "operator_requests"):
        with pytest.raises(RuntimeError, match="has not led"):
            getattr(NOT_LEADING, part)
