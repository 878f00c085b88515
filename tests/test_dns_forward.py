"""Forwarding names outside the zone to an upstream, and truncation, against dig.

The upstream is a second DNS server this test starts on loopback: dnslib's DNSServer with a
fixed set of records, its UDP side truncating at 512 bytes like any server without EDNS.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from conftest import free_port
from dns_support import DOMAIN, dig
from dnslib import QTYPE, RCODE, RR, TXT, A, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSServer

from pxeserver.app import Context
from pxeserver.dns import DnsService, forward
from pxeserver.dns.resolver import Forward

BIG_TEXTS = 12  # 12 TXT strings of 60 bytes: about 900 bytes, more than 512, less than 1232


class Outside(BaseResolver):
    asked: list[str] = []  # every name the upstream was asked, across its UDP and TCP servers

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply(ra=1, aa=0)  # a recursive resolver, not authoritative
        name = str(request.q.qname).lower()
        self.asked.append(name)
        if name == "www.outside.test.":
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A("192.0.2.10"), ttl=300))
        elif name == "big.outside.test.":
            for number in range(BIG_TEXTS):
                text = TXT(f"{number:02d}" + "x" * 58)
                reply.add_answer(RR(request.q.qname, QTYPE.TXT, rdata=text, ttl=300))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


class TruncatingHandler(DNSHandler):
    udplen = 512


def start_upstream() -> list[DNSServer]:
    """UDP and TCP servers on one free port (UDP picks it; retried when TCP has it taken)."""
    for _ in range(20):
        port = free_port(kind=2)  # SOCK_DGRAM
        udp = DNSServer(Outside(), "127.0.0.1", port, handler=TruncatingHandler)
        try:
            servers = [udp, DNSServer(Outside(), "127.0.0.1", port, tcp=True)]
        except OSError:
            udp.server.server_close()
            continue
        for server in servers:
            server.start_thread()
        return servers
    raise OSError("no port free for both UDP and TCP")


@pytest.fixture
def upstream_port() -> Iterator[int]:
    servers = start_upstream()
    yield servers[0].server.server_address[1]
    for server in servers:
        server.stop()
        server.server.server_close()


def forwarding_service(ctx: Context, upstream: str) -> DnsService:
    ctx.config.dns.domain = DOMAIN
    ctx.config.dns.upstream = upstream
    service = DnsService(ctx)
    service.start()
    return service


@pytest.fixture
def dns(ctx: Context, upstream_port: int) -> Iterator[DnsService]:
    service = forwarding_service(ctx, f"127.0.0.1:{upstream_port}")
    yield service
    service.stop()


def test_outside_names_are_forwarded(dns: DnsService) -> None:
    result = dig(dns.port, "www.outside.test")
    assert result.status == "NOERROR" and result.values() == ["192.0.2.10"]
    assert "aa" not in result.flags  # the upstream's answer, not ours
    assert dig(dns.port, "nothing.outside.test").status == "NXDOMAIN"
    assert dig(dns.port, "+tcp", "www.outside.test").values() == ["192.0.2.10"]


def test_zone_names_are_still_answered_locally(dns: DnsService) -> None:
    result = dig(dns.port, f"pxe.{DOMAIN}")
    assert result.values() == ["127.0.0.1"] and "aa" in result.flags
    assert dig(dns.port, f"nobody.{DOMAIN}").status == "NXDOMAIN"


def test_big_answer_is_truncated_for_plain_udp_and_whole_over_tcp(dns: DnsService) -> None:
    # The upstream truncates over UDP, so the forwarder itself must retry it over TCP.
    whole = dig(dns.port, "+bufsize=1232", "big.outside.test", "TXT")
    assert "tc" not in whole.flags and len(whole.answer) == BIG_TEXTS
    # Without EDNS the client may take 512 bytes: TC set, and dig retries over TCP by itself.
    retried = dig(dns.port, "+noedns", "big.outside.test", "TXT")
    assert "Truncated, retrying in TCP mode" in retried.output
    assert len(retried.answer) == BIG_TEXTS
    # +ignore shows the truncated UDP answer itself: the flag and the question, no records.
    truncated = dig(dns.port, "+noedns", "+ignore", "big.outside.test", "TXT")
    assert "tc" in truncated.flags and truncated.answer == []
    small = dig(dns.port, "+bufsize=600", "+ignore", "big.outside.test", "TXT")
    assert "tc" in small.flags  # the client's EDNS size is honoured too


def test_dead_upstream_gives_servfail(ctx: Context) -> None:
    service = forwarding_service(ctx, f"127.0.0.1:{free_port(kind=2)}")  # nobody listens
    try:
        assert dig(service.port, "www.outside.test").status == "SERVFAIL"
        assert dig(service.port, f"pxe.{DOMAIN}").values() == ["127.0.0.1"]
    finally:
        service.stop()


@pytest.mark.parametrize("upstream", ["dns.example:53", "127.0.0.1:0", "127.0.0.1:x", ":53"])
def test_bad_upstream_stops_the_start_with_a_clear_error(ctx: Context, upstream: str) -> None:
    ctx.config.dns.upstream = upstream
    with pytest.raises(OSError, match="upstream must be an IPv4 address and port"):
        DnsService(ctx).start()


@pytest.mark.slow
def test_silent_upstream_cannot_pile_up_queries(ctx: Context) -> None:
    """Queries beyond the in-flight bound get SERVFAIL at once; local names are unaffected."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # receives, never answers
        service = forwarding_service(ctx, f"127.0.0.1:{silent.getsockname()[1]}")
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.settimeout(0.5)
                for number in range(200):
                    query = DNSRecord.question(f"n{number}.outside.test").pack()
                    client.sendto(query, ("127.0.0.1", service.port))
                servfails = 0
                try:
                    while True:
                        reply = client.recv(512)
                        servfails += reply[3] & 0x0F == RCODE.SERVFAIL
                except TimeoutError:
                    pass
            assert servfails >= 200 - forward.MAX_IN_FLIGHT
            assert dig(service.port, f"pxe.{DOMAIN}").values() == ["127.0.0.1"]
        finally:
            service.stop()


