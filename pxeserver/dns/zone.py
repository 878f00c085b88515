"""The authoritative data: one forward zone for the configured domain and the reverse zones.

Built from :meth:`BootPolicy.name_records` (never from the database directly). Names are kept
as tuples of lower-cased labels, so a lookup is a dict access and DNS's case-insensitivity costs
nothing. Records are made with dnslib's record classes and packed by dnslib the first time they
are asked for, then kept in wire format for the life of the snapshot: a registry of 10,000 hosts
rebuilds in milliseconds, and a repeated question costs a few dict lookups. An answer's records
name their owner with a pointer into the question (RFC 1035 4.1.4), so they fit behind any
spelling of the question and the reply echoes the asker's case, as resolvers that randomise it
(draft-vixie-dnsext-dns0x20) require.

Reverse zones: the in-addr.arpa zone of the DHCP subnet (rounded out to whole octets), plus the
/24 zone of any host address outside it, so every PTR we publish has an SOA above it.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import NamedTuple

from dnslib import NS, PTR, QTYPE, RCODE, RR, SOA, A, DNSLabel
from dnslib.label import DNSBuffer

from pxeserver.policy import NameRecord

log = logging.getLogger(__name__)

Name = tuple[bytes, ...]

TTL = 60  # short: hosts are added and re-addressed while installers look them up
NEGATIVE_TTL = 30  # SOA minimum: how long a resolver may cache "no such name"
SERVER_LABEL = b"pxe"  # the server's own name, <SERVER_LABEL>.<domain>, also the zone's NS
HOSTMASTER_LABEL = b"hostmaster"
QUESTION_NAME = b"\xc0\x0c"  # a pointer to offset 12, where every reply's question name is
# dnslib's QTYPE and RCODE tables look a name up on every access; the hot path uses plain ints.
A_TYPE, NS_TYPE, SOA_TYPE, PTR_TYPE = QTYPE.A, QTYPE.NS, QTYPE.SOA, QTYPE.PTR
TRANSFER_TYPES = (QTYPE.IXFR, QTYPE.AXFR)
ANY_TYPE = QTYPE.ANY
NOERROR, NXDOMAIN, REFUSED = RCODE.NOERROR, RCODE.NXDOMAIN, RCODE.REFUSED


def to_name(text: str) -> Name:
    """'Web1.Domu.Example.' -> (b'web1', b'domu', b'example')."""
    return tuple(label.encode("ascii").lower() for label in text.strip(".").split(".") if label)


def reverse_name(ip: str) -> Name:
    return tuple(octet.encode() for octet in reversed(ip.split("."))) + (b"in-addr", b"arpa")


def reverse_zone(network: ipaddress.IPv4Network) -> Name:
    """The in-addr.arpa zone holding the network, rounded out to whole octets (at least one)."""
    octets = max(1, network.prefixlen // 8)
    return reverse_name(str(network.network_address))[4 - octets:]


def label(name: Name) -> DNSLabel:
    return DNSLabel(list(name))


@dataclass(frozen=True)
class ZoneSettings:
    domain: str
    server_address: str
    subnet: str


class Zone:
    """A snapshot of the zones at one registry generation.

    Its names never change once built; it only memoises the answers it has packed.
    """

    def __init__(self, settings: ZoneSettings, records: list[NameRecord], generation: int) -> None:
        self.generation = generation
        self.serial = generation % 2**32
        self.domain = to_name(settings.domain)
        self.server = (SERVER_LABEL,) + self.domain
        self.server_address = settings.server_address
        self.hostmaster = (HOSTMASTER_LABEL,) + self.domain
        # The earliest lease expiry: the zone must be rebuilt then even if nothing else changed.
        self.valid_until = min((r.expires for r in records if r.expires is not None),
                               default=float("inf"))
        self.addresses: dict[Name, str] = {self.server: settings.server_address}
        for record in records:
            name = self._forward_name(record.hostname)
            if sum(len(part) + 1 for part in name) > 254:
                log.warning("host %s is left out of DNS: with the domain its name is longer "
                            "than DNS allows (253 characters)", record.hostname)
                continue
            if name == self.server:
                log.warning("host %s is named like the DNS server itself; %s answers with the "
                            "server's address", record.hostname, b".".join(name).decode())
                continue
            self.addresses[name] = record.ip
        self.apexes: set[Name] = {self.domain, reverse_zone(ipaddress.IPv4Network(settings.subnet))}
        self.pointers: dict[Name, list[Name]] = {}
        for name, ip in self.addresses.items():
            ptr = reverse_name(ip)
            self.pointers.setdefault(ptr, []).append(name)
            if self.zone_of(ptr) is None:
                self.apexes.add(ptr[1:])
        # Every name that exists, including the empty non-terminals between a name and its zone
        # apex: those answer NODATA, not NXDOMAIN (RFC 8020).
        self.existing: set[Name] = set(self.apexes)
        for name in (*self.addresses, *self.pointers):
            apex = self.zone_of(name)
            for start in range(len(name) - len(apex) if apex else 0):
                self.existing.add(name[start:])
        # Packed answers, filled as they are asked for; they live and die with this snapshot,
        # so a record packed from an older registry can never outlive it.
        self._positive: dict[tuple[Name, int], Answer] = {}
        self._negative_soa: dict[Name, bytes] = {}
        self._glue = name_wire(self.server) + body(A_TYPE, A(settings.server_address), TTL)

    def _forward_name(self, hostname: str) -> Name:
        """A hostname already inside the domain stays as it is; anything else gets the domain."""
        name = to_name(hostname)
        if name[-len(self.domain):] == self.domain:
            return name
        return name + self.domain

    def zone_of(self, name: Name) -> Name | None:
        """The apex of the zone holding this name, or None when it is not ours."""
        for start in range(len(name) + 1):
            if name[start:] in self.apexes:
                return name[start:]
        return None

    # -- answers --------------------------------------------------------------------------

    def lookup(self, name: Name, qtype: int) -> Answer | None:
        """The authoritative answer for a lower-cased name, or None when the name is not ours."""
        known = self._positive.get((name, qtype))
        if known is not None:
            return known
        apex = self.zone_of(name)
        if apex is None:
            return None
        if qtype in TRANSFER_TYPES:
            return Answer(REFUSED)  # no zone transfers: secondaries have no use here
        if name in self.existing:
            records = self._records(name, apex, qtype)
            if records:
                # Packed once per snapshot, and only for names that exist: a flood of random
                # names leaves nothing behind.
                glue = (self._glue,) if qtype in (NS_TYPE, ANY_TYPE) and name == apex else ()
                answer = Answer(NOERROR, tuple(QUESTION_NAME + body(*r) for r in records), (), glue)
                self._positive[(name, qtype)] = answer
                return answer
            rcode = NOERROR
        else:
            rcode = NXDOMAIN
        # The SOA's owner, the apex, ends the question name: point at it there. Its TTL in a
        # negative answer is min(SOA TTL, minimum) (RFC 2308 3).
        offset = 12 + sum(len(part) + 1 for part in name[:len(name) - len(apex)])
        owner = (0xC000 | offset).to_bytes(2, "big")
        soa = self._negative_soa.get(apex)
        if soa is None:
            soa = self._negative_soa[apex] = body(SOA_TYPE, self._soa_rdata(), NEGATIVE_TTL)
        return Answer(rcode, (), (owner + soa,))

    def _records(self, name: Name, apex: Name, qtype: int) -> list[tuple[int, object, int]]:
        """(type, dnslib rdata, TTL) of each record the question asks for."""
        found: list[tuple[int, object, int]] = []
        wanted = (lambda t: True) if qtype == ANY_TYPE else (lambda t: t == qtype)
        if name == apex:
            if wanted(SOA_TYPE):
                found.append((SOA_TYPE, self._soa_rdata(), TTL))
            if wanted(NS_TYPE):
                found.append((NS_TYPE, NS(label(self.server)), TTL))
        if wanted(A_TYPE) and name in self.addresses:
            found.append((A_TYPE, A(self.addresses[name]), TTL))
        if wanted(PTR_TYPE):
            for target in self.pointers.get(name, ()):
                found.append((PTR_TYPE, PTR(label(target)), TTL))
        return found

    def _soa_rdata(self) -> SOA:
        times = (3600, 600, 86400, NEGATIVE_TTL)  # refresh, retry, expire, minimum
        return SOA(label(self.server), label(self.hostmaster), (self.serial, *times))


class Answer(NamedTuple):
    """What the zone says about one question: complete records in wire format."""

    rcode: int
    answer: tuple[bytes, ...] = ()
    authority: tuple[bytes, ...] = ()
    additional: tuple[bytes, ...] = ()


class _Uncompressed(DNSBuffer):
    """Packs names in full: a record packed on its own cannot point into a message."""

    encode_name = DNSBuffer.encode_name_nocompress


def body(rtype: int, rdata: object, ttl: int) -> bytes:
    """A record without its owner name: type, class, TTL, length and RDATA, packed by dnslib."""
    buffer = _Uncompressed()
    RR(DNSLabel([]), rtype, rdata=rdata, ttl=ttl).pack(buffer)
    return bytes(buffer.data[1:])  # drop the root owner name, one zero byte


def name_wire(name: Name) -> bytes:
    return b"".join(len(part).to_bytes(1, "big") + part for part in name) + b"\x00"
