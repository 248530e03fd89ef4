"""rabbitkeys: strict order per key, full concurrency across keys, on RabbitMQ."""

from ._app import App, Handler, Message
from ._errors import (
    BrokerUnavailableError,
    ConfigError,
    HandlerNotFoundError,
    InvalidKeyError,
    InvalidMessageError,
    ProtocolError,
    PublishError,
    RabbitkeysError,
    RegistryUnavailableError,
)
from ._publisher import Publisher
from ._registry import Registry
from ._settings import Settings, load_settings
from ._topology import DEFAULT_JOB_TYPE, MAX_KEY_BYTES
from ._worker import Worker

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_JOB_TYPE",
    "MAX_KEY_BYTES",
    "App",
    "BrokerUnavailableError",
    "ConfigError",
    "Handler",
    "HandlerNotFoundError",
    "InvalidKeyError",
    "InvalidMessageError",
    "Message",
    "ProtocolError",
    "PublishError",
    "Publisher",
    "RabbitkeysError",
    "Registry",
    "RegistryUnavailableError",
    "Settings",
    "Worker",
    "__version__",
    "load_settings",
]
