"""The DHCP decisions: one request's bytes in, at most one reply (bytes and destination) out.

No sockets here, so the RFC 2131 state handling, the proxyDHCP exchange and the fuzz tests
all run without a network. What a MAC boots comes from the BootPolicy; addresses come from the
host's reservation or the LeaseManager's pool. Replies are keyed on chaddr, never on the
client-id (option 61): an installed guest may send a different client-id than its installer.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
from collections.abc import Callable
from typing import NamedTuple

from pxeserver.app import Context
from pxeserver.dhcp import codec
from pxeserver.dhcp.codec import MessageType, Option, Packet
from pxeserver.dhcp.leases import LeaseManager
from pxeserver.mac import MacAddress
from pxeserver.metrics import dhcp_type
from pxeserver.registry import Host, Status

log = logging.getLogger(__name__)

BROADCAST = "255.255.255.255"
CLIENT_PORT = 68
SERVER_PORT = 67
PXE_PORT = 4011
X64_UEFI_ARCHES = (7, 9)  # RFC 4578: 7 is "EFI BC", which real firmware uses for x64; 9 x64
# PXE vendor option 6 (discovery control) bit 3: boot the file named in the reply, skip the
# boot-server discovery and menus (pixiecore and dnsmasq send the same to BIOS PXE ROMs).
PXE_VENDOR_OPTIONS = bytes((6, 1, 0x08, 255))


class Reply(NamedTuple):
    payload: bytes
    address: tuple[str, int]


class Responder:
    def __init__(self, context: Context,
                 mark_netbooting: Callable[[MacAddress], None] | None = None) -> None:
        """``mark_netbooting`` moves a host to NETBOOTING once it is handed its boot file;
        by default at once, the service passes a background writer (see server.py)."""
        config = context.config
        self.config = config
        self.policy = context.policy
        self.metrics = context.metrics.protocol("dhcp")
        self.dhcp = config.dhcp
        self.subnet = ipaddress.IPv4Network(config.dhcp.subnet)
        self.server_ip = config.advertised_address
        self.proxy = config.dhcp.mode == "proxy"
        if not self._in_subnet(self.server_ip) and not self.proxy:
            log.warning("dhcp: clients on %s will be told next-server %s, which is outside "
                        "their subnet; set [server] address", self.subnet, self.server_ip)
        self.mark_netbooting = mark_netbooting or (
            lambda mac: context.policy.advance(mac, Status.NETBOOTING))
        excluded = {self.server_ip, str(self.subnet.network_address),
                    str(self.subnet.broadcast_address)}
        if config.dhcp.router:
            excluded.add(config.dhcp.router)
        self.leases = LeaseManager(context.store, config.dhcp.pool_start, config.dhcp.pool_end,
                                   excluded, self.subnet, config.dhcp.unknown_pool_share)
        dns = [self.server_ip] if config.dns.enabled else list(config.dhcp.dns_servers)
        # Options every address-granting reply carries, encoded once.
        self._common: dict[int, bytes] = {
            Option.SERVER_ID: codec.ip_bytes(self.server_ip),
            Option.SUBNET_MASK: socket.inet_aton(str(self.subnet.netmask)),
            Option.DOMAIN_NAME: config.dns.domain.encode(),
            Option.TFTP_SERVER: self.server_ip.encode(),
        }
        if config.dhcp.router:
            self._common[Option.ROUTER] = codec.ip_bytes(config.dhcp.router)
        if dns:
            self._common[Option.DNS_SERVERS] = codec.ip_bytes(*dns)

    # -- entry point ----------------------------------------------------------------------

    def respond(self, data: bytes, source: tuple[str, int], local_port: int) -> Reply | None:
        """The reply to one datagram, or None to stay silent (malformed, not ours, unknown)."""
        try:
            packet = codec.parse(data)
        except codec.MalformedPacket as exc:
            log.debug("dropped a malformed DHCP packet from %s: %s", source[0], exc)
            self.metrics.drop("malformed")
            return None
        mac = packet.mac
        if packet.op != codec.BOOTREQUEST or mac is None or packet.message_type is None:
            self.metrics.drop("malformed")
            return None
        self.metrics.request(dhcp_type(packet.message_type))
        if packet.giaddr != codec.ZERO_IP and not self._in_subnet(packet.giaddr):
            self.metrics.drop("foreign_relay")
            return None  # a relay for a network this server was not configured for
        host = self.policy.host(mac)
        if host is None and not self.dhcp.serve_unknown:
            log.debug("ignored DHCP from unregistered MAC %s", mac)
            self.metrics.drop("unknown_client")
            return None
        if self.proxy:
            return self._proxy(packet, mac, host, source, local_port == PXE_PORT)
        return self._full(packet, mac, host, source)

    # -- full mode ------------------------------------------------------------------------

    def _full(self, packet: Packet, mac: MacAddress, host: Host | None,
              source: tuple[str, int]) -> Reply | None:
        kind = packet.message_type
        if kind == MessageType.DISCOVER:
            ip = self._address(mac, host, packet.ip_option(Option.REQUESTED_IP))
            if ip is None:
                self._record(host, mac, "DISCOVER: no address to offer")
                self.metrics.drop("no_address")
                return None
            return self._grant(packet, mac, host, MessageType.OFFER, ip)
        if kind == MessageType.REQUEST:
            return self._request(packet, mac, host)
        if kind == MessageType.DECLINE:
            self._decline(packet, mac, host)
        elif kind == MessageType.RELEASE:
            self.leases.release(mac, packet.ciaddr)
            self._record(host, mac, f"RELEASE of {packet.ciaddr}")
        elif kind == MessageType.INFORM and self._may_inform(packet, mac, host, source[0]):
            return self._grant(packet, mac, host, MessageType.ACK, None)
        return None

    def _may_inform(self, packet: Packet, mac: MacAddress, host: Host | None,
                    source_ip: str) -> bool:
        """RFC 2131 4.3.5 sends the ACK to ciaddr, so anyone could aim it at any address.

        Answer only an address in our subnet that is the sender's own: the packet's source,
        or the MAC's reservation or lease. A relayed INFORM is answered through the relay.
        """
        ciaddr = packet.ciaddr
        if ciaddr == codec.ZERO_IP or not self._in_subnet(ciaddr):
            log.debug("dhcp: INFORM from %s for %s outside %s dropped", mac, ciaddr, self.subnet)
            return False
        if packet.giaddr != codec.ZERO_IP or ciaddr == source_ip:
            return True
        if host is not None and host.ip == ciaddr:
            return True
        if self.leases.leased_ip(mac) == ciaddr:
            return True
        log.debug("dhcp: INFORM from %s names %s but came from %s: dropped", mac, ciaddr, source_ip)
        return False

    def _request(self, packet: Packet, mac: MacAddress, host: Host | None) -> Reply | None:
        server_id = packet.ip_option(Option.SERVER_ID)
        if server_id is not None and server_id != self.server_ip:
            self.leases.forget_offer(mac)  # it chose another server: stay silent (RFC 2131 4.3.2)
            return None
        requested = packet.ip_option(Option.REQUESTED_IP)
        if requested is None and packet.ciaddr != codec.ZERO_IP:
            requested = packet.ciaddr  # renewing or rebinding
        if requested is None:
            return None
        if host is not None and host.ip:
            granted = requested == host.ip and self._in_subnet(requested)
        else:
            granted = self.leases.bind(mac, requested, self.dhcp.lease_time, host is not None)
        if not granted:
            self._record(host, mac, f"NAK for {requested}")
            return self._nak(packet, f"{requested} is not your address on {self.subnet}")
        return self._grant(packet, mac, host, MessageType.ACK, requested)

    def _decline(self, packet: Packet, mac: MacAddress, host: Host | None) -> None:
        server_id = packet.ip_option(Option.SERVER_ID)
        declined = packet.ip_option(Option.REQUESTED_IP)
        if declined is None or server_id not in (None, self.server_ip):
            return
        if host is not None and host.ip == declined:
            log.warning("%s declined its reserved address %s: another machine is using it",
                        mac, declined)
        elif not self.leases.decline(mac, declined, host is not None):
            log.debug("dhcp: DECLINE of %s from %s, which was not given it: ignored", declined, mac)
            return
        self._record(host, mac, f"DECLINE of {declined}: address in use by another machine")

    def _address(self, mac: MacAddress, host: Host | None, hint: str | None) -> str | None:
        if host is not None and host.ip:
            if self._in_subnet(host.ip):
                return host.ip
            log.error("host %s has IP %s outside the DHCP subnet %s", mac, host.ip, self.subnet)
            return None
        return self.leases.offer(mac, hint, host is not None)

    def _grant(self, packet: Packet, mac: MacAddress, host: Host | None, kind: MessageType,
               ip: str | None) -> Reply:
        """An OFFER or ACK (ip None: an INFORM's ACK, which carries no address or lease time)."""
        boot_file = self.boot_file(packet, mac)
        options = dict(self._common)
        options[Option.MESSAGE_TYPE] = bytes((kind,))
        if ip is not None:
            options[Option.LEASE_TIME] = struct.pack("!I", self.dhcp.lease_time)
        if host is not None:
            options[Option.HOSTNAME] = self._short_name(host.hostname).encode()
        if boot_file:
            options[Option.BOOTFILE] = boot_file.encode()
        reply = self._reply(packet, options, yiaddr=ip or codec.ZERO_IP, file=boot_file)
        if kind == MessageType.ACK and ip is not None:
            self._record(host, mac, f"ACK {ip}, boot file {boot_file or '(none)'}")
            if host is not None and host.netboot and boot_file and host.status == Status.REGISTERED:
                self.mark_netbooting(mac)
        elif kind == MessageType.OFFER:
            self._record(host, mac, f"OFFER {ip}")
        return Reply(codec.encode(reply), self._destination(packet))

    def _nak(self, packet: Packet, message: str) -> Reply:
        options: dict[int, bytes] = {
            Option.MESSAGE_TYPE: bytes((MessageType.NAK,)),
            Option.SERVER_ID: self._common[Option.SERVER_ID],
            Option.MESSAGE: message.encode(),
        }
        reply = self._reply(packet, options, siaddr=codec.ZERO_IP)
        if packet.giaddr != codec.ZERO_IP:
            # RFC 2131 4.3.2: a NAK through a relay asks it to broadcast to the client.
            reply.flags |= codec.BROADCAST_FLAG
            return Reply(codec.encode(reply), (packet.giaddr, SERVER_PORT))
        return Reply(codec.encode(reply), (BROADCAST, CLIENT_PORT))

    # -- proxyDHCP (PXE specification 2.1) ------------------------------------------------

    def _proxy(self, packet: Packet, mac: MacAddress, host: Host | None,
               source: tuple[str, int], on_pxe_port: bool) -> Reply | None:
        """PXE firmware only: an address-less offer on 67, the boot file on 4011.

        The network's own DHCP server hands out the address; our offer (option 60
        "PXEClient", no file) makes the ROM ask us on port 4011 once it is configured, and
        that ACK names the boot file. pypxeboot's udhcpc sends no option 60 and cannot use
        this: it needs full mode.
        """
        if not packet.options.get(Option.VENDOR_CLASS, b"").startswith(b"PXEClient"):
            return None
        options: dict[int, bytes] = {
            Option.SERVER_ID: self._common[Option.SERVER_ID],
            Option.VENDOR_CLASS: b"PXEClient",
            Option.VENDOR_SPECIFIC: PXE_VENDOR_OPTIONS,
        }
        if Option.CLIENT_UUID in packet.options:
            options[Option.CLIENT_UUID] = packet.options[Option.CLIENT_UUID]
        kind = packet.message_type
        if not on_pxe_port:
            if kind != MessageType.DISCOVER:
                return None  # its REQUEST on 67 is for the network's DHCP server
            options[Option.MESSAGE_TYPE] = bytes((MessageType.OFFER,))
            self._record(host, mac, "proxyDHCP OFFER")
            return Reply(codec.encode(self._reply(packet, options)), self._destination(packet))
        if kind not in (MessageType.REQUEST, MessageType.INFORM):
            return None
        boot_file = self.boot_file(packet, mac)
        if not boot_file:
            return None
        options[Option.MESSAGE_TYPE] = bytes((MessageType.ACK,))
        options[Option.TFTP_SERVER] = self._common[Option.TFTP_SERVER]
        options[Option.BOOTFILE] = boot_file.encode()
        self._record(host, mac, f"proxyDHCP ACK on port {PXE_PORT}, boot file {boot_file}")
        if host is not None and host.netboot and host.status == Status.REGISTERED:
            self.mark_netbooting(mac)
        reply = self._reply(packet, options, file=boot_file)
        # The ROM is configured by now and listens where it sent from (port 68 or 4011).
        return Reply(codec.encode(reply), source)

    # -- shared pieces --------------------------------------------------------------------

    def boot_file(self, packet: Packet, mac: MacAddress) -> str:
        """What this client should load next; empty when we have nothing for its firmware.

        A host with netboot off still gets its loader: pxelinux (and pypxeboot) then find
        the host's local-boot config, which is how a disabled host boots its disk instead of
        falling through to the default menu.
        """
        user_class = packet.options.get(Option.USER_CLASS, b"")
        # iPXE sends "iPXE" raw; an RFC 3004 encoder prefixes the length. Only iPXE gets the
        # script URL: handing it to the PXE ROM would load a script it cannot run, and
        # handing iPXE its own binary again would loop. With ipxe_chain "pxelinux" iPXE gets
        # the firmware's loader like a PXE ROM would (iPXE runs pxelinux.0 and syslinux.efi).
        if user_class in (b"iPXE", b"\x04iPXE") and self.config.boot.ipxe_chain == "script":
            return f"{self.config.http_base_url}/ipxe/{mac.dashed}"
        arch_option = packet.options.get(Option.CLIENT_ARCH, b"")
        arch = int.from_bytes(arch_option[:2], "big") if len(arch_option) >= 2 else 0
        if arch == 0:
            return self.config.boot.bios_loader
        if arch in X64_UEFI_ARCHES:
            return self.config.boot.efi_loader
        return ""  # IA32 EFI, ARM64, HTTP boot...: no loader configured for these

    def _reply(self, packet: Packet, options: dict[int, bytes], *, yiaddr: str = codec.ZERO_IP,
               siaddr: str | None = None, file: str = "") -> Packet:
        # siaddr always set: the original pypxeboot reads only siaddr, never option 66.
        return Packet(
            op=codec.BOOTREPLY, xid=packet.xid, chaddr=packet.chaddr, htype=packet.htype,
            flags=packet.flags, ciaddr=packet.ciaddr, yiaddr=yiaddr,
            siaddr=self.server_ip if siaddr is None else siaddr, giaddr=packet.giaddr,
            file=file.encode()[:127], options=options,
        )

    def _destination(self, packet: Packet) -> tuple[str, int]:
        """RFC 2131 4.1: relay first, then a configured client's own address, else broadcast.

        Unconfigured clients always get a broadcast, even without the broadcast flag: a
        unicast to yiaddr would need an ARP entry we cannot set without raw sockets, and
        pypxeboot's udhcpc runs in dom0 with the guest's MAC, so only a broadcast reaches it.
        """
        if packet.giaddr != codec.ZERO_IP:
            return packet.giaddr, SERVER_PORT
        if packet.ciaddr != codec.ZERO_IP:
            return packet.ciaddr, CLIENT_PORT
        return BROADCAST, CLIENT_PORT

    def _in_subnet(self, ip: str) -> bool:
        try:
            return ipaddress.IPv4Address(ip) in self.subnet
        except ValueError:
            return False

    def _short_name(self, hostname: str) -> str:
        """Option 12 is the host name; the domain travels in option 15."""
        suffix = "." + self.config.dns.domain
        return hostname[: -len(suffix)] if hostname.endswith(suffix) else hostname

    def _record(self, host: Host | None, mac: MacAddress, message: str) -> None:
        if host is not None:  # unknown MACs would fill the registry with timelines
            self.policy.record(mac, "dhcp", message)
