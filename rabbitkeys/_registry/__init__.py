"""The registry role: who owns which key, and every key's life from declare to delete.

Core (pure, synchronous): ``keybook`` (the key book: keys, workers, holds, the key
lifecycle; a package: its ``records`` and ``commands``, ``hold_bindings``, the ``ledger``
and one module per event family over it, ``declare``, ``members``, ``retire``, ``holds``
and ``broker_view``, each handed its events by ``book``), ``assignment`` (rendezvous hashing
with bounded load) and ``keylist`` (a page of ``rabbitkeys keys``).
Shell: ``registry`` (:class:`~rabbitkeys.Registry`, the service around the book),
``session`` (what exists only while it leads: control channel, runner, reconciler),
``operator_requests`` (keys, pause, resume, skip, redrive), ``runner`` (carries out the book's
commands over AMQP), ``reconcile`` (the book checked against the broker), ``redrive``
(reading dead letters, putting them back, skipping a parked head) and ``leadership`` (the
leader lock).
Imports no other role. Internals: ``docs/internals/registry.md``.
"""
