"""Attacks from the guest network on the TFTP service, performed for real on loopback.

A guest can send RRQs from any source address of its network and never acknowledge the
answers (the "client" does not exist), ask for the longest timeout RFC 2349 allows, and ask
for the same file at many block sizes and in netascii. Each test floods the service that way
from raw UDP sockets bound to many 127.x addresses (real sources that stay silent: nothing
answers the server's packets, as with spoofed ones, and no ICMP error ends the session early),
and checks that the flood is refused where it must be, that real clients (tftp-hpa, curl) get
their files during it, and that what the flood held is given back within the configured bounds.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port
from tftp_support import RawClient, ack, error_of, request, running

from pxeserver.app import Context
from pxeserver.tftp import TftpService
from pxeserver.tftp.cache import ENTRY_OVERHEAD, RACY_SECONDS
from pxeserver.tftp.files import NetasciiStreamed
from pxeserver.tftp.packets import netascii

LOADER = os.urandom(100_000)


def flood(port: int, addresses: list[str], per_address: int, name: str, **options: object) -> list[socket.socket]:
    """Send ``per_address`` RRQs from each address, each from its own port; never acknowledge.

    The sockets stay open and unread, so the server's packets are neither answered nor
    refused: what a request from a spoofed source address looks like to the server.
    """
    packet = request(name, **options)
    sockets = []
    for index in range(per_address):
        for address in addresses:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((address, 0))
            sock.setblocking(False)
            sock.sendto(packet, ("127.0.0.1", port))
            sockets.append(sock)
        if index % 8 == 7:
            time.sleep(0.02)  # bursts of a few hundred: the test measures the caps, not UDP drops
    return sockets


def first_replies(sockets: list[socket.socket], within: float = 10.0) -> Counter[str]:
    """What each flooding socket got first: 'DATA 1', 'OACK', or the ERROR text."""
    seen: Counter[str] = Counter()
    deadline = time.monotonic() + within
    pending = list(sockets)
    while pending and time.monotonic() < deadline:
        waiting = []
        for sock in pending:
            try:
                reply = sock.recv(2048)
            except BlockingIOError:
                waiting.append(sock)
                continue
            error = error_of(reply)
            seen[error[1] if error else "OACK" if reply[:2] == b"\0\6" else f"DATA {reply[3]}"] += 1
        pending = waiting
        time.sleep(0.05)
    seen["no reply"] = len(pending)
    return seen


def settle(service: TftpService, expected: int, within: float = 10.0) -> int:
    """The session count once it reaches ``expected`` (or stops changing)."""
    deadline, last, steady_since = time.monotonic() + within, -1, time.monotonic()
    while time.monotonic() < deadline:
        now = service.active_sessions
        if now == expected:
            return now
        if now != last:
            last, steady_since = now, time.monotonic()
        elif time.monotonic() - steady_since > 1.0:
            return now
        time.sleep(0.05)
    return service.active_sessions


def tftp_hpa_gets(port: int, name: str, tmp_path: Path, mode: str = "binary") -> bytes:
    out = tmp_path / f"hpa-{time.monotonic_ns()}"
    result = subprocess.run(["tftp", "-m", mode, "127.0.0.1", str(port), "-c", "get", name, str(out)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and out.exists(), result.stdout + result.stderr
    return out.read_bytes()


def curl_gets(port: int, name: str, *args: str) -> bytes:
    result = subprocess.run(["curl", "-sS", "--max-time", "30", *args, f"tftp://127.0.0.1:{port}/{name}"],
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_until_no_sessions(service: TftpService, within: float) -> float:
    started = time.monotonic()
    while service.active_sessions and time.monotonic() - started < within + 5:
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.fixture
def loader_root(ctx: Context) -> Context:
    (ctx.config.tftp_root / "pxelinux.0").write_bytes(LOADER)
    return ctx


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


@pytest.mark.slow
def test_never_acknowledged_timeout_255_flood_from_64_addresses(loader_root: Context, tmp_path: Path) -> None:
    config = loader_root.config.tftp  # the defaults, but for:
    config.retries = 100  # retries x timeout alone would hold each session 100 s: the deadline ends it
    addresses = [f"127.3.{index}.1" for index in range(64)]  # 64 sources, each in its own /24
    with running(loader_root) as service:
        sockets = flood(service.port, addresses, 64, "pxelinux.0", timeout=255)  # 4,096 RRQs
        flooded_at = time.monotonic()
        try:
            held = settle(service, 64 * config.max_sessions_per_client)
            replies = first_replies(sockets)
            # Each address got its share, the rest were refused; the timeout was not granted
            # (no OACK: the only option asked was not acknowledged, so DATA 1 came at once).
            assert held == 64 * config.max_sessions_per_client < config.max_sessions
            assert replies["DATA 1"] == held and replies["OACK"] == 0
            assert replies["too many transfers from your address"] == 4096 - held
            assert replies["server busy, try again"] == 0
            # Real clients are served while the flood holds its sessions.
            assert tftp_hpa_gets(service.port, "pxelinux.0", tmp_path) == LOADER
            assert curl_gets(service.port, "pxelinux.0") == LOADER  # curl asks timeout=6: not granted either
            assert service.active_sessions >= held // 2  # still flooded while they were served
            # And the flood's sessions are gone within the session deadline, not 25 minutes.
            waited = wait_until_no_sessions(service, config.session_deadline)
            assert service.active_sessions == 0
            assert time.monotonic() - flooded_at <= config.session_deadline + 2, waited
            assert tftp_hpa_gets(service.port, "pxelinux.0", tmp_path) == LOADER
        finally:
            close_all(sockets)


@pytest.mark.slow
def test_flood_from_one_slash_24_cannot_take_the_total(loader_root: Context, tmp_path: Path) -> None:
    config = loader_root.config.tftp
    addresses = [f"127.4.0.{index}" for index in range(1, 129)]  # 128 sources in one /24
    assert 128 * config.max_sessions_per_client >= config.max_sessions  # without the /24 cap: all of it
    with running(loader_root) as service:
        sockets = flood(service.port, addresses, 32, "pxelinux.0", timeout=255)  # 4,096 RRQs
        try:
            held = settle(service, config.max_sessions_per_subnet)
            replies = first_replies(sockets)
            assert held == config.max_sessions_per_subnet < config.max_sessions
            assert replies["DATA 1"] == held
            assert replies["too many transfers from your network"] == 4096 - held
            assert replies["server busy, try again"] == 0
            # Clients in other networks are served; the flooded network's own share is spent.
            assert tftp_hpa_gets(service.port, "pxelinux.0", tmp_path) == LOADER
            assert curl_gets(service.port, "pxelinux.0") == LOADER
            neighbour = RawClient(service.port, source="127.4.0.200")
            assert error_of(neighbour.ask(request("pxelinux.0"))[0]) == (0, "too many transfers from your network")
            neighbour.close()
            assert service.active_sessions >= held // 2
            wait_until_no_sessions(service, config.session_deadline)
            assert service.active_sessions == 0
        finally:
            close_all(sockets)


def test_timeout_above_the_cap_is_not_acknowledged_and_the_server_keeps_its_own(ctx: Context) -> None:
    (ctx.config.tftp_root / "file").write_bytes(b"f" * 2000)
    with running(ctx) as service:
        client = RawClient(service.port)
        reply, _ = client.ask(request("file", timeout=255, tsize=0))
        assert reply == b"\x00\x06tsize\x002000\x00"  # RFC 2349: a timeout is acked as asked or not at all
        started = time.monotonic()
        again, _ = client.recv()  # the OACK again, after the server's own 1 s, not 255 s
        assert again == reply and 0.7 <= time.monotonic() - started <= 2.0
        client.close()
        allowed = RawClient(service.port)
        assert allowed.ask(request("file", timeout=ctx.config.tftp.max_timeout))[0] == (
            b"\x00\x06timeout\x00" + str(ctx.config.tftp.max_timeout).encode() + b"\x00")
        allowed.close()


def test_silent_client_is_dropped_at_the_session_deadline_whatever_its_retries(ctx: Context) -> None:
    ctx.config.tftp.retries = 100  # retries x timeout alone would hold it 300 s
    ctx.config.tftp.max_timeout = 3
    ctx.config.tftp.session_deadline = 3
    (ctx.config.tftp_root / "file").write_bytes(b"g" * 5000)
    with running(ctx) as service:
        silent = RawClient(service.port)
        assert silent.ask(request("file", timeout=3))[0] == b"\x00\x06timeout\x003\x00"
        started = time.monotonic()
        assert service.active_sessions == 1
        while service.active_sessions and time.monotonic() - started < 10:
            time.sleep(0.05)
        assert service.active_sessions == 0 and 2.8 <= time.monotonic() - started <= 4.5  # not 300 s
        # A client that keeps acknowledging is not cut off by the deadline: each ACK restarts it.
        slow = RawClient(service.port)
        reply, tid = slow.ask(request("file", blksize=512))
        for block in range(0, 10):
            time.sleep(0.5 if block < 9 else 0)  # 4.5 s in all, more than the deadline
            slow.send(ack(block), tid)
            reply, _ = slow.recv()
            assert reply[:4] == b"\x00\x03" + (block + 1).to_bytes(2, "big")
        slow.send(ack(10), tid)
        silent.close()
        slow.close()


def test_session_deadline_shorter_than_the_timeouts_is_a_config_error(tmp_path: Path) -> None:
    from pxeserver import config

    file = tmp_path / "pxeserver.toml"
    file.write_text("[tftp]\nmax_timeout = 20\nsession_deadline = 10\n")
    with pytest.raises(config.ConfigError, match=r"\[tftp\] session_deadline must be at least"):
        config.load(file)


# -- memory ---------------------------------------------------------------------------------

def test_netascii_past_the_cap_is_converted_block_by_block(ctx: Context, tmp_path: Path) -> None:
    ctx.config.tftp.packet_cache_mb = 1  # a 700 KB text takes over half: read and converted per block
    text = b"".join(b"%d\n" % n + b"\r" * (n % 3) + b"\r\n" * (n % 5 == 0) for n in range(100_000))
    (ctx.config.tftp_root / "notes.txt").write_bytes(text)
    time.sleep(RACY_SECONDS + 0.2)  # unchanged for a while: its netascii size may be remembered
    with running(ctx) as service:
        assert tftp_hpa_gets(service.port, "notes.txt", tmp_path, mode="netascii") == text
        for blksize, window in ((9, 8), (1468, 1)):  # boundaries split CR LF and CR NUL pairs
            raw = RawClient(service.port)
            data, oack, _ = raw.download("notes.txt", "netascii", blksize=blksize, windowsize=window, tsize=0)
            raw.close()
            assert data == netascii(text) and oack is not None and oack["tsize"] == str(len(data))
        # Nothing of the file is held, only its netascii size: remembered, not counted per request.
        assert len(service.file_memory) == 1 and service.file_memory.charged == ENTRY_OVERHEAD


def test_netascii_blocks_survive_partial_acknowledgements(tmp_path: Path) -> None:
    """The window goes back to the first unacknowledged block: its start must still be known."""
    text = os.urandom(5000).translate(bytes.maketrans(b"\x00\x01\x02\x03", b"\r\n\r\n"))
    path = tmp_path / "text"
    path.write_bytes(text)
    fd = os.open(path, os.O_RDONLY)
    try:
        blocks = NetasciiStreamed(fd, len(netascii(text)), 9, 4)
        received, acked = b"", 0
        for step in range(10_000):
            window = [blocks.get(block) for block in range(acked + 1, min(acked + 4, blocks.count) + 1)]
            taken = 1 + step % len(window)  # the client saw only the first few of the window
            received += b"".join(packet[4:] for packet in window[:taken])
            acked += taken
            if acked == blocks.count:
                break
        assert received == netascii(text)
    finally:
        os.close(fd)


CAP_MB = 64
SLACK_MB = 16  # the interpreter's own growth: sockets, sessions, allocator pages


def status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, Path]]:
    """``pxeserver serve`` (TFTP only) with a 64 MB file-memory cap, as an operator runs it.

    Retries and deadline are long so that every attacking session stays alive (and holds
    whatever it holds) for the whole test: the worst case for memory.
    """
    port = free_port(socket.SOCK_DGRAM)
    root = tmp_path / "tftproot"
    (root / "images").mkdir(parents=True)
    (tmp_path / "pxeserver.toml").write_text(
        '[server]\naddress = "127.0.0.1"\ntftp_root = "tftproot"\n'
        f'[tftp]\naddress = "127.0.0.1"\nport = {port}\npacket_cache_mb = {CAP_MB}\n'
        'retries = 100\nsession_deadline = 120\n'
        '[http]\nenabled = false\n')
    log = (tmp_path / "serve.log").open("w")  # a file, not a pipe nobody drains
    process = subprocess.Popen([sys.executable, "-m", "pxeserver", "serve"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = process.stdout.readline()  # type: ignore[union-attr]
            if not line or line.startswith("pxeserver: next:"):
                break
        assert process.poll() is None, (tmp_path / "serve.log").read_text()
        yield process, port, root
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def held_open(port: int, name: str, mode: str, blksize: int, source: str) -> socket.socket:
    """Start a transfer and take its first DATA, then go silent: it holds what it was given."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.sendto(request(name, mode, blksize=blksize), ("127.0.0.1", port))
    reply, tid = sock.recvfrom(70000)
    assert reply == b"\x00\x06blksize\x00" + str(blksize).encode() + b"\x00", error_of(reply)
    sock.sendto(ack(0), tid)
    reply, _ = sock.recvfrom(70000)
    assert reply[:4] == b"\x00\x03\x00\x01" and len(reply) == 4 + blksize
    return sock


