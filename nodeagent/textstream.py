"""`TextStream`: a turn's answer, piece by piece, from the provider to a waiting client.

The pod runs on a dispatcher thread; the client (an SSE response) reads on
another. The executor hands the stream to the provider as its ``on_text``
sink (`nodeagent.providers.base.TextSink`): each generated piece is queued as
it comes. When the client goes away the reader calls `cancel`; the sink then
answers False, the provider stops after the token it is on, and the turn ends
``cancelled`` (with a receipt saying so).
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

_END = object()


class TextStream:
    def __init__(self) -> None:
        self._pieces: "queue.Queue[object]" = queue.Queue()
        self._cancelled = threading.Event()

    # ------------------------------------------------------------ the provider's side
    def __call__(self, piece: str) -> bool:
        """The `TextSink`: queue ``piece``; False once the reader has gone."""
        if self._cancelled.is_set():
            return False
        self._pieces.put(piece)
        return True

    def close(self) -> None:
        """No more pieces (the turn ended, however it ended)."""
        self._pieces.put(_END)

    # ------------------------------------------------------------ the reader's side
    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def pieces(self, *, ended: Callable[[], bool], poll_s: float = 0.05, timeout_s: float | None = None,
               ) -> Iterator[str]:
        """The pieces as they come, until `close` (or ``ended()`` turns true: a pod that
        ended before it ran never closes the stream). Raises TimeoutError past ``timeout_s``."""
        import time

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                item = self._pieces.get(timeout=poll_s)
            except queue.Empty:
                if ended() and self._pieces.empty():
                    return
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"no answer within {timeout_s:g}s") from None
                continue
            if item is _END:
                return
            yield item  # type: ignore[misc]
