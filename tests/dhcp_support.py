"""Network namespaces for the DHCP tests and benchmark: real clients, no real interfaces.

Two namespaces joined by one veth pair, created directly inside them (``ip link add ...
netns``), so nothing ever appears in the root namespace; deleting the namespaces removes the
link. The server can stay in the test process: Linux keeps the network namespace per thread,
so :func:`inside` switches only the calling thread while it opens its sockets, and a socket
stays in the namespace it was created in.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from pxeserver import app
from pxeserver.config import Config
from pxeserver.dhcp.server import DhcpService

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

SERVER_IP = "10.77.0.1"
RELAY_IP = "10.77.0.2"  # the client side's own address, used when it plays a relay
SUBNET = "10.77.0.0/24"
SERVER_IF = "dhs0"
CLIENT_IF = "dhc0"
DNS_SERVER = "10.77.0.53"


def run(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


@contextmanager
def inside(namespace: str) -> Iterator[None]:
    """Run the calling thread in ``namespace`` for the duration of the block."""
    with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{namespace}") as target:
        if _libc.setns(target.fileno(), _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {namespace} failed")
        try:
            yield
        finally:
            if _libc.setns(home.fileno(), _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the original namespace failed")


@dataclass
class Link:
    """A server namespace and a client namespace joined by a veth pair."""

    server_ns: str
    client_ns: str

    def in_client(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.client_ns, *args, check=check, timeout=timeout)

    def set_client_mac(self, mac: str) -> None:
        run("ip", "-n", self.client_ns, "link", "set", CLIENT_IF, "address", mac)


@contextmanager
def veth_link(tag: str, prefix: int = 24) -> Iterator[Link]:
    """Create the namespaces and link (addresses in 10.77.0.0/prefix); always delete them
    again, even after a failure."""
    link = Link(f"{tag}-{os.getpid()}-s", f"{tag}-{os.getpid()}-c")
    try:
        run("ip", "netns", "add", link.server_ns)
        run("ip", "netns", "add", link.client_ns)
        run("ip", "link", "add", SERVER_IF, "netns", link.server_ns, "type", "veth",
            "peer", "name", CLIENT_IF, "netns", link.client_ns)
        run("ip", "-n", link.server_ns, "addr", "add", f"{SERVER_IP}/{prefix}", "dev", SERVER_IF)
        run("ip", "-n", link.client_ns, "addr", "add", f"{RELAY_IP}/{prefix}", "dev", CLIENT_IF)
        for namespace, interface in ((link.server_ns, SERVER_IF), (link.client_ns, CLIENT_IF)):
            run("ip", "-n", namespace, "link", "set", "lo", "up")
            run("ip", "-n", namespace, "link", "set", interface, "up")
        yield link
    finally:
        for namespace in (link.client_ns, link.server_ns):
            run("ip", "netns", "del", namespace, check=False)


def guest_tftp_get(link: Link, workdir: Path, name: str) -> bytes:
    """The tftp-hpa client in the client namespace; the file's bytes (empty if none came)."""
    target = workdir / "fetched"
    target.unlink(missing_ok=True)
    link.in_client("tftp", SERVER_IP, "-m", "binary", "-c", "get", name, str(target), check=False)
    return target.read_bytes() if target.exists() else b""


def guest_curl(link: Link, *args: str) -> str:
    """curl in the client namespace; its output, failing on an HTTP error."""
    return link.in_client("curl", "-fsS", "--max-time", "20", *args).stdout


def can_make_namespaces() -> bool:
    return os.geteuid() == 0 and os.path.exists("/proc/thread-self/ns/net")


def udhcpc(link: Link, tmp_path: Path, attempts: int = 3) -> dict[str, str] | None:
    """Run busybox udhcpc once; the environment its script saw on "bound", or None."""
    out = tmp_path / "udhcpc.env"
    script = tmp_path / "udhcpc.sh"
    script.write_text(f'#!/bin/sh\n[ "$1" = bound ] && env > {out}\nexit 0\n')
    script.chmod(0o755)
    link.in_client("busybox", "udhcpc", "-i", CLIENT_IF, "-f", "-q", "-n", "-t", str(attempts),
                   "-T", "1", "-s", str(script), "-O", "tftp", "-O", "bootfile", check=False)
    if not out.exists():
        return None
    return dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)


@pytest.fixture
def start_server(link: Link, config: Config) -> Iterator[Callable[..., app.Context]]:
    """Start the service inside the server namespace with DHCP settings for the veth link."""
    started: list[tuple[DhcpService, app.Context]] = []

    def start(**dhcp: object) -> app.Context:
        config.server.address = SERVER_IP
        section = config.dhcp
        section.enabled, section.interface, section.address, section.port = True, SERVER_IF, "0.0.0.0", 67
        section.subnet, section.router, section.dns_servers = SUBNET, SERVER_IP, [DNS_SERVER]
        for key, value in dhcp.items():
            setattr(section, key, value)
        context = app.build(config)
        context.provisioning.add_profile(
            {"name": "deb", "kernel": "images/deb/linux", "initrd": "images/deb/initrd.gz"})
        service = DhcpService(context)
        with inside(link.server_ns):
            service.start()
        started.append((service, context))
        return context

    yield start
    for service, context in started:
        service.stop()
        context.close()
