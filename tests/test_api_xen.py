"""An API write must never become root in dom0 (issue 9, point 4).

A token holder (or anyone, without a token) sends the xl disk and bridge strings that would
run a script as root, move the disk to another backend, or hand the guest dom0's own disk; and
host addresses that DHCP would then hand out in the server's or the router's place. Each is a
400 over real HTTP, and neither the stored host nor the domU config it gives changes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from http_support import MAC, PROFILE, curl, post_json, running

from pxeserver import domu
from pxeserver.app import Context
from pxeserver.mac import MacAddress
from pxeserver.registry.models import XenDisk

pytestmark = pytest.mark.both_stores  # registry behaviour: SQLite and PostgreSQL

GOOD_DISK = "phy:/dev/vg_domu/web1,xvda,w"
HOSTILE_DISKS = [
    ("/dev/vg_domu/web1,raw,xvda,rw,script=/tmp/own-dom0", "'script' is not allowed"),
    ("script=/tmp/own-dom0,target=/dev/vg_domu/web1", "'script' is not allowed"),
    ("format=raw,vdev=xvda,access=rw,backend=evil-driver-domain,target=/dev/vg_domu/web1", "'backend'"),
    ("format=raw,vdev=xvda,backendtype=qdisk,target=/dev/vg_domu/web1", "'backendtype'"),
    ("format=raw,vdev=xvda,access=rw,target=/dev/sda", "not under the allowed roots"),
    ("phy:/dev/sda,xvda,w", "not under the allowed roots"),
    ("/dev/vg_domu/../sda,raw,xvda,rw", "'..'"),
    ("format=raw,vdev=xvda,target=/var/lib/xen/images/../../../etc/shadow", "'..'"),
    ("/var/lib/xen/images", "not under the allowed roots"),
    ("/var/lib/xen/imagesX/disk.img", "not under the allowed roots"),
    ("iscsi:iqn.2001-04.com.example:disk,xvda,w", "block script"),
    ("drbd:resource,xvda,w", "block script"),
    ("/dev/vg_domu/web1,raw,xvda,rw,cdrom", "unexpected"),
    ("/dev/vg_domu/web1,raw,xvda,rw,devtype=cdrom", "devtype=disk"),
    ("target=/dev/vg_domu/web1,format=raw", "must come last"),
    ("/dev/vg_domu/web1', 'phy:/dev/sda,xvdb,w", "quotes"),
    ("/dev/vg_domu/web1,raw,xvda,rw\nbootloader='/tmp/x'", "line break"),
    ("/dev/vg_domu/we b1", "absolute path"),
    ("relative/disk.img", "absolute path"),
    ("/dev/vg_domu/web1,raw,xvda;rm,rw", "vdev"),
    ("/dev/vg_domu/web1,raw,xvda,rwx", "access"),
    ("/dev/vg_domu/web1,qcow3", "format"),
]
HOSTILE_XEN = [
    ({"bridge": "xenbr0,script=/tmp/x"}, "xen.bridge"),
    ({"bridge": "xenbr0']\nbootloader = '/tmp/x"}, "line break"),
    ({"bridge": "a" * 16}, "xen.bridge"),
    ({"bridge": ".."}, "xen.bridge"),
    ({"memory": 16}, "xen.memory"),
    ({"memory": "1024"}, "xen.memory"),
    ({"vcpus": 0}, "xen.vcpus"),
    ({"vcpus": True}, "xen.vcpus"),
    ({"vcpus": 100_000}, "xen.vcpus"),
    ({"disk": 5}, "disk must be a string"),
    ({"kernel": "/boot/vmlinuz"}, "unknown xen field"),
]


@pytest.fixture
def base(ctx: Context) -> Iterator[str]:
    """Always loopback, whatever address a test makes the server advertise."""
    ctx.config.api.token = "s3cret"
    with running(ctx) as service:
        yield f"http://127.0.0.1:{service.port}"


def api(base: str, method: str, path: str, body: object) -> tuple[int, dict]:
    reply = curl(base + path, "-X", method, "-H", "Authorization: Bearer s3cret",
                 "-H", "Content-Type: application/json", "--data-binary", json.dumps(body))
    return reply.status, json.loads(reply.body) if reply.body else {}


def registered(ctx: Context, base: str) -> tuple[object, str]:
    """The host as stored and the domU config it gives, to compare after each attack."""
    host = ctx.store.get_host(MacAddress.parse(MAC))
    return host, domu.render(host)


@pytest.fixture
def host(ctx: Context, base: str) -> str:
    assert api(base, "POST", "/api/profiles", PROFILE)[0] == 201
    status, body = api(base, "POST", "/api/hosts", {"mac": MAC, "hostname": "web1", "profile": "centos5",
                                                    "xen": {"disk": GOOD_DISK, "bridge": "xenbr1"}})
    assert status == 201, body
    assert body["xen"]["disk"] == "format=raw,vdev=xvda,access=rw,target=/dev/vg_domu/web1"
    return MAC


@pytest.mark.parametrize("disk, message", HOSTILE_DISKS)
def test_hostile_disks_are_refused_and_nothing_changes(ctx: Context, base: str, host: str,
                                                       disk: str, message: str) -> None:
    before = registered(ctx, base)
    status, body = api(base, "PATCH", f"/api/hosts/{host}", {"xen": {"disk": disk}})
    assert status == 400 and message in body["error"], body
    created, body = api(base, "POST", "/api/hosts", {"hostname": "web2", "profile": "centos5",
                                                     "xen": {"disk": disk}})
    assert created == 400 and message in body["error"], body
    assert registered(ctx, base) == before
    assert [h.hostname for h in ctx.store.list_hosts()] == ["web1"]
    assert "script" not in before[1] and "/dev/sda" not in before[1]


@pytest.mark.parametrize("xen, message", HOSTILE_XEN)
def test_hostile_xen_fields_are_refused_and_nothing_changes(ctx: Context, base: str, host: str,
                                                            xen: dict, message: str) -> None:
    before = registered(ctx, base)
    status, body = api(base, "PATCH", f"/api/hosts/{host}", {"xen": xen})
    assert status == 400 and message in body["error"], body
    assert registered(ctx, base) == before


@pytest.mark.parametrize("disk, canonical", [
    ("phy:/dev/vg_domu/web1,xvda,w", "format=raw,vdev=xvda,access=rw,target=/dev/vg_domu/web1"),
    ("/dev/vg_domu/web1,,xvdb", "format=raw,vdev=xvdb,access=rw,target=/dev/vg_domu/web1"),
    ("/var/lib/xen/images/web1.qcow2,qcow2,xvda,ro",
     "format=qcow2,vdev=xvda,access=ro,target=/var/lib/xen/images/web1.qcow2"),
    ("format=raw, vdev=xvda, access=rw, devtype=disk, target=/var/lib/xen/images//web1.img",
     "format=raw,vdev=xvda,access=rw,target=/var/lib/xen/images/web1.img"),
])
def test_good_disks_are_stored_and_rendered_in_xls_keyed_form(ctx: Context, base: str, host: str,
                                                              disk: str, canonical: str) -> None:
    status, body = api(base, "PATCH", f"/api/hosts/{host}", {"xen": {"disk": disk, "memory": 512}})
    assert status == 200 and body["xen"]["disk"] == canonical
    values: dict[str, object] = {}
    exec(domu.render(ctx.store.get_host(MacAddress.parse(host))), {}, values)
    assert values["disk"] == [canonical] and values["memory"] == 512
    assert values["vif"] == [f"mac={MAC},bridge=xenbr1"]
    assert XenDisk.parse(canonical).spec == canonical  # the stored form reads back unchanged


def test_a_hostile_disk_stored_by_an_older_release_never_reaches_xl(ctx: Context, base: str, host: str) -> None:
    from pxeserver.registry import ValidationError
    from pxeserver.registry.models import HostChanges

    # Written straight into the store, past today's checks, as an older release could have.
    ctx.store.update_host(MacAddress.parse(host), HostChanges(xen={"disk": "phy:/dev/sda,xvda,w,script=/tmp/x"}))
    with pytest.raises(ValidationError, match="'script' is not allowed"):
        domu.render(ctx.store.get_host(MacAddress.parse(host)))


@pytest.fixture
def dhcp(ctx: Context) -> Context:
    """DHCP on (the service itself is not started), serving the loopback /24 the server is on."""
    ctx.config.dhcp.enabled = True
    ctx.config.dhcp.subnet = "127.0.0.0/24"
    ctx.config.dhcp.router = "127.0.0.254"
    assert ctx.config.advertised_address == "127.0.0.1"
    return ctx


@pytest.mark.parametrize("ip, message", [
    ("127.0.0.1", "this server"),
    ("127.0.0.254", "the router"),
    ("127.0.1.5", "not a host address of the DHCP subnet"),
    ("127.0.0.0", "not a host address"),
    ("127.0.0.255", "not a host address"),
    ("192.168.1.10", "not a host address"),
])
def test_dhcp_never_hands_out_the_servers_or_routers_address(dhcp: Context, base: str, host: str,
                                                             ip: str, message: str) -> None:
    before = registered(dhcp, base)
    status, body = api(base, "PATCH", f"/api/hosts/{host}", {"ip": ip})
    assert status == 400 and message in body["error"], body
    created, body = api(base, "POST", "/api/hosts", {"hostname": "web2", "profile": "centos5", "ip": ip})
    assert created == 400 and message in body["error"], body
    assert registered(dhcp, base) == before
    assert api(base, "PATCH", f"/api/hosts/{host}", {"ip": "127.0.0.5"})[0] == 200


def test_without_dhcp_the_address_is_the_operators(ctx: Context, base: str, host: str) -> None:
    status, body = api(base, "PATCH", f"/api/hosts/{host}", {"ip": "192.168.1.10"})
    assert status == 200 and body["ip"] == "192.168.1.10"


def test_post_json_without_the_token_writes_nothing(ctx: Context, base: str, host: str) -> None:
    before = registered(ctx, base)
    reply = post_json(f"{base}/api/hosts/{host}", json.dumps({"xen": {"disk": GOOD_DISK}}), method="PATCH")
    assert reply.status == 401
    assert registered(ctx, base) == before
