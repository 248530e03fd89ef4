"""The exceptions rabbitkeys raises. Every one derives from :class:`RabbitkeysError`.

RabbitkeysError
├── ConfigError (ValueError)          a setting is missing or invalid
├── InvalidKeyError (ValueError)      a key or job type cannot be used
├── InvalidMessageError (ValueError)  a body or header cannot be sent
├── ProtocolError (ValueError)        a control message could not be parsed
├── BrokerUnavailableError (ConnectionError)
│                                     the broker cannot be reached
├── PublishError                      a message was not published (and never will be)
│   ├── PublishOutcomeUnknownError    sent, never confirmed: it may still be delivered
│   ├── QuotaExceededError            a new key would exceed a limit of its namespace
│   └── RegistryUnavailableError (TimeoutError)
│                                     no registry answered in time
├── HandlerNotFoundError (LookupError)
│                                     no handler serves a job type
├── PayloadError (ValueError)         a body is not what its handler declared
├── JobTimeoutError (TimeoutError)    a handler's attempt ran past its time limit
├── RetryJob                          raised by a handler: try the job again after a delay
├── FailJob                           raised by a handler: no more attempts for this job
└── StartupError                      a worker's startup hook failed: it did not join
"""

from __future__ import annotations

__all__ = [
    "BrokerUnavailableError",
    "ConfigError",
    "HandlerNotFoundError",
    "InvalidKeyError",
    "InvalidMessageError",
    "FailJob",
    "JobTimeoutError",
    "PayloadError",
    "ProtocolError",
    "PublishError",
    "PublishOutcomeUnknownError",
    "QuotaExceededError",
    "RabbitkeysError",
    "RegistryUnavailableError",
    "RetryJob",
    "StartupError",
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
    """The message was not published and never will be: the publisher withdrew it before
    writing it to the broker, or the broker refused it. Publishing it again is safe.

    Its subclass :class:`PublishOutcomeUnknownError` is the one exception to "never will be".
    """


class PublishOutcomeUnknownError(PublishError):
    """The message was written to the broker connection but no confirm came within
    ``publish_timeout`` (or the broker closed the connection repeatedly while it was on it).
    The broker may have it and deliver it; the publisher will not send it again. Publishing
    it again may deliver it twice (workers drop an exact copy only within one publisher's
    resends, not a new ``publish()``).
    """


class QuotaExceededError(PublishError):
    """A publish to a new key was refused: its namespace holds as many live keys or job types
    as its limits allow (``RABBITKEYS_MAX_KEYS``, ``RABBITKEYS_MAX_JOB_TYPES``) or the broker
    refused another queue (the vhost's ``max-queues``). Nothing was sent; keys that exist
    keep working, and an idle key frees its place when the registry retires it."""


class RegistryUnavailableError(PublishError, TimeoutError):
    """No registry answered in time, so a new key could not be routed."""


class HandlerNotFoundError(RabbitkeysError, LookupError):
    """A message arrived for a job type the worker's app has no handler for."""


class PayloadError(RabbitkeysError, ValueError):
    """A message's body is not what its handler declared (``Message[Comment]``): that
    message fails (dead-lettered at once with the reason: no retry can change the body)."""


class JobTimeoutError(RabbitkeysError, TimeoutError):
    """A handler's attempt ran past its time limit (``RABBITKEYS_JOB_TIMEOUT``, or the job
    type's ``@app.handler(..., timeout=)``): the attempt failed, and is retried, then
    dead-lettered or parked as any failure. An ``async def`` handler was cancelled at the
    limit; a ``def`` handler's thread cannot be stopped and runs on, its result discarded
    (the key's next attempt waits for it). The worker raises it where the handler's own
    exception would be: middleware sees it from ``call_next``, and its text is what the
    dead letter or the park records."""

    def __init__(self, handler: str, job_type: str, limit: float, *, sync: bool = False) -> None:
        self.handler = handler
        self.job_type = job_type
        #: the limit, in seconds
        self.limit = limit
        what = "its thread runs on, its result discarded" if sync else "cancelled"
        super().__init__(
            f"handler {handler} of job type {job_type!r} ran past its time limit of "
            f"{limit:g} s ({what})"
        )


#: the longest wait a :class:`RetryJob` gets: below RabbitMQ's default ``consumer_timeout``
#: (30 minutes), past which a broker before 4.3 closes the channel of a worker that holds a
#: delivery (the job would run again, elsewhere, as a duplicate)
MAX_RETRY_DELAY = 20 * 60.0


class RetryJob(RabbitkeysError):
    """Raise it in a handler to run the job again after ``delay`` seconds, whatever
    ``RABBITKEYS_MAX_RETRIES`` says: the handler decides when to stop (the Celery bridge's
    ``self.retry(countdown=...)``). The key waits meanwhile, so nothing overtakes the job; the
    wait holds no handler slot. A delay is at most 20 minutes (``MAX_RETRY_DELAY``).
    The attempt counts (``message.attempt`` grows), as any failed attempt does."""

    def __init__(self, delay: float = 0.0, reason: str = "") -> None:
        if not isinstance(delay, int | float) or isinstance(delay, bool) or not delay >= 0:
            raise ValueError(f"RetryJob delay must be a number of seconds >= 0, not {delay!r}")
        self.delay = min(float(delay), MAX_RETRY_DELAY)
        super().__init__(reason or f"retry in {self.delay:g} s")


class FailJob(RabbitkeysError):
    """Raise it in a handler to fail the job at once, without the retries
    ``RABBITKEYS_MAX_RETRIES`` would give: it is dead-lettered, or its key parked, as after a
    last attempt. Raise it ``from`` the error that decided it (``raise FailJob(...) from
    exc``): the dead letter's or the park's error text is that error's."""


def failure_text(error: BaseException) -> str:
    """``"ExceptionType: text"``: what a dead letter or a park records of the error a job
    failed with; for a :class:`FailJob` raised from an error, that error's."""
    if isinstance(error, FailJob) and error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


class StartupError(RabbitkeysError):
    """A startup hook of the worker's app (``@app.on_startup``) raised: the worker stopped
    before joining the registry. The message names the hook and the cause, which is also
    chained (``__cause__``)."""
