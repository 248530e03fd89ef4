"""The view publishes from sync code: ``rabbitkeys.publish`` sends through the process's
default :class:`rabbitkeys.SyncPublisher` (made on first use, closed at exit, made anew in a
child after a fork, as under gunicorn with ``--preload``) and returns once the broker has the
message, so a 202 means the job will run.
"""

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_POST

import rabbitkeys

from .payloads import Comment


@require_POST
def create_comment(request: HttpRequest, post: str) -> JsonResponse:
    text = request.POST.get("text", "").strip()
    if not text:
        return JsonResponse({"error": "text is required"}, status=400)
    comment = Comment(post=post, text=text, author=request.POST.get("author", "anonymous"))
    # comments of one post are handled in the order of these calls, across all threads of
    # this process; rabbitkeys.PublishError and its kin propagate like any other error
    rabbitkeys.publish(post, comment, job_type="comments")
    return JsonResponse({"status": "queued", "post": post}, status=202)
