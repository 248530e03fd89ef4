"""The publisher role: what an application uses to publish jobs in order per key.

Core (pure, synchronous, property-tested): ``lane`` (each key's lane: what to send, when to
ask the registry, what a caller is told) and ``room`` (first-come, first-served admission
under a count and a size bound).
Shell: ``publisher`` (:class:`~rabbitkeys.Publisher`: the calls, their deadlines and
futures, the connection), ``carrier`` (what carries the messages to the broker: the confirm
channel, batches, answers), ``ensures`` (asking the registry for the keys' routing keys,
the new keys due together in one request) and ``sync`` (:class:`~rabbitkeys.SyncPublisher`,
a thread over the publisher).
Imports no other role.
Internals: ``docs/internals/publisher.md``.
"""
