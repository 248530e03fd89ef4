"""The worker role: takes keys the registry assigns and runs their jobs in order.

Core (pure): ``job_run`` (one job's run: its attempts, and what follows a failed one: retry,
dead-letter or park, decided by ``next_step``; the I/O through ports), ``retry`` (the retry
policy: how many attempts, how long between them) and ``dedup`` (which messages of a key were
handled). ``app`` is what users write (:class:`~rabbitkeys.App`, handlers, middleware), pure
as well.
Shell: ``worker`` (:class:`~rabbitkeys.Worker`: session and membership), ``handoff`` (taking
and letting go of a key, its buffer and runner), ``execution`` (one delivery, from its turn
to its ack: the job-run core's ports on the broker, the handler's slots, threads and time
limits) and ``tracing`` (the spans of a job's wait and attempts, on the shared tracing
plumbing). ``rabbitkeys.testing.InMemoryWorker`` wires the same core to in-memory ports.
Imports no other role.
Internals: ``docs/internals/worker.md``.
"""
