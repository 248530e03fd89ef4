"""Broker I/O shared by every role: small AMQP helpers (``amqp``), opening connections
(``connection``), control traffic and request/reply with the registry (``control``), and the
management HTTP API (``management``).

All shell (they do I/O); the decisions they carry out live in the roles' cores. Stands on
:mod:`rabbitkeys._wire` and the settings; imports no role.
Internals: ``docs/internals/broker.md``.
"""
