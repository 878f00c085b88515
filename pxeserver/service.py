"""What ``pxeserver serve`` needs from each protocol service, and how it watches them.

A service is built from the shared :class:`~pxeserver.app.Context` (configuration, boot
policy, provisioning) and owns its sockets and threads. ``start`` binds (raising OSError with
a clear message when it cannot) and returns once the service answers; ``stop`` closes its
sockets and joins its threads within a few seconds. Each loop thread runs through
:meth:`Supervisor.guard`, so a loop that dies is reported instead of leaving a process that
looks healthy and answers nothing (pixiecore ends ``Serve`` through an error channel the same
way).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("pxeserver")


class Service(Protocol):
    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def endpoints(self) -> list[str]:
        """Where it listens, for the start-up banner: ``tftp://0.0.0.0:69``."""
        ...


@dataclass(frozen=True)
class Failure:
    service: str
    error: BaseException


class Supervisor:
    """What ``serve`` waits on: a stop request (a signal) or the first service that died."""

    def __init__(self) -> None:
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._failures: list[Failure] = []

    def guard(self, loop: Callable[[], None], service: str) -> Callable[[], None]:
        """``loop`` as a thread target that reports the exception that ends it."""

        def run() -> None:
            try:
                loop()
            except BaseException as exc:
                self.fail(service, exc)

        return run

    def fail(self, service: str, error: BaseException) -> None:
        # One line for the operator; the traceback for whoever runs with --log-level debug.
        log.error("%s failed: %s: %s", service, type(error).__name__, error)
        log.debug("%s failed", service, exc_info=error)
        with self._lock:
            self._failures.append(Failure(service, error))
        self._wake.set()

    def request_stop(self) -> None:
        """Safe to call from a signal handler."""
        self._wake.set()

    def wait(self, timeout: float | None = None) -> Failure | None:
        """Block until a stop request or a failure (or ``timeout`` seconds); the first
        failure, or None."""
        self._wake.wait(timeout)
        with self._lock:
            return self._failures[0] if self._failures else None
