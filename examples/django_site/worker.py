"""The worker: ``rabbitkeys worker examples.django_site.worker:app``.

A plain ``def`` handler: the worker runs it in its thread pool
(``RABBITKEYS_SYNC_HANDLER_THREADS``), one message per key at a time as for ``async def``
handlers, so it may block, e.g. on Django's ORM, without holding up the worker's other keys
(call ``django.setup()`` in an ``@app.on_startup`` hook first if it does).
"""

import logging

import rabbitkeys

from .payloads import Comment

log = logging.getLogger(__name__)

app = rabbitkeys.App()

#: what the handler did, per post: a stand-in for your database (the tests read it)
saved: dict[str, list[Comment]] = {}


@app.handler("comments")
def create_comment(message: rabbitkeys.Message[Comment]) -> None:
    comment = message.payload
    saved.setdefault(message.key, []).append(comment)
    log.info("comment %r on %r by %s", comment.text, message.key, comment.author)
