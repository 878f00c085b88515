"""Bad input over raw sockets: every packet gets FORMERR (or the right error) or is dropped, and
dig is answered right afterwards. TCP connections are bounded in number and in idle time."""

from __future__ import annotations

import logging
import random
import selectors
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from dns_support import DOMAIN, dig
from dnslib import RCODE, DNSRecord

from pxeserver.app import Context
from pxeserver.dns import DnsService, service

QUESTION = b"\x03pxe\x04domu\x07example\x00\x00\x01\x00\x01"


def header(ident: int = 0x1234, flags: int = 0x0000, qd: int = 1, an: int = 0, ns: int = 0,
           ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", ident, flags, qd, an, ns, ar)


@pytest.fixture
def client() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(0.3)
    yield sock
    sock.close()


def ask(sock: socket.socket, port: int, packet: bytes) -> bytes | None:
    sock.sendto(packet, ("127.0.0.1", port))
    try:
        return sock.recv(65535)
    except TimeoutError:
        return None


def rcode_of(reply: bytes | None) -> int | None:
    return None if reply is None else reply[3] & 0x0F


def still_answers(port: int) -> None:
    assert dig(port, f"pxe.{DOMAIN}").values() == ["127.0.0.1"]


@pytest.mark.parametrize("packet", [
    b"",
    b"\x12",
    header()[:11],
    header(flags=0x8000) + QUESTION,  # a response (QR=1): answering it could start a loop
    header(flags=0x8400, qd=0),
], ids=["empty", "one-byte", "short-header", "qr-set", "qr-set-no-question"])
def test_packets_without_a_query_are_dropped(dns: DnsService, client: socket.socket,
                                             packet: bytes) -> None:
    assert ask(client, dns.port, packet) is None
    still_answers(dns.port)


@pytest.mark.parametrize("packet,rcode", [
    (header() + b"\xc0\x0c\x00\x01\x00\x01", RCODE.FORMERR),  # name pointing at itself
    (header() + b"\x01a\xc0\x0e\x00\x01\x00\x01", RCODE.FORMERR),  # pointer forward into itself
    (header(qd=2) + b"\x01a\xc0\x14\x00\x01\x00\x01\x01b\xc0\x0c\x00\x01\x00\x01",
     RCODE.FORMERR),  # two names pointing at each other
    (header(qd=100) + QUESTION * 100, RCODE.FORMERR),
    (header(qd=0), RCODE.FORMERR),
    (header() + QUESTION[:9], RCODE.FORMERR),  # the name is cut off
    (header() + QUESTION[:-2], RCODE.FORMERR),  # the class is cut off
    (header() + b"\x40" + b"a" * 64 + QUESTION[-5:], RCODE.FORMERR),  # label longer than 63
    (header(ar=1) + QUESTION + b"\x00\x00\x29", RCODE.FORMERR),  # OPT record cut off
    (header(ar=2) + QUESTION + b"\x00\x00\x29\x04\xd0" + bytes(6) + b"\x00\x00\x29\x04\xd0"
     + bytes(6), RCODE.FORMERR),  # two OPT records
    (header(flags=0x2800) + QUESTION, RCODE.NOTIMP),  # opcode UPDATE
    (header(flags=0x1000) + QUESTION, RCODE.NOTIMP),  # opcode STATUS
], ids=["pointer-loop", "forward-pointer", "mutual-pointers", "100-questions", "no-question",
        "cut-name", "cut-class", "long-label", "cut-opt", "two-opts", "update", "status"])
def test_malformed_queries_get_an_error_with_their_id(dns: DnsService, client: socket.socket,
                                                      packet: bytes, rcode: int) -> None:
    reply = ask(client, dns.port, packet)
    assert reply is not None and reply[:2] == packet[:2] and reply[2] & 0x80
    assert rcode_of(reply) == rcode
    still_answers(dns.port)


def test_stray_header_bits_of_a_query_are_not_echoed(dns: DnsService,
                                                     client: socket.socket) -> None:
    """TC, AA, RA, AD and an RCODE in a query are nonsense; the reply must not repeat them."""
    reply = ask(client, dns.port, header(flags=0x07BF) + QUESTION)  # RD and CD are kept
    assert reply is not None
    flags = int.from_bytes(reply[2:4], "big")
    assert flags == 0x8000 | 0x0400 | 0x0100 | 0x0010  # QR, AA (ours), RD, CD; NOERROR
    assert DNSRecord.parse(reply).rr[0].rdata.toZone() == "127.0.0.1"


def test_query_with_other_additional_records_is_answered(dns: DnsService,
                                                        client: socket.socket) -> None:
    """Not the common shape (dnslib reads it), but a fine query: answered, spelling kept."""
    extra = b"\x00\x00\x01\x00\x01\x00\x00\x00\x00\x00\x04\x7f\x00\x00\x01"  # an A at the root
    spelled = b"\x03PXE\x04domu\x07example\x00\x00\x01\x00\x01"
    reply = ask(client, dns.port, header(ar=1) + spelled + extra)
    assert reply is not None and rcode_of(reply) == RCODE.NOERROR
    parsed = DNSRecord.parse(reply)
    assert str(parsed.q.qname) == "PXE.domu.example." and str(parsed.rr[0].rdata) == "127.0.0.1"


def pointer_chain_query(pointers: int) -> bytes:
    """A query whose second additional record is named by the end of a chain of compression
    pointers, each pointing at the one before, hidden in the first record's data."""
    start = 12 + len(QUESTION) + 11  # where the first record's data begins
    chain = b"\x00" + b"".join((0xC000 | (start if k == 0 else start + 2 * k - 1)).to_bytes(2, "big")
                               for k in range(pointers))
    opaque = b"\x00" + struct.pack("!HHIH", 10, 1, 0, len(chain)) + chain  # type NULL
    named = (0xC000 | (start + 2 * pointers - 1)).to_bytes(2, "big") + struct.pack("!HHIH", 1, 1, 0, 0)
    return header(ar=2) + QUESTION + opaque + named


def test_compression_pointer_chains_are_cheap_to_refuse(dns: DnsService,
                                                        client: socket.socket) -> None:
    """dnslib alone recurses once per pointer: ~3 ms of CPU for one such 4 KB datagram."""
    packet = pointer_chain_query(1900)
    assert len(packet) < 4096
    assert rcode_of(ask(client, dns.port, packet)) == RCODE.FORMERR
    started = time.monotonic()
    for _ in range(1500):  # what the socket buffer holds: over 3 s of work for dnslib's parser
        client.sendto(packet, ("127.0.0.1", dns.port))
    result = dig(dns.port, "+time=4", f"pxe.{DOMAIN}")
    assert result.values() == ["127.0.0.1"] and time.monotonic() - started < 2.0


@pytest.mark.slow
def test_thousands_of_mangled_packets_never_stop_the_server(
        dns: DnsService, client: socket.socket, caplog: pytest.LogCaptureFixture) -> None:
    """Bit flips, cuts and random bytes; every reply must still be a well-formed response."""
    rng = random.Random(6)
    valid = bytes(DNSRecord.question(f"web1.{DOMAIN}").pack())
    client.settimeout(0.05)
    replies = 0
    for number in range(3000):
        packet = bytearray(valid)
        if number % 3 == 0:
            packet = bytearray(rng.randbytes(rng.randrange(0, 600)))
        else:
            for _ in range(rng.randrange(1, 6)):
                packet[rng.randrange(len(packet))] = rng.randrange(256)
            packet = packet[:rng.randrange(len(packet) + 1)] if number % 3 == 1 else packet
        client.sendto(bytes(packet), ("127.0.0.1", dns.port))
        if number % 50 == 0:  # read what came back so far; the rest is in the socket buffer
            try:
                while True:
                    reply = client.recv(65535)
                    replies += 1
                    assert len(reply) >= 12 and reply[2] & 0x80
            except TimeoutError:
                pass
    assert replies > 0
    still_answers(dns.port)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no query hit a bug


def test_tcp_garbage_gets_formerr_and_the_connection_goes_on(dns: DnsService) -> None:
    with socket.create_connection(("127.0.0.1", dns.port), timeout=2) as sock:
        for message in (header() + b"\xc0\x0c\x00\x01\x00\x01",
                        bytes(DNSRecord.question(f"pxe.{DOMAIN}").pack())):
            sock.sendall(len(message).to_bytes(2, "big") + message)
        first = sock.recv(2)
        first_reply = sock.recv(int.from_bytes(first, "big"))
        assert rcode_of(first_reply) == RCODE.FORMERR
        length = int.from_bytes(sock.recv(2), "big")
        second = DNSRecord.parse(sock.recv(length))
        assert [str(rr.rdata) for rr in second.rr] == ["127.0.0.1"]


@pytest.mark.parametrize("message", [b"", header(flags=0x8000) + QUESTION], ids=["empty", "qr-set"])
def test_tcp_message_that_is_no_query_ends_the_connection(dns: DnsService, message: bytes) -> None:
    with socket.create_connection(("127.0.0.1", dns.port), timeout=2) as sock:
        sock.sendall(len(message).to_bytes(2, "big") + message)
        assert closed_by_server(sock, within=2.0)
    still_answers(dns.port)


@pytest.fixture
def small_tcp_limits(monkeypatch: pytest.MonkeyPatch, ctx: Context) -> Iterator[DnsService]:
    monkeypatch.setattr(service, "MAX_TCP_CONNECTIONS", 4)
    monkeypatch.setattr(service, "TCP_IDLE_TIMEOUT", 1.0)
    ctx.config.dns.domain = DOMAIN
    dns_service = service.DnsService(ctx)
    dns_service.start()
    yield dns_service
    dns_service.stop()


def closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:  # closed while our unread bytes were in flight
        return True


def test_idle_and_excess_tcp_connections_are_closed(small_tcp_limits: DnsService) -> None:
    port = small_tcp_limits.port
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    slow = socket.create_connection(("127.0.0.1", port))
    excess = socket.create_connection(("127.0.0.1", port))
    try:
        assert closed_by_server(excess, within=0.5)  # all four places are taken
        started = time.monotonic()
        closed = False
        while not closed and time.monotonic() - started < 4.0:
            try:
                slow.sendall(b"\x00")  # a byte at a time never completes a query
            except OSError:
                break
            closed = closed_by_server(slow, within=0.2)
        assert time.monotonic() - started < 4.0  # the trickle did not keep it open
        assert all(closed_by_server(sock, within=2.0) for sock in idle)
        assert dig(port, "+tcp", f"pxe.{DOMAIN}").values() == ["127.0.0.1"]
    finally:
        for sock in (*idle, slow, excess):
            sock.close()


def test_udp_loop_keeps_answering_while_tcp_clients_stall(small_tcp_limits: DnsService) -> None:
    port = small_tcp_limits.port
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    try:
        for sock in stalled:
            sock.sendall(b"\x01\x00" + b"x" * 10)  # promises 256 bytes, sends 10
        still_answers(port)
    finally:
        for sock in stalled:
            sock.close()


def close_times(socks: list[socket.socket], within: float) -> dict[socket.socket, float]:
    """When the server closed each socket it closed within ``within`` seconds from now."""
    closed: dict[socket.socket, float] = {}
    deadline = time.monotonic() + within
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        while len(closed) < len(socks) and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(timeout=left):
                sock = key.fileobj
                try:
                    data = sock.recv(1)
                except ConnectionResetError:
                    data = b""
                if data == b"":
                    closed[sock] = time.monotonic()
                    selector.unregister(sock)
    return closed


@pytest.mark.slow
def test_slow_tcp_clients_cannot_lock_out_others(dns: DnsService) -> None:
    """200 clients on four addresses each send one byte of a length prefix and stall: each
    address keeps only its share of places, dig over TCP from another address is answered at
    once, and the stalled places are freed by the query deadline."""
    port = dns.port
    stalled: dict[socket.socket, float] = {}  # when each sent its one byte
    try:
        for number in range(200):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            stalled[sock] = time.monotonic()
            sock.bind((f"127.0.0.{2 + number % 4}", 0))
            sock.settimeout(3)
            sock.connect(("127.0.0.1", port))
            try:
                sock.sendall(b"\x00")
            except OSError:  # already refused: its address has all its places
                pass
        closed = close_times(list(stalled), within=0.5)  # those refused at once
        started = time.monotonic()
        assert dig(port, "+tcp", f"pxe.{DOMAIN}").values() == ["127.0.0.1"]
        assert time.monotonic() - started < 1.0
        held = [sock for sock in stalled if sock not in closed]
        closed.update(close_times(held, within=service.TCP_QUERY_TIMEOUT + 3.0))
        assert len(closed) == len(stalled)  # nothing stays open
        waited = sorted(closed[sock] - sent for sock, sent in stalled.items())
        # Refused beyond the per-address cap; the others held, then closed by the deadline
        # (which cannot come sooner than TCP_QUERY_TIMEOUT after the byte was sent; the
        # selector looks at deadlines once a second).
        turned_away = [t for t in waited if t < service.TCP_QUERY_TIMEOUT]
        assert len(turned_away) == 200 - 4 * service.MAX_TCP_PER_CLIENT
        assert waited[-1] < service.TCP_QUERY_TIMEOUT + 2.0
        assert dig(port, "+tcp", f"pxe.{DOMAIN}").values() == ["127.0.0.1"]
    finally:
        for sock in stalled:
            sock.close()


def test_a_serving_loop_that_dies_says_why_and_keeps_the_error(
        dns: DnsService, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    supervisor = dns._context.supervisor
    assert supervisor.wait(timeout=0.5) is None

    def broken(_connections: object) -> None:  # a bug in the TCP loop's own bookkeeping
        raise RuntimeError("bookkeeping bug")

    monkeypatch.setattr(dns, "_expire", broken)
    failure = supervisor.wait(timeout=5)  # the TCP loop looks at its deadlines every second
    assert failure is not None and failure.service == "dns" and isinstance(failure.error, RuntimeError)
    assert "dns failed: RuntimeError: bookkeeping bug" in caplog.text
    still_answers(dns.port)  # UDP is another thread; a supervisor decides what happens next
