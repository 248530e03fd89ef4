"""The operator's commands (``rabbitkeys keys``, ``pause``, ``resume``, ``skip``,
``redrive``): arguments, their errors and the printed tables, with no broker; and a login
that may not send operator requests, against the broker."""

from __future__ import annotations

import argparse
import asyncio
import json

import aio_pika
import pytest

from rabbitkeys import App, Message, Publisher, RabbitkeysError, Settings, cli
from rabbitkeys._admin import operations as _operations
from rabbitkeys._admin.operations import (
    OperationRefusedError,
    _expect,
    fetch_keys,
    format_age,
    format_hold,
    format_key_rows,
    format_keys,
    format_redrive,
)
from rabbitkeys._admin.permissions import Role
from rabbitkeys._wire.protocol import (
    HoldReply,
    KeyInfo,
    KeysPage,
    KeysRequest,
    RedriveKeySummary,
    RedriveReply,
    Refused,
)
from rabbitkeys._wire.topology import KeyRef, Names
from rabbitkeys.cli.entry import _parser
from rabbitkeys.tools.cluster import _settings_env

from ..support import eventually, make_settings, running_registry, running_worker
from ..trust_support import RoleUsers

# --- arguments, no broker ----------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    return _parser().parse_args(list(argv))


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """``rabbitkeys ARGV`` fails before connecting: exit 2, and the message."""
    assert cli.main(list(argv)) == cli.EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


def test_keys_arguments_make_the_request() -> None:
    args = parse(
        "keys", "--job-type", "orders", "--worker", "w-1", "--state", "parked", "--sort", "age"
    )
    request = cli.keys_request(args)
    assert request == KeysRequest(
        job_type="orders", worker_id="w-1", state="parked", sort="age", limit=100, offset=0
    )
    paged = cli.keys_request(parse("keys", "--limit", "20", "--offset", "40"))
    assert (paged.limit, paged.offset, paged.sort) == (20, 40, "key")
    # --all asks for pages as large as allowed, unless told otherwise
    assert cli.keys_request(parse("keys", "--all")).limit == 1000
    assert cli.keys_request(parse("keys", "--all", "--limit", "50")).limit == 50


def test_keys_argument_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--limit must be 1 to 1000" in usage_error(capsys, "keys", "--limit", "5000")
    assert "--limit must be 1 to 1000" in usage_error(capsys, "keys", "--limit", "0")
    assert "--offset must be 0 or more" in usage_error(capsys, "keys", "--offset", "-1")
    assert "job-type" in usage_error(capsys, "keys", "--job-type", "no spaces")
    assert "worker" in usage_error(capsys, "keys", "--worker", "a/b")
    # argparse's own checks: an unknown state or sort
    with pytest.raises(SystemExit) as exited:
        parse("keys", "--state", "sleeping")
    assert exited.value.code == cli.EXIT_USAGE
    assert "invalid choice: 'sleeping'" in capsys.readouterr().err


def test_pause_resume_and_skip_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    pause = cli.hold_request(parse("pause", "orders", "customer 42"))
    assert (pause.action, pause.job_type, pause.key) == ("pause", "orders", "customer 42")
    resume = cli.hold_request(parse("resume", "orders"))
    assert (resume.action, resume.job_type, resume.key) == ("resume", "orders", None)
    skip = cli.hold_request(parse("skip", "orders", "c-1"))
    assert (skip.action, skip.key) == ("skip", "c-1")
    # skip needs the key
    with pytest.raises(SystemExit):
        parse("skip", "orders")
    assert "KEY" in capsys.readouterr().err
    assert "job-type" in usage_error(capsys, "pause", "bad type!")
    assert "key" in usage_error(capsys, "resume", "orders", "")


def test_redrive_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    dry = cli.redrive_request(parse("redrive", "--job-type", "orders"))
    assert (dry.job_type, dry.key, dry.apply) == ("orders", None, False)
    one = cli.redrive_request(parse("redrive", "--job-type", "orders", "--key", "c-1", "--apply"))
    assert (one.job_type, one.key, one.apply) == ("orders", "c-1", True)
    every = cli.redrive_request(parse("redrive", "--all"))
    assert (every.job_type, every.key) == (None, None)

    assert "--job-type T [--key K], or --all" in usage_error(capsys, "redrive")
    assert "--job-type T [--key K], or --all" in usage_error(capsys, "redrive", "--apply")
    assert "--job-type" in usage_error(capsys, "redrive", "--key", "c-1")
    assert "not with --job-type" in usage_error(capsys, "redrive", "--all", "--job-type", "a")


