"""TFTP downloads for pypxeboot that trust only the server they asked, within bounds.

A small client loop over tftpy's packet classes rather than tftpy's ``TftpClient``: tftpy
0.8.7's client context (``TftpContext.cycle``) logs "Discarding" for a packet from another
address or port and then hands it to the transfer state anyway, so anyone on the guest network
can inject DATA; it also parses a packet before looking at where it came from (one malformed
injected packet ends the transfer), its timeout restarts on any packet at all, and it has no
place for a size cap, a speed floor or a deadline. A subclass would have to replace ``cycle``
and the client states, which is the whole client; this loop is that client with the checks in
it. The wire format stays tftpy's (``TftpPacketFactory``, ``TftpPacketRRQ``/``ACK``/``ERR``).

Trust: the first answer from the server's address fixes the transfer's port (RFC 1350's TID);
after that only packets from that address and port count, others are dropped unread.
"""

from __future__ import annotations

import re
import socket
import struct
import time
from dataclasses import dataclass
from typing import BinaryIO

from tftpy.TftpPacketFactory import TftpPacketFactory
from tftpy.TftpPacketTypes import TftpPacketACK, TftpPacketDAT, TftpPacketERR, TftpPacketOACK, TftpPacketRRQ
from tftpy.TftpShared import TftpException

BLKSIZE = 1468  # fits an Ethernet frame; 512-byte lockstep is 3x slower
MIN_BLKSIZE = 8  # RFC 2348
PACKET_TIMEOUT, RETRIES = 5.0, 3  # silence before resending, resends before giving up
_ERR_OPTIONS, _ERR_TOO_BIG = 8, 3  # TFTP error codes sent back when we stop a transfer
_DIGITS = re.compile(r"[0-9]{1,12}")


class TransferFailed(Exception):
    """The transfer stopped; the message is pypxeboot's one error line."""


class ServerRefused(TransferFailed):
    """The server answered with an error packet (usually: no such file)."""


class NoAnswer(TransferFailed):
    """Nothing came back from the server at all."""


class BoundExceeded(TransferFailed):
    """Too big, too slow or too late: the transfer was stopped on our side."""


@dataclass
class Bounds:
    """What one boot may spend: bytes per file and in all, a speed floor, a deadline."""

    max_file: int  # bytes
    max_total: int  # bytes, the kernel and the ramdisk together
    min_rate: int  # bytes per second, averaged over each rate_window
    rate_window: float  # seconds
    deadline: float  # time.monotonic() value
    written: int = 0  # bytes of kernel and ramdisk so far


def download(server: str, port: int, path: str, output: BinaryIO, limit: int, too_big: str,
             bounds: Bounds) -> int:
    """Fetch ``path`` into ``output``; returns its size. Raises TransferFailed (a subclass)
    with a one-line message; past ``limit`` bytes, the message is ``too_big``."""
    url = f"tftp://{server}/{path}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        transfer = _Transfer(sock, server, url, limit, too_big, bounds)
        rrq = TftpPacketRRQ()
        rrq.filename, rrq.mode, rrq.options = path, "octet", {"blksize": str(BLKSIZE), "tsize": "0"}
        transfer.send(rrq.encode().buffer, (server, port))
        return transfer.run(output)


