"""From a query's bytes to the reply's bytes: a hand-written fast path in front of dnslib.

dnslib's parse and pack cost tens of microseconds per query, which caps a Python server far
below the 20,000 queries/s we want. So the common query (one question, an uncompressed name, no
records but at most one EDNS OPT) is recognised by reading the header and the question by hand,
and answered from a cache of packed replies keyed by the flags, the lower-cased question and the
EDNS header. A cached reply was built for the lower-cased question, and dnslib compresses every
owner name in it to a pointer at the question, so the asker's own spelling of the name (resolvers
randomise case, draft-vixie-dnsext-dns0x20) is put back by splicing in the question bytes and the
ID. Everything else goes through dnslib (the slow path), which also fills the cache.

The cache belongs to one zone snapshot; a new registry generation builds a new snapshot. Most
changes touch few names or none (a host's install status, one new lease), so the new snapshot
takes over the cached answers of every name whose records stayed the same, unless they show the
SOA serial (negative answers do): a busy install wave does not send every query back through
dnslib. The generation is one SQLite read of about
10 µs, so it is checked at most once per ``CHECK_INTERVAL`` (1 ms) rather than per query: a
change is answered from the next query on once that millisecond is over, which no client can
tell from "immediately".
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from dnslib import CLASS, OPCODE, QTYPE, RCODE, DNSHeader, DNSRecord, EDNS0

from pxeserver.dns.zone import Name, Zone, ZoneSettings
from pxeserver.policy import BootPolicy

MAX_UDP_PAYLOAD = 1232  # what we advertise and the most we send over UDP (DNS flag day 2020)
PLAIN_UDP_LIMIT = 512  # RFC 1035: the UDP limit for clients without EDNS
TCP_LIMIT = 65535
CACHE_LIMIT = 50_000  # answers per snapshot; a flood of random names empties it, never grows it
CHECK_INTERVAL = 0.001  # seconds between registry generation checks
_ONE_QUESTION = b"\x00\x01\x00\x00\x00\x00"  # QDCOUNT 1, ANCOUNT 0, NSCOUNT 0
_OPT_TYPE = b"\x00\x29"
_SOA_TYPE = b"\x00\x06"
_ECHOED_FLAGS = 0x7910  # opcode, RD and CD; not AA, TC, RA, Z, AD or an RCODE a query should not set
_ANY_TYPE = b"\x00\xff"
BADVERS = 16  # extended RCODE; dnslib's RCODE table stops at 15
ANY_CLASS = 255  # dnslib names it "*", not ANY


@dataclass(frozen=True)
class Forward:
    """Not our zone and an upstream is configured: the service forwards ``query``."""

    query: bytes
    limit: int  # the most the client can take back (UDP payload size, or TCP_LIMIT)


def error_reply(query: bytes, rcode: int) -> bytes:
    """A header-only reply built from the query's header alone, for queries dnslib cannot parse.

    Keeps the ID, the opcode and RD, as BIND does for FORMERR.
    """
    return query[:2] + bytes((0x80 | (query[2] & 0x79), rcode)) + bytes(8)


def fit_udp(response: bytes, limit: int) -> bytes:
    """The response, or when it is longer than the client takes over UDP, its truncated form.

    The truncated form keeps the header (with TC set), the question and the OPT record, so the
    client sees why and retries over TCP (RFC 2181 9, RFC 6891 7).
    """
    if len(response) <= limit:
        return response
    try:
        full = DNSRecord.parse(response)
    except Exception:  # dnslib raises several types for bad bytes; a header-only TC still helps
        return response[:2] + bytes((response[2] | 0x02, response[3])) + bytes(8)
    short = DNSRecord(DNSHeader(id=full.header.id, bitmap=full.header.bitmap, tc=1), q=full.q)
    for record in full.ar:
        if record.rtype == QTYPE.OPT:
            short.add_ar(record)
    return bytes(short.pack())


def parse_plain_question(query: bytes) -> tuple[bytes, int, int] | None:
    """(cache key, end of the name, end of the question) for a query the fast path can answer.

    None sends the query to the slow path: anything unusual, including compression pointers in
    the question, which legitimate queries never use.
    """
    size = len(query)
    if size < 17 or size > PLAIN_UDP_LIMIT or query[2] & 0xF8 or query[4:10] != _ONE_QUESTION:
        return None
    additional = query[10:12]
    position = 12
    for _ in range(128):  # at most 127 labels fit in 255 bytes; bounded even for garbage
        length = query[position]
        if length == 0:
            break
        if length > 63:
            return None
        position += length + 1
        if position >= size:
            return None
    else:
        return None
    name_end = position + 1
    question_end = name_end + 4
    if additional == b"\x00\x00":
        if question_end != size:
            return None
        edns = b""
    elif additional == b"\x00\x01":
        # The one additional record must be an OPT at the root: name 0, type 41, payload size,
        # extended RCODE, version, flags, option length; its options (cookies) we ignore.
        opt = question_end
        if size < opt + 11 or query[opt] != 0 or query[opt + 1:opt + 3] != _OPT_TYPE:
            return None
        if opt + 11 + int.from_bytes(query[opt + 9:opt + 11], "big") != size:
            return None
        edns = query[opt + 3:opt + 9]
    else:
        return None
    key = query[2:4] + query[12:name_end].lower() + query[name_end:question_end] + edns
    return key, name_end, question_end


def wire_name(query: bytes, name_end: int) -> Name:
    """The question's name as a tuple of labels; the fast path has checked its structure."""
    labels = []
    position = 12
    while position < name_end - 1:
        length = query[position]
        labels.append(query[position + 1:position + 1 + length])
        position += length + 1
    return tuple(labels)


