"""Settings: one immutable, typed object, read from ``RABBITKEYS_*`` environment variables.

Build it once at the entry point (``Settings()`` or :func:`load_settings`) and pass it down;
no module reads the environment on import.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ._errors import ConfigError

__all__ = ["ENV_PREFIX", "Settings", "load_settings", "mask_url"]

ENV_PREFIX = "RABBITKEYS_"


class Settings(BaseSettings):
    """Everything rabbitkeys can be told. Each field is read from ``RABBITKEYS_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="forbid", validate_default=True
    )

    amqp_url: SecretStr = Field(
        default=SecretStr("amqp://guest:guest@localhost:5672/"),
        description="AMQP URL of the broker; its password is never logged.",
    )
    management_url: SecretStr | None = Field(
        default=None,
        description="Management API URL (default: the AMQP host, port 15672, same login); "
        "the registry rebuilds unconsumed keys from it after a failover.",
    )
    namespace: str = Field(
        default="rabbitkeys",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Prefix of every exchange and queue; namespaces never see each other.",
    )
    key_queue_expires: float = Field(
        default=3600.0,
        ge=1.0,
        description="Seconds a key queue without consumer survives (x-expires backstop).",
    )
    durable: bool = Field(default=True, description="Durable key queues and persistent messages.")
    prefetch: int = Field(
        default=4,
        ge=1,
        le=65535,
        description="Deliveries a worker holds per key (handled one at a time, in order).",
    )
    concurrency: int = Field(
        default=64, ge=1, description="Handlers a worker runs at once (one per key at most)."
    )
    idle_period: float = Field(
        default=60.0,
        gt=0,
        description="Seconds without traffic after which the registry retires a key.",
    )
    heartbeat_interval: float = Field(
        default=1.0, gt=0, description="Seconds between worker heartbeats to the registry."
    )
    worker_timeout: float = Field(
        default=5.0,
        gt=0,
        description="Seconds without heartbeat after which the registry drops a worker.",
    )
    max_retries: int = Field(
        default=3, ge=0, description="Retries of a failing handler before dead-lettering."
    )
    retry_backoff: float = Field(
        default=0.5, ge=0, description="Seconds before the first retry; doubles each retry."
    )
    retry_backoff_max: float = Field(
        default=30.0, ge=0, description="Upper bound of the retry backoff, in seconds."
    )
    ensure_timeout: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a publish waits for the registry to route a new key.",
    )
    publish_timeout: float = Field(
        default=60.0,
        gt=0,
        description="Seconds a publish waits for its confirm, riding out broker outages.",
    )
    retire_grace: float = Field(
        default=1.0,
        ge=0,
        description="Seconds the registry waits after unbinding a key before it checks it empty.",
    )
    dedup: bool = Field(
        default=True,
        description="Workers drop exact copies of a message (same publisher and sequence).",
    )
    log_level: str = Field(default="INFO", description="Python logging level name.")
    metrics_port: int = Field(
        default=9500,
        ge=0,
        le=65535,
        description="Port of /metrics, /livez and /readyz in registry and worker processes; "
        "0 turns the endpoint off.",
    )
    metrics_host: str = Field(
        default="0.0.0.0", description="Address the metrics and health endpoint listens on."
    )
    # --- publisher: what a Publisher holds, and the largest message it sends ---
    max_pending_messages: int = Field(
        default=10_000,
        ge=1,
        description="Messages a Publisher holds at most (not yet sent, or sent and not yet "
        "confirmed); publish() waits for room, in call order, within publish_timeout.",
    )
    max_pending_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=1,
        description="Bytes (bodies and application headers) a Publisher holds at most; "
        "publish() waits for room. At least max_message_bytes.",
    )
    max_message_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1,
        le=512 * 1024 * 1024,
        description="Largest body publish() accepts: at most the broker's max_message_size "
        "(RabbitMQ 4.x default 16 MiB, 3.x 128 MiB; 512 MiB is RabbitMQ's ceiling).",
    )

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if not isinstance(logging.getLevelName(value.upper()), int):
            raise ValueError(f"unknown logging level {value!r}")
        return value.upper()

    @model_validator(mode="after")
    def _timeout_beyond_heartbeat(self) -> Self:
        if self.worker_timeout <= 2 * self.heartbeat_interval:
            raise ValueError(
                "worker_timeout must exceed twice heartbeat_interval, "
                "or a single late heartbeat drops a live worker"
            )
        return self

    @model_validator(mode="after")
    def _largest_message_fits_the_bound(self) -> Self:
        if self.max_message_bytes > self.max_pending_bytes:
            raise ValueError(
                "RABBITKEYS_MAX_PENDING_BYTES must be at least RABBITKEYS_MAX_MESSAGE_BYTES, "
                "or a message of the largest allowed size could never be published"
            )
        return self

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in self.model_dump().items())
        return f"Settings({fields})"

    @property
    def amqp_url_masked(self) -> str:
        """The broker URL with the password replaced, safe for logs."""
        return mask_url(self.amqp_url.get_secret_value())


def mask_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def load_settings(**overrides: Any) -> Settings:
    """Build :class:`Settings` from the environment, turning validation errors into a
    :class:`ConfigError` that names each offending environment variable."""
    # pydantic-settings ignores unknown variables; a typo would then silently fall back to a
    # default, so an unknown RABBITKEYS_* variable is an error. RABBITKEYS_TEST_* is the
    # test suite's own.
    known = {f"{ENV_PREFIX}{name}".upper() for name in Settings.model_fields}
    unknown = sorted(
        name
        for name in os.environ
        if name.upper().startswith(ENV_PREFIX)
        and not name.upper().startswith(f"{ENV_PREFIX}TEST_")
        and name.upper() not in known
    )
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_input=False, include_url=False):
            field = ".".join(str(part) for part in error["loc"]) or "?"
            problems.append(f"{ENV_PREFIX}{field.upper()}: {error['msg']}")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None