class _Transfer:
    def __init__(self, sock: socket.socket, server: str, url: str, limit: int, too_big: str,
                 bounds: Bounds) -> None:
        self.sock, self.server, self.url = sock, server, url
        self.limit, self.too_big, self.bounds = limit, too_big, bounds
        self.peer: tuple[str, int] | None = None  # the server's address and transfer port
        self.last_sent = b""
        self.last_destination: tuple[str, int] = (server, 0)
        self.sent_at = 0.0
        self.resends = 0
        self.factory = TftpPacketFactory()

    def send(self, packet: bytes, destination: tuple[str, int]) -> None:
        self.sock.sendto(packet, destination)
        self.last_sent, self.last_destination, self.sent_at = packet, destination, time.monotonic()

    def ack(self, block: int) -> None:
        packet = TftpPacketACK()
        packet.blocknumber = block
        assert self.peer is not None
        self.send(packet.encode().buffer, self.peer)
        self.resends = 0

    def stop(self, code: int, error: TransferFailed) -> TransferFailed:
        """Tell the server we stopped (so it frees its session), and say why."""
        if self.peer is not None:
            packet = TftpPacketERR()
            packet.errorcode = code
            self.sock.sendto(packet.encode().buffer, self.peer)
        return error

    def run(self, output: BinaryIO) -> int:
        blksize, expected, received, tsize, negotiated = 512, 1, 0, -1, False
        window_start, window_bytes = time.monotonic(), 0
        while True:
            now = time.monotonic()
            if now >= self.bounds.deadline:
                raise self.stop(_ERR_TOO_BIG, BoundExceeded(
                    f"{self.url}: the boot's deadline passed (deadline=)"))
            if now - window_start >= self.bounds.rate_window:
                if received - window_bytes < self.bounds.min_rate * (now - window_start):
                    raise self.stop(_ERR_TOO_BIG, BoundExceeded(
                        f"{self.url}: slower than {self.bounds.min_rate // 1024} KiB/s over "
                        f"{self.bounds.rate_window:g} s (min_rate_kbs=, rate_window=)"))
                window_start, window_bytes = now, received
            if now - self.sent_at >= PACKET_TIMEOUT:
                if self.resends >= RETRIES:
                    raise NoAnswer(f"{self.url}: no answer from the TFTP server")
                self.resends += 1
                self.send(self.last_sent, self.last_destination)
            wait = min(self.sent_at + PACKET_TIMEOUT, self.bounds.deadline,
                       window_start + self.bounds.rate_window) - now
            self.sock.settimeout(max(wait, 0.001))
            try:
                data, source = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            if source[0] != self.server or (self.peer is not None and source != self.peer):
                continue  # not the server we asked, or not this transfer's port: unread
            try:
                packet = self.factory.parse(data)
            except (TftpException, struct.error, UnicodeDecodeError, ValueError):
                continue  # garbage (maybe forged): not worth ending the transfer for
            if self.peer is None:
                if not isinstance(packet, (TftpPacketOACK, TftpPacketDAT, TftpPacketERR)):
                    continue
                self.peer = source
            if isinstance(packet, TftpPacketERR):
                message = (packet.errmsg or packet.errmsgs.get(packet.errorcode, b"error")).decode("ascii", "replace")
                raise ServerRefused(f"{self.url}: the server answered: {message[:200]}")
            if isinstance(packet, TftpPacketOACK):
                if expected != 1 or received:
                    continue  # a late duplicate
                if not negotiated:
                    blksize, tsize = self.accept_options(packet.options)
                    negotiated = True
                self.ack(0)  # again, if it was our ACK that got lost
            elif isinstance(packet, TftpPacketDAT):
                if packet.blocknumber == (expected - 1) & 0xFFFF and (received or expected != 1):
                    self.ack(packet.blocknumber)  # our ACK was lost: say it again
                    continue
                if packet.blocknumber != expected or len(packet.data) > blksize:
                    continue
                received += len(packet.data)
                if received > self.limit:
                    raise self.stop(_ERR_TOO_BIG, BoundExceeded(self.too_big))
                if 0 <= tsize < received:
                    raise self.stop(_ERR_TOO_BIG, BoundExceeded(
                        f"{self.url}: the server sent more than the {tsize} bytes it announced"))
                output.write(packet.data)
                self.ack(packet.blocknumber)
                if len(packet.data) < blksize:
                    return received
                expected = (expected + 1) & 0xFFFF  # rolls over to 0, as common servers expect

    def accept_options(self, options: dict[str, str]) -> tuple[int, int]:
        """The blksize and tsize (-1: none) the server acknowledged, checked."""
        values = {"blksize": "512", **{name.lower(): value for name, value in options.items()}}
        if set(values) - {"blksize", "tsize"} or not all(_DIGITS.fullmatch(v) for v in values.values()) \
                or not MIN_BLKSIZE <= int(values["blksize"]) <= BLKSIZE:
            raise self.stop(_ERR_OPTIONS, TransferFailed(
                f"{self.url}: the server's option acknowledgement is not what we asked: {options!r}"[:300]))
        blksize, tsize = int(values["blksize"]), int(values.get("tsize", "-1"))
        if tsize > self.limit:
            raise self.stop(_ERR_TOO_BIG, BoundExceeded(self.too_big))
        return blksize, tsize
