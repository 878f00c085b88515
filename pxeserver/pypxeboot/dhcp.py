"""DHCP on a guest's behalf: DISCOVER, OFFER, REQUEST, ACK with the guest's MAC in chaddr.

pypxeboot runs in dom0 before the guest exists, so it asks with a MAC that is not dom0's own:
the broadcast flag is set, and the reply is read from a socket bound to port 68 (a server
that answers pypxeboot must broadcast, as pxeserver does). No PXE options (60, 93) are sent:
this is not PXE firmware, and a proxyDHCP server must not mistake it for one. The wire format
is pxeserver's own codec, so client and server share one checked parser.

Anyone on the bridge sees the broadcast DISCOVER (xid and MAC) and can answer it, so a reply
counts only from the server this exchange trusts: the one pinned with ``dhcp_server=IP``
(its server id and the reply's source address must both be that IP), else the first server to
offer (its server id and source address together); the ACK must then come from the same.

Every pypxeboot in a dom0 listens on port 68 at once, and the kernel hands each broadcast reply
to every such socket: in a storm of 200 guests each would wake for, and parse, the replies to
all the others, and a guest flooding port 68 would be parsed by all of them. So the socket
carries a classic BPF filter (``SO_ATTACH_FILTER``) that lets only datagrams with this
exchange's xid through; the Python checks below still decide what counts.
"""

from __future__ import annotations

import array
import ipaddress
import re
import secrets
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from pxeserver.dhcp import codec
from pxeserver.dhcp.codec import MessageType, Option
from pxeserver.mac import MacAddress

ATTEMPT_TIMEOUTS = (1.0, 2.0, 4.0, 4.0)  # seconds to wait for each DISCOVER's or REQUEST's reply
_PLAIN_NAME = re.compile(rb"[!-~]{0,128}")  # printable ASCII, no blanks: it prefixes TFTP paths
REQUESTED = bytes((Option.SUBNET_MASK, Option.ROUTER, Option.DNS_SERVERS, Option.HOSTNAME,
                   Option.DOMAIN_NAME, Option.TFTP_SERVER, Option.BOOTFILE))
SO_ATTACH_FILTER = 26  # <asm-generic/socket.h>; Python's socket module does not name it
_XID_OFFSET = 8 + 4  # a UDP socket's filter reads from the UDP header; the xid follows op..hops


class DhcpFailed(RuntimeError):
    """No usable lease; the message says which step got no answer."""


@dataclass(frozen=True)
class Lease:
    ip: str
    next_server: str  # where the boot files are: siaddr, else option 66, else the server id
    boot_file: str


def _request_packet(mac: MacAddress, xid: int, kind: MessageType, extra: dict[int, bytes] | None = None) -> bytes:
    packet = codec.Packet(op=codec.BOOTREQUEST, xid=xid, chaddr=mac.packed, flags=codec.BROADCAST_FLAG)
    packet.options = {Option.MESSAGE_TYPE: bytes((kind,)), Option.PARAMETER_LIST: REQUESTED,
                      Option.CLIENT_ID: b"\x01" + mac.packed}
    packet.options.update(extra or {})
    return codec.encode(packet)


@dataclass(frozen=True)
class Origin:
    """Who sent a reply: its server id (option 54) and the address the datagram came from."""

    server_id: str
    address: str


