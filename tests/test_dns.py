"""The authoritative zone as dig (bind9-dnsutils) sees it: forward, reverse, negative, live."""

from __future__ import annotations

import time

import pytest
from dns_support import DOMAIN, dig

from pxeserver.app import Context
from pxeserver.dns import DnsService
from pxeserver.mac import MacAddress
from pxeserver.registry import Lease

pytestmark = pytest.mark.both_stores  # registry behaviour: SQLite and PostgreSQL

MAC = "00:16:3e:00:00:05"


def add_web1(ctx: Context, ip: str = "10.0.0.5") -> None:
    ctx.provisioning.add_host({"mac": MAC, "hostname": "web1", "profile": "debian", "ip": ip})


def soa_serial(port: int) -> int:
    return int(dig(port, DOMAIN, "SOA").answer[0][6])


def test_host_name_resolves_to_its_registered_ip(dns: DnsService, ctx: Context) -> None:
    add_web1(ctx)
    result = dig(dns.port, f"web1.{DOMAIN}", "A")
    assert result.status == "NOERROR"
    assert "aa" in result.flags and "ra" not in result.flags
    assert result.answer == [[f"web1.{DOMAIN}.", "60", "IN", "A", "10.0.0.5"]]


def test_reverse_lookup_gives_the_host_name(dns: DnsService, ctx: Context) -> None:
    add_web1(ctx)
    result = dig(dns.port, "-x", "10.0.0.5")
    assert result.status == "NOERROR" and "aa" in result.flags
    assert result.values() == [f"web1.{DOMAIN}."]


def test_apex_has_soa_and_ns_and_the_server_its_own_name(dns: DnsService) -> None:
    soa = dig(dns.port, DOMAIN, "SOA")
    assert soa.status == "NOERROR" and "aa" in soa.flags
    assert soa.answer[0][3:6] == ["SOA", f"pxe.{DOMAIN}.", f"hostmaster.{DOMAIN}."]
    ns = dig(dns.port, DOMAIN, "NS")
    assert ns.values() == [f"pxe.{DOMAIN}."]
    assert ns.additional == [[f"pxe.{DOMAIN}.", "60", "IN", "A", "127.0.0.1"]]  # glue
    assert dig(dns.port, f"pxe.{DOMAIN}", "A").values() == ["127.0.0.1"]
    reverse = dig(dns.port, "0.0.10.in-addr.arpa", "SOA")  # the DHCP subnet's reverse zone
    assert reverse.status == "NOERROR" and "aa" in reverse.flags and reverse.answer


def test_unknown_name_is_nxdomain_with_the_soa(dns: DnsService) -> None:
    result = dig(dns.port, f"nobody.{DOMAIN}", "A")
    assert result.status == "NXDOMAIN" and "aa" in result.flags
    assert result.answer == []
    assert result.authority[0][0] == f"{DOMAIN}." and result.authority[0][3] == "SOA"
    assert result.authority[0][1] == "30"  # negative TTL: the SOA minimum (RFC 2308)
    assert dig(dns.port, "-x", "10.0.0.99").status == "NXDOMAIN"


def test_known_name_other_type_is_nodata_with_the_soa(dns: DnsService, ctx: Context) -> None:
    add_web1(ctx)
    for qtype in ("MX", "AAAA", "TXT"):
        result = dig(dns.port, f"web1.{DOMAIN}", qtype)
        assert result.status == "NOERROR" and result.answer == []
        assert result.authority[0][3] == "SOA"


def test_name_outside_the_zone_is_refused(dns: DnsService) -> None:
    for name in ("example.com", "domu.example.com", "1.1.168.192.in-addr.arpa"):
        result = dig(dns.port, name, "A")
        assert result.status == "REFUSED" and "aa" not in result.flags


def test_tcp_gives_the_same_answers(dns: DnsService, ctx: Context) -> None:
    add_web1(ctx)
    assert dig(dns.port, "+tcp", f"web1.{DOMAIN}").values() == ["10.0.0.5"]
    assert dig(dns.port, "+tcp", f"nobody.{DOMAIN}").status == "NXDOMAIN"
    pipelined = dig(dns.port, "+tcp", "+keepopen", f"web1.{DOMAIN}", f"pxe.{DOMAIN}")
    assert "10.0.0.5" in pipelined.output and "127.0.0.1" in pipelined.output


def test_answer_keeps_the_askers_spelling(dns: DnsService, ctx: Context) -> None:
    """Resolvers randomise the case of names (0x20) and drop answers that do not match it."""
    add_web1(ctx)
    dig(dns.port, f"web1.{DOMAIN}")  # fill the cache with the lower-case spelling
    result = dig(dns.port, "WeB1.DoMu.ExAmple")
    assert result.answer[0][0] == "WeB1.DoMu.ExAmple." and result.values() == ["10.0.0.5"]


