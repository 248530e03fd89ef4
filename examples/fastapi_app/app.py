"""The web app: ``uvicorn examples.fastapi_app.app:app``.

One :class:`rabbitkeys.Publisher` for the whole app, opened and closed by the lifespan and
shared by every request through ``app.state``. A route publishes the comment for the key
``post``: comments of one post are handled in the order the requests published them, those
of different posts in parallel.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from pydantic import BaseModel

import rabbitkeys

from .models import Comment


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # settings from the RABBITKEYS_* environment, as for `rabbitkeys worker`
    async with rabbitkeys.Publisher() as publisher:
        app.state.publisher = publisher
        yield
    # leaving the block waits for the messages still pending


app = FastAPI(lifespan=lifespan)


class NewComment(BaseModel):
    text: str
    author: str = "anonymous"


@app.post("/posts/{post}/comments", status_code=202)
async def create_comment(post: str, new: NewComment, request: Request) -> dict[str, str]:
    publisher: rabbitkeys.Publisher = request.app.state.publisher
    # returns once the broker has the job: a 202 means it will be handled
    await publisher.publish(
        post, Comment(post=post, text=new.text, author=new.author), job_type="comments"
    )
    return {"status": "queued", "post": post}
