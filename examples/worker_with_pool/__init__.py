"""A worker with a PostgreSQL pool opened in ``on_startup``, used by its handler."""
