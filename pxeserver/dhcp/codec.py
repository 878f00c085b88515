"""The DHCP/BOOTP wire format (RFC 951, 2131, 2132, 3396): parse untrusted bytes, build replies.

Hand-written on purpose: there is no well-kept, lightweight Python DHCP library (the PyPI
candidates are unmaintained; scapy is a general packet toolkit, far too slow and heavy for a
server's hot path, so the tests use it only as an independent oracle). The format is small,
and owning the parser lets it check every length against the buffer itself: several dnsmasq
and ISC dhcpd CVEs came from trusting a length byte. Everything here is pure (no sockets).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from enum import IntEnum

from pxeserver.mac import MacAddress

# op htype hlen hops xid secs flags ciaddr yiaddr siaddr giaddr chaddr sname file cookie
_HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128sI")
HEADER_SIZE = _HEADER.size  # 240: the fixed BOOTP header plus the DHCP magic cookie
MAGIC_COOKIE = 0x63825363
# RFC 2131 clients must accept 576-byte messages and some BOOTP-era firmware drops replies
# shorter than the 300-byte BOOTP minimum, so replies are padded up to it.
MIN_REPLY_SIZE = 300
BROADCAST_FLAG = 0x8000
ZERO_IP = "0.0.0.0"
BOOTREQUEST, BOOTREPLY = 1, 2
HTYPE_ETHERNET = 1


class MalformedPacket(ValueError):
    """Bytes that are not a DHCP message we can trust; the message says why."""


class MessageType(IntEnum):
    DISCOVER = 1
    OFFER = 2
    REQUEST = 3
    DECLINE = 4
    ACK = 5
    NAK = 6
    RELEASE = 7
    INFORM = 8


class Option(IntEnum):
    PAD = 0
    SUBNET_MASK = 1
    ROUTER = 3
    DNS_SERVERS = 6
    HOSTNAME = 12
    DOMAIN_NAME = 15
    VENDOR_SPECIFIC = 43
    REQUESTED_IP = 50
    LEASE_TIME = 51
    OVERLOAD = 52
    MESSAGE_TYPE = 53
    SERVER_ID = 54
    PARAMETER_LIST = 55
    MESSAGE = 56
    VENDOR_CLASS = 60
    CLIENT_ID = 61
    TFTP_SERVER = 66
    BOOTFILE = 67
    USER_CLASS = 77
    CLIENT_ARCH = 93
    CLIENT_UUID = 97
    END = 255


@dataclass(slots=True)
class Packet:
    """One BOOTP/DHCP message; addresses as dotted quads, options as raw bytes by code."""

    op: int
    xid: int
    chaddr: bytes  # the client hardware address, hlen bytes (at most 16)
    htype: int = HTYPE_ETHERNET
    hops: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: str = ZERO_IP
    yiaddr: str = ZERO_IP
    siaddr: str = ZERO_IP
    giaddr: str = ZERO_IP
    sname: bytes = b""
    file: bytes = b""
    options: dict[int, bytes] = field(default_factory=dict)

    @property
    def message_type(self) -> int | None:
        value = self.options.get(Option.MESSAGE_TYPE)
        return value[0] if value and len(value) == 1 else None

    @property
    def mac(self) -> MacAddress | None:
        """The Ethernet MAC in chaddr; None for other hardware types, which we do not serve."""
        if self.htype != HTYPE_ETHERNET or len(self.chaddr) != 6:
            return None
        return MacAddress(self.chaddr)

    @property
    def broadcast(self) -> bool:
        return bool(self.flags & BROADCAST_FLAG)

    def ip_option(self, code: int) -> str | None:
        """An option holding one IPv4 address; None when absent or not four bytes."""
        value = self.options.get(code)
        return socket.inet_ntoa(value) if value is not None and len(value) == 4 else None


def parse(data: bytes) -> Packet:
    """Parse one message, checking every length against the buffer; raises MalformedPacket."""
    if len(data) < HEADER_SIZE:
        raise MalformedPacket(f"{len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
    (op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr, sname,
     file, cookie) = _HEADER.unpack_from(data)
    if cookie != MAGIC_COOKIE:
        raise MalformedPacket("no DHCP magic cookie (a plain BOOTP message)")
    if hlen > 16:
        raise MalformedPacket(f"hlen {hlen} is larger than the 16-byte chaddr field")
    options: dict[int, bytes] = {}
    _parse_options(data, HEADER_SIZE, len(data), options)
    overload = options.pop(Option.OVERLOAD, None)
    if overload is not None:
        # RFC 2132 9.3: option 52 lets file (1), sname (2) or both (3) carry more options,
        # parsed in that order. A 52 inside those fields is meaningless and is ignored.
        if len(overload) != 1 or overload[0] not in (1, 2, 3):
            raise MalformedPacket(f"bad option overload value {overload.hex()}")
        if overload[0] & 1:
            _parse_options(file, 0, len(file), options)
            file = b""
        if overload[0] & 2:
            _parse_options(sname, 0, len(sname), options)
            sname = b""
        options.pop(Option.OVERLOAD, None)
    return Packet(
        op=op, xid=xid, chaddr=chaddr[:hlen], htype=htype, hops=hops, secs=secs, flags=flags,
        ciaddr=socket.inet_ntoa(ciaddr), yiaddr=socket.inet_ntoa(yiaddr),
        siaddr=socket.inet_ntoa(siaddr), giaddr=socket.inet_ntoa(giaddr),
        sname=sname.split(b"\0", 1)[0], file=file.split(b"\0", 1)[0], options=options,
    )


def _parse_options(buffer: bytes, start: int, end: int, into: dict[int, bytes]) -> None:
    """Options from buffer[start:end] into ``into``; a repeated code is concatenated (RFC 3396).

    The loop is bounded: every step moves ``at`` forward by at least one byte. A missing END
    is tolerated (some BOOTP-era clients omit it); a length running past the end is not.
    """
    at = start
    while at < end:
        code = buffer[at]
        if code == Option.PAD:
            at += 1
            continue
        if code == Option.END:
            return
        if at + 1 >= end:
            raise MalformedPacket(f"option {code} has no length byte")
        length = buffer[at + 1]
        if at + 2 + length > end:
            raise MalformedPacket(f"option {code} of length {length} runs past the end")
        value = buffer[at + 2 : at + 2 + length]
        into[code] = into[code] + value if code in into else value
        at += 2 + length


def encode(packet: Packet) -> bytes:
    """The wire form: message type first, END last, padded to the BOOTP minimum."""
    head = _HEADER.pack(
        packet.op, packet.htype, len(packet.chaddr), packet.hops, packet.xid, packet.secs,
        packet.flags, socket.inet_aton(packet.ciaddr), socket.inet_aton(packet.yiaddr),
        socket.inet_aton(packet.siaddr), socket.inet_aton(packet.giaddr), packet.chaddr,
        packet.sname, packet.file, MAGIC_COOKIE,
    )
    parts = [head]
    ordered = sorted(packet.options.items(), key=lambda item: item[0] != Option.MESSAGE_TYPE)
    for code, value in ordered:
        # RFC 3396: a value longer than 255 bytes is sent as consecutive instances.
        for offset in range(0, max(len(value), 1), 255):
            chunk = value[offset : offset + 255]
            parts.append(bytes((code, len(chunk))) + chunk)
    parts.append(bytes((Option.END,)))
    wire = b"".join(parts)
    return wire + bytes(max(0, MIN_REPLY_SIZE - len(wire)))


def ip_bytes(*addresses: str) -> bytes:
    """Option value for a list of IPv4 addresses (routers, DNS servers, server id)."""
    return b"".join(socket.inet_aton(address) for address in addresses)
