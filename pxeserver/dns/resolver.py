"""From a query's bytes to the reply's bytes.

dnslib's ``DNSRecord.parse`` and ``pack`` cost about 100 µs per query, which caps a Python server
far below the 20,000 queries/s we want. So the reply is assembled here by hand from wire-format
records the zone keeps (packed by dnslib once per snapshot): the header, the question exactly
as the client sent it, the records, an OPT record. The common query (one question, an
uncompressed name, no records but at most one EDNS OPT) is also read by hand, header and
question only; anything else goes through ``DNSRecord.parse`` and is either answered the same
way or refused with the right error. dnslib still builds every record and parses every odd
query; only the two fixed layouts of RFC 1035 4.1.1 and 4.1.2 are written out here.

Live data: the zone snapshot is rebuilt when the registry generation changes (or a lease runs
out). The generation is one SQLite read of about 10 µs, so it is checked at most once per
``CHECK_INTERVAL`` (1 ms) rather than per query: a change is answered from the next query on
once that millisecond is over, which no client can tell from "immediately".
"""

from __future__ import annotations

import ipaddress
import struct
import threading
import time
from collections.abc import Sequence
from typing import NamedTuple

from dnslib import CLASS, EDNS0, OPCODE, QTYPE, RCODE, RR, DNSHeader, DNSLabel, DNSQuestion, DNSRecord
from dnslib.label import DNSBuffer

from pxeserver.dns.zone import NOERROR, REFUSED, Answer, Name, Zone, ZoneSettings, name_wire
from pxeserver.policy import BootPolicy

MAX_UDP_PAYLOAD = 1232  # what we advertise and the most we send over UDP (DNS flag day 2020)
PLAIN_UDP_LIMIT = 512  # RFC 1035: the UDP limit for clients without EDNS
TCP_LIMIT = 65535
CHECK_INTERVAL = 0.001  # seconds between registry generation checks
BADVERS = 16  # extended RCODE; dnslib's RCODE table stops at 15
ANY_CLASS = 255  # dnslib names it "*", not ANY
_ONE_QUESTION = b"\x00\x01\x00\x00\x00\x00"  # QDCOUNT 1, ANCOUNT 0, NSCOUNT 0
_OPT_TYPE = b"\x00\x29"
_COUNTS = struct.Struct("!HHHH")
_TYPE_CLASS = struct.Struct("!HH")


class Forward(NamedTuple):
    """Not our zone and an upstream is configured: the service forwards ``query``."""

    query: bytes
    limit: int  # the most the client can take back (UDP payload size, or TCP_LIMIT)


class Question(NamedTuple):
    name: Name  # lower-cased labels, for the lookup
    wire: bytes  # name, type and class as the client wrote them, for the reply
    qtype: int
    qclass: int


class Edns(NamedTuple):
    payload: int  # the most the client takes over UDP
    version: int
    do: bool  # DNSSEC OK, echoed in the reply (RFC 3225)


def _packed_opt(**options: object) -> bytes:
    buffer = DNSBuffer()
    EDNS0(udp_len=MAX_UDP_PAYLOAD, **options).pack(buffer)
    return bytes(buffer.data)


# Our OPT record, without and with DO. No cookie option: we do not implement cookies, and a
# server that does not simply leaves the option out (RFC 7873 5.2.1).
_OPT = {False: _packed_opt(), True: _packed_opt(flags="do")}
_OPT_BADVERS = _packed_opt(ext_rcode=BADVERS >> 4)  # the upper 8 bits of the 12-bit RCODE
_REFUSED = Answer(REFUSED)
_IN_CLASSES = (CLASS.IN, ANY_CLASS)


def error_reply(query: bytes, rcode: int) -> bytes:
    """A header-only reply built from the query's header alone, for queries we cannot read.

    Keeps the ID, the opcode and RD, as BIND does for FORMERR.
    """
    return query[:2] + bytes((0x80 | (query[2] & 0x79), rcode)) + bytes(8)


def fit_udp(response: bytes, limit: int) -> bytes:
    """A forwarded response, or when it is longer than the client takes, its truncated form.

    The truncated form keeps the header (with TC set), the question and the OPT record, so the
    client sees why and retries over TCP (RFC 2181 9, RFC 6891 7).
    """
    if len(response) <= limit:
        return response
    try:
        full = _parse(response)
    except Exception:  # dnslib raises several types for bad bytes; a header-only TC still helps
        return response[:2] + bytes((response[2] | 0x02, response[3])) + bytes(8)
    short = DNSRecord(DNSHeader(id=full.header.id, bitmap=full.header.bitmap, tc=1), q=full.q)
    for record in full.ar:
        if record.rtype == QTYPE.OPT:
            short.add_ar(record)
    return bytes(short.pack())