@pytest.mark.parametrize("command", ["keys", "pause", "resume", "skip", "redrive"])
def test_help_names_the_credential_and_the_settings(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse(command, "--help")
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "registry's credential" in text and "administrator's" in text
    assert "RABBITKEYS_AMQP_URL" in text


# --- text --------------------------------------------------------------------------------


def info(key: str, **fields: object) -> KeyInfo:
    key_id = KeyRef.of(key, "orders").id
    return KeyInfo.model_validate({"key_id": key_id, "job_type": "orders", "key": key} | fields)


def test_ages() -> None:
    assert [format_age(s) for s in (None, 0, 3.9, 59, 60, 299, 7200, 86_399, 3 * 86_400)] == [
        "-", "0s", "3s", "59s", "1m", "4m", "2h", "23h", "3d"
    ]  # fmt: skip


def test_a_page_as_a_table() -> None:
    page = KeysPage(
        keys=[
            info(
                "customer-42",
                state="unowned",
                holds=["parked"],
                backlog=118,
                oldest_age_seconds=2460.0,
                failures=5,
                last_error="ConnectionError: the gateway timed out\nafter 30 s " + "x" * 500,
                parked_at=1.7e9,
            ),
            info("customer-7", state="owned", owner="w-1", backlog=0),
            info("k" * 1000 + "\n", state="retiring"),
        ],
        total=250,
        next_offset=103,
        listed_seconds_ago=12.0,
        paused_job_types=["mail"],
    )
    text = format_keys(page, offset=100, width=160)
    lines = text.splitlines()
    assert lines[0] == "250 keys; backlog and age as of 12s ago"
    assert lines[1] == "paused job types: mail"
    assert lines[2] == "showing 101-103"
    header, parked, owned, long = lines[4:8]
    assert header.split() == [
        "JOB", "TYPE", "KEY", "STATE", "OWNER", "HOLDS", "BACKLOG", "AGE", "FAILS", "LAST", "ERROR"
    ]  # fmt: skip
    assert parked.split()[:7] == ["orders", "customer-42", "unowned", "-", "parked", "118", "41m"]
    assert "ConnectionError: the gateway timed out after 30 s" in parked  # one line
    assert owned.split() == ["orders", "customer-7", "owned", "w-1", "-", "0", "-", "-"]
    # a long key is cut, a control character escaped; every line fits the width
    assert "kkkk…" in long and "\n" not in long
    assert all(len(line) <= 160 for line in lines)
    assert max(len(line) for line in lines) == 160  # the error takes what is left
    assert lines[-1] == "more: --offset 103 (or --all)"


def test_an_empty_page_and_unknown_figures() -> None:
    text = format_keys(KeysPage(keys=[], total=0), width=120)
    assert "backlog and age unknown" in text
    assert text.endswith("(no keys)")
    assert "more:" not in text
    (row,) = format_key_rows([info("a", state="unowned")], width=120)
    assert row.split() == ["orders", "a", "unowned", "-", "-", "-", "-", "-"]


def test_hold_replies() -> None:
    done = HoldReply(ok=True, detail="key 'c-1' of job type 'orders' paused")
    assert format_hold("pause", "orders", "c-1", done) == "key 'c-1' of job type 'orders' paused"
    refused = HoldReply(ok=False, detail="key 'c-1' of job type 'orders' is not parked")
    assert (
        format_hold("skip", "orders", "c-1", refused)
        == "skip key orders/c-1 refused: key 'c-1' of job type 'orders' is not parked"
    )
    assert format_hold("resume", "orders", None, HoldReply(ok=False, detail="no")) == (
        "resume job type orders refused: no"
    )


def test_redrive_replies() -> None:
    dry = RedriveReply(
        applied=False,
        keys=[
            RedriveKeySummary(job_type="orders", key="c-1", messages=3),
            RedriveKeySummary(job_type="orders", key="c-2", messages=1),
        ],
        messages=4,
        not_selected=7,
        unreadable=1,
    )
    text = format_redrive(dry)
    assert [line.split() for line in text.splitlines()[1:3]] == [
        ["orders", "c-1", "3"],
        ["orders", "c-2", "1"],
    ]
    assert "selected: 4 dead letters of 2 keys" in text
    assert "7 not selected, 1 unreadable" in text
    assert text.endswith("dry run: nothing moved; add --apply")

    applied = RedriveReply(
        applied=True,
        keys=[
            RedriveKeySummary(job_type="orders", key="c-1", messages=3),
            RedriveKeySummary(job_type="orders", key="c-2", messages=1, error="queue gone"),
        ],
        messages=4,
    )
    text = format_redrive(applied)
    assert "queue gone" in text
    assert "redriven: 3 dead letters of 2 keys" in text
    assert "1 key(s) failed" in text
    assert "dry run" not in text
    assert "(no dead letters selected)" in format_redrive(
        RedriveReply(applied=False, keys=[], messages=0)
    )


# --- against the broker ------------------------------------------------------------------


async def test_a_publishers_login_is_refused_with_a_clear_error(
    settings: Settings, role_users: RoleUsers, capsys: pytest.CaptureFixture[str]
) -> None:
    """The broker, not the registry, turns a publisher's operator request away: the error
    says so, instead of waiting for a registry."""
    names = Names(settings.namespace)
    # what a registry declares (none runs here: the request never reaches one)
    connection = await aio_pika.connect(settings.amqp_urls[0])
    async with connection:
        channel = await connection.channel()
        await channel.declare_exchange(
            names.operations_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        await channel.declare_exchange(
            names.replies_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
    publisher = make_settings(role_users.of(Role.PUBLISHER).url, settings.namespace)
    with pytest.raises(OperationRefusedError) as refused:
        await asyncio.wait_for(fetch_keys(publisher, KeysRequest(), timeout=5), 20)
    assert "registry's credential" in str(refused.value)
    assert names.operations_exchange in str(refused.value)


def test_a_registry_that_fails_to_answer_is_an_error() -> None:
    """The registry answers a request it failed on with a Refused: the command fails
    with its reason (exit 1 through the CLI's error handling)."""
    with pytest.raises(RabbitkeysError, match="could not answer: boom"):
        _expect(Refused(reason="boom"), KeysPage)
    with pytest.raises(RabbitkeysError, match="unexpected reply"):
        _expect(HoldReply(ok=True, detail="x"), KeysPage)


async def test_keys_pause_and_resume_from_the_command_line(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``rabbitkeys pause``, ``keys --json`` and ``resume`` against a running registry and
    worker (``cli.main`` in a thread: it runs its own event loop)."""
    for name, value in _settings_env(settings).items():
        monkeypatch.setenv(name, value)
    handled: list[tuple[str, int]] = []
    app = App()

    @app.handler("orders")
    async def record(message: Message) -> None:
        handled.append((message.key, int(message.body)))

    async def run(*argv: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(cli.main, [*argv, "--timeout", "30"])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    async with (
        running_registry(settings) as registry,
        running_worker(settings, app, worker_id="w-cli"),
        Publisher(settings) as publisher,
    ):
        for key in ("k1", "k2"):
            await publisher.publish(key, b"1", job_type="orders")
        await eventually(lambda: len(handled) == 2)
        k1 = registry._book.keys[KeyRef.of("k1", "orders").id]

        code, out, err = await run("pause", "orders", "k1")
        assert code == cli.EXIT_OK, err
        assert "paused" in out
        await eventually(lambda: k1.owner is None)
        await publisher.publish("k1", b"2", job_type="orders")  # waits in its queue

        code, out, err = await run("keys", "--json", "--job-type", "orders")
        assert code == cli.EXIT_OK, err
        listed = json.loads(out)
        assert listed["total"] == 2 and listed["next_offset"] is None
        by_key = {info["key"]: info for info in listed["keys"]}
        assert by_key["k1"]["holds"] == ["paused"]
        assert (by_key["k1"]["state"], by_key["k1"]["owner"]) == ("unowned", None)
        assert (by_key["k2"]["holds"], by_key["k2"]["owner"]) == ([], "w-cli")

        code, out, err = await run("keys", "--state", "paused")
        assert code == cli.EXIT_OK, err
        assert "1 key;" in out and "k1" in out and "k2" not in out

        # the overview says so too
        code, out, err = await run("status", "--json")
        assert code == cli.EXIT_OK, err
        status = json.loads(out)
        assert (status["paused_keys"], status["parked_keys"]) == (1, 0)
        code, out, err = await run("status")
        assert "parked 0  paused 1  (rabbitkeys keys --state parked|paused)" in out

        # every page, one key a page
        code, out, err = await run("keys", "--all", "--limit", "1", "--json")
        assert code == cli.EXIT_OK, err
        assert [info["key"] for info in json.loads(out)["keys"]] == ["k1", "k2"]
        code, out, err = await run("keys", "--all", "--limit", "1", "--sort", "backlog")
        assert code == cli.EXIT_OK, err
        rows = [line.split()[:2] for line in out.splitlines() if line.startswith("orders ")]
        assert sorted(rows) == [["orders", "k1"], ["orders", "k2"]]

        # a dry run with nothing dead-lettered
        code, out, err = await run("redrive", "--all")
        assert code == cli.EXIT_OK, err
        assert "(no dead letters selected)" in out and "dry run: nothing moved" in out

        code, out, err = await run("resume", "orders", "k1")
        assert code == cli.EXIT_OK, err
        assert "resumed" in out
        await eventually(lambda: ("k1", 2) in handled)

        # the registry refuses: exit 1 with its reason
        code, out, err = await run("resume", "orders", "k1")
        assert code == cli.EXIT_ERROR
        assert "resume key orders/k1 refused:" in err and "not paused" in err


async def test_a_redrive_with_no_registry_fails_soon_not_at_its_timeout(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A redrive may wait minutes for its answer (--timeout 300): with no registry leading
    it fails as soon as that is clear."""
    for name, value in _settings_env(settings).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(_operations, "_LEADER_WAIT", 1.0)
    code = await asyncio.wait_for(asyncio.to_thread(cli.main, ["redrive", "--all", "--apply"]), 60)
    assert code == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "no registry leads namespace" in err and settings.namespace in err


async def test_each_role_with_its_own_credential_and_the_operator_with_the_registrys(
    settings: Settings,
    role_users: RoleUsers,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Production's set-up: the registry, a worker and a publisher each log in as their
    role's user; ``pause``, ``keys`` and ``resume`` run with the registry's credential (a
    reply queue of their own, exclusive: the registry role may declare one)."""
    as_role = {
        role: make_settings(role_users.of(role).url, settings.namespace)
        for role in (Role.PUBLISHER, Role.WORKER, Role.REGISTRY)
    }
    for name, value in _settings_env(as_role[Role.REGISTRY]).items():
        monkeypatch.setenv(name, value)
    handled: list[int] = []
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        handled.append(int(message.body))

    async def run(*argv: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(cli.main, [*argv, "--timeout", "30"])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    async with (
        running_registry(as_role[Role.REGISTRY]) as registry,
        running_worker(as_role[Role.WORKER], app),
        Publisher(as_role[Role.PUBLISHER]) as publisher,
    ):
        await publisher.publish("user/42", b"1")
        await eventually(lambda: handled == [1])
        code, out, err = await run("pause", "default", "user/42")
        assert code == cli.EXIT_OK, err
        key = registry._book.keys[KeyRef.of("user/42").id]
        await eventually(lambda: key.owner is None)
        await publisher.publish("user/42", b"2")
        code, out, err = await run("keys", "--json", "--state", "paused")
        assert code == cli.EXIT_OK, err
        assert [info["key"] for info in json.loads(out)["keys"]] == ["user/42"]
        assert handled == [1]
        code, out, err = await run("resume", "default", "user/42")
        assert code == cli.EXIT_OK, err
        await eventually(lambda: handled == [1, 2])
