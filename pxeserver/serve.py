"""``pxeserver serve``: every enabled service in one process until SIGINT or SIGTERM."""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable

from pxeserver import app
from pxeserver.app import Context
from pxeserver.config import Config
from pxeserver.registry import Unavailable, describe_database
from pxeserver.service import Service

log = logging.getLogger("pxeserver")


def _tftp(context: Context) -> Service:
    from pxeserver.tftp import TftpService

    return TftpService(context)


def _http(context: Context) -> Service:
    from pxeserver.web.server import HttpService

    return HttpService(context)


def _dhcp(context: Context) -> Service:
    from pxeserver.dhcp.server import DhcpService

    return DhcpService(context)


def _dns(context: Context) -> Service:
    from pxeserver.dns import DnsService

    return DnsService(context)


# Start order: name service and file services first, DHCP (which points clients at them) last.
FACTORIES: list[tuple[str, Callable[[Context], Service]]] = [
    ("dns", _dns), ("tftp", _tftp), ("http", _http), ("dhcp", _dhcp),
]


def _api_exposed(config: Config) -> bool:
    try:
        return not ipaddress.ip_address(config.http.address).is_loopback
    except ValueError:
        return True


def run(config: Config) -> int:
    """Start the enabled services, print where they listen, and wait for a signal or a failure.

    A service whose loop dies stops the others and makes the exit status 1, so systemd
    (Restart=on-failure) starts a fresh process instead of keeping one that answers nothing.
    """
    logging.basicConfig(level=config.server.log_level.upper(),
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        context = app.build(config)
    except (Unavailable, RuntimeError) as exc:  # the database unreachable, or a newer schema
        print(f"pxeserver: cannot open the registry: {exc}", file=sys.stderr)
        return 1
    context.writer.write_default()
    # Hash the recorded boot files once now, off the request path: a bad copy is logged at
    # start, and the first guest to boot does not wait for its initrd to be read.
    threading.Thread(target=context.policy.boot_files.verify_all, name="boot-file-check",
                     daemon=True).start()
    supervisor = context.supervisor
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: supervisor.request_stop())
    started: list[Service] = []
    try:
        for name, factory in FACTORIES:
            if getattr(config, name).enabled:
                service = factory(context)
                service.start()
                started.append(service)
    except (OSError, ValueError) as exc:  # a port in use, no root, a bad [section] setting
        print(f"pxeserver: cannot start {name}: {exc}", file=sys.stderr)
        _stop_all(started, context)
        return 1
    _banner(config, started)
    failure = supervisor.wait()
    print("pxeserver: stopping" if failure is None else "pxeserver: stopping the other services",
          file=sys.stderr)
    _stop_all(started, context)
    return 0 if failure is None else 1


def _stop_all(services: list[Service], context: Context) -> None:
    for service in reversed(services):
        try:
            service.stop()
        except Exception:
            log.exception("stopping %s failed", service.name)
        else:
            log.info("stopped %s", service.name)
    context.close()


def _command() -> str:
    """How the user can run pxeserver again: the name on PATH, else the path they used."""
    invoked = os.path.realpath(sys.argv[0])
    on_path = shutil.which("pxeserver")
    if on_path and os.path.realpath(on_path) == invoked:
        return "pxeserver"
    if os.path.basename(invoked) == "pxeserver":
        return os.path.relpath(invoked) if not os.path.relpath(invoked).startswith("..") else invoked
    return f"{sys.executable} -m pxeserver"


def _banner(config: Config, services: list[Service]) -> None:
    print(f"pxeserver: configuration from {config.source}", flush=True)
    print(f"pxeserver: registry {describe_database(config.database)}", flush=True)
    print(f"pxeserver: TFTP root {config.tftp_root}", flush=True)
    print(f"pxeserver: clients are told this server is {config.advertised_address}", flush=True)
    for service in services:
        for endpoint in service.endpoints():
            print(f"pxeserver: {service.name} listening on {endpoint}", flush=True)
    if config.http.enabled:
        print(f"pxeserver: dashboard at {config.http_base_url}/", flush=True)
    if not config.api.token and config.http.enabled and _api_exposed(config):
        print(
            "pxeserver: WARNING: the API answers reads and writes from anyone who can reach "
            f"{config.http.address}:{config.http.port}; set [api] token in pxeserver.toml",
            flush=True,
        )
    command = _command()
    print(
        f"pxeserver: next: {command} profile add NAME --kernel images/NAME/linux --initrd "
        f"images/NAME/initrd.gz --autoinstall debian-xen.cfg; {command} host add --hostname web1 "
        f"--profile NAME; curl {config.http_base_url}/api/hosts",
        flush=True,
    )