def parse_plain(query: bytes) -> tuple[Question, Edns | None] | None:
    """The question and EDNS of a common query, read by hand; None sends it to dnslib.

    That is anything unusual, including compression pointers in the question, which
    legitimate queries never use.
    """
    size = len(query)
    if size < 17 or query[2] & 0xF8 or query[4:10] != _ONE_QUESTION:  # QR and opcode are 0
        return None
    labels = []
    position = 12
    for _ in range(128):  # at most 127 labels fit in 255 bytes; bounded even for garbage
        length = query[position]
        if length == 0:
            break
        end = position + 1 + length
        if length > 63 or end >= size:
            return None
        labels.append(query[position + 1:end].lower())
        position = end
    else:
        return None
    name_end = position + 1
    question_end = name_end + 4
    if name_end - 12 > 255 or question_end > size:
        return None
    additional = query[10:12]
    if additional == b"\x00\x00":
        if question_end != size:
            return None
        edns = None
    elif additional == b"\x00\x01":
        # The one additional record must be an OPT at the root: name 0, type 41, payload size,
        # extended RCODE, version, flags, option length; its options (cookies) we ignore.
        opt = question_end
        if size < opt + 11 or query[opt] != 0 or query[opt + 1:opt + 3] != _OPT_TYPE:
            return None
        if opt + 11 + int.from_bytes(query[opt + 9:opt + 11], "big") != size:
            return None
        payload = int.from_bytes(query[opt + 3:opt + 5], "big")
        edns = Edns(payload, query[opt + 6], bool(query[opt + 7] & 0x80))
    else:
        return None
    qtype, qclass = _TYPE_CLASS.unpack_from(query, name_end)
    return Question(tuple(labels), query[12:question_end], qtype, qclass), edns


class _BoundedBuffer(DNSBuffer):
    """dnslib's buffer with a name decoder that cannot loop.

    dnslib's own ``decode_name`` recurses once per compression pointer and only notices a
    pointer to itself, so two pointers that lead to each other recurse until Python's limit:
    about a millisecond of CPU for one 30-byte packet. This one follows at most
    ``MAX_POINTERS`` pointers, each strictly backwards, and stops at 255 bytes of name.
    """

    MAX_POINTERS = 16  # real queries use none in the question, one or two in a signature
    offset: int  # DNSBuffer's read position

    def decode_name(self, last: int = -1) -> DNSLabel:
        data = self.data
        labels: list[bytes] = []
        size = 1
        position: int = self.offset
        resume: int | None = None
        for _ in range(self.MAX_POINTERS + 1):
            while True:  # ends: every pass moves forward by at least one byte or raises
                if position >= len(data):
                    raise BufferError("name runs past the end of the message")
                length = data[position]
                if length == 0:
                    self.offset = position + 1 if resume is None else resume
                    return DNSLabel(labels)
                if length & 0xC0 == 0xC0:
                    if position + 1 >= len(data):
                        raise BufferError("name runs past the end of the message")
                    pointer = (length & 0x3F) << 8 | data[position + 1]
                    if pointer >= position:
                        raise BufferError("compression pointer does not point backwards")
                    if resume is None:
                        resume = position + 2
                    position = pointer
                    break
                if length > 63:
                    raise BufferError("unknown label type")
                size += length + 1
                if size > 255 or position + 1 + length > len(data):
                    raise BufferError("name longer than 255 bytes or than the message")
                labels.append(bytes(data[position + 1:position + 1 + length]))
                position += 1 + length
        raise BufferError("too many compression pointers")


def _parse(query: bytes) -> DNSRecord:
    """``DNSRecord.parse`` on a :class:`_BoundedBuffer`."""
    buffer = _BoundedBuffer(query)
    header = DNSHeader.parse(buffer)
    questions = [DNSQuestion.parse(buffer) for _ in range(header.q)]
    answers, authority, additional = (
        [RR.parse(buffer) for _ in range(count)] for count in (header.a, header.auth, header.ar))
    return DNSRecord(header, questions, answers, auth=authority, ar=additional)


