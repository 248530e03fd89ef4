"""What the web app publishes and the worker handles: one pydantic model, shared by both."""

from pydantic import BaseModel


class Comment(BaseModel):
    post: str
    text: str
    author: str = "anonymous"
