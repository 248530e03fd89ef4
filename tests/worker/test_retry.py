"""The retry policy of a failing handler: pure logic, property-tested (no broker)."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from rabbitkeys import Settings
from rabbitkeys._errors import (
    MAX_RETRY_DELAY,
    FailJob,
    HandlerNotFoundError,
    RetryJob,
    failure_text,
)
from rabbitkeys._worker.retry import DeadLetter, Retry, RetryPolicy

policies = st.builds(
    RetryPolicy,
    max_retries=st.integers(0, 50),
    backoff=st.floats(0, 1e6, allow_nan=False),
    backoff_max=st.floats(0, 1e6, allow_nan=False),
)


def test_the_policy_comes_from_the_settings() -> None:
    settings = Settings(max_retries=5, retry_backoff=0.25, retry_backoff_max=7.0)
    assert RetryPolicy.from_settings(settings) == RetryPolicy(5, 0.25, 7.0)


def test_the_backoff_doubles_up_to_its_cap_then_the_message_is_dead_lettered() -> None:
    policy = RetryPolicy(max_retries=6, backoff=0.5, backoff_max=10.0)
    error = RuntimeError("database busy")
    steps = [policy.after_failure(attempt, error) for attempt in range(1, 8)]
    assert steps == [
        Retry(0.5),
        Retry(1.0),
        Retry(2.0),
        Retry(4.0),
        Retry(8.0),
        Retry(10.0),
        DeadLetter(attempts=7),
    ]


def test_no_retries_dead_letters_after_the_first_attempt() -> None:
    assert RetryPolicy(0, 0.5, 30.0).after_failure(1, ValueError()) == DeadLetter(attempts=1)


def test_a_job_type_without_handler_is_dead_lettered_at_once() -> None:
    policy = RetryPolicy(max_retries=3, backoff=0.5, backoff_max=30.0)
    assert not policy.retries(HandlerNotFoundError("no handler for job type 'x'"))
    assert policy.after_failure(1, HandlerNotFoundError("x")) == DeadLetter(attempts=1)


def test_a_huge_attempt_number_neither_overflows_nor_turns_a_zero_backoff_into_a_wait() -> None:
    assert RetryPolicy(10**6, 0.5, 30.0).delay(5000) == 30.0
    assert RetryPolicy(10**6, 0.0, 30.0).delay(5000) == 0.0


@given(
    policies,
    st.sampled_from([RuntimeError("x"), ValueError("y"), TimeoutError(), HandlerNotFoundError()]),
)
def test_a_handler_that_always_fails_gets_a_bounded_number_of_attempts(
    policy: RetryPolicy, error: Exception
) -> None:
    """Retries until the policy says dead-letter: max_retries + 1 attempts in all for what is
    retried, one for what is not; the waits never shrink and stay within the cap."""
    attempt, delays = 0, []
    while True:
        attempt += 1
        step = policy.after_failure(attempt, error)
        if isinstance(step, DeadLetter):
            break
        delays.append(step.delay)
    expected = policy.max_retries + 1 if policy.retries(error) else 1
    assert step == DeadLetter(attempts=expected) and attempt == expected
    assert delays == sorted(delays)
    assert all(0 <= delay <= policy.backoff_max and math.isfinite(delay) for delay in delays)
    if delays:
        assert delays[0] == min(policy.backoff, policy.backoff_max)


def test_a_handler_that_asks_for_a_retry_gets_it_after_its_own_delay_whatever_max_retries() -> None:
    policy = RetryPolicy(max_retries=1, backoff=0.5, backoff_max=30.0)
    assert policy.after_failure(1, RetryJob(7.5)) == Retry(7.5)
    assert policy.after_failure(50, RetryJob(0)) == Retry(0.0)
    # a wait past RabbitMQ's consumer_timeout would lose the delivery: at most 20 minutes
    assert policy.after_failure(1, RetryJob(86_400)) == Retry(MAX_RETRY_DELAY)


def test_a_handler_that_fails_its_job_gets_no_retry() -> None:
    policy = RetryPolicy(max_retries=5, backoff=0.5, backoff_max=30.0)
    assert policy.after_failure(1, FailJob("no")) == DeadLetter(attempts=1)


def test_a_retry_job_delay_must_be_seconds() -> None:
    for bad in (-1, float("nan"), "5", True, None):
        try:
            RetryJob(bad)  # type: ignore[arg-type]
        except ValueError as exc:
            assert "RetryJob delay" in str(exc)
        else:
            raise AssertionError(f"RetryJob({bad!r}) was accepted")


def test_a_failed_job_records_the_error_it_was_failed_from() -> None:
    try:
        try:
            raise KeyError("order 42")
        except KeyError as exc:
            raise FailJob("giving up") from exc
    except FailJob as failed:
        assert failure_text(failed) == "KeyError: 'order 42'"
    assert failure_text(FailJob("plain")) == "FailJob: plain"
