"""The worker: ``rabbitkeys worker examples.fastapi_app.worker:app``.

The handler declares the payload it wants (``Message[Comment]``): the worker validates each
body into a ``Comment`` before calling it, and dead-letters a body that does not fit (with
pydantic's reason in its ``x-rabbitkeys-error`` header) instead of calling the handler.
"""

import logging

import rabbitkeys

from .models import Comment

log = logging.getLogger(__name__)

app = rabbitkeys.App()

#: what the handler did, per post: a stand-in for your database (the tests read it)
saved: dict[str, list[Comment]] = {}


@app.handler("comments")
async def create_comment(message: rabbitkeys.Message[Comment]) -> None:
    comment = message.payload  # a validated Comment; message.body is still the raw bytes
    saved.setdefault(message.key, []).append(comment)
    log.info("comment %r on %r by %s", comment.text, message.key, comment.author)
