"""The DHCP service against real clients (busybox udhcpc, ISC dhclient) and scapy-built
packets, across a veth pair between two network namespaces this module creates."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from dhcp_support import (
    CLIENT_IF,
    DNS_SERVER,
    RELAY_IP,
    SERVER_IF,
    SERVER_IP,
    Link,
    can_make_namespaces,
    inside,
    udhcpc,
    veth_link,
)
from scapy.layers.dhcp import BOOTP, DHCP

from pxeserver import app
from pxeserver.dhcp.server import DhcpService
from pxeserver.mac import MacAddress
from pxeserver.registry import Status

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not can_make_namespaces(), reason="needs root for network namespaces"),
]

HOST_MAC = "00:16:3e:12:34:56"
HOST_IP = "10.77.0.10"


@pytest.fixture(scope="module")
def link() -> Iterator[Link]:
    with veth_link("pxd") as made:
        yield made


def register(context: app.Context, mac: str = HOST_MAC, ip: str | None = HOST_IP,
             hostname: str = "web1") -> None:
    data = {"mac": mac, "hostname": hostname, "profile": "deb"}
    if ip:
        data["ip"] = ip
    context.provisioning.add_host(data)


def client_socket(link: Link, port: int, address: str = "0.0.0.0") -> socket.socket:
    """A UDP socket in the client namespace, on the client's interface."""
    with inside(link.client_ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, CLIENT_IF.encode())
    sock.bind((address, port))
    sock.settimeout(2.0)
    return sock


def request(mac: str, kind: str, *options: tuple[str, object], giaddr: str = "0.0.0.0",
            ciaddr: str = "0.0.0.0", xid: int = 0x1234) -> bytes:
    """A BOOTREQUEST built by scapy, the independent oracle for our codec."""
    chaddr = MacAddress.parse(mac).packed + bytes(10)
    return bytes(BOOTP(op=1, xid=xid, chaddr=chaddr, giaddr=giaddr, ciaddr=ciaddr,
                       hops=1 if giaddr != "0.0.0.0" else 0)
                 / DHCP(options=[("message-type", kind), *options, "end"]))


def receive(sock: socket.socket) -> tuple[BOOTP, dict[str, object]] | None:
    try:
        data, _ = sock.recvfrom(4096)
    except TimeoutError:
        return None
    reply = BOOTP(data)
    options = {o[0]: (o[1] if len(o) == 2 else o[1:]) for o in reply[DHCP].options
               if isinstance(o, tuple)}
    return reply, options


def test_udhcpc_gets_the_reservation_and_everything_pypxeboot_reads(start_server, link, tmp_path):
    context = start_server()
    register(context)
    link.set_client_mac(HOST_MAC)
    env = udhcpc(link, tmp_path)
    assert env is not None, "udhcpc got no lease"
    assert env["ip"] == HOST_IP
    assert env["siaddr"] == SERVER_IP  # pypxeboot fails without it
    assert env["boot_file"] == "pxelinux.0"
    assert env["bootfile"] == "pxelinux.0" and env["tftp"] == SERVER_IP
    assert env["hostname"] == "web1" and env["domain"] == "domu.example"
    assert env["router"] == SERVER_IP and env["dns"].strip() == DNS_SERVER
    assert env["subnet"] == "255.255.255.0" and env["serverid"] == SERVER_IP
    mac = MacAddress.parse(HOST_MAC)
    deadline = time.monotonic() + 5  # the status is written after the ACK has gone out
    while context.policy.host(mac).status is not Status.NETBOOTING and time.monotonic() < deadline:
        time.sleep(0.05)
    assert context.policy.host(mac).status is Status.NETBOOTING
    context.timeline.flush()
    messages = [e.message for e in context.store.events(mac) if e.source == "dhcp"]
    assert f"OFFER {HOST_IP}" in messages and f"ACK {HOST_IP}, boot file pxelinux.0" in messages


def test_udhcpc_with_an_unregistered_mac_gets_nothing(start_server, link, tmp_path):
    context = start_server()
    register(context)
    link.set_client_mac("00:16:3e:00:00:99")
    assert udhcpc(link, tmp_path, attempts=2) is None


