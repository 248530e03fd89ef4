"""Whose control message is obeyed (rabbitkeys/_wire/senders.py): the pure rules, no broker. What
the broker adds (who may write where, user_id checked) is tried in tests/system/test_trust.py."""

from __future__ import annotations

import pytest

from rabbitkeys._wire.protocol import (
    Assign,
    Ensured,
    EnsureKey,
    Release,
    Released,
    StatusRequest,
    Sync,
    WorkerHeartbeat,
    WorkerJoin,
    WorkerLeave,
)
from rabbitkeys._wire.senders import (
    REFUSAL_REASONS,
    Refusal,
    WorkerSessions,
    check_command,
    check_request,
)
from rabbitkeys._wire.topology import Names

NAMES = Names("ns")
S1, S2 = "1" * 32, "2" * 32


def join(worker_id: str = "w", session: str = S1) -> WorkerJoin:
    return WorkerJoin(
        worker_id=worker_id, session=session, inbox=NAMES.worker_inbox(worker_id), job_types=[]
    )


def refusal(call: object, *args: object) -> str:
    with pytest.raises(Refusal) as caught:
        call(*args)  # type: ignore[operator]
    assert caught.value.reason in REFUSAL_REASONS
    return caught.value.reason


def test_each_request_is_obeyed_only_through_its_roles_exchange() -> None:
    requests = [EnsureKey(job_type="default", key="k"), StatusRequest()]
    reports = [
        join(),
        WorkerHeartbeat(worker_id="w", session=S1),
        Released(worker_id="w", session=S1, keys=[]),
        WorkerLeave(worker_id="w", session=S1),
    ]
    for request in requests:
        check_request(NAMES, NAMES.requests_exchange, "alice", request)
        for other in (NAMES.membership_exchange, "", NAMES.commands_exchange):
            assert refusal(check_request, NAMES, other, "alice", request) == "wrong_exchange"
    for report in reports:
        check_request(NAMES, NAMES.membership_exchange, "alice", report)
        for other in (NAMES.requests_exchange, "", NAMES.replies_exchange):
            assert refusal(check_request, NAMES, other, "alice", report) == "wrong_exchange"
    for not_a_request in (Assign(keys=[]), Release(key_ids=[]), Sync(), Ensured(routing_key="r")):
        assert (
            refusal(check_request, NAMES, NAMES.requests_exchange, "alice", not_a_request)
            == "malformed"
        )
    # without user_id the broker vouches for no one, whatever the exchange
    for user_id in (None, ""):
        assert (
            refusal(check_request, NAMES, NAMES.requests_exchange, user_id, requests[0])
            == "no_user_id"
        )


def test_a_worker_obeys_only_commands_through_the_commands_exchange() -> None:
    for command in (Assign(keys=[]), Release(key_ids=[]), Sync()):
        check_command(NAMES, NAMES.commands_exchange, "registry", command)
        for other in ("", NAMES.requests_exchange, NAMES.membership_exchange):
            assert refusal(check_command, NAMES, other, "registry", command) == "wrong_exchange"
        assert refusal(check_command, NAMES, NAMES.commands_exchange, None, command) == (
            "no_user_id"
        )
    assert refusal(check_command, NAMES, NAMES.commands_exchange, "r", StatusRequest()) == (
        "malformed"
    )


def test_a_worker_id_is_pinned_to_the_first_user_and_session_heard() -> None:
    sessions = WorkerSessions(NAMES)
    assert sessions.route("w") is None  # never heard of: no command can reach it
    assert sessions.check(WorkerHeartbeat(worker_id="w", session=S1), "alice")
    assert sessions.route("w") == NAMES.worker_route("w", S1)
    assert sessions.check(join("w", S1), "alice")
    # another session of the same user, or the same session from another user: a conflict
    assert not sessions.check(join("w", S2), "alice")
    assert not sessions.check(WorkerLeave(worker_id="w", session=S1), "mallory")
    assert sessions.route("w") == NAMES.worker_route("w", S1)
    # the inbox's owner (decided by the registry, asking the broker) takes it over
    sessions.take_over(join("w", S2), "alice")
    assert sessions.route("w") == NAMES.worker_route("w", S2)
    assert not sessions.check(join("w", S1), "alice")
    # other ids are their own
    assert sessions.check(join("v", S1), "bob")


def test_pins_of_ids_the_registry_does_not_know_go() -> None:
    sessions = WorkerSessions(NAMES)
    for worker_id in ("a", "b", "c"):
        assert sessions.check(WorkerHeartbeat(worker_id=worker_id, session=S1), "alice")
    sessions.retain({"b": object()})
    assert [sessions.route(w) is not None for w in ("a", "b", "c")] == [False, True, False]
    sessions.forget("b")
    assert sessions.route("b") is None
    # a forgotten id is free again: the next session heard holds it
    assert sessions.check(join("b", S2), "bob")
    sessions.clear()
    assert sessions.route("b") is None
