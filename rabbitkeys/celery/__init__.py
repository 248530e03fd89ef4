"""Keep your Celery tasks, get per-key order: the Celery bridge (``pip install
'rabbitkeys[celery]'``).

Publishing: ``ordered(task).apply_async(args, kwargs, key="post A")`` (or
``ordered(task, "post A").delay(...)``, ``await ...aapply_async(...)`` in async code, or
``@app.task(base=OrderedTask)`` and ``task.apply_async(..., key="post A")``) sends the
call as the message Celery would send, to the key's queue. Running: ``rabbitkeys worker
--celery proj.celery:app`` runs the app's tasks one at a time per key, in the order they
were sent, keys concurrently (:func:`worker_app`). "Coming from Celery" in the docs says
what maps to what.
"""

try:
    import celery as _celery  # noqa: F401
except ImportError as exc:  # pragma: no cover - the extra not installed
    raise ImportError("rabbitkeys.celery needs Celery: pip install 'rabbitkeys[celery]'") from exc

from ._publishing import JOB_TYPE, Ordered, OrderedTask, ordered
from ._running import RetryWindowExceededError, WorkerTimeLimitExceeded, worker_app

__all__ = [
    "JOB_TYPE",
    "Ordered",
    "OrderedTask",
    "RetryWindowExceededError",
    "WorkerTimeLimitExceeded",
    "ordered",
    "worker_app",
]
