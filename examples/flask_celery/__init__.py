"""Flask and Celery: the views send with ``ordered(task, key)``; the tasks are unchanged."""
