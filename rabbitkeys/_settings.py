"""Settings: one immutable, typed object, read from ``RABBITKEYS_*`` environment variables.

Build it once at the entry point (``Settings()`` or :func:`load_settings`) and pass it down;
no module reads the environment on import.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

import yarl
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from ._errors import ConfigError
from ._tls import client_context

__all__ = [
    "DEFAULT_METRICS_PORT",
    "ENV_PREFIX",
    "Settings",
    "load_settings",
    "mask_url",
    "split_urls",
]

ENV_PREFIX = "RABBITKEYS_"
#: where /metrics is served when RABBITKEYS_METRICS_PORT is not set (a free port if taken)
DEFAULT_METRICS_PORT = 9500


class Settings(BaseSettings):
    """Everything rabbitkeys can be told. Each field is read from ``RABBITKEYS_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="forbid",
        validate_default=True,
        # a rejected URL must not show up, password included, in a ValidationError's text
        hide_input_in_errors=True,
    )

    amqp_url: SecretStr = Field(
        default=SecretStr("amqp://guest:guest@localhost:5672/"),
        description="AMQP URL of the broker, or of each node of a cluster separated by "
        "commas (same scheme, user and vhost); its password is never logged.",
    )
    management_url: SecretStr | None = Field(
        default=None,
        description="Management API URL, or several separated by commas (default: each AMQP "
        "host, port 15672, same login); the registry rebuilds unconsumed keys from it after a "
        "failover.",
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
    queue_type: Literal["classic", "quorum"] = Field(
        default="classic",
        description="Type of the namespace's key queues, registry queue and dead-letter queue: "
        "'classic' (one node holds each; a key whose node is down waits for it) or 'quorum' "
        "(replicated over the cluster's nodes: keys flow through the loss of a node; "
        "needs durable).",
    )
    prefetch: int = Field(
        default=4,
        ge=1,
        le=65535,
        description="Deliveries a worker holds per key (handled one at a time, in order).",
    )
    concurrency: int = Field(
        default=64, ge=1, description="Handlers a worker runs at once (one per key at most)."
    )
    sync_handler_threads: int = Field(
        default=8,
        ge=1,
        description="Threads a worker runs plain `def` handlers (and sync hooks) in: at most "
        "this many sync handlers at once, within the concurrency.",
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
    job_timeout: float = Field(
        default=300.0,
        ge=0,
        allow_inf_nan=False,
        description="Seconds one attempt of a handler may run (a job type's "
        "@app.handler(timeout=) overrides it); past it the attempt fails with "
        "JobTimeoutError and is retried, then dead-lettered or parked. 0: no limit.",
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
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Port of /metrics, /livez and /readyz in registry and worker processes "
        f"(unset: {DEFAULT_METRICS_PORT}, or a free port when that is taken, so that several "
        "processes share a host); 0 turns the endpoint off.",
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
    # --- publisher: batches of one key's jobs (docs/internals/publisher.md, "Batches") ---
    batch_max_jobs: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="Jobs of one key a Publisher sends in one AMQP message at most, when "
        "several wait in the key's lane; 1 sends every job as a message of its own.",
    )
    batch_max_bytes: int = Field(
        default=256 * 1024,
        ge=1,
        description="Bytes of jobs a batch holds at most (a larger job goes alone).",
    )
    batch_linger: float = Field(
        default=0.0,
        ge=0,
        le=10.0,
        description="Seconds a key's job may wait for more of its key to join its batch; 0: "
        "none, batches form only from what waits anyway.",
    )
    max_in_flight_per_key: int = Field(
        default=1,
        ge=1,
        description="AMQP messages of one key a Publisher has sent and not yet had "
        "confirmed; what a key publishes meanwhile waits and forms its next batch.",
    )

    # --- secrets from files, and TLS ----------------------------------------------------
    amqp_url_file: Path | None = Field(
        default=None,
        description="File holding the AMQP URL (a mounted Kubernetes Secret), instead of "
        "RABBITKEYS_AMQP_URL; a trailing newline is ignored.",
    )
    management_url_file: Path | None = Field(
        default=None,
        description="File holding the management API URL, instead of "
        "RABBITKEYS_MANAGEMENT_URL; a trailing newline is ignored.",
    )
    tls_ca_file: Path | None = Field(
        default=None,
        description="PEM bundle of the CAs that sign the broker's certificate, for amqps:// "
        "and an https:// management API (default: the system's CAs).",
    )
    tls_cert_file: Path | None = Field(
        default=None,
        description="PEM client certificate, for a broker that requires one (its key in "
        "RABBITKEYS_TLS_KEY_FILE, or in this file too).",
    )
    tls_key_file: Path | None = Field(
        default=None,
        description="PEM private key (unencrypted) of RABBITKEYS_TLS_CERT_FILE.",
    )

    @model_validator(mode="before")
    @classmethod
    def _urls_from_files(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, schemes in (("amqp_url", _AMQP_SCHEMES), ("management_url", _HTTP_SCHEMES)):
            path = data.get(f"{name}_file")
            if path is None:
                continue
            variable, file_variable = _variable(name), _variable(f"{name}_file")
            if data.get(name) is not None:
                raise PydanticCustomError(
                    "config", f"{variable} and {file_variable} are both set: set one of them"
                )
            urls = _read_secret_file(path, file_variable)
            problem = _list_problem(urls, schemes, where=f" in {path}")
            if problem:
                raise PydanticCustomError("config", f"{file_variable}: {problem}")
            data = {**data, name: urls}
        return data

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, value: SecretStr) -> SecretStr:
        return _checked_urls(value, _AMQP_SCHEMES)

    @field_validator("management_url")
    @classmethod
    def _management_url(cls, value: SecretStr | None) -> SecretStr | None:
        return None if value is None else _checked_urls(value, _HTTP_SCHEMES)

    @model_validator(mode="after")
    def _tls_files_load(self) -> Self:
        # Load the files now, so that a wrong path or a bad PEM stops the process at start
        # with the variable's name, not at the first (re)connect.
        try:
            client_context(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
        except ConfigError as exc:
            raise PydanticCustomError("config", str(exc)) from None
        return self

    # --- quotas: what a namespace and a worker may hold (docs/guarantees.md, "Limits") ---
    max_keys: int = Field(
        default=50_000,
        ge=1,
        description="Live keys per namespace; the registry refuses a publish to a new key "
        "beyond it (QuotaExceededError). Each is a queue: tens of KiB of broker memory.",
    )
    max_job_types: int = Field(
        default=1_000,
        ge=1,
        description="Job types with live keys per namespace; a new key of one more job type "
        "is refused (QuotaExceededError).",
    )
    max_buffered_messages: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Deliveries a worker holds at most over all its keys (a global basic.qos "
        "on RabbitMQ 3.x classic keys, else each key's prefetch out of it; one per key beyond "
        "it); default concurrency x prefetch. At least concurrency.",
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
                f"{ENV_PREFIX}WORKER_TIMEOUT must exceed twice {ENV_PREFIX}HEARTBEAT_INTERVAL, "
                "or a single late heartbeat drops a live worker"
            )
        return self

    @model_validator(mode="after")
    def _quorum_is_durable(self) -> Self:
        if self.queue_type == "quorum" and not self.durable:
            raise ValueError(
                f"{ENV_PREFIX}QUEUE_TYPE=quorum needs {ENV_PREFIX}DURABLE=true: quorum queues "
                "are always durable"
            )
        return self

    @model_validator(mode="after")
    def _buffer_cap_feeds_every_handler(self) -> Self:
        if self.max_buffered_messages is not None and self.max_buffered_messages < self.concurrency:
            raise ValueError(
                f"{ENV_PREFIX}MAX_BUFFERED_MESSAGES ({self.max_buffered_messages}) must be at "
                f"least {ENV_PREFIX}CONCURRENCY ({self.concurrency}): each running handler "
                "holds its delivery, so a smaller cap leaves handlers idle"
            )
        return self

    @property
    def buffered_messages_cap(self) -> int:
        """What a worker holds at most over all its keys: ``max_buffered_messages``, or by
        default enough for every handler's key to have its full ``prefetch``."""
        if self.max_buffered_messages is not None:
            return self.max_buffered_messages
        return min(65535, self.concurrency * self.prefetch)  # qos counts are 16-bit

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
    def amqp_urls(self) -> list[str]:
        """The URL of each node ``amqp_url`` lists (one for a single broker), passwords in."""
        return split_urls(self.amqp_url.get_secret_value())

    @property
    def management_urls(self) -> list[str]:
        """The management API URLs ``management_url`` lists; when it is not set, one per
        AMQP host (``http://host:15672``, ``https://host:15671`` for ``amqps://``: RabbitMQ's
        customary ports), without a login (the AMQP URL's applies)."""
        if self.management_url is not None:
            return split_urls(self.management_url.get_secret_value())
        derived: list[str] = []
        for url in self.amqp_urls:
            parts = urlsplit(url)
            host = parts.hostname or "localhost"
            host = f"[{host}]" if ":" in host else host
            tls = parts.scheme.lower() == "amqps"
            base = f"https://{host}:15671" if tls else f"http://{host}:15672"
            if base not in derived:  # two nodes on one host (other ports) share a guess
                derived.append(base)
        return derived

    @property
    def vhost(self) -> str:
        """The virtual host of ``amqp_url`` (``/`` when the URL names none); every URL of a
        cluster names the same one."""
        return _vhost_of(urlsplit(self.amqp_urls[0]))

    @property
    def amqp_user(self) -> str:
        """The user ``amqp_url`` logs in as (``guest`` when it names none): what every
        message this process sends carries as ``user_id``, which the broker checks. Every
        URL of a cluster names the same one."""
        return _user_of(urlsplit(self.amqp_urls[0]))

    @property
    def amqp_url_masked(self) -> str:
        """The broker URL (each of the list) with the password replaced, safe for logs."""
        return ",".join(mask_url(url) for url in self.amqp_urls)


def mask_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        port = parts.port
    except ValueError:
        return "<a malformed URL>"
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{f'[{host}]' if ':' in host else host}"
    if port is not None:
        netloc += f":{port}"
    return urlunsplit(parts._replace(netloc=netloc))


_AMQP_SCHEMES = ("amqp", "amqps")
_HTTP_SCHEMES = ("http", "https")
_ENCODE_HINT = "(characters such as @ : / # ? in the user or password must be %-encoded)"
_COMMA_HINT = "(URLs are separated by commas: a comma in a password must be written %2C)"


def _variable(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def _url_problem(url: str, schemes: tuple[str, ...]) -> str | None:
    """What is wrong with ``url``, or None. Never quotes the URL: it may hold a password."""
    try:
        parts: SplitResult = urlsplit(url)
        port = parts.port
    except ValueError:
        return f"cannot be parsed, or has a bad port {_ENCODE_HINT}"
    if parts.scheme.lower() not in schemes:
        return f"must start with {' or '.join(f'{s}://' for s in schemes)}"
    if not parts.hostname:
        return f"has no host {_ENCODE_HINT}"
    if port == 0:
        return "has a bad port"
    try:  # what aio-pika connects with (yarl, a dependency of aio-pika) must take it too
        host = yarl.URL(url).host
    except (ValueError, TypeError):  # UnicodeError is a ValueError
        host = None
    if not host:
        return f"has a host name that cannot be used {_ENCODE_HINT}"
    return None


def split_urls(text: str) -> list[str]:
    """The URLs of a comma-separated list (one URL is a list of one), spaces around the
    commas dropped. A comma inside a URL (in a password) must be written ``%2C``."""
    return [part.strip() for part in text.split(",")]


def _vhost_of(parts: SplitResult) -> str:
    return unquote(parts.path[1:]) if len(parts.path) > 1 else "/"


def _user_of(parts: SplitResult) -> str:
    return unquote(parts.username) if parts.username else "guest"


def _node(parts: SplitResult) -> str:
    """Host and port, to name one URL of a list without its password."""
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return host if parts.port is None else f"{host}:{parts.port}"


def _list_problem(text: str, schemes: tuple[str, ...], where: str = "") -> str | None:
    """What is wrong with a list of URLs, or None. Names a URL by its position and host,
    never by its text: it holds a password.

    The URLs of a cluster's nodes must agree on scheme (a plain ``amqp://`` among
    ``amqps://`` ones would send the password in the clear to that node), user (the
    ``user_id`` every message carries is checked against the connection's user) and vhost
    (the namespace would otherwise be split between two vhosts, depending on the node).
    """
    urls = split_urls(text)
    if len(urls) == 1:
        problem = _url_problem(urls[0], schemes)
        return None if problem is None else f"the URL{where} {problem}"
    count = len(urls)
    for number, url in enumerate(urls, 1):
        problem = "is empty" if not url else _url_problem(url, schemes)
        if problem:
            return f"URL {number} of {count}{where} {problem} {_COMMA_HINT}"
    first = urlsplit(urls[0])
    aspects: list[tuple[str, Callable[[SplitResult], str]]] = [
        ("scheme", lambda parts: parts.scheme.lower())
    ]
    if schemes == _AMQP_SCHEMES:
        aspects += [("user", _user_of), ("vhost", _vhost_of)]
    else:  # no login in a management URL: the AMQP URL's
        aspects.append(("user", lambda parts: unquote(parts.username or "") or "none"))
    for number, url in enumerate(urls[1:], 2):
        parts = urlsplit(url)
        for aspect, of in aspects:
            if of(parts) != of(first):
                return (
                    f"URL {number} of {count}{where} ({_node(parts)}) has {aspect} "
                    f"{of(parts)!r}, URL 1 ({_node(first)}) {of(first)!r}: every node of a "
                    f"cluster must be reached with the same {aspect}"
                )
    return None


def _checked_urls(value: SecretStr, schemes: tuple[str, ...]) -> SecretStr:
    # a Secret created with `echo` carries a newline into the variable
    text = value.get_secret_value().strip()
    problem = _list_problem(text, schemes)
    if problem:
        raise PydanticCustomError("config", problem)
    return SecretStr(",".join(split_urls(text)))


def _read_secret_file(path: Any, variable: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise PydanticCustomError("config", f"{variable}: cannot read {path}: {detail}") from None
    # a Secret written with `echo` or an editor ends with a newline
    value = text.strip()
    if not value:
        raise PydanticCustomError("config", f"{variable}: {path} is empty")
    return value


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
            field = ".".join(str(part) for part in error["loc"])
            if not field and error["type"] in ("config", "value_error"):
                # a rule across settings: its message names its variables itself
                problems.append(error["msg"].removeprefix("Value error, "))
                continue
            problems.append(f"{ENV_PREFIX}{(field or '?').upper()}: {error['msg']}")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None
