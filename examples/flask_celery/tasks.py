"""The Celery app and its tasks, exactly as a Celery project has them: nothing here knows of
rabbitkeys. Plain Celery runs them with ``celery -A examples.flask_celery.tasks:celery
worker``; rabbitkeys with ``rabbitkeys worker --celery examples.flask_celery.tasks:celery``.

Results go to the Redis result backend (``CELERY_RESULT_BACKEND``), and the comments to a
Redis list per post in the same database: a stand-in for your own.
"""

import logging
import os

import redis
from celery import Celery

log = logging.getLogger(__name__)

celery = Celery(
    "flask_celery",
    broker=os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/0"),
)

#: the comments, one Redis list per post ("comments:<post_id>"), in the order they were added
store = redis.Redis.from_url(celery.conf.result_backend, decode_responses=True)


def comments_of(post_id: str) -> str:
    return f"comments:{post_id}"


@celery.task
def add_comment(post_id: str, text: str) -> int:
    """Append the comment to its post's list; return its position there (1 for the first)."""
    position = store.rpush(comments_of(post_id), text)
    log.info("comment %d on post %s: %r", position, post_id, text)
    return position


class MailServerBusy(Exception):
    pass


def mail_followers(post_id: str, body: str, attempt: int) -> None:
    """A stand-in for a flaky mail server: it refuses every first attempt."""
    if attempt == 0:
        raise MailServerBusy("421 try again later")
    log.info("mailed the followers of post %s: %s", post_id, body)


@celery.task(bind=True, max_retries=3)
def send_digest(self, post_id: str) -> dict[str, object]:
    """Mail the post's followers how many comments it has so far; when the mail server is
    busy, try again a second later (``self.retry``)."""
    count = store.llen(comments_of(post_id))
    try:
        mail_followers(post_id, f"{count} comments so far", attempt=self.request.retries)
    except MailServerBusy as exc:
        raise self.retry(exc=exc, countdown=1) from exc
    return {
        "task_id": self.request.id,
        "post": post_id,
        "comments": count,
        "retries": self.request.retries,
    }
