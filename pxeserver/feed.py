"""The live feed of timeline events: what the dashboard's Server-Sent Events streams read.

The timeline publishes each event here as it is recorded, before its batched commit, so a
live page lags the boot step by milliseconds, not by the registry's write queue. Events of
MACs the registry does not know come through too (the store drops them); readers skip them.
Readers wait for events newer than the sequence number they last saw and get at most the
newest ``limit`` of them (a flood of events is coalesced, not replayed); a page that
reconnects passes the number it had (``Last-Event-ID``).
"""

from __future__ import annotations

import itertools
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

    def after(self, seen: int, timeout: float, limit: int = 1000) -> tuple[int, list[Event]]:
        """The newest (at most ``limit``) events published after number ``seen``, waiting up
        to ``timeout`` seconds for one; returns the newest number with them (``seen`` itself
        when none came)."""
        with self._changed:
            if seen > self._last:  # a number from before a restart: start from now
                seen = self._last
            self._changed.wait_for(lambda: self._last > seen, timeout=timeout)
            count = min(self._last - seen, limit, len(self._events))
            fresh = [event for _, event in itertools.islice(
                reversed(self._events), count)][::-1]
            return self._last, fresh