def test_changes_are_answered_live_and_the_serial_grows(dns: DnsService, ctx: Context) -> None:
    name = f"web1.{DOMAIN}"
    ctx.provisioning.add_host({"hostname": "other", "profile": "debian", "ip": "10.0.0.9"})
    assert dig(dns.port, f"other.{DOMAIN}").values() == ["10.0.0.9"]  # cached from now on
    assert dig(dns.port, name).status == "NXDOMAIN"
    serial = soa_serial(dns.port)
    add_web1(ctx)
    assert dig(dns.port, name).values() == ["10.0.0.5"]
    assert soa_serial(dns.port) > serial
    serial = soa_serial(dns.port)
    ctx.provisioning.update_host(MacAddress.parse(MAC), {"ip": "10.0.0.6"})
    assert dig(dns.port, name).values() == ["10.0.0.6"]
    assert dig(dns.port, "-x", "10.0.0.6").values() == [f"{name}."]
    assert dig(dns.port, "-x", "10.0.0.5").status == "NXDOMAIN"
    assert soa_serial(dns.port) > serial
    ctx.provisioning.update_host(MacAddress.parse(MAC), {"hostname": "db1"})
    assert dig(dns.port, name).status == "NXDOMAIN"
    assert dig(dns.port, f"db1.{DOMAIN}").values() == ["10.0.0.6"]
    ctx.provisioning.delete_host(MacAddress.parse(MAC))
    assert dig(dns.port, f"db1.{DOMAIN}").status == "NXDOMAIN"
    assert dig(dns.port, f"other.{DOMAIN}").values() == ["10.0.0.9"]  # untouched throughout
    assert dig(dns.port, "-x", "10.0.0.9").values() == [f"other.{DOMAIN}."]


def test_change_that_keeps_every_name_still_moves_the_serial(dns: DnsService, ctx: Context) -> None:
    add_web1(ctx)
    assert dig(dns.port, f"web1.{DOMAIN}").values() == ["10.0.0.5"]  # now cached
    before = dig(dns.port, f"nobody.{DOMAIN}")
    ctx.provisioning.set_netboot(MacAddress.parse(MAC), False)  # status only, no name changes
    assert dig(dns.port, f"web1.{DOMAIN}").values() == ["10.0.0.5"]
    after = dig(dns.port, f"nobody.{DOMAIN}")
    assert int(after.authority[0][6]) > int(before.authority[0][6])


def test_host_without_ip_resolves_to_its_current_lease(dns: DnsService, ctx: Context) -> None:
    ctx.provisioning.add_host({"mac": MAC, "hostname": "web1", "profile": "debian"})
    name = f"web1.{DOMAIN}"
    assert dig(dns.port, name).status == "NXDOMAIN"  # known host, no address yet
    ctx.store.put_lease(Lease(MacAddress.parse(MAC), "10.0.0.50", time.time() + 3600))
    assert dig(dns.port, name).values() == ["10.0.0.50"]
    assert dig(dns.port, "-x", "10.0.0.50").values() == [f"{name}."]
    ctx.store.put_lease(Lease(MacAddress.parse(MAC), "10.0.0.50", time.time() + 1))
    time.sleep(1.2)  # the lease runs out: no registry write, the zone notices by itself
    assert dig(dns.port, name).status == "NXDOMAIN"


def test_fully_qualified_and_dotted_host_names(dns: DnsService, ctx: Context) -> None:
    ctx.provisioning.add_host({"hostname": f"mail.{DOMAIN}", "profile": "debian", "ip": "10.0.0.7"})
    ctx.provisioning.add_host({"hostname": "a.lab", "profile": "debian", "ip": "10.0.0.8"})
    assert dig(dns.port, f"mail.{DOMAIN}").values() == ["10.0.0.7"]
    assert dig(dns.port, f"a.lab.{DOMAIN}").values() == ["10.0.0.8"]
    between = dig(dns.port, f"lab.{DOMAIN}")  # exists as a parent of a.lab: NODATA (RFC 8020)
    assert between.status == "NOERROR" and between.answer == []


def test_edns_is_answered_and_bad_versions_get_badvers(dns: DnsService, ctx: Context) -> None:
    add_web1(ctx)
    result = dig(dns.port, "+bufsize=4096", "+dnssec", f"web1.{DOMAIN}")
    assert "udp: 1232" in result.output and "flags: do;" in result.output
    assert dig(dns.port, "+edns=1", "+noednsnegotiation", f"web1.{DOMAIN}").status == "BADVERS"
    assert dig(dns.port, "+noedns", f"web1.{DOMAIN}").values() == ["10.0.0.5"]


def test_empty_domain_stops_the_start_with_a_clear_error(ctx: Context) -> None:
    ctx.config.dns.domain = "."
    with pytest.raises(OSError, match="domain"):
        DnsService(ctx).start()


def test_answer_too_big_for_plain_udp_is_truncated_and_whole_over_tcp(
        dns: DnsService, ctx: Context) -> None:
    """Two long names on one address: a reservation made for an address still leased to
    another MAC. Their PTR answer is over 512 bytes."""
    long_name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 47])
    ctx.provisioning.add_host({"hostname": long_name, "profile": "debian", "ip": "10.0.0.5"})
    ctx.provisioning.add_host({"mac": MAC, "hostname": "e" + long_name[1:], "profile": "debian"})
    ctx.store.put_lease(Lease(MacAddress.parse(MAC), "10.0.0.5", time.time() + 3600))
    truncated = dig(dns.port, "+noedns", "+ignore", "-x", "10.0.0.5")
    assert "tc" in truncated.flags and truncated.answer == []
    retried = dig(dns.port, "+noedns", "-x", "10.0.0.5")
    assert "Truncated, retrying in TCP mode" in retried.output
    assert sorted(retried.values()) == sorted(f"{name}.{DOMAIN}." for name in
                                              (long_name, "e" + long_name[1:]))
    assert "tc" not in dig(dns.port, "+bufsize=1232", "-x", "10.0.0.5").flags  # fits with EDNS


def test_name_too_long_with_the_domain_is_left_out(dns: DnsService, ctx: Context) -> None:
    too_long = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 60])  # valid alone, not + domain
    ctx.provisioning.add_host({"hostname": too_long, "profile": "debian", "ip": "10.0.0.5"})
    assert dig(dns.port, "-x", "10.0.0.5").status == "NXDOMAIN"
    assert dig(dns.port, f"pxe.{DOMAIN}").values() == ["127.0.0.1"]
