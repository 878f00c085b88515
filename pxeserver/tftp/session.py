"""One read transfer: its own port (the server's TID), the agreed options, retry state, stats.

Like fbtftp, each transfer is an explicit object the event loop drives with "a packet came"
and "your deadline passed", so every transfer's progress, retries and counters are visible
and a misbehaving client can only ever affect its own session.

Block numbers are kept absolute (1, 2, ... past 65535) and put on the wire modulo 65536, so
they roll over to 0 as every common client expects (pypxeboot's tftpy, pxelinux, iPXE).
The server retransmits only when its deadline passes, never because of a duplicate ACK: that
is the Sorcerer's Apprentice bug of RFC 1350, which doubles the traffic on every delay.
It gives up after ``retries`` resends, or once the client has acknowledged nothing new for
``patience`` seconds (``[tftp] session_deadline``), whichever comes first: a request from a
spoofed address is never acknowledged, and must not hold its session for retries x timeout.

DATA goes out with ``os.write`` on the connected socket's descriptor, and the server reads
ACKs with ``os.read``: the same datagram syscalls as ``send``/``recv``, without the socket
methods' tuple argument parsing and timeout bookkeeping, which is a measurable share of the
CPU per block when all else is a list lookup (see cache.py).

Lockstep transfers from the packet cache (nearly all of them: PXE ROMs, pxelinux, tftpy)
have a fast path, inlined in the event loop (server.py): while a block that is not the last
is in flight, ``awaited`` holds the exact bytes of its ACK, so the loop recognises the common
packet with one bytes comparison (no unpacking, no block arithmetic, no call) and sends the
next cached packet from ``built``. Anything else (a duplicate or stale ACK, an ERROR, the
last block's ACK, a window, a packet not cached) takes :meth:`Session.on_packet`. The count
of packets sent is derived when it is read (``sent`` plus ``stats.repeats``), so the fast
path does not count. Under 300 concurrent transfers all this took the server's user-space
instructions per block from about 10,400 to 5,400 (bench/tftp.py case (b), under callgrind).

The transfer's port has two sockets (both SO_REUSEADDR): one connected to the client, which
the kernel gives every packet from the client's address and port, and one unconnected, which
gets only packets from anyone else (a connected socket matches more specifically). The
connected one needs no address on send or receive and no route lookup per packet, about a
fifth less CPU per block on loopback; the other one lets a wrong TID still get its ERROR 5.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

from pxeserver.tftp.cache import Packets
from pxeserver.tftp.files import Source
from pxeserver.tftp.packets import ACK, ERROR, HEADER, ErrorCode, Negotiated, encode_error, encode_oack

# Every ACK packet, by wire block number: what ``Session.awaited`` is compared with (2.6 MB,
# made once, instead of packing a new 4-byte object per block sent).
ACK_PACKETS = tuple(HEADER.pack(ACK, block) for block in range(1 << 16))


@dataclass(slots=True)
class Stats:
    """What one transfer cost; logged when it ends, so slow or lossy clients stand out."""

    started: float
    finished: float = 0.0
    repeats: int = 0  # packets sent beyond each block's first send: OACKs, resends, ERRORs
    retransmits: int = 0
    timeouts: int = 0
    wrong_tid: int = 0


class Session:
    __slots__ = ("sock", "fd", "strangers", "peer", "source", "blksize", "windowsize", "patience", "timeout",
                 "max_retries", "oack", "packet", "built", "total_blocks", "acked", "sent", "awaited", "retries",
                 "deadline", "progressed", "done", "completed", "stats")

    def __init__(self, sock: socket.socket, strangers: socket.socket, peer: tuple[str, int],
                 source: Source, options: Negotiated, timeout: float, retries: int, patience: float) -> None:
        self.sock = sock  # connected to the client
        self.fd = sock.fileno()  # for os.read/os.write on the hot path
        self.strangers = strangers  # the same port, for packets from other addresses
        self.peer = peer
        self.source = source
        self.blksize = options.blksize
        self.windowsize = options.windowsize
        self.patience = patience  # seconds without an acknowledged block before giving up
        self.timeout = min(float(options.timeout or timeout), patience)
        self.max_retries = retries
        self.oack = encode_oack(options.oack) if options.oack else b""
        packets = source.packets(self.blksize, self.windowsize)
        self.packet = packets.get  # the DATA packet of an absolute block number
        # Cached packets, for the lockstep fast path; None: no fast path (windows, uncached files)
        self.built = packets.built if isinstance(packets, Packets) and self.windowsize == 1 else None
        self.total_blocks = packets.count  # the last block is short, maybe empty
        self.acked = 0  # highest block the client confirmed (absolute)
        self.sent = 0  # highest block sent so far (absolute)
        self.awaited: bytes | None = None  # the ACK that moves the fast path on (see above)
        self.retries = 0
        self.deadline = 0.0
        self.progressed = 0.0  # when the client last acknowledged something new (or asked)
        self.done = False
        self.completed = False  # the client acknowledged the last block
        self.stats = Stats(started=time.monotonic())

    @property
    def packets_sent(self) -> int:
        """Every packet this transfer sent: each block once, and what was repeated or extra."""
        return self.sent + self.stats.repeats

    def begin(self, now: float) -> None:
        """Send the OACK (then wait for ACK 0) or, without options, the first window."""
        self.progressed = now
        if self.oack:
            self._send(self.oack)
            self.deadline = now + self.timeout
        else:
            self._send_window(now)

    def on_stranger(self, packet: bytes, sender: tuple[str, int]) -> None:
        """RFC 1350: a packet from a wrong TID gets ERROR 5; the transfer goes on undisturbed."""
        self.stats.wrong_tid += 1
        try:
            self.strangers.sendto(encode_error(ErrorCode.UNKNOWN_TID), sender)
        except OSError:
            pass

    def on_packet(self, packet: bytes, now: float) -> None:
        """A packet from the client (the connected socket receives nothing else)."""
        if len(packet) < 4:
            return  # truncated: ignored, the deadline retransmits if it mattered
        opcode, block = HEADER.unpack_from(packet)
        if opcode == ACK and self.sent:
            # Map the 16-bit number onto the blocks in flight; anything else is a duplicate or
            # stale ACK and is ignored (no retransmission on duplicates).
            advance = (block - self.acked) & 0xFFFF
            if advance == 0 or advance > self.sent - self.acked:
                return
            self.acked += advance
            self.retries = 0
            self.progressed = now
            if self.acked == self.total_blocks:
                self.completed = True
                self._finish(now)
            else:
                # A full window acknowledged sends the next one; a partial ACK (RFC 7440: the
                # client saw a gap) resends from the block after the last one it has in order.
                self._send_window(now)
        elif opcode == ACK:  # the OACK is out; only ACK 0 moves on
            if block == 0:
                self.retries = 0
                self.progressed = now
                self._send_window(now)
        elif opcode == ERROR:
            # The client gave up, or (ERROR 8 after an OACK) only wanted the tsize.
            self._finish(now)
        else:
            self._send(encode_error(ErrorCode.ILLEGAL_OPERATION, "expected an ACK"))
            self._finish(now)

    def on_timeout(self, now: float) -> None:
        """Resend what is unacknowledged, or give up: after the retries, or once the client
        has been silent for ``patience`` seconds, however many retries that leaves unused."""
        self.stats.timeouts += 1
        give_up_at = self.progressed + self.patience
        if self.retries >= self.max_retries or now >= give_up_at:
            self._finish(now)
            return
        self.retries += 1
        if self.sent == 0:
            self.stats.retransmits += 1
            self._send(self.oack)
        else:
            self.stats.retransmits += min(self.sent, self.total_blocks) - self.acked
            self._send_window(now)
        self.deadline = min(now + self.timeout, give_up_at)

    def _send_window(self, now: float) -> None:
        """Send blocks acked+1 .. acked+windowsize (fewer at the end of the file)."""
        first = self.acked + 1
        last = first + self.windowsize - 1
        if last > self.total_blocks:
            last = self.total_blocks
        try:
            if first == last:  # lockstep, the common case: one send, no loop
                os.write(self.fd, self.packet(first))
            else:
                write, fd, packet = os.write, self.fd, self.packet
                for block in range(first, last + 1):
                    write(fd, packet(block))
        except OSError:
            pass  # a full socket buffer (or a failed read) loses the rest; the deadline resends it
        self.stats.repeats += min(last, self.sent) - self.acked  # blocks sent before, sent again
        if last > self.sent:
            self.sent = last
        self.deadline = now + self.timeout
        if self.built is not None:  # lockstep from the cache: its next ACK takes the fast path
            self.awaited = ACK_PACKETS[last & 0xFFFF] if last < self.total_blocks else None

    def _send(self, packet: bytes) -> None:
        try:
            self.sock.send(packet)
        except OSError:
            pass  # UDP: the deadline covers a lost packet
        self.stats.repeats += 1

    def _finish(self, now: float) -> None:
        self.done = True
        self.stats.finished = now
