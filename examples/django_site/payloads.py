"""What the view publishes and the worker handles (a pydantic model, not a Django model:
it travels as JSON and is validated on the worker's side)."""

from pydantic import BaseModel


class Comment(BaseModel):
    post: str
    text: str
    author: str = "anonymous"
