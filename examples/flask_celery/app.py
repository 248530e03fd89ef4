"""The web app: ``flask --app examples.flask_celery.app run``.

Its views send Celery tasks. Converted to rabbitkeys, a view sends with
``ordered(task, key).delay(...)`` instead of ``task.delay(...)``: the tasks of one post (the
key ``"post <id>"``) run one at a time, in the order the views sent them; those of different
posts concurrently. ``delay`` returns once the broker confirmed the job, with Celery's
``AsyncResult`` as before.
"""

from flask import Flask, request

from rabbitkeys.celery import ordered

from .tasks import add_comment, celery, send_digest

app = Flask(__name__)


@app.post("/posts/<post_id>/comments")
def create_comment(post_id: str) -> tuple[dict[str, str], int]:
    text = request.form.get("text", "").strip()
    if not text:
        return {"error": "text is required"}, 400
    result = ordered(add_comment, f"post {post_id}").delay(post_id, text)
    return {"task_id": result.id}, 202


@app.post("/posts/<post_id>/digest")
def create_digest(post_id: str) -> tuple[dict[str, str], int]:
    result = ordered(send_digest, f"post {post_id}").delay(post_id)
    return {"task_id": result.id}, 202


@app.get("/tasks/<task_id>")
def task_status(task_id: str) -> dict[str, object]:
    result = celery.AsyncResult(task_id)
    return {"state": result.state, "result": result.result if result.successful() else None}
