"""The brokers one ``rabbitkeys bench`` run measures side by side: ``--broker
NAME=AMQP_URL,MANAGEMENT_URL`` (repeatable) parsed into settings per broker, and each
broker's real version as its management API reports it."""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

from pydantic import SecretStr, ValidationError

from ..._broker.management import _get
from ..._errors import BrokerUnavailableError
from ..._settings import Settings

__all__ = ["BenchBroker", "BrokerSpecError", "parse_broker", "rabbitmq_version"]


class BrokerSpecError(ValueError):
    """A ``--broker`` value that is not ``NAME=AMQP_URL,MANAGEMENT_URL``."""


@dataclass(frozen=True)
class BenchBroker:
    #: the column's name in the report (e.g. "3.10", "4.0.5")
    name: str
    settings: Settings


def parse_broker(value: str, settings: Settings) -> BenchBroker:
    """``NAME=AMQP_URL,MANAGEMENT_URL`` into ``settings`` pointed at that broker."""
    name, equals, urls = value.partition("=")
    amqp, comma, management = urls.partition(",")
    if not (equals and comma and name.strip() and amqp.strip() and management.strip()):
        raise BrokerSpecError(
            f"--broker {_masked(value)!r}: expected NAME=AMQP_URL,MANAGEMENT_URL, e.g. "
            "4.0=amqp://guest:guest@localhost:5710/,http://guest:guest@localhost:15710/"
        )
    for url, schemes in ((amqp, ("amqp", "amqps")), (management, ("http", "https"))):
        if urllib.parse.urlsplit(url.strip()).scheme not in schemes:
            raise BrokerSpecError(
                f"--broker {name}: {_masked(url)!r} is not a {' or '.join(schemes)} URL"
            )
    try:
        # validated again: the settings' own checks of both URLs
        pointed = Settings.model_validate(
            {
                **settings.model_dump(),
                "amqp_url": SecretStr(amqp.strip()),
                "amqp_url_file": None,
                "management_url": SecretStr(management.strip()),
                "management_url_file": None,
            }
        )
    except ValidationError as exc:
        raise BrokerSpecError(f"--broker {name}: {exc.errors()[0]['msg']}") from None
    return BenchBroker(name.strip(), pointed)


def _masked(text: str) -> str:
    """``text`` with the password of every URL in it replaced: errors are printed."""
    return re.sub(r"://([^:/@,]*):[^@,]*@", r"://\1:***@", text.strip())


def rabbitmq_version(settings: Settings) -> str | None:
    """The broker's version from its management API (``/api/overview``), None without it."""
    try:
        overview = _get(settings, "overview")
    except (BrokerUnavailableError, OSError, ValueError):
        return None
    version = overview.get("rabbitmq_version") if isinstance(overview, dict) else None
    return str(version) if version else None
