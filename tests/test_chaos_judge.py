"""The chaos report's judge (pure): a duplicate counts as explained only when its cause is
a crash (a redelivery after its worker's SIGKILL, or the broker restart between the two)."""

from __future__ import annotations

from typing import Any

from rabbitkeys._chaos import ChaosReport, _judge, _Timeline

KILLED, STOPPED, OTHER = 101, 102, 103


def record(seq: int, started: float, pid: int, redelivered: bool = False) -> dict[str, Any]:
    return {"key": "k", "publisher": "p", "seq": seq, "started": started, "pid": pid,
            "finished": started + 0.1, "redelivered": redelivered, "body": str(seq)}  # fmt: skip


def judge(records: list[dict[str, Any]], **marks: float) -> ChaosReport:
    timeline = _Timeline(sent=3, names=["k"], marks=dict(marks), killed_pids={KILLED})
    return _judge(ChaosReport(), records, timeline)


def test_a_redelivery_after_its_workers_sigkill_is_an_explained_duplicate() -> None:
    report = judge(
        [record(1, 1.0, KILLED), record(2, 2.0, KILLED), record(2, 3.0, OTHER, True),
         record(3, 4.0, OTHER)],
        worker_kill=2.5,
    )  # fmt: skip
    assert (report.lost, report.duplicates, report.unexplained_duplicates) == (0, 1, 0)
    assert report.order_violations == 0 and report.ok
    assert report.worker_kill_gap == 0.5


def test_a_copy_after_a_graceful_stop_is_unexplained_and_fails_the_run() -> None:
    report = judge(
        [record(1, 1.0, STOPPED), record(2, 2.0, STOPPED), record(2, 3.0, OTHER, True),
         record(3, 4.0, OTHER)]
    )  # fmt: skip
    assert (report.duplicates, report.unexplained_duplicates) == (1, 1)
    assert not report.ok
    assert "1 unexplained" in report.format()


def test_a_copy_that_was_not_redelivered_is_unexplained_even_after_a_kill() -> None:
    # a resend by the publisher, not the broker's redelivery: a crash does not explain it
    report = judge(
        [record(1, 1.0, KILLED), record(1, 3.0, OTHER, redelivered=False), record(2, 4.0, OTHER),
         record(3, 5.0, OTHER)],
        worker_kill=2.0,
    )  # fmt: skip
    assert report.unexplained_duplicates == 1 and not report.ok


def test_a_copy_across_the_broker_restart_is_explained() -> None:
    report = judge(
        [record(1, 1.0, OTHER), record(2, 2.0, OTHER), record(2, 9.0, OTHER),
         record(3, 10.0, OTHER)],
        broker_stop=3.0,
        broker_back=8.0,
    )  # fmt: skip
    assert (report.duplicates, report.unexplained_duplicates) == (1, 0) and report.ok


def test_loss_and_reordering_are_counted() -> None:
    report = judge([record(2, 1.0, OTHER), record(1, 2.0, OTHER)])
    assert (report.lost, report.order_violations) == (1, 1)
    assert not report.ok


def test_handlings_of_one_key_that_overlap_in_time_fail_the_run() -> None:
    report = judge([record(1, 1.0, OTHER), record(2, 1.05, STOPPED), record(3, 2.0, OTHER)])
    assert report.overlaps == 1 and report.order_violations == 0
    assert not report.ok