def parse_with_dnslib(query: bytes) -> tuple[Question, Edns | None] | bytes | None:
    """Any other query: its question and EDNS, or the error reply, or None to drop it."""
    if len(query) < 12 or query[2] & 0x80:
        return None  # no header to answer, or itself a response: answering could loop
    if (query[2] >> 3) & 0x0F != OPCODE.QUERY:
        return error_reply(query, RCODE.NOTIMP)
    if query[4:6] != b"\x00\x01":
        return error_reply(query, RCODE.FORMERR)  # RFC 9619: exactly one question
    if query[6:10] != b"\x00\x00\x00\x00" or int.from_bytes(query[10:12], "big") > 2:
        # A query carries no answers and at most an OPT and a signature; this also bounds
        # what dnslib has to read, so no packet costs more than a few records' parsing.
        return error_reply(query, RCODE.FORMERR)
    try:
        request = _parse(query)
    except Exception:  # dnslib raises DNSError, BufferError, UnicodeError and others
        return error_reply(query, RCODE.FORMERR)
    labels = tuple(request.q.qname.label)
    if any(len(part) > 63 for part in labels) or sum(len(part) + 1 for part in labels) > 254:
        return error_reply(query, RCODE.FORMERR)  # dnslib reads these but cannot write them
    options = [record for record in request.ar if record.rtype == QTYPE.OPT]
    if len(options) > 1:
        return error_reply(query, RCODE.FORMERR)  # RFC 6891 6.1.1
    edns = None
    if options:
        flags = options[0].ttl  # extended RCODE, version, DO and the other flags
        edns = Edns(options[0].rclass, (flags >> 16) & 0xFF, bool(flags & 0x8000))
    qtype, qclass = request.q.qtype, request.q.qclass
    wire = name_wire(labels) + _TYPE_CLASS.pack(qtype, qclass)  # uncompressed, as spelled
    return Question(tuple(part.lower() for part in labels), wire, qtype, qclass), edns


def assemble(query: bytes, question: Question, answer: Answer, authoritative: bool,
             opt: bytes, limit: int) -> bytes:
    """The reply message; if it is longer than ``limit``, the truncated one (TC set)."""
    # Echo only the ID, opcode, RD and CD: never TC, AA, RA, AD or an RCODE a query carried.
    flags = bytes((0x80 | (query[2] & 0x79) | (0x04 if authoritative else 0),
                   (query[3] & 0x10) | answer.rcode))
    additional = (*answer.additional, opt) if opt else answer.additional
    reply = b"".join((query[:2], flags,
                      _COUNTS.pack(1, len(answer.answer), len(answer.authority), len(additional)),
                      question.wire, *answer.answer, *answer.authority, *additional))
    if len(reply) <= limit:
        return reply
    truncated = bytes((flags[0] | 0x02, flags[1]))
    return query[:2] + truncated + _COUNTS.pack(1, 0, 0, 1 if opt else 0) + question.wire + opt


class Resolver:
    """Answers queries from the current zone snapshot, rebuilding it when the registry changes."""

    def __init__(self, policy: BootPolicy, settings: ZoneSettings,
                 forward_clients: Sequence[ipaddress.IPv4Network] = ()) -> None:
        """``forward_clients``: the networks whose queries outside the zone go upstream;
        empty when no upstream is configured. Anyone else is REFUSED, so the server is no
        open resolver for whoever reaches it."""
        self._policy = policy
        self._settings = settings
        self._forward_clients = tuple(forward_clients)
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
                zone = self._zone = self._build()
            self._next_check = time.monotonic() + CHECK_INTERVAL
        return zone

    def respond(self, query: bytes, tcp: bool, client: str) -> bytes | Forward | None:
        """The reply, a query to forward, or None to drop the message; ``client`` is the
        sender's IPv4 address."""
        zone = self.zone()
        parsed = parse_plain(query) or parse_with_dnslib(query)
        if not isinstance(parsed, tuple):
            return parsed
        question, edns = parsed
        if tcp:
            limit = TCP_LIMIT
        elif edns is None:
            limit = PLAIN_UDP_LIMIT
        else:
            limit = min(max(edns.payload, PLAIN_UDP_LIMIT), MAX_UDP_PAYLOAD)
        if edns is not None and edns.version != 0:  # RFC 6891 6.1.3
            return assemble(query, question, Answer(NOERROR), False, _OPT_BADVERS, limit)
        in_class = question.qclass in _IN_CLASSES
        answer = zone.lookup(question.name, question.qtype) if in_class else None
        authoritative = answer is not None
        if answer is None:
            if in_class and self._may_forward(client):
                return Forward(query, limit)
            answer = _REFUSED
        opt = b"" if edns is None else _OPT[edns.do]
        return assemble(query, question, answer, authoritative, opt, limit)

    def _may_forward(self, client: str) -> bool:
        if not self._forward_clients:
            return False
        try:
            address = ipaddress.IPv4Address(client)
        except ValueError:
            return False
        return any(address in network for network in self._forward_clients)
