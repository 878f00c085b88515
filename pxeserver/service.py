"""What ``pxeserver serve`` needs from each protocol service.

A service is built from the shared :class:`~pxeserver.app.Context` (configuration, boot
policy, provisioning) and owns its sockets and threads. ``start`` binds (raising OSError with
a clear message when it cannot) and returns once the service answers; ``stop`` closes its
sockets and joins its threads within a few seconds.
"""

from __future__ import annotations

from typing import Protocol


class Service(Protocol):
    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def endpoints(self) -> list[str]:
        """Where it listens, for the start-up banner: ``tftp://0.0.0.0:69``."""
        ...
