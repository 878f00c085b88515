"""pypxeboot fetching ``http://`` kernels and initrds: from a real ``pxeserver serve`` whose
boot policy writes such configs, and from hostile HTTP servers.

Each hostile server is real (a TCP server on loopback, below) and does what it says: an
endless body, a Content-Length of 10 GB, one that promises more than it sends, a drip of a
byte every half second, headers dripped the same way, a redirect to another host, and a config
whose URL names another host. Each must end in one error line, exit 1, nothing for libxl and
nothing left in the output directory; the other host must never be contacted.
"""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import free_port
from test_pypxeboot_hostile import (
    INITRD,
    KERNEL,
    MAC,
    HostileTftp,
    Outcome,
    assert_booted,
    assert_refused,
    config_for,
    run_as_libxl,
)
from test_serve import start_server

Behaviour = Callable[[socket.socket], None]


# -- a hostile HTTP server ------------------------------------------------------------------


@dataclass
class HostileHttp:
    """Answers each GET by the behaviour registered for its path (404 for others), one thread
    per connection; counts connections and body bytes sent; every answer ends within
    ``give_up`` seconds."""

    paths: dict[str, Behaviour]
    address: str = "127.0.0.1"
    give_up: float = 60.0
    connections: int = 0
    sent: int = 0
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((self.address, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def url(self, path: str) -> str:
        return f"http://{self.address}:{self.port}{path}"

    def __enter__(self) -> HostileHttp:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(10)
        self.sock.close()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                connection, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with connection:
            connection.settimeout(5)
            request = b""
            try:
                while b"\r\n\r\n" not in request and len(request) < 8192:
                    chunk = connection.recv(4096)
                    if not chunk:
                        return
                    request += chunk
                path = request.split(b" ", 2)[1].decode()
                behaviour = self.paths.get(path, lambda c: c.sendall(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"))
                behaviour(connection)
            except OSError:
                return  # the client hung up: what a refusal looks like from here

    def body(self, connection: socket.socket, data: bytes) -> None:
        connection.sendall(data)
        self.sent += len(data)

    def alive(self) -> bool:
        return not self.stopping.is_set() and time.monotonic() - self.started < self.give_up


def fixed(server_ref: list[HostileHttp], data: bytes) -> Behaviour:
    def send(connection: socket.socket) -> None:
        connection.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(data)}\r\n\r\n".encode())
        server_ref[0].body(connection, data)
    return send


def hostile_with(ref: list[HostileHttp], tmp_path: Path, kernel: Behaviour, *words: str,
                 timeout: float = 60) -> tuple[HostileHttp, Outcome]:
    """As ``hostile``, with ``ref`` filled in before the client runs (for behaviours that count)."""
    paths = {"/initrd": fixed(ref, INITRD), "/linux": kernel}
    with HostileHttp(paths) as server:
        ref.append(server)
        files = config_for(server.url("/linux"), "quiet", initrd=server.url("/initrd"))
        with HostileTftp(files) as tftp:
            outcome = run_as_libxl(tmp_path, "server=127.0.0.1", f"tftp_port={tftp.port}", *words, timeout=timeout)
    return server, outcome


def drip(server_ref: list[HostileHttp], header: bytes, every: float, headers_too: bool = False) -> Behaviour:
    def send(connection: socket.socket) -> None:
        if not headers_too:
            connection.sendall(header)
        data = header if headers_too else b"x" * 10_000_000
        for index in range(len(data)):
            if not server_ref[0].alive():
                return
            connection.sendall(data[index:index + 1])
            time.sleep(every)
    return send


def test_a_good_http_server_boots(tmp_path: Path) -> None:
    ref: list[HostileHttp] = []
    server, outcome = hostile_with(ref, tmp_path, fixed(ref, KERNEL))
    assert_booted(outcome, tmp_path / "d", KERNEL, INITRD)
    assert server.sent == len(KERNEL) + len(INITRD)


def test_an_endless_chunked_body_stops_at_the_cap(tmp_path: Path) -> None:
    ref: list[HostileHttp] = []

    def endless(connection: socket.socket) -> None:
        connection.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"10000\r\n" + b"k" * 0x10000 + b"\r\n"
        while ref[0].alive():
            ref[0].body(connection, chunk)

    server, outcome = hostile_with(ref, tmp_path, endless, "max_file_mb=4")
    assert_refused(outcome, f"{server.url('/linux')}: larger than the 4 MiB cap on one file (max_file_mb=)")
    assert server.sent < 16 << 20  # it stopped reading at the cap (plus what loopback buffers hold)


def test_an_endless_body_without_length_stops_at_the_cap(tmp_path: Path) -> None:
    ref: list[HostileHttp] = []

    def endless(connection: socket.socket) -> None:
        connection.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
        while ref[0].alive():
            ref[0].body(connection, b"k" * 0x10000)

    server, outcome = hostile_with(ref, tmp_path, endless, "max_file_mb=4")
    assert_refused(outcome, "larger than the 4 MiB cap on one file (max_file_mb=)")
    assert server.sent < 16 << 20  # it stopped reading at the cap (plus what loopback buffers hold)


def test_a_content_length_over_the_cap_aborts_before_the_body(tmp_path: Path) -> None:
    ref: list[HostileHttp] = []

    def huge(connection: socket.socket) -> None:
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10737418240\r\n\r\n")
        for _ in range(100):
            if not ref[0].alive():
                return
            ref[0].body(connection, b"k" * 0x10000)

    server, outcome = hostile_with(ref, tmp_path, huge)
    assert_refused(outcome, "larger than the 256 MiB cap on one file (max_file_mb=)")
    assert outcome.seconds < 10


def test_a_body_shorter_than_its_content_length_fails(tmp_path: Path) -> None:
    ref: list[HostileHttp] = []

    def short(connection: socket.socket) -> None:
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n")
        ref[0].body(connection, KERNEL[:1000])

    server, outcome = hostile_with(ref, tmp_path, short)
    assert_refused(outcome, "closed the connection after 1000 bytes, before the end of the body it announced")


def test_a_body_longer_than_its_content_length_is_cut_at_the_length(tmp_path: Path) -> None:
    """HTTP says the body is Content-Length bytes: what follows is not read into the kernel."""
    ref: list[HostileHttp] = []

    def long(connection: socket.socket) -> None:
        connection.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(KERNEL)}\r\n\r\n".encode())
        ref[0].body(connection, KERNEL + b"more" * 100_000)

    server, outcome = hostile_with(ref, tmp_path, long)
    assert_booted(outcome, tmp_path / "d", KERNEL, INITRD)


def test_a_dripping_body_is_dropped_by_the_speed_floor(tmp_path: Path) -> None:
    ref: list[HostileHttp] = []
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n"
    server, outcome = hostile_with(ref, tmp_path, drip(ref, head, 0.5), "min_rate_kbs=4", "rate_window=3")
    assert_refused(outcome, f"{server.url('/linux')}: slower than 4 KiB/s over 3 s (min_rate_kbs=, rate_window=)")
    assert outcome.seconds < 10


def test_dripping_headers_are_dropped_within_one_window(tmp_path: Path) -> None:
    ref: list[HostileHttp] = []
    header = b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"p" * 5000 + b"\r\n\r\n"
    server, outcome = hostile_with(ref, tmp_path, drip(ref, header, 0.2, headers_too=True), "rate_window=3")
    assert_refused(outcome, "sent no answer within 3 s (rate_window=)")
    assert outcome.seconds < 10


def test_a_silent_server_is_dropped_at_the_deadline(tmp_path: Path) -> None:
    ref: list[HostileHttp] = []

    def silent(connection: socket.socket) -> None:
        while ref[0].alive():
            time.sleep(0.1)

    server, outcome = hostile_with(ref, tmp_path, silent, "deadline=3")
    assert_refused(outcome, "the boot's deadline passed (deadline=)")
    assert outcome.seconds < 8


def test_a_redirect_to_another_host_is_not_followed(tmp_path: Path) -> None:
    with HostileHttp({}, address="127.0.0.2") as elsewhere:
        def redirect(connection: socket.socket) -> None:
            connection.sendall(f"HTTP/1.1 302 Found\r\nLocation: {elsewhere.url('/linux')}\r\n"
                               "Content-Length: 0\r\n\r\n".encode())

        server, outcome = hostile_with([], tmp_path, redirect)
    assert_refused(outcome, f"{server.url('/linux')}: the server answered 302 Found",
                   "redirects are not followed")
    assert elsewhere.connections == 0


@pytest.mark.parametrize("path, why", [
    ("http://127.0.0.2:{port}/linux", "names 127.0.0.2, not the boot server 127.0.0.1: refused"),
    ("http://boot.example:{port}/linux", "not a plain http://<IPv4 address>[:port]/path URL"),
    ("http://127.0.0.1@127.0.0.2:{port}/linux", "not a plain http://<IPv4 address>[:port]/path URL"),
])
def test_a_url_naming_another_host_is_refused_before_any_download(tmp_path: Path, path: str, why: str) -> None:
    with HostileHttp({}, address="127.0.0.2") as elsewhere:
        ref: list[HostileHttp] = []
        paths = {"/initrd": fixed(ref, INITRD), "/linux": fixed(ref, KERNEL)}
        with HostileHttp(paths) as server:
            ref.append(server)
            files = config_for(path.format(port=elsewhere.port), "quiet", initrd=server.url("/initrd"))
            with HostileTftp(files) as tftp:
                outcome = run_as_libxl(tmp_path, "server=127.0.0.1", f"tftp_port={tftp.port}")
    assert_refused(outcome, why)
    assert elsewhere.connections == 0 and server.connections == 0


# -- against pxeserver serve, its boot policy writing http:// configs -------------------------


def test_pypxeboot_boots_over_http_from_pxeserver_serve(tmp_path: Path) -> None:
    ports = {"tftp": free_port(socket.SOCK_DGRAM), "http": free_port()}
    images = tmp_path / "tftproot" / "images" / "d"
    images.mkdir(parents=True)
    kernel, initrd = bytes(range(256)) * 8192, bytes(reversed(range(256))) * 40960  # 2 MiB, 10 MiB
    (images / "linux").write_bytes(kernel)
    (images / "initrd.gz").write_bytes(initrd)
    (tmp_path / "pxeserver.toml").touch()
    process, banner = start_server(tmp_path, **ports, extra='[boot]\nkernel_transport = "http"\n')
    try:
        pxeserver = [sys.executable, "-m", "pxeserver"]
        for command in (["profile", "add", "d", "--kernel", "images/d/linux", "--initrd", "images/d/initrd.gz",
                         "--append", "console=hvc0"],
                        ["host", "add", "--mac", MAC, "--hostname", "web1", "--profile", "d"]):
            done = subprocess.run([*pxeserver, *command], cwd=tmp_path, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
        config = tmp_path / "config"
        subprocess.run(["tftp", "127.0.0.1", str(ports["tftp"]), "-m", "binary", "-c", "get",
                        f"pxelinux.cfg/01-{MAC.replace(':', '-')}", str(config)], timeout=30, check=True)
        base = f"http://127.0.0.1:{ports['http']}/boot"
        assert f"kernel {base}/images/d/linux\n" in config.read_text()
        assert f"append initrd={base}/images/d/initrd.gz console=hvc0\n" in config.read_text()
        outcome = run_as_libxl(tmp_path / "run", "server=127.0.0.1", f"tftp_port={ports['tftp']}")
    finally:
        process.terminate()
        process.wait(20)
    assert_booted(outcome, tmp_path / "run" / "d", kernel, initrd)
    assert outcome.max_rss_kb < 60_000
    print(f"pypxeboot over HTTP from pxeserver serve: 12 MiB in {outcome.seconds:.2f} s, "
          f"peak RSS {outcome.max_rss_kb} KiB; {shlex.join(banner[:1])}")
