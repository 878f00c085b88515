"""Attacks on the DHCP service from the guest network, performed for real across a veth pair
between two namespaces this module creates: DECLINE and DISCOVER floods from random MACs
(scapy-built packets on UDP sockets) and INFORMs that name someone else's address, each while
busybox udhcpc, the client pypxeboot runs, asks for an address with a registered MAC."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from dhcp_support import CLIENT_IF, RELAY_IP, SERVER_IP, Link, can_make_namespaces, inside, run, udhcpc, veth_link
from scapy.layers.dhcp import BOOTP, DHCP
from test_dhcp_clients import HOST_MAC, register, request

from pxeserver.mac import MacAddress

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(not can_make_namespaces(), reason="needs root for network namespaces"),
]

POOL = [f"10.77.0.{n}" for n in range(100, 120)]
SECOND_MAC = "00:16:3e:12:34:57"


@pytest.fixture(scope="module")
def link() -> Iterator[Link]:
    with veth_link("pxa") as made:
        yield made


def random_macs(count: int, seed: int) -> list[str]:
    chooser = random.Random(seed)
    return [":".join(f"{b:02x}" for b in (0x02, *chooser.randbytes(5))) for _ in range(count)]


def flood_socket(link: Link, port: int = 0) -> socket.socket:
    """A UDP socket in the client namespace that broadcasts on the client interface."""
    with inside(link.client_ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, CLIENT_IF.encode())
    sock.bind(("0.0.0.0", port))
    return sock


def send_all(sock: socket.socket, packets: list[bytes], pace: int = 200) -> None:
    """Send every packet to the server's broadcast port, pausing briefly every ``pace``
    packets so the flood is a flood, not just an overrun receive buffer."""
    for number, data in enumerate(packets):
        try:
            sock.sendto(data, ("255.255.255.255", 67))
        except OSError:  # the client side's own send buffer is full: drop, as a flood would
            pass
        if number % pace == pace - 1:
            time.sleep(0.01)


class Background(threading.Thread):
    """Runs ``work`` again and again until stopped (at most ``limit`` seconds)."""

    def __init__(self, work, limit: float = 30.0) -> None:
        super().__init__(daemon=True)
        self.work, self.limit, self.rounds = work, limit, 0
        self.halt = threading.Event()

    def run(self) -> None:
        ends = time.monotonic() + self.limit
        while not self.halt.is_set() and time.monotonic() < ends:
            self.work()
            self.rounds += 1

    def __enter__(self) -> Background:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.halt.set()
        self.join(timeout=self.limit)


def test_decline_flood_from_random_macs_quarantines_nothing(start_server, link, tmp_path):
    # Served, unknown MACs could take part in the exchange; a registered MAC (its owner's, or
    # spoofed: MACs are visible on the bridge) names addresses it was never given.
    context = start_server(pool_start=POOL[0], pool_end=POOL[-1], serve_unknown=True)
    register(context, ip=None)
    register(context, mac=SECOND_MAC, ip=None, hostname="web2")
    macs = [*random_macs(500, seed=1), SECOND_MAC]
    declines = [request(mac, "decline", ("server_id", SERVER_IP), ("requested_addr", ip))
                for mac in macs for ip in POOL]
    link.set_client_mac(HOST_MAC)
    (tmp_path / "during").mkdir()
    with flood_socket(link) as sock:
        with Background(lambda: send_all(sock, declines)) as flood:
            during = udhcpc(link, tmp_path / "during")
        assert flood.rounds >= 1, "the flood did not run while udhcpc asked"
        # Declined 500 times over by MACs it was never given to, the lowest address is still
        # the first one handed out.
        assert during is not None and during["ip"] == POOL[0]
        send_all(sock, declines)
    link.set_client_mac(SECOND_MAC)
    (tmp_path / "after").mkdir()
    after = udhcpc(link, tmp_path / "after")
    assert after is not None and after["ip"] == POOL[1]
    assert context.store.find_lease(MacAddress.parse(HOST_MAC)).ip == POOL[0]


def test_discover_flood_from_random_macs_holds_only_the_unknown_share(start_server, link, tmp_path):
    context = start_server(pool_start=POOL[0], pool_end=POOL[-1], serve_unknown=True,
                           unknown_pool_share=0.25)
    register(context, ip=None)
    register(context, mac=SECOND_MAC, ip=None, hostname="web2")
    macs = random_macs(2000, seed=2)
    share = int(len(POOL) * 0.25)
    offered: dict[str, str] = {}  # address -> the flooding MAC it was offered to
    with flood_socket(link) as sender, flood_socket(link, 68) as listener:
        listener.settimeout(0.05)

        def flood() -> None:
            """DISCOVER from every MAC; REQUEST whatever comes back, as an attacker would."""
            send_all(sender, [request(mac, "discover", xid=n) for n, mac in enumerate(macs)])
            while True:
                try:
                    data = listener.recv(4096)
                except TimeoutError:
                    return
                reply = BOOTP(data)
                mac = str(MacAddress(bytes(reply.chaddr[:6])))
                if mac in (HOST_MAC, SECOND_MAC):
                    continue
                kind = dict(o for o in reply[DHCP].options if isinstance(o, tuple) and len(o) == 2)
                if kind.get("message-type") == 2:
                    offered[reply.yiaddr] = mac
                    send_all(sender, [request(mac, "request", ("server_id", SERVER_IP),
                                              ("requested_addr", reply.yiaddr))])

        link.set_client_mac(HOST_MAC)
        (tmp_path / "during").mkdir()
        with Background(flood) as running:
            during = udhcpc(link, tmp_path / "during")
        assert running.rounds >= 1
    assert during is not None and during["ip"] in POOL and during["ip"] not in offered
    assert 1 <= len(offered) <= share
    now = time.time()
    unknown = [lease for lease in context.store.list_leases()
               if lease.mac not in context.store.macs() and lease.expires > now]
    assert 1 <= len(unknown) <= share
    link.set_client_mac(SECOND_MAC)
    (tmp_path / "after").mkdir()
    after = udhcpc(link, tmp_path / "after")
    assert after is not None and after["ip"] in POOL and after["ip"] not in offered


def test_inform_naming_someone_elses_address_sends_nothing_there(start_server, link):
    context = start_server()
    register(context)
    victim, outsider = "10.77.0.200", "192.0.2.55"
    # Both addresses live in the client namespace, so a reply aimed at them would arrive.
    run("ip", "-n", link.client_ns, "addr", "add", f"{victim}/24", "dev", CLIENT_IF)
    run("ip", "-n", link.client_ns, "addr", "add", f"{outsider}/32", "dev", CLIENT_IF)
    run("ip", "-n", link.server_ns, "route", "add", f"{outsider}/32", "via", RELAY_IP)
    try:
        with flood_socket(link, 68) as listener, flood_socket(link) as sender:
            listener.settimeout(0.5)
            for ciaddr in (victim, outsider) * 5:
                sender.sendto(request(HOST_MAC, "inform", ciaddr=ciaddr), (SERVER_IP, 67))
            replies = []
            try:
                while True:
                    replies.append(listener.recvfrom(4096))
            except TimeoutError:
                pass
            assert replies == []
            # The same INFORM naming the address it comes from is answered, there.
            with inside(link.client_ns):
                own = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with own:
                own.bind((RELAY_IP, 0))
                own.sendto(request(HOST_MAC, "inform", ciaddr=RELAY_IP), (SERVER_IP, 67))
                data, (sent_from, _) = listener.recvfrom(4096)
            ack = BOOTP(data)
            assert sent_from == SERVER_IP and ack.ciaddr == RELAY_IP and ack.yiaddr == "0.0.0.0"
    finally:
        run("ip", "-n", link.server_ns, "route", "del", f"{outsider}/32", check=False)
        run("ip", "-n", link.client_ns, "addr", "del", f"{outsider}/32", "dev", CLIENT_IF, check=False)
        run("ip", "-n", link.client_ns, "addr", "del", f"{victim}/24", "dev", CLIENT_IF, check=False)