class Resolver:
    """Answers queries from the current zone snapshot, rebuilding it when the registry changes."""

    def __init__(self, policy: BootPolicy, settings: ZoneSettings, forwarding: bool) -> None:
        self._policy = policy
        self._settings = settings
        self._forwarding = forwarding
        self._lock = threading.Lock()
        self._zone = self._build()
        self._next_check = time.monotonic() + CHECK_INTERVAL

    def _build(self) -> Zone:
        generation = self._policy.generation()  # read first: a later change triggers a rebuild
        return Zone(self._settings, self._policy.name_records(), generation)

    def zone(self) -> Zone:
        """The current snapshot; checks the registry generation at most once per interval."""
        if time.monotonic() < self._next_check:
            return self._zone
        with self._lock:
            zone = self._zone
            if self._policy.generation() != zone.generation or time.time() >= zone.valid_until:
                old, zone = zone, self._build()
                changed = zone.changed_names(old)
                if changed is not None:
                    zone.cache.update((key, entry) for key, entry in old.cache.items()
                                      if entry[2] is not None and entry[2] not in changed)
                self._zone = zone
            self._next_check = time.monotonic() + CHECK_INTERVAL
        return zone

    # -- entry points ---------------------------------------------------------------------

    def respond_udp(self, query: bytes) -> bytes | Forward | None:
        """The reply datagram, a query to forward, or None to drop the datagram."""
        zone = self.zone()
        plain = parse_plain_question(query)
        if plain is None:
            return self._respond(query, zone, tcp=False)
        key, name_end, question_end = plain
        template = zone.cache.get(key)
        if template is None:
            lowered = query[:12] + query[12:name_end].lower() + query[name_end:]
            reply = self._respond(lowered, zone, tcp=False)
            if not isinstance(reply, bytes):
                return reply
            if reply[4:6] != b"\x00\x01" or reply[12:question_end] != lowered[12:question_end]:
                return self._respond(query, zone, tcp=False)  # no question to splice: uncached
            if len(zone.cache) >= CACHE_LIMIT:
                zone.cache.clear()
            # Without an authority section and not asked for SOA or ANY, no SOA (serial) is in it.
            serial_free = reply[8:10] == b"\x00\x00" and query[name_end:name_end + 2] not in (
                _SOA_TYPE, _ANY_TYPE)
            carried = wire_name(lowered, name_end) if serial_free else None
            template = zone.cache[key] = (reply[2:12], reply[question_end:], carried)
        return query[:2] + template[0] + query[12:question_end] + template[1]

    def respond_tcp(self, query: bytes) -> bytes | Forward | None:
        return self._respond(query, self.zone(), tcp=True)

    # -- the slow path --------------------------------------------------------------------

    def _respond(self, query: bytes, zone: Zone, tcp: bool) -> bytes | Forward | None:
        if len(query) < 12 or query[2] & 0x80:
            return None  # no header to answer, or itself a response: answering could loop
        if (query[2] >> 3) & 0x0F != OPCODE.QUERY:
            return error_reply(query, RCODE.NOTIMP)
        if query[4:6] != b"\x00\x01":
            return error_reply(query, RCODE.FORMERR)  # RFC 9619: exactly one question
        try:
            request = DNSRecord.parse(query)
        except Exception:  # DNSError, BufferError, UnicodeError, RecursionError on pointer loops
            return error_reply(query, RCODE.FORMERR)
        # dnslib's reply() copies every header bit of the query; keep only those a reply echoes.
        request.header.bitmap &= _ECHOED_FLAGS
        labels = request.q.qname.label
        if any(len(part) > 63 for part in labels) or sum(len(part) + 1 for part in labels) > 254:
            return error_reply(query, RCODE.FORMERR)  # dnslib reads these but cannot write them
        options = [record for record in request.ar if record.rtype == QTYPE.OPT]
        if len(options) > 1:
            return error_reply(query, RCODE.FORMERR)  # RFC 6891 6.1.1
        edns = options[0] if options else None
        if tcp:
            limit = TCP_LIMIT
        elif edns is None:
            limit = PLAIN_UDP_LIMIT
        else:
            limit = min(max(edns.rclass, PLAIN_UDP_LIMIT), MAX_UDP_PAYLOAD)
        if edns is not None and edns.ttl >> 16 & 0xFF:
            reply = request.reply(ra=0, aa=0)  # EDNS version other than 0 (RFC 6891 6.1.3)
            reply.add_ar(EDNS0(ext_rcode=BADVERS >> 4, udp_len=MAX_UDP_PAYLOAD))
            return fit_udp(bytes(reply.pack()), limit)
        reply = self._answer(request, zone)
        if reply is None:
            return Forward(query, limit)
        if edns is not None:
            # Echo DO (RFC 3225); no cookie back: we do not implement them (RFC 7873 5.2.1).
            reply.add_ar(EDNS0(udp_len=MAX_UDP_PAYLOAD, flags="do" if edns.ttl & 0x8000 else ""))
        return fit_udp(bytes(reply.pack()), limit)

    def _answer(self, request: DNSRecord, zone: Zone) -> DNSRecord | None:
        """The zone's answer; REFUSED for other names and classes; None means "forward it"."""
        if request.q.qclass in (CLASS.IN, ANY_CLASS):
            reply = zone.answer(request)
            if reply is not None:
                return reply
            if self._forwarding:
                return None
        reply = request.reply(ra=0, aa=0)
        reply.header.rcode = RCODE.REFUSED
        return reply