@pytest.mark.slow
def test_many_block_sizes_and_netascii_stay_within_the_memory_cap(
        server_process: tuple[subprocess.Popen[str], int, Path], tmp_path: Path) -> None:
    process, port, root = server_process
    image = os.urandom(20 << 20)
    text = b"".join(b"line %d of the notes\n" % n + (b"\r" if n % 7 == 0 else b"") for n in range(600_000))
    (root / "images" / "initrd").write_bytes(image)  # 20 MB
    (root / "images" / "notes.txt").write_bytes(text)  # 13 MB, one more byte per LF and CR in netascii
    time.sleep(RACY_SECONDS + 0.2)  # files an admin put there a while ago: shared between transfers
    before = status_mb(process.pid, "VmRSS")
    held = []
    try:
        for index in range(40):  # the attack that took 36 MB to 805 MB: a new blksize each time
            held.append(held_open(port, "images/initrd", "octet", 512 + 97 * index, f"127.6.{index}.1"))
        for index in range(20):
            held.append(held_open(port, "images/notes.txt", "netascii", 512 + 101 * index, f"127.7.{index}.1"))
        attacked = status_mb(process.pid, "VmRSS")
        # Full transfers while all 60 sessions hold their share: byte-identical, in both modes.
        assert curl_gets(port, "images/initrd", "--tftp-blksize", "1468") == image
        assert curl_gets(port, "images/initrd", "--tftp-blksize", "777") == image
        assert tftp_hpa_gets(port, "images/notes.txt", tmp_path, mode="netascii") == text
        raw = RawClient(port, source="127.8.0.1", timeout=10)
        data, _, _ = raw.download("images/notes.txt", "netascii", blksize=1000)
        raw.close()
        assert data == netascii(text)
        after = status_mb(process.pid, "VmRSS")
        peak = status_mb(process.pid, "VmHWM")
    finally:
        close_all(held)
    print(f"RSS before {before:.0f} MB, after the attack {attacked:.0f} MB, after the transfers "
          f"{after:.0f} MB, peak {peak:.0f} MB (cap {CAP_MB} MB)")
    assert peak - before <= CAP_MB + SLACK_MB, (before, attacked, after, peak)
