"""The install secret reaches only its host, the API only its token holders (issue 9, point 3).

Every request is real HTTP to a running HttpService on 127.0.0.1. The attacker on the guest
network is a client bound to another loopback address, 127.0.0.2: it knows the MAC (the
guest network sees it) and, in the replay cases, even the install token.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from http_support import MAC, PROFILE, Reply, curl, running
from pg_support import database_rows

from pxeserver.app import Context
from pxeserver.mac import MacAddress
from pxeserver.registry import Lease, Status

pytestmark = pytest.mark.both_stores  # registry behaviour: SQLite and PostgreSQL

HOST_IP = "127.0.0.1"
ATTACKER_IP = "127.0.0.2"
DASHED = MAC.replace(":", "-")
SECRET_HASH = "$6$pepper$0123456789abcdefghijkl"


@pytest.fixture
def base(ctx: Context) -> Iterator[str]:
    ctx.provisioning.add_profile({**PROFILE, "vars": {"root_password_hash": SECRET_HASH}})
    assert ctx.config.http_base_url.startswith("http://127.0.0.1:")  # the kickstart's callback URL
    with running(ctx):
        yield ctx.config.http_base_url


def add_host(ctx: Context, **fields: object) -> None:
    ctx.provisioning.add_host({"mac": MAC, "hostname": "web1", "profile": "centos5", **fields})


def token_of(ctx: Context) -> str:
    return ctx.store.get_host(MacAddress.parse(MAC)).install_token


def status_of(ctx: Context) -> Status:
    return ctx.store.get_host(MacAddress.parse(MAC)).status


def from_address(source: str, url: str, *args: str) -> Reply:
    """curl with its socket bound to ``source``, as a client at that address."""
    return curl(url, "--interface", source, *args)


def test_kickstart_goes_only_to_the_hosts_registered_address(ctx: Context, base: str) -> None:
    add_host(ctx, ip=HOST_IP)
    token = token_of(ctx)
    for path in (f"/ks/{MAC}", f"/ks/{DASHED.upper()}"):
        refused = from_address(ATTACKER_IP, base + path)
        assert refused.status == 403 and token not in refused.text and SECRET_HASH not in refused.text
    assert status_of(ctx) is Status.REGISTERED  # a refused fetch is no install step
    served = from_address(HOST_IP, f"{base}/ks/{MAC}")
    assert served.status == 200 and token in served.text and SECRET_HASH in served.text
    assert status_of(ctx) is Status.INSTALLING
    # During the install too: the attacker still gets nothing.
    assert from_address(ATTACKER_IP, f"{base}/ks/{MAC}").status == 403
    messages = [e.message for e in ctx.timeline.events(MacAddress.parse(MAC))]
    assert sum(f"refused kickstart to {ATTACKER_IP}" in m for m in messages) == 3


def test_preseed_goes_only_to_the_hosts_current_lease(ctx: Context, base: str) -> None:
    ctx.provisioning.add_profile({**PROFILE, "name": "deb", "autoinstall": "debian-xen.cfg"})
    ctx.provisioning.add_host({"mac": MAC, "hostname": "web1", "profile": "deb"})  # no fixed IP
    url = f"{base}/preseed/{DASHED}"
    assert from_address(HOST_IP, url).status == 403  # no lease yet: nobody
    mac = MacAddress.parse(MAC)
    ctx.store.put_lease(Lease(mac, ATTACKER_IP, time.time() + 600))  # the lease DHCP gave it
    assert from_address(HOST_IP, url).status == 403
    leased = from_address(ATTACKER_IP, url)
    assert leased.status == 200 and token_of(ctx) in leased.text
    ctx.store.put_lease(Lease(mac, ATTACKER_IP, time.time() - 1))  # expired: the address may be another's
    assert from_address(ATTACKER_IP, url).status == 403


def test_no_install_in_progress_means_no_kickstart(ctx: Context, base: str) -> None:
    add_host(ctx, ip=HOST_IP)
    ctx.provisioning.set_netboot(MacAddress.parse(MAC), False)
    assert from_address(HOST_IP, f"{base}/ks/{MAC}").status == 404
    ctx.provisioning.set_netboot(MacAddress.parse(MAC), True)
    assert from_address(HOST_IP, f"{base}/ks/{MAC}").status == 200
    ctx.provisioning.install_done(MacAddress.parse(MAC), token_of(ctx), client_ip=HOST_IP)
    reply = from_address(HOST_IP, f"{base}/ks/{MAC}")
    assert reply.status == 404 and "no install in progress" in reply.text


def test_trusted_networks_relax_the_address_check(ctx: Context, base: str) -> None:
    add_host(ctx, ip="10.0.0.5")  # behind NAT: its requests arrive from the gateway
    assert from_address(ATTACKER_IP, f"{base}/ks/{MAC}").status == 403
    ctx.config.http.autoinstall_trusted_networks = [f"{ATTACKER_IP}/32"]
    assert from_address(ATTACKER_IP, f"{base}/ks/{MAC}").status == 200
    assert from_address(HOST_IP, f"{base}/ks/{MAC}").status == 403  # only that network


def test_a_stolen_token_replayed_from_another_address_changes_nothing(ctx: Context, base: str) -> None:
    add_host(ctx, ip=HOST_IP)
    kickstart = from_address(HOST_IP, f"{base}/ks/{MAC}").text
    callback = next(line for line in kickstart.splitlines() if "/installed?token=" in line)
    url = callback.split("'")[-2]
    for args in (["-X", "POST"], ["-X", "POST", "-H", "Content-Type: application/json",
                                   "--data", json.dumps({"token": token_of(ctx)})]):
        replay = from_address(ATTACKER_IP, url.split("?")[0] if "--data" in args else url, *args)
        assert replay.status == 403 and json.loads(replay.body)["error"]
        assert status_of(ctx) is Status.INSTALLING
        assert ctx.store.get_host(MacAddress.parse(MAC)).netboot is True
    assert "localboot" not in (ctx.config.tftp_root / "pxelinux.cfg" / f"01-{DASHED}").read_text()
    done = from_address(HOST_IP, url, "-X", "POST")  # the host itself, with the same token
    assert done.status == 200 and json.loads(done.body)["status"] == "installed"


def test_reads_need_the_api_token_and_show_no_secret(ctx: Context, base: str) -> None:
    ctx.config.api.token = "admin-s3cret"
    add_host(ctx, ip=HOST_IP, vars={"luks_passphrase": "hunter2", "db": {"password": "pw"},
                                    "suite": "bookworm"})
    token = token_of(ctx)
    for path in ("/api/hosts", f"/api/hosts/{MAC}", "/api/profiles", "/api/profiles/centos5",
                 f"/api/hosts/{MAC}/events"):
        refused = from_address(ATTACKER_IP, base + path)
        assert refused.status == 401 and MAC not in refused.text and "centos5\"" not in refused.text
        assert "Bearer" in json.loads(refused.body)["error"]
    admin = ("-H", "Authorization: Bearer admin-s3cret")
    listing = curl(f"{base}/api/hosts", *admin)
    one = curl(f"{base}/api/hosts/{MAC}", *admin)
    profiles = curl(f"{base}/api/profiles", *admin)
    for reply in (listing, one, profiles):
        assert reply.status == 200
        for secret in (token, SECRET_HASH, "hunter2", '"pw"'):
            assert secret not in reply.text
    host = json.loads(one.body)
    assert host["vars"] == {"luks_passphrase": "********", "db": {"password": "********"}, "suite": "bookworm"}
    assert "install_token" not in host and json.loads(profiles.body)[0]["vars"] == {
        "root_password_hash": "********"}
    # A client that writes the masked vars back keeps the secrets it never saw.
    patched = curl(f"{base}/api/hosts/{MAC}", *admin, "-X", "PATCH", "-H", "Content-Type: application/json",
                   "--data", json.dumps({"vars": {**host["vars"], "suite": "trixie"}}))
    assert patched.status == 200, patched.text
    stored = ctx.store.get_host(MacAddress.parse(MAC)).vars
    assert stored == {"luks_passphrase": "hunter2", "db": {"password": "pw"}, "suite": "trixie"}
    put = curl(f"{base}/api/profiles/centos5", *admin, "-X", "PUT", "-H", "Content-Type: application/json",
               "--data", json.dumps(json.loads(curl(f"{base}/api/profiles/centos5", *admin).body)))
    assert put.status == 200 and ctx.store.get_profile("centos5").vars == {"root_password_hash": SECRET_HASH}
    # The host itself still gets the real values.
    assert SECRET_HASH in from_address(HOST_IP, f"{base}/ks/{MAC}").text


def test_secret_vars_from_the_config_are_masked(ctx: Context, base: str) -> None:
    ctx.config.api.secret_vars = ["suite"]
    add_host(ctx, vars={"suite": "bookworm"})
    assert json.loads(curl(f"{base}/api/hosts/{MAC}").body)["vars"] == {"suite": "********"}


def test_the_callback_works_without_the_api_token(ctx: Context, base: str) -> None:
    ctx.config.api.token = "admin-s3cret"
    add_host(ctx, ip=HOST_IP)
    reply = from_address(HOST_IP, f"{base}/api/hosts/{MAC}/installed?token={token_of(ctx)}", "-X", "POST")
    assert reply.status == 200 and status_of(ctx) is Status.INSTALLED
    assert "token" not in json.loads(reply.body)  # the answer carries no secret either


def test_deep_json_is_a_clean_400(ctx: Context, base: str, tmp_path: Path) -> None:
    add_host(ctx, ip=HOST_IP)
    before = ctx.store.get_host(MacAddress.parse(MAC))
    deep, in_object = tmp_path / "deep.json", tmp_path / "token.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    in_object.write_text('{"token": ' + "[" * 100_000 + "]" * 100_000 + "}")
    json_body = ("-H", "Content-Type: application/json", "--data-binary")
    for method, path in (("POST", "/api/hosts"), ("PATCH", f"/api/hosts/{MAC}"),
                         ("PUT", "/api/profiles/centos5"), ("POST", "/api/profiles")):
        reply = curl(base + path, "-X", method, *json_body, f"@{deep}")
        assert reply.status == 400, reply.text
        assert "nested too deeply" in json.loads(reply.body)["error"] and "Traceback" not in reply.text
    callback = curl(f"{base}/api/hosts/{MAC}/installed", "-X", "POST", *json_body, f"@{in_object}")
    assert callback.status == 403 and json.loads(callback.body)["error"]
    assert ctx.store.get_host(MacAddress.parse(MAC)) == before
    assert curl(f"{base}/api/hosts/{MAC}").status == 200  # and the service goes on


def test_a_flood_of_unknown_macs_stores_nothing_and_timelines_stay_capped(ctx: Context, base: str) -> None:
    ctx.timeline.keep_per_host = 50
    add_host(ctx, ip=HOST_IP)
    port = int(base.rsplit(":", 1)[1])
    started = time.monotonic()
    attacker = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(ATTACKER_IP, 0))
    statuses: dict[int, int] = {}
    for number in range(5000):
        unknown = MacAddress.random_xen({MacAddress.parse(MAC)})
        path = (f"/ks/{unknown}", f"/preseed/{unknown.dashed}", f"/ipxe/{unknown}",
                f"/api/hosts/{unknown}/installed?token=x", f"/ks/{MAC}",
                f"/api/hosts/{MAC}/installed?token=x")[number % 6]
        attacker.request("POST" if "installed" in path else "GET", path)
        response = attacker.getresponse()
        response.read()
        statuses[response.status] = statuses.get(response.status, 0) + 1
        if number % 1000 == 0:  # the real host is served during the flood
            good = from_address(HOST_IP, f"{base}/ks/{MAC}")
            assert good.status == 200 and token_of(ctx) in good.text
    attacker.close()
    flood_seconds = time.monotonic() - started
    assert flood_seconds < 120, flood_seconds
    assert set(statuses) <= {200, 403, 404}, statuses  # /ipxe/ answers unknown MACs with the default
    # A DHCP or TFTP event for made-up MACs, as recorded off the packet path, is dropped too.
    for _ in range(1000):
        ctx.policy.record(MacAddress.random_xen({MacAddress.parse(MAC)}), "dhcp", "DISCOVER")
    ctx.timeline.flush()
    by_mac = dict(database_rows(ctx.config.database, "SELECT mac, COUNT(*) FROM events GROUP BY mac"))
    assert list(by_mac) == [MAC] and by_mac[MAC] <= 50
    events = ctx.timeline.events(MacAddress.parse(MAC))
    assert len(events) == 50
    assert [e.time for e in events] == sorted(e.time for e in events)
    after = from_address(HOST_IP, f"{base}/ks/{MAC}")  # and after it
    assert after.status == 200
    newest = ctx.timeline.events(MacAddress.parse(MAC))
    assert len(newest) == 50 and newest[-1].message == f"served kickstart centos5-xen-pv.ks to {HOST_IP}"
    print(f"flood: 5000 requests in {flood_seconds:.1f} s, statuses {statuses}")
