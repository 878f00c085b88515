"""Test and benchmark helpers for the TFTP service: a raw client and a many-clients load driver.

The real clients (tftp-hpa, curl, tftpy) are what the tests trust for "a user gets the file";
this module adds what they cannot do: send broken packets, watch every DATA and OACK on the
wire, and simulate thousands of clients from one process with epoll (each from its own
127.x.y.z address, as distinct PXE clients would be). bench/tftp.py drives its load with it.
"""

from __future__ import annotations

import selectors
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import pytest
from conftest import started

from pxeserver.app import Context
from pxeserver.tftp import TftpService

HEADER = struct.Struct("!HH")
RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6


def running(context: Context) -> AbstractContextManager[TftpService]:
    return started(TftpService(context))


@pytest.fixture
def client(service: TftpService) -> Iterator[RawClient]:
    """A raw client of the module's ``service`` fixture (a plugin of conftest.py)."""
    raw = RawClient(service.port)
    yield raw
    raw.close()


def request(name: str | bytes, mode: str = "octet", opcode: int = RRQ, **options: object) -> bytes:
    raw = name if isinstance(name, bytes) else name.encode()
    packet = HEADER.pack(opcode, 0)[:2] + raw + b"\0" + mode.encode() + b"\0"
    for key, value in options.items():
        packet += key.encode() + b"\0" + str(value).encode() + b"\0"
    return packet


def ack(block: int) -> bytes:
    return HEADER.pack(ACK, block & 0xFFFF)


def parse_oack(packet: bytes) -> dict[str, str]:
    fields = packet[2:].split(b"\0")[:-1]
    return {fields[i].decode(): fields[i + 1].decode() for i in range(0, len(fields), 2)}


def error_of(packet: bytes) -> tuple[int, str] | None:
    if packet[:2] != b"\0\5":
        return None
    return HEADER.unpack_from(packet)[1], packet[4:].rstrip(b"\0").decode(errors="replace")


