"""The rabbitkeys benchmark handler: ``rabbitkeys worker rabbitkeys.tools.bench.app:app``."""

from __future__ import annotations

import atexit

from ..._worker.app import App, Message
from .recording import HEADER_PUBLISHED, Recorder

__all__ = ["app"]

app = App()
_recorder: Recorder | None = None


@app.handler()
async def record(message: Message) -> None:
    global _recorder
    if _recorder is None:
        _recorder = Recorder()
        atexit.register(_recorder.flush)
    published = message.headers.get(HEADER_PUBLISHED)
    await _recorder.handle(message.key, message.sequence or 0, int(published or 0) / 1e6)
