"""The child-process side of a benchmark: one pxeserver service, its port on stdout."""

from __future__ import annotations

import sys
from collections.abc import Callable

from pxeserver import app
from pxeserver.config import Config


def serve_until_stdin_closes(config: Config, make_service: Callable[[app.Context], object]) -> None:
    """Start the service, print its bound port for the parent, stop when the parent closes stdin."""
    context = app.build(config)
    service = make_service(context)
    service.start()
    print(service.port, flush=True)
    sys.stdin.read()
    service.stop()
    context.close()
