"""rabbitkeys: strict order per key, full concurrency across keys, on RabbitMQ."""

from ._errors import (
    BrokerUnavailableError,
    ConfigError,
    FailJob,
    HandlerNotFoundError,
    InvalidKeyError,
    InvalidMessageError,
    JobTimeoutError,
    PayloadError,
    ProtocolError,
    PublishError,
    PublishOutcomeUnknownError,
    QuotaExceededError,
    RabbitkeysError,
    RegistryUnavailableError,
    RetryJob,
    StartupError,
)
from ._publisher.publisher import Publisher
from ._publisher.sync import SyncPublisher, close_default_publisher, default_publisher, publish
from ._registry.registry import Registry
from ._settings import Settings, load_settings
from ._version import __version__
from ._wire.topology import DEFAULT_JOB_TYPE, MAX_KEY_BYTES
from ._worker.app import App, Context, Handler, Message
from ._worker.worker import Worker

__all__ = [
    "App",
    "BrokerUnavailableError",
    "ConfigError",
    "Context",
    "DEFAULT_JOB_TYPE",
    "FailJob",
    "Handler",
    "HandlerNotFoundError",
    "InvalidKeyError",
    "InvalidMessageError",
    "JobTimeoutError",
    "MAX_KEY_BYTES",
    "Message",
    "PayloadError",
    "ProtocolError",
    "PublishError",
    "PublishOutcomeUnknownError",
    "Publisher",
    "QuotaExceededError",
    "RabbitkeysError",
    "Registry",
    "RegistryUnavailableError",
    "RetryJob",
    "Settings",
    "StartupError",
    "SyncPublisher",
    "Worker",
    "__version__",
    "close_default_publisher",
    "default_publisher",
    "load_settings",
    "publish",
]
