"""The worker: ``rabbitkeys worker examples.worker_with_pool.app:app`` (``DATABASE_URL``).

``@app.on_startup`` runs once in the worker process, before it joins the registry: it opens
an asyncpg pool and puts it on the worker's :class:`rabbitkeys.Context`, which every handler
reaches as ``message.context``. If it fails (PostgreSQL down) the worker stops with a
``StartupError`` naming the hook and takes no job. ``@app.on_shutdown`` runs once after the
worker has finished its messages, and closes the pool.
"""

import os

import asyncpg
from pydantic import BaseModel

import rabbitkeys

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"


class Comment(BaseModel):
    post: str
    text: str


app = rabbitkeys.App()


@app.on_startup
async def open_pool(context: rabbitkeys.Context) -> None:
    dsn = os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)
    # sized like the worker's concurrency: one connection per handler running at once
    context.db = await asyncpg.create_pool(dsn, min_size=1, max_size=10)
    # an example's shortcut: a real application creates its tables with its migrations
    await context.db.execute(
        """CREATE TABLE IF NOT EXISTS comments (
               id bigserial PRIMARY KEY,
               post text NOT NULL,
               text text NOT NULL,
               created timestamptz NOT NULL DEFAULT now()
           )"""
    )


@app.on_shutdown
async def close_pool(context: rabbitkeys.Context) -> None:
    await context.db.close()


@app.handler("comments")
async def create_comment(message: rabbitkeys.Message[Comment]) -> None:
    comment = message.payload
    # One message per key at a time: the rows of a post are inserted in publish order.
    # If this raises (a lost connection), the message is retried before the post's next one.
    await message.context.db.execute(
        "INSERT INTO comments (post, text) VALUES ($1, $2)", comment.post, comment.text
    )
