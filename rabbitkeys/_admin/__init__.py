"""The operator's side: per-role users and the requests ``rabbitkeys`` sends to a running
registry.

Core (pure): ``permissions`` (what each role may do on the broker).
Shell: ``users`` (making the users through the management API), ``operations`` (keys, pause,
resume, skip, redrive: request and printed answer) and ``status``.
Imports no role: it talks to the registry through :mod:`rabbitkeys._broker.control`.
Internals: ``docs/internals/admin.md``.
"""
