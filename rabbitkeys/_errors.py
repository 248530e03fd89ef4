"""The exceptions rabbitkeys raises. Every one derives from :class:`RabbitkeysError`.

RabbitkeysError
├── ConfigError (ValueError)          a setting is missing or invalid
├── InvalidKeyError (ValueError)      a key or job type cannot be used
├── InvalidMessageError (ValueError)  a body or header cannot be sent
├── ProtocolError (ValueError)        a control message could not be parsed
├── BrokerUnavailableError (ConnectionError)
│                                     the broker cannot be reached
├── PublishError                      the broker did not take a message
│   ├── QuotaExceededError            a new key would exceed a limit of its namespace
│   └── RegistryUnavailableError (TimeoutError)
│                                     no registry answered in time
└── HandlerNotFoundError (LookupError)
                                      no handler serves a job type
"""

from __future__ import annotations

__all__ = [
    "BrokerUnavailableError",
    "ConfigError",
    "HandlerNotFoundError",
    "InvalidKeyError",
    "InvalidMessageError",
    "ProtocolError",
    "PublishError",
    "QuotaExceededError",
    "RabbitkeysError",
    "RegistryUnavailableError",
]


class RabbitkeysError(Exception):
    """Base class of every error rabbitkeys raises."""


class ConfigError(RabbitkeysError, ValueError):
    """A setting is invalid; the message names the environment variable."""


class InvalidKeyError(RabbitkeysError, ValueError):
    """A key or job type is empty, of the wrong type or too long. Nothing was sent."""


class InvalidMessageError(RabbitkeysError, ValueError):
    """A message body is not bytes, or a header is reserved or cannot be encoded."""


class ProtocolError(RabbitkeysError, ValueError):
    """A control message is malformed or of an unknown type."""


class BrokerUnavailableError(RabbitkeysError, ConnectionError):
    """The broker could not be reached or refused the login."""


class PublishError(RabbitkeysError):
    """The broker did not confirm a message: it must be treated as not published."""


class QuotaExceededError(PublishError):
    """A publish to a new key was refused: its namespace holds as many live keys or job types
    as its limits allow (``RABBITKEYS_MAX_KEYS``, ``RABBITKEYS_MAX_JOB_TYPES``) or the broker
    refused another queue (the vhost's ``max-queues``). Nothing was sent; keys that exist
    keep working, and an idle key frees its place when the registry retires it."""


class RegistryUnavailableError(PublishError, TimeoutError):
    """No registry answered in time, so a new key could not be routed."""


class HandlerNotFoundError(RabbitkeysError, LookupError):
    """A message arrived for a job type the worker's app has no handler for."""
