"""A background writer: callers enqueue and return at once; one thread writes in bursts.

The ledger and the audit log both keep disk off the request path this way. `flush()` waits
until everything queued so far is written (tests and shutdown use it).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

log = logging.getLogger(__name__)

_STOP = object()


class BatchWriter:
    """Subclasses implement `_write_batch(items)` and `_close_sink()`."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._pending = 0
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> None:
        with self._idle:
            self._pending += 1
        self._queue.put(item)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=30)
        self._close_sink()

    def _write_batch(self, items: list[Any]) -> None:
        raise NotImplementedError

    def _close_sink(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:  # take whatever else is waiting: one write per burst
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            items = [b for b in batch if b is not _STOP]
            if items:
                try:
                    self._write_batch(items)
                except Exception:  # a batch that cannot be written must not end the thread:
                    # every later entry would be lost, and flush() would wait forever
                    log.exception("%s dropped %d entries", self._thread.name, len(items))
            with self._idle:
                self._pending -= len(items)
                self._idle.notify_all()
            if len(items) != len(batch):
                return
