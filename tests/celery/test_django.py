"""A Django project's Celery tasks through the bridge, as Django users lay them out
(``mysite/celery.py`` with ``config_from_object("django.conf:settings")`` and
``autodiscover_tasks()``, ``@shared_task`` in an app's ``tasks.py``, the ORM in the task):
``rabbitkeys worker --celery mysite`` runs them in worker processes, with Celery's Django
fixup (its ``worker_init``, ``task_prerun`` and ``task_postrun`` handlers) working."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from rabbitkeys import Settings
from rabbitkeys.tools.cluster import _settings_env

from ..support import running_registry
from .tasks import RESULT_BACKEND

pytest.importorskip("django")

pytestmark = pytest.mark.processes

PROJECT = {
    "mysite/__init__.py": """
from .celery import app as celery_app

__all__ = ("celery_app",)
""",
    "mysite/celery.py": """
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
app = Celery("mysite")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
""",
    "mysite/settings.py": """
from pathlib import Path

SECRET_KEY = "not a secret"
INSTALLED_APPS = ["polls"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": Path(__file__).parent.parent / "db.sqlite3",
    }
}
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
CELERY_RESULT_BACKEND = "{backend}"
""",
    "polls/__init__.py": "",
    "polls/models.py": """
from django.db import models


class Comment(models.Model):
    post = models.CharField(max_length=1000)
    n = models.IntegerField()
""",
    "polls/tasks.py": """
from celery import shared_task

from .models import Comment


@shared_task
def add_comment(post, n):
    # the numbers this post had before: the order its comments were saved in
    before = list(Comment.objects.filter(post=post).order_by("id").values_list("n", flat=True))
    Comment.objects.create(post=post, n=n)
    return before
""",
    "send.py": """
import json

import django

django.setup()

from rabbitkeys.celery import ordered  # noqa: E402

from polls.models import Comment  # noqa: E402
from polls.tasks import add_comment  # noqa: E402

posts = ["post A", "user/42", "ünïcødé ✓"]
sent = [ordered(add_comment, post).delay(post, n) for n in range(8) for post in posts]
for result in sent:
    result.get(timeout=60)
saved = {
    post: list(Comment.objects.filter(post=post).order_by("id").values_list("n", flat=True))
    for post in posts
}
print(json.dumps(saved))
""",
}


def write_project(root: Path) -> None:
    for name, text in PROJECT.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace("{backend}", RESULT_BACKEND))


async def test_a_django_projects_tasks_run_in_order_with_the_django_fixup(
    settings: Settings, tmp_path: Path
) -> None:
    write_project(tmp_path)
    env = {
        **os.environ,
        **_settings_env(settings),
        "DJANGO_SETTINGS_MODULE": "mysite.settings",
        "PYTHONPATH": str(tmp_path),
    }
    migrate = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "django", "migrate", "--run-syncdb", "-v", "0", cwd=tmp_path, env=env
    )
    assert await migrate.wait() == 0
    log = tmp_path / "worker.log"
    async with running_registry(settings):
        with log.open("w") as output:
            worker = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "rabbitkeys",
                "worker",
                "--celery",
                "mysite",
                cwd=tmp_path,
                env=env,
                stderr=output,
            )
        try:
            sender = await asyncio.create_subprocess_exec(
                sys.executable,
                "send.py",
                cwd=tmp_path,
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(sender.communicate(), 120)
            assert sender.returncode == 0, err.decode()[-3000:]
        finally:
            worker.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(worker.wait(), 30)
    text = log.read_text()
    assert code == 0, text[-3000:]
    # each post's comments saved in the order they were sent
    assert json.loads(out) == {post: list(range(8)) for post in ["post A", "user/42", "ünïcødé ✓"]}
    # Celery's Django fixup ran its handlers without an error (it reads the worker's pool)
    assert "Signal handler" not in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
