"""The wire: what one process writes and another reads, as pure functions and typed models.

Every module here is core (pure: no AMQP client, no asyncio, no socket): ``topology`` (names
and arguments of every exchange and queue), ``protocol`` (the control messages), ``envelope``
(a job message's headers), ``batch`` (a batch body), ``payload`` (message bodies) and
``senders`` (who may send which control message). No shell: the I/O is in the roles and in
:mod:`rabbitkeys._broker`. Depends only on :mod:`rabbitkeys._errors`.
Internals: ``docs/internals/wire.md``.
"""
