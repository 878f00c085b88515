"""Each host's provisioning timeline, written in batches off the services' hot paths.

A TFTP or DHCP service records an event per transfer or packet; writing each one as its own
durable transaction would put a disk flush on every boot step. Events go into a queue instead,
and one writer thread stores whatever has gathered in one transaction. Readers flush first,
so a timeline read right after a boot step shows it. Many events come from unauthenticated
requests, so only registered hosts' events are kept, each host's newest ``keep_per_host``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from pxeserver.feed import EventFeed
from pxeserver.mac import MacAddress
from pxeserver.registry import Event, Store, Unavailable

log = logging.getLogger(__name__)

MAX_BATCH = 1000


class Timeline:
    def __init__(self, store: Store, keep_per_host: int, on_drop: Callable[[int], None]) -> None:
        """``on_drop(n)``: n events were lost (queue full, or the registry refused the batch)."""
        self.store = store
        self._on_drop = on_drop
        self.keep_per_host = keep_per_host
        self.feed = EventFeed()  # every event as it is recorded, for the dashboard's live pages
        self._queue: queue.Queue[Event | threading.Event | None] = queue.Queue(maxsize=100_000)
        self._writer = threading.Thread(target=self._run, name="timeline", daemon=True)
        self._writer.start()

    def record(self, mac: MacAddress, source: str, message: str) -> None:
        event = Event(mac, time.time(), source, message)
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            log.warning("timeline queue full: dropped %s event for %s", source, mac)
            self._on_drop(1)
            return
        # Live pages see it now, not after the batched commit: under a boot storm the writer
        # waits its turn for the registry's write lock, which would be the pages' lag.
        self.feed.publish((event,))

    def flush(self, timeout: float = 10) -> bool:
        """Wait until every event recorded before the call is stored; False if ``timeout`` came first."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout=timeout)

    def events(self, mac: MacAddress) -> list[Event]:
        self.flush()
        return self.store.events(mac)

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join(timeout=10)

    def _run(self) -> None:
        while True:
            batch: list[Event] = []
            waiters: list[threading.Event] = []
            item = self._queue.get()
            stop = item is None
            while item is not None:
                (batch if isinstance(item, Event) else waiters).append(item)  # type: ignore[arg-type]
                if len(batch) >= MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                stop = stop or item is None
            try:
                self.store.add_events(batch, keep=self.keep_per_host)
            except Unavailable as exc:  # the shared database is away; the store logs the outage
                log.warning("dropped %d timeline events: %s", len(batch), exc)
                self._on_drop(len(batch))
            except Exception:  # a failing disk must not kill the writer
                log.exception("could not store %d timeline events", len(batch))
                self._on_drop(len(batch))
            for waiter in waiters:
                waiter.set()
            if stop:
                return
