"""`pxeserver serve` supervises its services: one that dies stops the rest and exits 1.

The server runs as a user runs it (a child process, `pxeserver serve` on loopback). A small
launcher in the child keeps a handle on each real service and, when the test says so, breaks
one service's loop the way a fault would: it closes the TFTP loop's epoll object or one of
the DHCP service's sockets, or puts a pipe where the DNS UDP socket was. Nothing in
pxeserver itself knows about the test.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import free_port

LAUNCHER = """
import os, sys, threading
from pxeserver import serve
from pxeserver.cli import main

services = {}

def keep(name, factory):
    def build(context):
        services[name] = service = factory(context)
        return service
    return build

serve.FACTORIES = [(name, keep(name, factory)) for name, factory in serve.FACTORIES]
FAULTS = {
    "tftp": lambda service: service._epoll.close(),
    "dhcp": lambda service: service._sockets[0].close(),
    "dns": lambda service: break_udp(service),
}

def break_udp(service):
    # The UDP socket's descriptor now names a pipe holding data, and the loop is woken: every
    # receive fails with ENOTSOCK, which no ICMP error explains.
    readable, writable = os.pipe()
    os.write(writable, b"x")
    os.dup2(readable, service._udp.fileno())
    service._udp_wake[1].send(b"x")

def break_one():
    victim = sys.stdin.readline().strip()
    FAULTS[victim](services[victim])

threading.Thread(target=break_one, daemon=True).start()
sys.argv = ["pxeserver", *sys.argv[1:]]
main()
"""


def write_config(tmp_path: Path, *, dhcp: bool) -> dict[str, int]:
    ports = {"tftp": free_port(socket.SOCK_DGRAM), "http": free_port(), "dns": 0,
             "dhcp": free_port(socket.SOCK_DGRAM)}
    text = ('[server]\naddress = "127.0.0.1"\n'
            f'[tftp]\naddress = "127.0.0.1"\nport = {ports["tftp"]}\n'
            f'[http]\naddress = "127.0.0.1"\nport = {ports["http"]}\n'
            '[dns]\nenabled = true\naddress = "127.0.0.1"\nport = 0\n')
    if dhcp:
        text += (f'[dhcp]\nenabled = true\ninterface = "lo"\nport = {ports["dhcp"]}\n'
                 'subnet = "127.0.0.0/8"\nrouter = "127.0.0.1"\n')
    (tmp_path / "pxeserver.toml").write_text(text)
    return ports


@pytest.fixture
def launch() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Starts the server as :func:`start` does; kills any still running when the test ends."""
    processes: list[subprocess.Popen[str]] = []

    def launched(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
        processes.append(process := start(tmp_path, *args))
        return process

    yield launched
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def start(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", LAUNCHER, "serve", *args], cwd=tmp_path,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line or line.startswith("pxeserver: next:"):
            break
    else:
        process.kill()
    assert process.poll() is None, process.stderr.read()
    return process


@pytest.mark.parametrize("victim", [
    "tftp",
    "dns",
    pytest.param("dhcp", marks=pytest.mark.skipif(
        not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() != 0,
        reason="the DHCP service binds to an interface: root only")),
])
def test_a_service_that_dies_stops_the_others_and_exits_1(tmp_path: Path, victim: str,
                                                           launch: Callable[..., subprocess.Popen[str]]) -> None:
    ports = write_config(tmp_path, dhcp=victim == "dhcp")
    process = launch(tmp_path)
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/api/hosts", timeout=10) as reply:
        assert reply.status == 200, "serving before the fault"
    started = time.monotonic()
    process.stdin.write(f"{victim}\n")
    process.stdin.flush()
    assert process.wait(timeout=30) == 1, "a dead service makes the exit status 1"
    stopped_in = time.monotonic() - started
    log = process.stderr.read()
    failures = [line for line in log.splitlines() if " failed" in line]
    assert len(failures) == 1, log
    assert re.search(rf"pxeserver: {victim} failed: (ValueError|OSError): .+", failures[0]), log
    others = ({"dns", "tftp", "http"} | ({"dhcp"} if victim == "dhcp" else set())) - {victim}
    for name in others:
        assert f"pxeserver: stopped {name}" in log, f"{name} stopped cleanly: {log}"
    assert "Traceback" not in log and "stopping" in log
    assert stopped_in < 10, f"stopped in {stopped_in:.1f}s"
    with socket.socket() as probe:  # nothing listens any more (TIME_WAIT is fine)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", ports["http"]))
        probe.listen()


def test_a_signal_still_exits_0_and_log_level_warning_hides_info(
        tmp_path: Path, launch: Callable[..., subprocess.Popen[str]]) -> None:
    write_config(tmp_path, dhcp=False)
    process = launch(tmp_path, "--log-level", "WARNING")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    log = process.stderr.read()
    assert "stopped" not in log.replace("pxeserver: stopping", "") and "Traceback" not in log
    (tmp_path / "pxeserver.toml").write_text((tmp_path / "pxeserver.toml").read_text().replace(
        '[server]\n', '[server]\nlog_level = "debug"\n'))
    process = launch(tmp_path)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0
    assert "pxeserver: stopped http" in process.stderr.read()
