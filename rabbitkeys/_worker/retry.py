"""The retry policy of a failing handler: the one home of how many attempts a delivery gets,
how long a retry waits (exponential backoff, capped), what is retried, and when a delivery
is dead-lettered instead. Pure: it decides, a job's run (:mod:`.job_run`, which also parks
the key of a job type that parks instead of dead-lettering) follows it, its shell waits and
dead-letters.

Every exception a handler raises is retried, up to ``max_retries`` retries after the first
attempt; the wait before retry ``n`` is ``retry_backoff * 2 ** (n - 1)``, at most
``retry_backoff_max``. Two failures are dead-lettered at once: a delivery whose job type has
no handler (no retry can add a handler), and one whose body is not what its handler declared
(:class:`~rabbitkeys.PayloadError`: no retry can change the body).

A handler can also decide for itself: :class:`~rabbitkeys.RetryJob` asks for another attempt
after its own delay, not counted against ``max_retries`` (the handler counts: the Celery
bridge's ``self.retry()``), and :class:`~rabbitkeys.FailJob` ends the job's attempts at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._errors import FailJob, HandlerNotFoundError, PayloadError, RetryJob
from .._settings import Settings

__all__ = ["DeadLetter", "Retry", "RetryPolicy"]


@dataclass(frozen=True, slots=True)
class Retry:
    """Run the handler again after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Give up: copy the delivery to the dead-letter queue, then ack it."""

    attempts: int


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int
    backoff: float
    backoff_max: float

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(settings.max_retries, settings.retry_backoff, settings.retry_backoff_max)

    @staticmethod
    def retries(error: BaseException) -> bool:
        """Whether an attempt that failed with ``error`` may be tried again."""
        return not isinstance(error, HandlerNotFoundError | PayloadError | FailJob)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1 for the first)."""
        # the exponent bounded: 2 ** 1024 does not fit a float (a product past the largest
        # float is inf, which min() caps; a zero backoff stays zero)
        return min(self.backoff * 2.0 ** min(attempt - 1, 1023), self.backoff_max)

    def after_failure(self, attempt: int, error: BaseException) -> Retry | DeadLetter:
        """What follows failed attempt ``attempt`` (1 for the first)."""
        if isinstance(error, RetryJob):
            return Retry(delay=error.delay)
        if attempt > self.max_retries or not self.retries(error):
            return DeadLetter(attempts=attempt)
        return Retry(delay=self.delay(attempt))
