"""What a role has before its connection does: nothing to reach for, and it says so. No broker.

A registry's leading session and a publisher's link to the broker are objects built when they
exist (``_registry/session.py``, ``_publisher/carrier.py``); before that their place holds a
state that has none of their parts.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from rabbitkeys import Publisher, Registry, Settings
from rabbitkeys._publisher.carrier import _NOT_CONNECTED
from rabbitkeys._registry.session import NOT_LEADING


def test_a_registry_that_has_not_led_has_no_leading_session_and_reports_standing_by() -> None:
    registry = Registry(Settings(), metrics_registry=CollectorRegistry())
    assert registry._lead is NOT_LEADING
    assert registry.gauge_values() == {"rabbitkeys_leader": 0}
    for part in ("connection", "control", "runner", "reconciler", "operator_requests"):
        with pytest.raises(RuntimeError, match="has not led"):
            getattr(NOT_LEADING, part)


def test_a_carrier_without_a_connection_raises_what_a_lost_connection_would() -> None:
    publisher = Publisher(Settings(), metrics_registry=CollectorRegistry())
    assert publisher._carrier._link is _NOT_CONNECTED
    # an ensure under way treats ConnectionError as an interruption: it asks again once
    # connected (Carrier._ensure)
    with pytest.raises(ConnectionError):
        _NOT_CONNECTED.channel  # noqa: B018
    with pytest.raises(ConnectionError):
        _NOT_CONNECTED.control  # noqa: B018
