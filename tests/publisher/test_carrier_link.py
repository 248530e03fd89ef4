"""What a publisher's carrier has before it connects: no link to the broker to reach for,
and it raises what a lost connection would. No broker. The carrier's link is an object built
when it connects (``_publisher/carrier.py``).
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from rabbitkeys import Publisher, Settings
from rabbitkeys._publisher.carrier import _NOT_CONNECTED


def test_a_carrier_without_a_connection_raises_what_a_lost_connection_would() -> None:
    publisher = Publisher(Settings(), metrics_registry=CollectorRegistry())
    assert publisher._carrier._link is _NOT_CONNECTED
    # an ensure under way treats ConnectionError as an interruption: it asks again once
    # connected (Carrier._ensure)
    with pytest.raises(ConnectionError):
        _NOT_CONNECTED.channel  # noqa: B018
    with pytest.raises(ConnectionError):
        _NOT_CONNECTED.control  # noqa: B018
