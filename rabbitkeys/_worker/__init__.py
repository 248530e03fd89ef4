"""The worker role: takes keys the registry assigns and runs their jobs in order.

Core (pure): ``retry`` (what follows a failed attempt) and ``dedup`` (which messages of a key
were handled). ``app`` is what users write (:class:`~rabbitkeys.App`, handlers, middleware),
pure as well.
Shell: ``worker`` (:class:`~rabbitkeys.Worker`: session and membership), ``handoff`` (taking
and letting go of a key, its buffer and runner) and ``execution`` (one delivery, from its turn
to its ack).
Imports no other role.
"""