class RawClient:
    """One client socket on loopback, for packet-level checks."""

    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = 3.0) -> None:
        self.server = ("127.0.0.1", port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((source, 0))
        self.sock.settimeout(timeout)

    def send(self, packet: bytes, to: tuple[str, int] | None = None) -> None:
        self.sock.sendto(packet, to or self.server)

    def recv(self) -> tuple[bytes, tuple[str, int]]:
        return self.sock.recvfrom(70000)

    def silent_for(self, seconds: float) -> bool:
        """True when nothing arrives for this long."""
        self.sock.settimeout(seconds)
        try:
            self.sock.recvfrom(70000)
            return False
        except TimeoutError:
            return True

    def ask(self, packet: bytes) -> tuple[bytes, tuple[str, int]]:
        self.send(packet)
        return self.recv()

    def download(self, name: str, mode: str = "octet",
                 **options: object) -> tuple[bytes, dict[str, str] | None, list[int]]:
        """Fetch in lockstep (or by windows); returns data, the OACK (if any), wire block numbers."""
        reply, tid = self.ask(request(name, mode, **options))
        oack = None
        blksize, window = 512, 1
        if reply[:2] == b"\0\6":
            oack = parse_oack(reply)
            blksize = int(oack.get("blksize", 512))
            window = int(oack.get("windowsize", 1))
            self.send(ack(0), tid)
            reply, tid = self.recv()
        data, blocks, expected = bytearray(), [], 1
        while True:
            if error_of(reply):
                raise AssertionError(f"server error {error_of(reply)}")
            block = HEADER.unpack_from(reply)[1]
            if block == expected & 0xFFFF:
                blocks.append(block)
                data += reply[4:]
                expected += 1
                last = len(reply) - 4 < blksize
                if last or (expected - 1) % window == 0:
                    self.send(ack(block), tid)
                if last:
                    return bytes(data), oack, blocks
            reply, tid = self.recv()

    def close(self) -> None:
        self.sock.close()


@dataclass
class Job:
    name: str
    options: dict[str, str] = field(default_factory=dict)
    source: str = "127.0.0.1"


@dataclass
class Outcome:
    job: Job
    ok: bool = False
    size: int = 0
    data: bytearray | None = None
    error: str = ""
    seconds: float = 0.0


class _Client:
    __slots__ = ("outcome", "sock", "tid", "blksize", "window", "expected", "since_ack",
                 "last_packet", "started", "request", "last_sent", "locked", "done")

    def __init__(self, job: Job, server: tuple[str, int], keep: bool) -> None:
        self.outcome = Outcome(job, data=bytearray() if keep else None)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((job.source, 0))
        self.sock.setblocking(False)
        self.tid = server
        self.blksize, self.window, self.expected, self.since_ack = 512, 1, 1, 0
        self.request = request(job.name, **job.options)
        self.last_sent = self.request
        self.started = self.last_packet = 0.0
        self.locked = False  # the server's TID is known (from its first answer)
        self.done = False


def drive(port: int, jobs: list[Job], keep: bool = False, deadline: float = 60.0,
          host: str = "127.0.0.1", retry_after: float = 2.0) -> list[Outcome]:
    """Run every job concurrently from one process; each Outcome says how its transfer went.

    The simulated clients behave like tftp-hpa's: lockstep ACKs, or with windowsize one ACK
    per full window and on the last block; a gap re-ACKs the last block in order; silence
    for ``retry_after`` resends the last packet (at most until ``deadline``).
    """
    server = (host, port)
    selector = selectors.DefaultSelector()
    clients = [_Client(job, server, keep) for job in jobs]
    start = time.monotonic()
    for client in clients:
        selector.register(client.sock, selectors.EVENT_READ, client)
        client.started = client.last_packet = time.monotonic()
        client.sock.sendto(client.request, server)
    pending = len(clients)
    next_check = start + 0.25
    while pending and time.monotonic() - start < deadline:
        for key, _ in selector.select(0.25):  # one read per event: epoll reports it again
            client = key.data
            try:
                packet, sender = client.sock.recvfrom(70000)
            except BlockingIOError:
                continue
            if _on_packet(client, packet, sender):
                client.done = True
                pending -= 1
                selector.unregister(client.sock)
                client.sock.close()
        now = time.monotonic()
        if now >= next_check:
            next_check = now + 0.25
            for client in clients:
                if not client.done and now - client.last_packet > retry_after:
                    client.last_packet = now
                    client.sock.sendto(client.last_sent, client.tid)
    for client in clients:
        if not client.done:
            client.outcome.error = client.outcome.error or "timed out"
            client.sock.close()
    selector.close()
    return [client.outcome for client in clients]


def _on_packet(client: _Client, packet: bytes, sender: tuple[str, int]) -> bool:
    """Handle one packet; True when the transfer is over (done or failed)."""
    outcome = client.outcome
    client.last_packet = now = time.monotonic()
    if not client.locked:
        client.tid, client.locked = sender, True
    elif sender != client.tid:
        return False
    opcode = packet[1] if len(packet) >= 2 else 0
    if opcode == ERROR:
        outcome.error = f"ERROR {error_of(packet)}"
        outcome.seconds = now - client.started
        return True
    if opcode == OACK:
        options = parse_oack(packet)
        client.blksize = int(options.get("blksize", 512))
        client.window = int(options.get("windowsize", 1))
        client.last_sent = ack(0)
        client.sock.sendto(client.last_sent, sender)
        return False
    if opcode != DATA or len(packet) < 4:
        return False
    block = (packet[2] << 8) | packet[3]
    if block != client.expected & 0xFFFF:
        if client.window > 1 and client.since_ack:  # a gap: say where we are
            client.last_sent = ack(client.expected - 1)
            client.sock.sendto(client.last_sent, sender)
            client.since_ack = 0
        return False
    payload = len(packet) - 4
    outcome.size += payload
    if outcome.data is not None:
        outcome.data += packet[4:]
    client.expected += 1
    client.since_ack += 1
    last = payload < client.blksize
    if last or client.since_ack >= client.window:
        client.last_sent = ack(block)
        client.sock.sendto(client.last_sent, sender)
        client.since_ack = 0
    if last:
        outcome.ok = True
        outcome.seconds = now - client.started
    return last


def sources(count: int) -> list[str]:
    """Distinct loopback addresses, one per simulated client (127.1.0.1, 127.1.0.2, ...)."""
    return [f"127.1.{index // 250}.{index % 250 + 1}" for index in range(count)]