def test_only_allowed_clients_are_forwarded(ctx: Context, upstream_port: int) -> None:
    """An open resolver answers anyone who reaches it; ours only forwards for its networks."""
    ctx.config.dns.forward_clients = ["127.0.0.1/32"]
    service = forwarding_service(ctx, f"127.0.0.1:{upstream_port}")
    try:
        Outside.asked.clear()
        for transport in ("+notcp", "+tcp"):
            refused = dig(service.port, "-b", "127.0.0.2", transport, "www.outside.test")
            assert refused.status == "REFUSED" and refused.answer == []
        assert Outside.asked == []  # nothing reached the upstream
        # The zone itself is still answered for everyone.
        assert dig(service.port, "-b", "127.0.0.2", f"pxe.{DOMAIN}").values() == ["127.0.0.1"]
        for transport in ("+notcp", "+tcp"):
            allowed = dig(service.port, "-b", "127.0.0.1", transport, "www.outside.test")
            assert allowed.status == "NOERROR" and allowed.values() == ["192.0.2.10"]
        assert Outside.asked == ["www.outside.test."] * 2
    finally:
        service.stop()


def test_forward_clients_default_to_the_dhcp_subnet_and_loopback(ctx: Context,
                                                                 upstream_port: int) -> None:
    ctx.config.dhcp.subnet = "10.9.0.0/24"
    service = forwarding_service(ctx, f"127.0.0.1:{upstream_port}")
    try:
        resolver = service._resolver
        query = bytes(DNSRecord.question("www.outside.test").pack())
        assert isinstance(resolver.respond(query, False, "10.9.0.7"), Forward)
        assert isinstance(resolver.respond(query, False, "127.0.0.9"), Forward)
        refused = resolver.respond(query, False, "10.9.1.7")
        assert isinstance(refused, bytes) and refused[3] & 0x0F == RCODE.REFUSED
    finally:
        service.stop()