def _await(sock: socket.socket, mac: MacAddress, xid: int, wanted: set[int], timeout: float,
           trusted: Callable[[Origin], bool]) -> tuple[codec.Packet, Origin] | None:
    """The first reply for this exchange of one of the wanted types from a trusted server;
    anything else is skipped."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, (address, _) = sock.recvfrom(4096)
        except TimeoutError:
            return None
        try:
            reply = codec.parse(data)
        except codec.MalformedPacket:
            continue
        origin = Origin(reply.ip_option(Option.SERVER_ID) or "", address)
        if reply.op == codec.BOOTREPLY and reply.xid == xid and reply.chaddr == mac.packed \
                and reply.message_type in wanted and origin.server_id and trusted(origin):
            return reply, origin
    return None


def _exchange(sock: socket.socket, mac: MacAddress, xid: int, packet: bytes, wanted: set[int],
              trusted: Callable[[Origin], bool], deadline: float) -> tuple[codec.Packet, Origin] | None:
    for timeout in ATTEMPT_TIMEOUTS:
        if time.monotonic() >= deadline:
            raise DhcpFailed("the boot's deadline passed during DHCP (deadline=)")
        sock.sendto(packet, ("255.255.255.255", 67))
        answer = _await(sock, mac, xid, wanted, min(timeout, deadline - time.monotonic()), trusted)
        if answer is not None:
            return answer
    return None


def only_exchange(sock: socket.socket, xid: int) -> None:
    """Let the kernel queue to ``sock`` only UDP datagrams whose DHCP xid is ``xid``."""
    instruction = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k
    program = array.array("B", b"".join((
        instruction.pack(0x20, 0, 0, _XID_OFFSET),  # BPF_LD|BPF_W|BPF_ABS: A = 32 bits there (big-endian)
        instruction.pack(0x15, 0, 1, xid),  # BPF_JMP|BPF_JEQ|BPF_K: A == xid? next : skip one
        instruction.pack(0x06, 0, 0, 0xFFFFFFFF),  # BPF_RET|BPF_K: the whole datagram
        instruction.pack(0x06, 0, 0, 0),  # BPF_RET|BPF_K: none of it
    )))
    address, length = program.buffer_info()
    # struct sock_fprog: the instruction count, then a pointer to them (native layout)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("@HP", length // instruction.size, address))


def obtain_lease(mac: MacAddress, interface: str, pinned: str, deadline: float) -> Lease:
    """Run one DHCP exchange for ``mac`` with the server ``pinned`` (an IP; "": none), else with the
    first server that offers, by ``deadline`` (a time.monotonic() value); raises DhcpFailed
    when that server does not complete it."""
    xid = secrets.randbits(32)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        only_exchange(sock, xid)  # before bind: nothing of other exchanges is ever queued
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if interface:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        try:
            sock.bind(("0.0.0.0", 68))
        except PermissionError:
            raise DhcpFailed("DHCP needs root (port 68)") from None
        discover = _request_packet(mac, xid, MessageType.DISCOVER)
        answer = _exchange(sock, mac, xid, discover, {MessageType.OFFER},
                           lambda origin: not pinned or origin == Origin(pinned, pinned), deadline)
        if answer is None:
            raise DhcpFailed(f"no DHCP offer for {mac}" + (f" from {pinned}" if pinned else "")
                             + ": is it registered, and is the server in full mode?")
        offer, server = answer
        request = _request_packet(mac, xid, MessageType.REQUEST, {
            Option.REQUESTED_IP: codec.ip_bytes(offer.yiaddr), Option.SERVER_ID: codec.ip_bytes(server.server_id)})
        answer = _exchange(sock, mac, xid, request, {MessageType.ACK, MessageType.NAK},
                           lambda origin: origin == server, deadline)
    if answer is None:
        raise DhcpFailed(f"no DHCP acknowledgement for {offer.yiaddr} from {server.server_id}")
    ack = answer[0]
    if ack.message_type == MessageType.NAK:
        raise DhcpFailed(f"the DHCP server refused {offer.yiaddr} (NAK)")
    next_server = ack.siaddr
    if next_server == codec.ZERO_IP:
        next_server = ack.options.get(Option.TFTP_SERVER, b"").decode("ascii", "replace") or server.server_id
    try:
        ipaddress.IPv4Address(next_server)
    except ValueError:
        raise DhcpFailed(f"the DHCP server's next-server {next_server!r} is not an IPv4 address") from None
    boot_file = ack.file or ack.options.get(Option.BOOTFILE, b"").split(b"\0", 1)[0]
    if not _PLAIN_NAME.fullmatch(boot_file):
        raise DhcpFailed(f"the DHCP server's boot file name {boot_file!r} is not a plain path")
    return Lease(ip=ack.yiaddr, next_server=next_server, boot_file=boot_file.decode("ascii"))
