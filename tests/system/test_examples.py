"""The examples in examples/ run as their READMEs say, against the real broker (and the local
PostgreSQL for the worker with a pool, the local Redis for Flask and Celery).

The examples read rabbitkeys' settings from the ``RABBITKEYS_*`` environment, as an
application does: each test points that environment at its own namespace. Their extra
libraries (FastAPI, httpx2, Django, asyncpg, Flask, Celery, redis-py: the ``examples``
extra) are imported inside the tests, so that a missing one skips locally and fails under
``CI=true`` like a missing broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

import rabbitkeys
from rabbitkeys import Settings
from rabbitkeys._settings import ENV_PREFIX
from rabbitkeys.tools.cluster import LocalCluster, _settings_env

from ..support import eventually, running_registry, running_worker, skip_or_fail

ROOT = Path(__file__).resolve().parents[2]
#: keys with a space: any str is a key, also in a URL path
POSTS = ["post A", "post B"]
COMMENTS = 10
#: where the worker-with-pool test creates (and drops) a database of its own
DATABASE_URL = os.environ.get(
    "RABBITKEYS_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


def expected_comments() -> dict[str, list[str]]:
    return {post: [f"comment {n}" for n in range(1, COMMENTS + 1)] for post in POSTS}


def import_or_skip(module: str) -> Any:
    """``pytest.importorskip`` inside a test, where the CI policy turns a skip into a
    failure (a skip at collection would pass unnoticed)."""
    try:
        return __import__(module)
    except ImportError as exc:
        skip_or_fail(f"{module} is not installed (pip install -e '.[examples]'): {exc}")


def environment_for(settings: Settings) -> dict[str, str]:
    """This process's environment with ``settings`` as the only ``RABBITKEYS_*`` settings."""
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.upper().startswith(ENV_PREFIX) or name.upper().startswith(f"{ENV_PREFIX}TEST_")
    }
    return {**inherited, **_settings_env(settings)}


@pytest.fixture
def settings_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """``settings`` as this process's ``RABBITKEYS_*`` environment, for the examples'
    ``Publisher()`` and ``rabbitkeys.publish()``."""
    wanted = environment_for(settings)
    for name in list(os.environ):
        if name not in wanted:
            monkeypatch.delenv(name)
    for name, value in wanted.items():
        monkeypatch.setenv(name, value)
    return settings


# --------------------------------------------------------------------------- FastAPI


async def test_fastapi_app_publishes_comments_handled_in_order_per_post(
    settings_env: Settings,
) -> None:
    import_or_skip("fastapi")
    import_or_skip("httpx2")  # FastAPI's TestClient runs on it
    from fastapi.testclient import TestClient

    from examples.fastapi_app import worker
    from examples.fastapi_app.app import app as web_app
    from examples.fastapi_app.models import Comment

    settings = settings_env
    worker.saved.clear()

    def post_comments() -> list[int]:
        statuses = []
        # entering runs the lifespan: the app's Publisher opens, and closes at the end
        with TestClient(web_app) as client:
            for n in range(1, COMMENTS + 1):
                for post in POSTS:
                    response = client.post(
                        f"/posts/{quote(post)}/comments",
                        json={"text": f"comment {n}", "author": "tester"},
                    )
                    statuses.append(response.status_code)
        return statuses

    async with running_registry(settings), running_worker(settings, worker.app):
        # the client blocks: in a thread, so that this loop runs the registry and worker
        statuses = await asyncio.to_thread(post_comments)
        assert statuses == [202] * (COMMENTS * len(POSTS))
        await eventually(lambda: sum(map(len, worker.saved.values())) == COMMENTS * len(POSTS))

    assert {post: [c.text for c in comments] for post, comments in worker.saved.items()} == (
        expected_comments()
    )
    assert all(
        isinstance(c, Comment) and c.post == post and c.author == "tester"
        for post, comments in worker.saved.items()
        for c in comments
    )


# --------------------------------------------------------------------------- Django


