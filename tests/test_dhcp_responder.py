"""RFC 2131 states, boot-file choice and leases, straight through the responder (no sockets).

Requests are built and replies read by scapy, so these check our packets against an
independent implementation of the format.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterator

import pytest
from scapy.layers.dhcp import BOOTP, DHCP

from pxeserver import app, config as config_module, pxelinux
from pxeserver.config import Config
from pxeserver.dhcp import leases
from pxeserver.dhcp.responder import Reply, Responder
from pxeserver.dhcp.server import RateLimiter
from pxeserver.mac import MacAddress
from pxeserver.registry import Status

pytestmark = pytest.mark.both_stores  # registry behaviour: SQLite and PostgreSQL

SERVER = "10.0.0.1"
MAC = "00:16:3e:00:00:01"
OTHER_MAC = "00:16:3e:00:00:02"


@pytest.fixture
def context(config: Config) -> Iterator[app.Context]:
    config.server.address = SERVER
    config.dhcp.pool_start, config.dhcp.pool_end = "10.0.0.100", "10.0.0.102"
    context = app.build(config)
    context.provisioning.add_profile({"name": "deb", "kernel": "k/linux", "initrd": "k/initrd"})
    yield context
    context.close()


def add_host(context: app.Context, mac: str = MAC, ip: str | None = "10.0.0.10",
             netboot: bool = True) -> None:
    data: dict[str, object] = {"mac": mac, "hostname": f"h{mac[-1]}.domu.example",
                               "profile": "deb", "netboot": netboot}
    if ip:
        data["ip"] = ip
    context.provisioning.add_host(data)


def packet(kind: str, *options: tuple[str, object], mac: str = MAC, ciaddr: str = "0.0.0.0",
           giaddr: str = "0.0.0.0") -> bytes:
    return bytes(BOOTP(op=1, xid=42, chaddr=MacAddress.parse(mac).packed + bytes(10),
                       ciaddr=ciaddr, giaddr=giaddr)
                 / DHCP(options=[("message-type", kind), *options, "end"]))


def ask(server: app.Context | Responder, data: bytes, port: int = 67,
        source: str = "0.0.0.0") -> tuple[BOOTP, dict[str, object], Reply] | None:
    """One exchange; with a Context, through a fresh Responder (a restarted server)."""
    responder = server if isinstance(server, Responder) else Responder(server)
    reply = responder.respond(data, (source, 68), port)
    if reply is None:
        return None
    parsed = BOOTP(reply.payload)
    options = {o[0]: (o[1] if len(o) == 2 else o[1:]) for o in parsed[DHCP].options
               if isinstance(o, tuple)}
    return parsed, options, reply


def test_offer_carries_every_option_a_netbooting_client_reads(context):
    add_host(context)
    got = ask(context, packet("discover"))
    assert got is not None
    reply, options, sent = got
    assert options["message-type"] == 2 and reply.yiaddr == "10.0.0.10"
    assert reply.siaddr == SERVER and reply.file.rstrip(b"\0") == b"pxelinux.0"
    assert options["subnet_mask"] == "255.255.255.0" and options["router"] == "10.0.0.1"
    assert options["hostname"] == b"h1" and options["domain"] == b"domu.example"
    assert options["lease_time"] == 3600 and options["server_id"] == SERVER
    assert options["tftp_server_name"] == SERVER.encode()
    assert options["boot-file-name"] == b"pxelinux.0"
    assert sent.address == ("255.255.255.255", 68)


def test_dns_option_names_this_server_when_its_dns_is_enabled(context):
    context.config.dns.enabled = True
    add_host(context)
    _, options, _ = ask(context, packet("discover"))
    assert options["name_server"] == SERVER


def test_http_kernels_hand_bios_clients_lpxelinux(context):
    """Configs naming http:// kernels need lpxelinux (pxelinux.0 reads only TFTP paths); the
    configs themselves then name the kernel by URL, as pypxeboot reads them too."""
    add_host(context)
    context.config.boot.kernel_transport = "http"
    reply, _, _ = ask(context, packet("discover", ("pxe_client_architecture", b"\x00\x00")))
    assert reply.file.rstrip(b"\0") == b"lpxelinux.0"
    config = pxelinux.render(context.policy.boot_spec(MacAddress.parse(MAC)))
    base = context.config.http_base_url  # http://10.0.0.1:<port>: the address DHCP gives as next-server
    assert base.startswith(f"http://{SERVER}")
    assert f"kernel {base}/boot/k/linux\n" in config and f"initrd={base}/boot/k/initrd" in config


@pytest.mark.parametrize("options, boot_file", [
    ([("pxe_client_architecture", b"\x00\x07")], b"syslinux.efi"),
    ([("pxe_client_architecture", b"\x00\x09")], b"syslinux.efi"),
    ([("pxe_client_architecture", b"\x00\x00")], b"pxelinux.0"),
    ([("pxe_client_architecture", b"\x00\x07"), ("user_class", b"iPXE")],
     "iPXE script"),
    ([("pxe_client_architecture", b"\x00\x0b")], b""),
])
def test_boot_file_follows_the_firmware(context, options, boot_file):
    add_host(context)
    if boot_file == "iPXE script":  # only iPXE gets the script URL, so it never loops
        boot_file = f"{context.config.http_base_url}/ipxe/00-16-3e-00-00-01".encode()
    reply, _, _ = ask(context, packet("discover", *options))
    assert reply.file.rstrip(b"\0") == boot_file


def test_ack_advances_the_host_and_records_its_timeline(context):
    add_host(context)
    reply, options, _ = ask(context, packet("request", ("server_id", SERVER),
                                            ("requested_addr", "10.0.0.10")))
    assert options["message-type"] == 5 and reply.yiaddr == "10.0.0.10"
    mac = MacAddress.parse(MAC)
    assert context.policy.host(mac).status is Status.NETBOOTING
    context.timeline.flush()
    assert any(e.source == "dhcp" and e.message.startswith("ACK 10.0.0.10")
               for e in context.store.events(mac))


def test_a_host_with_netboot_off_gets_an_address_but_is_not_advanced(context):
    add_host(context, netboot=False)
    reply, options, _ = ask(context, packet("request", ("requested_addr", "10.0.0.10")))
    assert options["message-type"] == 5 and reply.yiaddr == "10.0.0.10"
    # pxelinux still loads and finds the host's localboot config.
    assert reply.file.rstrip(b"\0") == b"pxelinux.0"
    assert context.policy.host(MacAddress.parse(MAC)).status is Status.REGISTERED


def test_unknown_mac_is_ignored_unless_configured(context):
    assert ask(context, packet("discover")) is None
    context.config.dhcp.serve_unknown = True
    reply, options, _ = ask(context, packet("discover"))
    assert options["message-type"] == 2 and reply.yiaddr == "10.0.0.100"


def test_request_naming_another_server_is_silent_and_frees_the_offer(context):
    add_host(context, ip=None)
    add_host(context, mac=OTHER_MAC, ip=None)
    responder = Responder(context)
    assert ask(responder, packet("discover"))[0].yiaddr == "10.0.0.100"
    # An offer is held in memory, not written to the registry, and no one else gets it.
    assert context.store.find_lease(MacAddress.parse(MAC)) is None
    assert ask(responder, packet("discover", mac=OTHER_MAC))[0].yiaddr == "10.0.0.101"
    assert ask(responder, packet("request", ("server_id", "10.0.0.99"),
                                 ("requested_addr", "10.0.0.100"))) is None
    third = "00:16:3e:00:00:03"
    add_host(context, mac=third, ip=None)
    assert ask(responder, packet("discover", mac=third))[0].yiaddr == "10.0.0.100"


def test_init_reboot_with_a_stale_address_is_naked_by_broadcast(context):
    add_host(context)
    _, options, sent = ask(context, packet("request", ("requested_addr", "10.0.0.77")))
    assert options["message-type"] == 6 and sent.address == ("255.255.255.255", 68)


def test_renewal_is_acked_by_unicast_to_ciaddr(context):
    add_host(context)
    reply, options, sent = ask(context, packet("request", ciaddr="10.0.0.10"))
    assert options["message-type"] == 5 and reply.yiaddr == "10.0.0.10"
    assert sent.address == ("10.0.0.10", 68)


def test_inform_gets_configuration_without_address_or_lease_time(context):
    add_host(context)
    reply, options, sent = ask(context, packet("inform", ciaddr="10.0.0.10"))
    assert options["message-type"] == 5 and reply.yiaddr == "0.0.0.0"
    assert "lease_time" not in options and options["router"] == "10.0.0.1"
    assert sent.address == ("10.0.0.10", 68)


def test_inform_is_answered_only_to_the_senders_own_address(context):
    add_host(context)
    # Its own source address, or its reservation: answered.
    assert ask(context, packet("inform", ciaddr="10.0.0.33"), source="10.0.0.33") is not None
    assert ask(context, packet("inform", ciaddr="10.0.0.10"), source="10.0.0.99") is not None
    # Someone else's address in the subnet, or any address outside it: dropped.
    assert ask(context, packet("inform", ciaddr="10.0.0.34"), source="10.0.0.33") is None
    assert ask(context, packet("inform", ciaddr="192.0.2.7"), source="192.0.2.7") is None
    assert ask(context, packet("inform", ciaddr="192.0.2.7", giaddr="10.0.0.254")) is None


def test_relay_outside_the_subnet_is_ignored_and_inside_is_answered(context):
    add_host(context)
    assert ask(context, packet("discover", giaddr="192.168.1.1")) is None
    _, _, sent = ask(context, packet("discover", giaddr="10.0.0.254"))
    assert sent.address == ("10.0.0.254", 67)


def test_reservation_is_keyed_on_chaddr_not_client_id(context):
    add_host(context)
    other = ("client_id", b"\x01" + MacAddress.parse(OTHER_MAC).packed)
    reply, _, _ = ask(context, packet("discover", other))
    assert reply.yiaddr == "10.0.0.10"


def test_pool_leases_are_kept_in_the_registry_across_restarts(context):
    add_host(context, ip=None)
    add_host(context, mac=OTHER_MAC, ip=None)
    first = ask(context, packet("request", ("requested_addr", "10.0.0.101")))[0].yiaddr
    assert first == "10.0.0.101"
    # A new responder (a restarted server) offers the same address to the same MAC ...
    assert ask(context, packet("discover"))[0].yiaddr == "10.0.0.101"
    # ... and never that one to another MAC, even when it asks for it.
    other = ask(context, packet("discover", ("requested_addr", "10.0.0.101"), mac=OTHER_MAC))
    assert other[0].yiaddr == "10.0.0.100"
    assert ask(context, packet("request", ("requested_addr", "10.0.0.101"),
                               mac=OTHER_MAC))[1]["message-type"] == 6


def test_release_frees_and_decline_quarantines_a_pool_address(context):
    add_host(context, ip=None)
    responder = Responder(context)
    mac = MacAddress.parse(MAC)
    responder.respond(packet("request", ("requested_addr", "10.0.0.100")), ("0.0.0.0", 68), 67)
    assert context.store.find_lease(mac).ip == "10.0.0.100"
    assert responder.respond(packet("release", ("server_id", SERVER), ciaddr="10.0.0.100"),
                             ("10.0.0.100", 68), 67) is None
    assert context.store.find_lease(mac) is None
    decline = packet("decline", ("server_id", SERVER), ("requested_addr", "10.0.0.100"))
    # Released, it is no longer this MAC's to decline: ignored, and offered again.
    assert responder.respond(decline, ("0.0.0.0", 68), 67) is None
    assert ask(responder, packet("discover"))[0].yiaddr == "10.0.0.100"
    # Offered to it, it may: the address is quarantined and the next offer is another.
    assert responder.respond(decline, ("0.0.0.0", 68), 67) is None
    assert ask(responder, packet("discover"))[0].yiaddr == "10.0.0.101"


def test_decline_from_a_mac_never_given_the_address_is_ignored(context):
    add_host(context, ip=None)
    add_host(context, mac=OTHER_MAC, ip=None)
    responder = Responder(context)
    assert ask(responder, packet("request", ("requested_addr", "10.0.0.100")))[1]["message-type"] == 5
    for ip in ("10.0.0.100", "10.0.0.101", "10.0.0.102"):
        responder.respond(packet("decline", ("requested_addr", ip), mac=OTHER_MAC), ("0.0.0.0", 68), 67)
    assert context.store.find_lease(MacAddress.parse(MAC)).ip == "10.0.0.100"
    assert ask(responder, packet("discover", mac=OTHER_MAC))[0].yiaddr == "10.0.0.101"


def test_one_mac_quarantines_only_a_few_addresses(config):
    config.server.address = SERVER
    config.dhcp.pool_start, config.dhcp.pool_end = "10.0.0.100", "10.0.0.119"
    context = app.build(config)
    try:
        context.provisioning.add_profile({"name": "deb", "kernel": "k/linux", "initrd": "k/initrd"})
        add_host(context, ip=None)
        responder = Responder(context)
        offered = []
        for _ in range(10):  # DISCOVER, DECLINE what was offered, again and again
            ip = ask(responder, packet("discover"))[0].yiaddr
            offered.append(ip)
            responder.respond(packet("decline", ("requested_addr", ip)), ("0.0.0.0", 68), 67)
        assert len(set(offered)) == leases.MAX_DECLINES_PER_CLIENT + 1
    finally:
        context.close()


def test_unknown_macs_hold_at_most_their_share_and_registered_hosts_come_first(config):
    config.server.address = SERVER
    config.dhcp.pool_start, config.dhcp.pool_end = "10.0.0.100", "10.0.0.107"  # 8 addresses
    config.dhcp.serve_unknown, config.dhcp.unknown_pool_share = True, 0.5
    context = app.build(config)
    try:
        context.provisioning.add_profile({"name": "deb", "kernel": "k/linux", "initrd": "k/initrd"})
        responder = Responder(context)
        strangers = [f"02:00:00:00:00:{n:02x}" for n in range(20)]
        answered = [ask(responder, packet("discover", mac=m)) for m in strangers]
        assert sum(a is not None for a in answered) == 4  # half of the pool
        assert responder.leases.unknown_holdings() == 4
        offered = [(mac, got[0].yiaddr) for mac, got in zip(strangers, answered, strict=True) if got is not None]
        # Two bind what they were offered; none can bind anything more.
        for mac, ip in offered[:2]:
            assert ask(responder, packet("request", ("requested_addr", ip), mac=mac))[1]["message-type"] == 5
        assert ask(responder, packet("request", ("requested_addr", "10.0.0.107"),
                                     mac=strangers[-1]))[1]["message-type"] == 6
        # Registered hosts get the other half, then the addresses only offered to strangers.
        hosts = [f"00:16:3e:00:02:0{n}" for n in range(7)]
        for mac in hosts:
            add_host(context, mac=mac, ip=None)
        got = [ask(responder, packet("discover", mac=mac)) for mac in hosts]
        assert sorted(g[0].yiaddr for g in got[:6]) == sorted(
            {f"10.0.0.{n}" for n in range(100, 108)} - {ip for _, ip in offered[:2]})
        assert got[6] is None  # the rest is bound
        # The strangers whose offers were taken over are refused their REQUEST.
        for mac, ip in offered[2:]:
            assert ask(responder, packet("request", ("requested_addr", ip), mac=mac))[1]["message-type"] == 6
        assert responder.leases.unknown_holdings() == 2
    finally:
        context.close()


def test_exhausted_pool_offers_nothing(context):
    responder = Responder(context)
    for n in range(4):
        add_host(context, mac=f"00:16:3e:00:01:0{n}", ip=None)
    offers = [ask(responder, packet("discover", mac=f"00:16:3e:00:01:0{n}")) for n in range(4)]
    assert [o[0].yiaddr for o in offers[:3]] == ["10.0.0.100", "10.0.0.101", "10.0.0.102"]
    assert offers[3] is None


def test_requests_per_mac_are_capped():
    limiter = RateLimiter(rate=10, burst=30)
    mac, other = MacAddress.parse(MAC), MacAddress.parse(OTHER_MAC)
    assert all(limiter.allow(mac, now=0.0) for _ in range(30))
    assert not limiter.allow(mac, now=0.0)
    assert limiter.allow(other, now=0.0)  # one flooding MAC does not starve the rest
    assert limiter.allow(mac, now=0.2)  # refilled at 10 per second


@pytest.mark.parametrize("text, message", [
    ("[dhcp]\nunknown_pool_share = 1.5\n", r"\[dhcp\] unknown_pool_share must be 0..1"),
    ("[dhcp]\nunknown_pool_share = -0.1\n", r"\[dhcp\] unknown_pool_share must be 0..1"),
    ('[dns]\nforward_clients = ["10.0.0.0/33"]\n', r"\[dns\] forward_clients must be IPv4 networks"),
    ('[dns]\nforward_clients = ["10.0.0.1/8"]\n', r"\[dns\] forward_clients must be .*host bits"),
])
def test_bad_dhcp_and_dns_client_settings_are_a_config_error(tmp_path, text, message):
    file = tmp_path / "pxeserver.toml"
    file.write_text(text)
    with pytest.raises(config_module.ConfigError, match=message):
        config_module.load(file)


STEPS = 800


def test_the_pool_index_never_double_grants_nor_loses_an_address(ctx):
    """Hundreds of random DISCOVER / REQUEST / RELEASE steps over simulated hours, checked
    against a plain model of who holds what: every offer is free by the model, and whenever
    the model has a free address a registered host is offered one."""
    chooser = random.Random(7)
    ctx.provisioning.add_profile({"name": "deb", "kernel": "k/linux", "initrd": "k/initrd"})
    known = [MacAddress.parse(f"00:16:3e:00:03:{n:02x}") for n in range(12)]
    strangers = [MacAddress.parse(f"02:00:00:00:03:{n:02x}") for n in range(12)]
    for mac in known:
        ctx.provisioning.add_host({"mac": str(mac), "hostname": f"k{mac.packed[-1]}", "profile": "deb"})
    ctx.provisioning.add_host({"mac": "00:16:3e:00:04:00", "hostname": "fixed", "profile": "deb",
                               "ip": "10.0.0.105"})  # a reservation inside the pool
    pool = [f"10.0.0.{n}" for n in range(100, 108)]
    manager = leases.LeaseManager(ctx.store, pool[0], pool[-1], {"10.0.0.103"},
                                  ipaddress.IPv4Network("10.0.0.0/24"), 0.25, now=0.0)
    offers: dict[MacAddress, tuple[str, float]] = {}
    seen = {"taken over": 0, "pool full": 0}
    now = 0.0

    def holder(ip: str, at: float) -> MacAddress | None:
        for mac, (offered, until) in offers.items():
            if offered == ip and until > at:
                return mac
        lease = ctx.store.find_lease_by_ip(ip)
        return lease.mac if lease is not None and lease.expires >= at else None

    def free_for(mac: MacAddress, at: float) -> list[str]:
        return [ip for ip in pool if ip not in ("10.0.0.105", "10.0.0.103")
                and holder(ip, at) in (None, mac)]

    for _ in range(STEPS):
        now += chooser.choice((0.5, 1.0, 5.0, 30.0))
        mac = chooser.choice(known + strangers)
        is_known = mac in known
        step = chooser.random()
        if step < 0.5:
            expected = free_for(mac, now)
            ip = manager.offer(mac, chooser.choice([None, *pool]), is_known, now=now)
            taken_over = [m for m, (_, until) in offers.items() if m in strangers and until > now]
            if ip is not None and ip not in expected:
                # Only a registered host, only when nothing else is free, and only an address
                # merely offered to an unknown MAC, which then loses it.
                victim = holder(ip, now)
                assert is_known and expected == [] and victim in taken_over
                del offers[victim]
                seen["taken over"] += 1
            if ip is not None:
                hold = leases.OFFER_HOLD if is_known else leases.UNKNOWN_OFFER_HOLD
                offers[mac] = (ip, now + hold)
            elif is_known:
                assert expected == [] and taken_over == [], (mac, expected, taken_over)
                seen["pool full"] += 1
        elif step < 0.85 and mac in offers:
            ip, until = offers.pop(mac)
            granted = manager.bind(mac, ip, chooser.choice((60, 600, 3600)), is_known, now=now)
            free = until > now or holder(ip, now) in (None, mac)
            # An unknown MAC whose offer ran out also needs room in its share.
            assert granted == free if is_known or until > now else granted <= free
        else:
            lease = ctx.store.find_lease(mac)
            if lease is not None:
                assert manager.release(mac, lease.ip)
        assert manager.unknown_holdings(now) <= manager.unknown_limit
    assert seen["taken over"] and seen["pool full"], seen  # the hard cases did happen
