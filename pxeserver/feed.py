"""The live feed of timeline events: what the dashboard's Server-Sent Events streams read.

The timeline's writer publishes each batch here once it is stored, so a page that is told of
an event and then asks the registry finds it there. Readers wait for events newer than the
sequence number they last saw; a reader too far behind gets the oldest events still kept and
then catches up, and a page that reconnects passes the number it had (``Last-Event-ID``).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable

from pxeserver.registry import Event


class EventFeed:
    def __init__(self, keep: int = 10_000) -> None:
        self._events: deque[tuple[int, Event]] = deque(maxlen=keep)
        self._last = 0
        self._changed = threading.Condition()

    @property
    def last(self) -> int:
        """The sequence number of the newest event published so far (0: none yet)."""
        with self._changed:
            return self._last

    def publish(self, events: Iterable[Event]) -> None:
        with self._changed:
            for event in events:
                self._last += 1
                self._events.append((self._last, event))
            self._changed.notify_all()

    def after(self, seen: int, timeout: float) -> tuple[int, list[Event]]:
        """Events published after number ``seen``, waiting up to ``timeout`` seconds for one;
        returns the newest number with them (``seen`` itself when none came)."""
        with self._changed:
            if seen > self._last:  # a number from before a restart: start from now
                seen = self._last
            self._changed.wait_for(lambda: self._last > seen, timeout=timeout)
            fresh = [event for number, event in self._events if number > seen]
            return self._last, fresh