def test_dhclient_gets_a_pool_address_kept_in_the_registry(start_server, link, tmp_path):
    context = start_server(pool_start="10.77.0.100", pool_end="10.77.0.110")
    register(context, ip=None)
    link.set_client_mac(HOST_MAC)
    out, script = tmp_path / "dhclient.env", tmp_path / "dhclient.sh"
    script.write_text(f'#!/bin/sh\ncase "$reason" in BOUND) env > {out}.tmp; mv {out}.tmp {out};; esac\n')
    script.chmod(0o755)
    client = subprocess.Popen(
        ["ip", "netns", "exec", link.client_ns, "dhclient", "-d", "-1", "-sf", str(script),
         "-lf", str(tmp_path / "leases"), "-pf", str(tmp_path / "pid"), CLIENT_IF],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not out.exists() and time.monotonic() < deadline and client.poll() is None:
            time.sleep(0.1)
    finally:
        client.terminate()
        client.wait(timeout=10)
    assert out.exists(), "dhclient got no lease"
    env = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    assert env["new_ip_address"] == "10.77.0.100"
    assert env["new_host_name"] == "web1" and env["new_routers"] == SERVER_IP
    assert env["new_filename"] == "pxelinux.0"
    lease = context.store.find_lease(MacAddress.parse(HOST_MAC))
    assert lease is not None and lease.ip == "10.77.0.100"


def test_broadcast_reply_reaches_a_client_whose_mac_is_not_the_interfaces(start_server, link):
    # pypxeboot runs udhcpc in dom0 with the guest's MAC: only a broadcast gets back to it.
    context = start_server()
    register(context)
    link.set_client_mac("02:00:00:00:00:01")
    with client_socket(link, 68) as sock:
        sock.sendto(request(HOST_MAC, "discover"), ("255.255.255.255", 67))
        got = receive(sock)
    assert got is not None
    reply, options = got
    assert options["message-type"] == 2 and reply.yiaddr == HOST_IP and reply.siaddr == SERVER_IP


def test_relayed_request_is_answered_through_the_relay(start_server, link):
    context = start_server()
    register(context)
    with client_socket(link, 67, RELAY_IP) as relay:
        relay.sendto(request(HOST_MAC, "discover", giaddr=RELAY_IP), (SERVER_IP, 67))
        got = receive(relay)
        assert got is not None
        offer, options = got
        assert options["message-type"] == 2 and offer.yiaddr == HOST_IP
        assert offer.giaddr == RELAY_IP and options["server_id"] == SERVER_IP
        relay.sendto(request(HOST_MAC, "request", ("server_id", SERVER_IP),
                             ("requested_addr", HOST_IP), giaddr=RELAY_IP), (SERVER_IP, 67))
        got = receive(relay)
    assert got is not None
    ack, options = got
    assert options["message-type"] == 5 and ack.yiaddr == HOST_IP
    assert options["lease_time"] == 3600 and ack.file.rstrip(b"\0") == b"pxelinux.0"


def test_request_for_an_address_outside_the_subnet_is_naked(start_server, link):
    context = start_server()
    register(context)
    with client_socket(link, 68) as sock:
        sock.sendto(request(HOST_MAC, "request", ("requested_addr", "192.168.9.9")),
                    ("255.255.255.255", 67))
        got = receive(sock)
    assert got is not None and got[1]["message-type"] == 6


def test_proxy_mode_offers_no_address_and_names_the_boot_file_on_4011(start_server, link):
    context = start_server(mode="proxy")
    register(context)
    pxe = [("vendor_class_id", b"PXEClient:Arch:00000:UNDI:002001"),
           ("client_id", b"\x01" + MacAddress.parse(HOST_MAC).packed)]
    with client_socket(link, 68) as sock:
        sock.sendto(request(HOST_MAC, "discover", *pxe), ("255.255.255.255", 67))
        got = receive(sock)
        assert got is not None
        offer, options = got
        assert options["message-type"] == 2 and offer.yiaddr == "0.0.0.0"
        assert options["vendor_class_id"] == b"PXEClient" and offer.file.strip(b"\0") == b""
        assert offer.siaddr == SERVER_IP
        # Configured by the network's own DHCP server, the ROM asks us on port 4011.
        sock.sendto(request(HOST_MAC, "request", *pxe, ciaddr=RELAY_IP), (SERVER_IP, 4011))
        got = receive(sock)
        assert got is not None
        ack, options = got
        assert options["message-type"] == 5 and ack.file.rstrip(b"\0") == b"pxelinux.0"
        assert ack.siaddr == SERVER_IP
        # A client without option 60 (pypxeboot's udhcpc) is not a PXE ROM: no proxy offer.
        sock.settimeout(0.5)
        sock.sendto(request(HOST_MAC, "discover"), ("255.255.255.255", 67))
        assert receive(sock) is None


def test_a_missing_interface_is_one_clear_error(link, config):
    config.dhcp.interface = "nosuch0"
    context = app.build(config)
    try:
        with inside(link.server_ns), pytest.raises(OSError, match="no network interface named 'nosuch0'"):
            DhcpService(context).start()
    finally:
        context.close()


NOT_ROOT_SCRIPT = """
import tempfile
from pathlib import Path
from pxeserver import app
from pxeserver.config import Config
from pxeserver.dhcp.server import DhcpService
with tempfile.TemporaryDirectory() as tmp:
    config = Config(base_dir=Path(tmp))
    config.server.address, config.server.data_dir, config.server.tftp_root = "10.77.0.1", tmp, tmp
    config.dhcp.interface = "lo"
    context = app.build(config)
    try:
        DhcpService(context).start()
    except OSError as exc:
        print(exc)
    context.close()
"""


def test_without_root_the_service_says_so_in_one_line():
    # Refused at SO_BINDTODEVICE or at binding port 67: nothing is ever sent. Root's privileges
    # are its capabilities: the child keeps uid 0 (so it can still read a checkout only root may
    # enter, as a fresh clone under mktemp -d is) and loses every capability, as a user has none.
    result = subprocess.run(
        ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs",
         sys.executable, "-c", NOT_ROOT_SCRIPT], capture_output=True, text=True, timeout=60, cwd="/tmp")
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "needs root" in lines[0], result.stdout + result.stderr


