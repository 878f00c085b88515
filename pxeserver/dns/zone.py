"""The authoritative data: one forward zone for the configured domain and the reverse zones.

Built from :meth:`BootPolicy.name_records` (never from the database directly) and answered with
dnslib's record classes. Names are kept as tuples of lower-cased labels, so a lookup is a dict
access and DNS's case-insensitivity costs nothing. Resource records are built per answer, not
per zone build, so a registry of 10,000 hosts rebuilds in milliseconds.

Reverse zones: the in-addr.arpa zone of the DHCP subnet (rounded out to whole octets), plus the
/24 zone of any host address outside it, so every PTR we publish has an SOA above it.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from dnslib import NS, PTR, QTYPE, RCODE, RR, SOA, A, DNSLabel, DNSRecord

from pxeserver.policy import NameRecord

log = logging.getLogger(__name__)

Name = tuple[bytes, ...]

TTL = 60  # short: hosts are added and re-addressed while installers look them up
NEGATIVE_TTL = 30  # SOA minimum: how long a resolver may cache "no such name"
SERVER_LABEL = b"pxe"  # the server's own name, <SERVER_LABEL>.<domain>, also the zone's NS
HOSTMASTER_LABEL = b"hostmaster"


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
    """A snapshot of the zones at one registry generation; immutable once built."""

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
        # Packed answers for the resolver's fast path; they live and die with this snapshot, so
        # an answer computed from an older registry can never outlive it.
        # Each entry: the reply's header after the ID, the reply after the question, and the
        # question's name when a newer snapshot may keep the entry (None: it shows the serial).
        self.cache: dict[bytes, tuple[bytes, bytes, Name | None]] = {}

    def changed_names(self, old: Zone) -> set[Name] | None:
        """Names whose records differ from an older snapshot's; None if the zones themselves do."""
        if self.apexes != old.apexes:
            return None
        changed = {name for name in self.addresses.keys() | old.addresses.keys()
                   if self.addresses.get(name) != old.addresses.get(name)}
        changed.update(name for name in self.pointers.keys() | old.pointers.keys()
                       if self.pointers.get(name) != old.pointers.get(name))
        return changed

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

    def answer(self, request: DNSRecord) -> DNSRecord | None:
        """The authoritative reply to a one-question query, or None when the name is not ours."""
        question = request.q
        name = tuple(part.lower() for part in question.qname.label)
        apex = self.zone_of(name)
        if apex is None:
            return None
        reply = request.reply(ra=0, aa=1)
        if question.qtype in (QTYPE.AXFR, QTYPE.IXFR):
            reply.header.rcode = RCODE.REFUSED  # no zone transfers: secondaries have no use here
            return reply
        owner = question.qname
        records = self._records(name, apex, owner, question.qtype)
        if records:
            for record in records:
                reply.add_answer(record)
            if question.qtype in (QTYPE.NS, QTYPE.ANY) and name == apex:
                reply.add_ar(RR(label(self.server), QTYPE.A, rdata=A(self.server_address), ttl=TTL))
            return reply
        if name not in self.existing:
            reply.header.rcode = RCODE.NXDOMAIN
        reply.add_auth(self._soa(apex, ttl=NEGATIVE_TTL))  # RFC 2308: min(SOA TTL, minimum)
        return reply

    def _records(self, name: Name, apex: Name, owner: DNSLabel, qtype: int) -> list[RR]:
        found: list[RR] = []
        wanted = (lambda t: True) if qtype == QTYPE.ANY else (lambda t: t == qtype)
        if name == apex:
            if wanted(QTYPE.SOA):
                found.append(self._soa(apex, ttl=TTL, owner=owner))
            if wanted(QTYPE.NS):
                found.append(RR(owner, QTYPE.NS, rdata=NS(label(self.server)), ttl=TTL))
        if wanted(QTYPE.A) and name in self.addresses:
            found.append(RR(owner, QTYPE.A, rdata=A(self.addresses[name]), ttl=TTL))
        if wanted(QTYPE.PTR):
            for target in self.pointers.get(name, ()):
                found.append(RR(owner, QTYPE.PTR, rdata=PTR(label(target)), ttl=TTL))
        return found

    def _soa(self, apex: Name, ttl: int, owner: DNSLabel | None = None) -> RR:
        times = (3600, 600, 86400, NEGATIVE_TTL)  # refresh, retry, expire, minimum
        rdata = SOA(label(self.server), label(self.hostmaster), (self.serial, *times))
        return RR(owner or label(apex), QTYPE.SOA, rdata=rdata, ttl=ttl)
