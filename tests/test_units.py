"""Pure parts: settings, key naming, control protocol, public surface. No broker."""

from __future__ import annotations

import inspect

import pytest
from hypothesis import given
from hypothesis import strategies as st

import rabbitkeys
from rabbitkeys import ConfigError, InvalidKeyError, ProtocolError
from rabbitkeys._settings import load_settings, mask_url
from rabbitkeys._wire.protocol import EnsureKey, WorkerJoin, decode_control, encode_control
from rabbitkeys._wire.topology import MAX_KEY_BYTES, KeyRef, Names, new_routing_key
from rabbitkeys._worker.handoff import PrefetchBudget


def test_public_names_are_exported_and_sorted() -> None:
    public = {
        name
        for name in dir(rabbitkeys)
        if not name.startswith("_") and not inspect.ismodule(getattr(rabbitkeys, name))
    }
    assert set(rabbitkeys.__all__) == public | {"__version__"}
    assert rabbitkeys.__all__ == sorted(rabbitkeys.__all__)
    assert all(
        issubclass(getattr(rabbitkeys, n), rabbitkeys.RabbitkeysError)
        for n in public
        if n.endswith("Error")
    )


# --- settings -----------------------------------------------------------------------


def test_a_bad_setting_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITKEYS_CONCURRENCY", "lots")
    with pytest.raises(ConfigError, match="RABBITKEYS_CONCURRENCY"):
        load_settings()


def test_an_unknown_setting_is_an_error_not_a_silent_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RABBITKEYS_CONCURENCY", "8")  # typo
    with pytest.raises(ConfigError, match="RABBITKEYS_CONCURENCY"):
        load_settings()


def test_the_password_never_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITKEYS_AMQP_URL", "amqp://app:hunter2@broker:5672/prod")
    settings = load_settings()
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings)
    assert settings.amqp_url_masked == "amqp://app:***@broker:5672/prod"
    assert "hunter2" not in repr(rabbitkeys.Publisher(settings))
    monkeypatch.setenv("RABBITKEYS_NAMESPACE", "bad.name")
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert "hunter2" not in str(error.value)


def test_heartbeat_must_fit_in_the_worker_timeout() -> None:
    with pytest.raises(ConfigError, match="RABBITKEYS_WORKER_TIMEOUT must exceed") as error:
        load_settings(heartbeat_interval=2.0, worker_timeout=3.0)
    assert "Value error" not in str(error.value)


def test_quorum_queues_need_durable_and_take_a_cap_over_all_keys() -> None:
    with pytest.raises(ConfigError, match="QUEUE_TYPE=quorum needs RABBITKEYS_DURABLE=true"):
        load_settings(queue_type="quorum", durable=False)
    settings = load_settings(queue_type="quorum", max_buffered_messages=100)
    assert settings.buffered_messages_cap == 100


def test_a_prefetch_budget_gives_each_key_its_prefetch_while_the_cap_has_room() -> None:
    """Without a global qos, each key's prefetch comes out of the cap: the full prefetch
    while it has room, what is left, then one per key; a key let go gives its share back."""
    budget = PrefetchBudget(cap=10, per_key=4)
    granted = [budget.take() for _ in range(5)]
    assert granted == [4, 4, 2, 1, 1] and budget.used == 12  # 10, and one per key beyond
    budget.give_back(granted[0])
    assert budget.take() == 2  # 8 held by the others: 2 left
    budget.give_back(granted[1])
    assert budget.take() == 4 and budget.used == 10


def test_mask_url_leaves_urls_without_password_alone() -> None:
    assert mask_url("amqp://localhost/") == "amqp://localhost/"


# --- keys and names -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "problem"),
    [("", "empty"), (42, "str"), (b"post", "str"), ("x" * (MAX_KEY_BYTES + 1), "maximum")],
)
def test_bad_keys_are_refused(key: object, problem: str) -> None:
    with pytest.raises(InvalidKeyError, match=problem):
        KeyRef.of(key)


@pytest.mark.parametrize("job_type", ["", "a.b", "x" * 65, None])
def test_bad_job_types_are_refused(job_type: object) -> None:
    with pytest.raises(InvalidKeyError, match="job type"):
        KeyRef.of("k", job_type)


def test_plain_keys_stay_readable_and_others_are_hashed() -> None:
    assert KeyRef.of("post-42").token == "post-42"
    hashed = KeyRef.of("commentaire/été")
    assert hashed.token.startswith("commentaire_ete#") and len(hashed.token) == 16 + 40
    assert KeyRef.of("commentaire/été").token == hashed.token  # stable
    assert KeyRef.of("привет").token.startswith("#")


@given(
    st.text(min_size=1, max_size=300).filter(
        lambda k: len(k.encode("utf-8", "surrogatepass")) <= MAX_KEY_BYTES
    )
)
def test_any_valid_key_gives_a_valid_queue_name_and_routing_key(key: str) -> None:
    try:
        ref = KeyRef.of(key, "j" * 64)
    except InvalidKeyError:
        return  # lone surrogates
    names = Names("n" * 64)
    assert len(names.key_queue(ref).encode()) <= 255
    assert len(new_routing_key(ref).encode()) <= 255
    assert names.key_queue(ref).isascii()


@given(st.text(min_size=1, max_size=50), st.text(min_size=1, max_size=50))
def test_distinct_keys_get_distinct_tokens(a: str, b: str) -> None:
    try:
        ref_a, ref_b = KeyRef.of(a), KeyRef.of(b)
    except InvalidKeyError:
        return
    assert (ref_a.token == ref_b.token) == (a == b)


def test_each_binding_gets_a_fresh_routing_key() -> None:
    ref = KeyRef.of("k")
    assert new_routing_key(ref) != new_routing_key(ref)


# --- control protocol -------------------------------------------------------------------


def test_control_messages_round_trip() -> None:
    join = WorkerJoin(worker_id="w1", session="0" * 32, inbox="ns.worker.w1", job_types=["default"])
    assert decode_control(encode_control(join)) == join
    assert decode_control(encode_control(EnsureKey(job_type="j", key="k"))) == EnsureKey(
        job_type="j", key="k"
    )


@pytest.mark.parametrize(
    "body", [b"", b"not json", b"[]", b'{"type": "launch_missiles"}', b'{"type": "worker_leave"}']
)
def test_malformed_control_messages_raise_protocol_error(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_control(body)
