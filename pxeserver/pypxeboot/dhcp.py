"""DHCP on a guest's behalf: DISCOVER, OFFER, REQUEST, ACK with the guest's MAC in chaddr.

pypxeboot runs in dom0 before the guest exists, so it asks with a MAC that is not dom0's own:
the broadcast flag is set, and the reply is read from a socket bound to port 68 (a server
that answers pypxeboot must broadcast, as pxeserver does). No PXE options (60, 93) are sent:
this is not PXE firmware, and a proxyDHCP server must not mistake it for one. The wire format
is pxeserver's own codec, so client and server share one checked parser.
"""

from __future__ import annotations

import secrets
import socket
import time
from dataclasses import dataclass

from pxeserver.dhcp import codec
from pxeserver.dhcp.codec import MessageType, Option
from pxeserver.mac import MacAddress

ATTEMPT_TIMEOUTS = (1.0, 2.0, 4.0, 4.0)  # seconds to wait for each DISCOVER's or REQUEST's reply
REQUESTED = bytes((Option.SUBNET_MASK, Option.ROUTER, Option.DNS_SERVERS, Option.HOSTNAME,
                   Option.DOMAIN_NAME, Option.TFTP_SERVER, Option.BOOTFILE))


class DhcpFailed(RuntimeError):
    """No usable lease; the message says which step got no answer."""


@dataclass(frozen=True)
class Lease:
    ip: str
    next_server: str  # where the boot files are: siaddr, else option 66, else the server id
    boot_file: str
    hostname: str


def _request_packet(mac: MacAddress, xid: int, kind: MessageType, extra: dict[int, bytes] | None = None) -> bytes:
    packet = codec.Packet(op=codec.BOOTREQUEST, xid=xid, chaddr=mac.packed, flags=codec.BROADCAST_FLAG)
    packet.options = {Option.MESSAGE_TYPE: bytes((kind,)), Option.PARAMETER_LIST: REQUESTED,
                      Option.CLIENT_ID: b"\x01" + mac.packed}
    packet.options.update(extra or {})
    return codec.encode(packet)


def _await(sock: socket.socket, mac: MacAddress, xid: int, wanted: set[int], timeout: float) -> codec.Packet | None:
    """The first reply for this exchange of one of the wanted types; others are skipped."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except (TimeoutError, socket.timeout):
            return None
        try:
            reply = codec.parse(data)
        except codec.MalformedPacket:
            continue
        if reply.op == codec.BOOTREPLY and reply.xid == xid and reply.chaddr == mac.packed \
                and reply.message_type in wanted:
            return reply
    return None


def _exchange(sock: socket.socket, mac: MacAddress, xid: int, packet: bytes, wanted: set[int]) -> codec.Packet | None:
    for timeout in ATTEMPT_TIMEOUTS:
        sock.sendto(packet, ("255.255.255.255", 67))
        reply = _await(sock, mac, xid, wanted, timeout)
        if reply is not None:
            return reply
    return None


def obtain_lease(mac: MacAddress, interface: str = "") -> Lease:
    """Run one DHCP exchange for ``mac``; raises DhcpFailed when no server completes it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if interface:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        try:
            sock.bind(("0.0.0.0", 68))
        except PermissionError:
            raise DhcpFailed("DHCP needs root (port 68)") from None
        xid = secrets.randbits(32)
        offer = _exchange(sock, mac, xid, _request_packet(mac, xid, MessageType.DISCOVER), {MessageType.OFFER})
        if offer is None:
            raise DhcpFailed(f"no DHCP offer for {mac}: is it registered, and is the server in full mode?")
        server_id = offer.options.get(Option.SERVER_ID, b"")
        request = _request_packet(mac, xid, MessageType.REQUEST, {
            Option.REQUESTED_IP: codec.ip_bytes(offer.yiaddr), Option.SERVER_ID: server_id})
        ack = _exchange(sock, mac, xid, request, {MessageType.ACK, MessageType.NAK})
    if ack is None:
        raise DhcpFailed(f"no DHCP acknowledgement for {offer.yiaddr}")
    if ack.message_type == MessageType.NAK:
        raise DhcpFailed(f"the DHCP server refused {offer.yiaddr} (NAK)")
    next_server = ack.siaddr
    if next_server == codec.ZERO_IP:
        next_server = ack.options.get(Option.TFTP_SERVER, b"").decode("ascii", "replace") \
            or ack.ip_option(Option.SERVER_ID) or ""
    boot_file = ack.file or ack.options.get(Option.BOOTFILE, b"").rstrip(b"\0")
    return Lease(ip=ack.yiaddr, next_server=next_server,
                 boot_file=boot_file.decode("ascii", "replace"),
                 hostname=ack.options.get(Option.HOSTNAME, b"").decode("ascii", "replace"))