def test_garbage_and_floods_do_not_stop_the_service(start_server, link):
    context = start_server()
    register(context)
    valid = request(HOST_MAC, "discover")
    garbage = [b"", b"\x01" * 300, valid[:239], valid[:2] + b"\xff" + valid[3:],
               valid[:240] + bytes([12, 200]) + b"x", valid[:240] + bytes([52, 1, 3]) + b"\xff"]
    with client_socket(link, 68) as sock:
        for data in garbage:
            sock.sendto(data, ("255.255.255.255", 67))
        # One MAC sending 40 DISCOVERs at once gets at most the per-MAC burst answered ...
        for _ in range(40):
            sock.sendto(valid, ("255.255.255.255", 67))
        sock.settimeout(0.5)
        answered = 0
        while receive(sock) is not None:
            answered += 1
        assert 1 <= answered <= 30
        # ... and the next client is still served.
        register(context, mac="00:16:3e:12:34:57", ip="10.77.0.11", hostname="web2")
        sock.sendto(request("00:16:3e:12:34:57", "discover"), ("255.255.255.255", 67))
        got = receive(sock)
    assert got is not None and got[0].yiaddr == "10.77.0.11"


def test_a_receive_loop_that_dies_says_why_and_keeps_the_error(link, config, caplog):
    config.server.address, config.dhcp.interface = SERVER_IP, SERVER_IF
    context = app.build(config)
    service = DhcpService(context)
    with inside(link.server_ns):
        service.start()
    try:
        assert context.supervisor.wait(timeout=0.5) is None
        service._sockets[0].close()  # the socket goes bad under the loop (as EBADF would)
        failure = context.supervisor.wait(timeout=5)
        assert failure is not None and failure.service == "dhcp"
        assert isinstance(failure.error, (OSError, ValueError))
        assert "dhcp failed: " in caplog.text
    finally:
        service.stop()
        context.close()
