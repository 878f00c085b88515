"""Registry work taken off a service's packet path: one thread behind a bounded queue.

A host's status change is a durable write (an fsync) and tying a transfer to a host is a
registry read; on the thread that answers packets either would throttle every other client.
The TFTP and DHCP services hand such work to an :class:`OffPathWorker` instead. The queue is
bounded, so a flood cannot grow memory; what does not fit is reported to the caller, which
knows what losing it means, and counted through ``on_drop``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")


class OffPathWorker(Generic[Item]):
    def __init__(self, name: str, handle: Callable[[Item], None], capacity: int,
                 on_drop: Callable[[int], None]) -> None:
        self.name = name
        self._handle = handle
        self._on_drop = on_drop
        self._queue: queue.Queue[tuple[Item] | None] = queue.Queue(maxsize=capacity)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def submit(self, item: Item) -> bool:
        """Queue ``item``; False when the queue is full and it was dropped."""
        try:
            self._queue.put_nowait((item,))
        except queue.Full:
            self._on_drop(1)
            return False
        return True

    def stop(self) -> None:
        """Handle what is queued, then end the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while (entry := self._queue.get()) is not None:
            try:
                self._handle(entry[0])
            except Exception:  # a registry hiccup must not end the worker
                log.exception("%s: could not handle %r", self.name, entry[0])