@pytest.fixture
def django_client(settings_env: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Django's test Client for examples/django_site, configured in this process. The
    default publisher its view uses is made for this test (with the environment above) and
    closed afterwards."""
    django = import_or_skip("django")
    from django.test import Client
    from django.test.utils import setup_test_environment, teardown_test_environment

    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "examples.django_site.settings")
    django.setup()
    setup_test_environment()  # allows the test client's host, "testserver"
    close_default_publisher()  # one made by an earlier test publishes elsewhere
    try:
        yield Client()
    finally:
        teardown_test_environment()
        close_default_publisher()


def close_default_publisher() -> None:
    """The next ``rabbitkeys.publish`` makes a new default publisher, with the
    ``RABBITKEYS_*`` environment of then."""
    rabbitkeys.close_default_publisher()


async def test_django_view_publishes_comments_handled_in_order_per_post(
    settings_env: Settings, django_client: Any
) -> None:
    from examples.django_site import worker

    settings = settings_env
    worker.saved.clear()

    def post_comments() -> list[int]:
        statuses = []
        for n in range(1, COMMENTS + 1):
            for post in POSTS:
                response = django_client.post(
                    f"/posts/{quote(post)}/comments", {"text": f"comment {n}", "author": "tester"}
                )
                statuses.append(response.status_code)
        return statuses

    async with running_registry(settings), running_worker(settings, worker.app):
        # the view blocks until the broker confirmed: in a thread, so that this loop runs
        # the registry (which routes each new post) and the worker
        statuses = await asyncio.to_thread(post_comments)
        assert statuses == [202] * (COMMENTS * len(POSTS))
        await eventually(lambda: sum(map(len, worker.saved.values())) == COMMENTS * len(POSTS))

    assert {post: [c.text for c in comments] for post, comments in worker.saved.items()} == (
        expected_comments()
    )
    assert all(
        c.post == post and c.author == "tester" for post in POSTS for c in worker.saved[post]
    )


def test_django_view_refuses_a_comment_without_text(django_client: Any) -> None:
    # refused before anything is published (no broker needed beyond the fixtures)
    response = django_client.post("/posts/post-A/comments", {"text": " "})
    assert response.status_code == 400
    assert response.json() == {"error": "text is required"}


# --------------------------------------------------------------------------- worker with a pool


@pytest.fixture
async def database_url() -> AsyncIterator[str]:
    """A PostgreSQL database of this test's own (the example creates its table in it),
    dropped at the end."""
    asyncpg = import_or_skip("asyncpg")
    name = f"rabbitkeys_example_{uuid.uuid4().hex[:10]}"
    try:
        admin = await asyncpg.connect(DATABASE_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        skip_or_fail(f"no PostgreSQL at {DATABASE_URL} (RABBITKEYS_TEST_DATABASE_URL): {exc}")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield urlunsplit(urlsplit(DATABASE_URL)._replace(path=f"/{name}"))
    finally:
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def wait_for_rows(connection: Any, count: int, timeout: float = 30) -> list[Any]:
    """The example's rows in insertion order, once there are ``count`` of them."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = list(await connection.fetch("SELECT post, text FROM comments ORDER BY id"))
        if len(found) >= count:
            return found
        assert asyncio.get_running_loop().time() < deadline, f"{len(found)} rows: {found}"
        await asyncio.sleep(0.1)


@pytest.mark.processes
async def test_worker_with_pool_inserts_rows_in_order_per_post(
    settings: Settings, database_url: str
) -> None:
    import asyncpg

    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    extra = {"DATABASE_URL": database_url, "PYTHONPATH": python_path}
    async with LocalCluster(settings, extra_env=extra) as cluster:
        await cluster.start_registry()
        await cluster.start_worker("examples.worker_with_pool.app:app")
        await cluster.wait_for_workers(1)

        # the example's script, as its README runs it: sync rabbitkeys.publish in a process
        script = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "examples.worker_with_pool.publish",
            str(COMMENTS),
            *POSTS,
            env={**environment_for(settings), **extra},
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        output, _ = await asyncio.wait_for(script.communicate(), 60)
        assert script.returncode == 0
        assert f"published {COMMENTS} comments for each of {len(POSTS)} posts" in output.decode()

        connection = await asyncpg.connect(database_url)
        try:
            found = await wait_for_rows(connection, COMMENTS * len(POSTS))
        finally:
            await connection.close()
        # SIGTERM: the worker drains, runs on_shutdown (closes the pool) and exits 0
        exit_codes = await cluster.stop_all()

    per_post: dict[str, list[str]] = {}
    for row in found:
        per_post.setdefault(row["post"], []).append(row["text"])
    assert per_post == expected_comments()
    assert exit_codes == [0, 0]


# --------------------------------------------------------------------------- Flask and Celery

#: the Redis database of the Flask-and-Celery test: the tasks' result backend and their
#: comment lists (not db 0, which the example uses by default)
REDIS_URL = os.environ.get("RABBITKEYS_TEST_REDIS_URL", "redis://127.0.0.1:6379/5")
#: the example's posts: its keys are "post A" and "post B"
POST_IDS = ["A", "B"]


class RedisKeys:
    """A client of :data:`REDIS_URL` and the keys a test made there (deleted at its end)."""

    def __init__(self, client: Any, created: list[str]) -> None:
        self.client = client
        self.created = created


@pytest.fixture
def celery_redis(monkeypatch: pytest.MonkeyPatch) -> Iterator[RedisKeys]:
    """:data:`REDIS_URL` as the example's result backend (``CELERY_RESULT_BACKEND``, read
    when its tasks module is imported) and where its comment lists go. The keys the test
    adds to ``created`` (and the comment lists) are deleted at the end."""
    redis = import_or_skip("redis")
    import_or_skip("celery")
    import_or_skip("flask")
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        skip_or_fail(f"no Redis at {REDIS_URL} (RABBITKEYS_TEST_REDIS_URL): {exc}")
    monkeypatch.setenv("CELERY_RESULT_BACKEND", REDIS_URL)
    keys = RedisKeys(client, [f"comments:{post_id}" for post_id in POST_IDS])
    client.delete(*keys.created)  # left by an interrupted run
    try:
        yield keys
    finally:
        client.delete(*keys.created)
        client.close()


@pytest.fixture
def own_default_publisher(settings_env: Settings) -> Iterator[Settings]:
    """The process's default publisher (what ``ordered(...).delay()`` sends with) made anew
    for this test, from its environment, and closed at the end (outside the test's loop)."""
    close_default_publisher()  # one made by an earlier test publishes elsewhere
    try:
        yield settings_env
    finally:
        close_default_publisher()


@pytest.mark.processes
async def test_flask_celery_tasks_run_in_order_per_post_with_results_in_redis(
    own_default_publisher: Settings, celery_redis: RedisKeys, tmp_path: Path
) -> None:
    from examples.flask_celery import tasks
    from examples.flask_celery.app import app as web_app

    settings = own_default_publisher
    assert tasks.celery.conf.result_backend == REDIS_URL
    client = web_app.test_client()
    sent: dict[str, list[str]] = {post_id: [] for post_id in POST_IDS}
    digests: dict[str, str] = {}

    def post(url: str, **data: str) -> str:
        response = client.post(url, data=data)
        assert response.status_code == 202, response.get_data(as_text=True)
        task_id: str = response.get_json()["task_id"]
        celery_redis.created.append(f"celery-task-meta-{task_id}")
        return task_id

    def post_comments_and_digests() -> None:
        for n in range(1, COMMENTS + 1):
            for post_id in POST_IDS:
                sent[post_id].append(post(f"/posts/{post_id}/comments", text=f"comment {n}"))
                if n == COMMENTS // 2:
                    # a digest of the comments so far, which retries once (a second later):
                    # the post's later comments wait for it
                    digests[post_id] = post(f"/posts/{post_id}/digest")

    def results(task_ids: list[str]) -> list[Any]:
        return [tasks.celery.AsyncResult(task_id).get(timeout=30) for task_id in task_ids]

    # the worker as its README starts it: `rabbitkeys worker --celery MODULE:ATTR`
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    log_path = tmp_path / "worker.log"
    try:
        async with running_registry(settings) as registry:
            with log_path.open("wb") as log_file:
                worker = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "rabbitkeys",
                    "worker",
                    "--celery",
                    "examples.flask_celery.tasks:celery",
                    env={
                        **environment_for(settings),
                        "CELERY_RESULT_BACKEND": REDIS_URL,
                        "PYTHONPATH": python_path,
                        f"{ENV_PREFIX}METRICS_PORT": "0",
                    },
                    cwd=ROOT,
                    stderr=log_file,
                )
            try:
                await eventually(lambda: len(registry._book.workers) == 1, timeout=30)
                # the view blocks until the broker confirmed: in a thread, so that this loop
                # runs the registry (which routes each new post to the worker)
                await asyncio.to_thread(post_comments_and_digests)
                comment_results = {
                    post_id: await asyncio.to_thread(results, sent[post_id]) for post_id in POST_IDS
                }
                digest_results = await asyncio.to_thread(results, list(digests.values()))
            finally:
                exit_code = await LocalCluster.terminate(worker)
    finally:
        print(log_path.read_text()[-20000:])

    # each post's comments were added in the order they were posted: each task's result
    # (its position in the post's list, read back through the Redis backend) says so too
    for post_id in POST_IDS:
        assert celery_redis.client.lrange(f"comments:{post_id}", 0, -1) == [
            f"comment {n}" for n in range(1, COMMENTS + 1)
        ]
        assert comment_results[post_id] == list(range(1, COMMENTS + 1))
    # the digest ran again after its retry's countdown, and no later comment of its post
    # overtook it (with plain Celery's retry, sent anew, they would have)
    assert digest_results == [
        {"task_id": digests[post_id], "post": post_id, "comments": COMMENTS // 2, "retries": 1}
        for post_id in POST_IDS
    ]
    response = client.get(f"/tasks/{digests['A']}")
    assert response.get_json() == {"state": "SUCCESS", "result": digest_results[0]}
    assert exit_code == 0  # SIGTERM: the worker finished its jobs and left


# --------------------------------------------------------------------------- testing handlers


def test_testing_handlers_example_passes_under_pytest() -> None:
    # as its README runs it, in a pytest of its own (what a user's suite would be): no
    # broker, and none of the RABBITKEYS_* environment is needed
    environment = {
        name: value for name, value in os.environ.items() if not name.upper().startswith(ENV_PREFIX)
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "examples/testing_handlers", "-q"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    print(result.stdout[-3000:], result.stderr[-2000:])
    assert result.returncode == 0
    assert re.search(r"\b5 passed\b", result.stdout)


# --------------------------------------------------------------------------- all of them


def test_every_example_has_a_readme_naming_its_test_here() -> None:
    folders = sorted(p for p in (ROOT / "examples").iterdir() if (p / "__init__.py").exists())
    assert [p.name for p in folders] == [
        "django_site",
        "fastapi_app",
        "flask_celery",
        "testing_handlers",
        "worker_with_pool",
    ]
    index = (ROOT / "examples" / "README.md").read_text()
    for folder in folders:
        readme = (folder / "README.md").read_text()
        named = re.findall(r"tests/system/test_examples\.py::(\w+)", readme)
        assert named, f"{folder.name}/README.md names no test"
        for test in named:
            assert test in globals(), f"{folder.name}/README.md names {test}, not a test here"
        assert f"({folder.name}/)" in index, f"examples/README.md does not link {folder.name}/"


@pytest.mark.processes
async def test_worker_with_pool_stops_with_a_clear_error_when_the_database_is_down(
    settings: Settings,
) -> None:
    import_or_skip("asyncpg")
    # nothing listens on port 1: the startup hook fails, and the worker must not join
    extra = {"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/test", "PYTHONPATH": str(ROOT)}
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rabbitkeys",
        "worker",
        "examples.worker_with_pool.app:app",
        env={**environment_for(settings), **extra, f"{ENV_PREFIX}METRICS_PORT": "0"},
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    _, errors = await asyncio.wait_for(worker.communicate(), 60)
    print(errors.decode()[-2000:])
    assert worker.returncode == 1
    assert "open_pool" in errors.decode()
