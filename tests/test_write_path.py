"""One write path for host state: PATCHes and install callbacks racing over real HTTP.

Many hosts at once, each getting PATCHes of its hostname, vars and xen settings (two partial xen
PATCHes that must both stick), netboot PATCHes, the lifecycle steps a booting installer causes
(iPXE script, kickstart) and its install-complete callback, all in flight together on a running
HTTP service. Every outcome is checked: a callback that succeeded is never undone, no named
field is lost, the boot config file on disk says what the registry says, and netboot turned on
after an install starts a new one with a new token.
"""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from http_support import PROFILE, running

from pxeserver.app import Context
from pxeserver.mac import MacAddress
from pxeserver.registry import Conflict

pytestmark = pytest.mark.both_stores  # registry behaviour: SQLite and PostgreSQL

HOSTS = 48
ROUNDS = 3  # each PATCH is sent this many times, so some land just before or after a callback


def request(method: str, url: str, body: object | None = None) -> tuple[int, dict | str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as reply:
            status, raw = reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read().decode()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def mac_of(i: int) -> str:
    return f"00:16:3e:77:{i >> 8:02x}:{i & 0xFF:02x}"


def netboot_racer(i: int) -> bool:
    """Every third host also gets "netboot on" PATCHes racing its callback."""
    return i % 3 == 0


@pytest.mark.slow
def test_patches_and_callbacks_racing_on_many_hosts_lose_nothing(ctx: Context) -> None:
    random.seed(10)
    # Every "installer" here calls from loopback; the address check has its own tests.
    ctx.config.http.autoinstall_trusted_networks = ["127.0.0.0/8"]
    # ... and all 48 hosts share that one address, 32 requests in flight at once.
    ctx.config.http.max_connections_per_address = 64
    with running(ctx):
        base = ctx.config.http_base_url
        assert request("POST", f"{base}/api/profiles", PROFILE)[0] == 201
        tokens: dict[str, str] = {}
        for i in range(HOSTS):
            status, _ = request("POST", f"{base}/api/hosts",
                                {"mac": mac_of(i), "hostname": f"host{i}", "profile": "centos5"})
            assert status == 201
            tokens[mac_of(i)] = ctx.store.get_host(MacAddress.parse(mac_of(i))).install_token

        callbacks: dict[str, int] = {}
        kickstarts: dict[str, int] = {}
        work: list[Callable[[], object]] = []
        for i in range(HOSTS):
            mac, url = mac_of(i), f"{base}/api/hosts/{mac_of(i)}"
            patches: list[dict] = [{"hostname": f"renamed{i}"}, {"vars": {"round": i, "role": "web"}},
                                   {"xen": {"memory": 512 + i}}, {"xen": {"vcpus": 2}}]
            if netboot_racer(i):
                patches.append({"netboot": True})
            for _ in range(ROUNDS):
                work += [lambda u=url, p=p: request("PATCH", u, p) for p in patches]
            work.append(lambda m=mac: request("GET", f"{base}/ipxe/{m}"))
            # 404 once its callback has landed: the kickstart is served only during an install.
            work.append(lambda m=mac: kickstarts.__setitem__(m, request("GET", f"{base}/ks/{m}")[0]))
            work.append(lambda m=mac, u=url: callbacks.__setitem__(
                m, request("POST", f"{u}/installed?token={tokens[m]}")[0]))
        random.shuffle(work)
        with ThreadPoolExecutor(max_workers=32) as pool:
            results = list(pool.map(lambda job: job(), work))
        assert all(r is None or r[0] == 200 for r in results), "every PATCH and GET succeeds"
        assert set(kickstarts.values()) <= {200, 404}, kickstarts

        for i in range(HOSTS):
            mac = mac_of(i)
            host = ctx.store.get_host(MacAddress.parse(mac))
            assert callbacks[mac] == 200, f"{mac}: its one callback with its own token succeeds"
            # No field a PATCH named is lost, whatever landed in between.
            assert (host.hostname, host.vars) == (f"renamed{i}", {"round": i, "role": "web"})
            assert (host.xen.memory, host.xen.vcpus, host.xen.bridge) == (512 + i, 2, "xenbr0")
            if host.netboot:
                # Only a "netboot on" PATCH after the callback turns it back on: a new install.
                assert netboot_racer(i), f"{mac}: a callback was undone"
                # ... which the installer's later iPXE or kickstart request may have advanced.
                assert host.status.value in ("registered", "netbooting", "installing")
                assert host.install_token and host.install_token != tokens[mac]
            else:
                assert host.status.value == "installed" and host.install_token == ""
            # The used token never works again, and the file on disk matches the registry.
            assert request("POST", f"{base}/api/hosts/{mac}/installed?token={tokens[mac]}")[0] == 403
            config = (ctx.config.tftp_root / "pxelinux.cfg" / f"01-{mac.replace(':', '-')}").read_text()
            assert ("localboot" in config) == (not host.netboot), config
            assert "install complete" in " ".join(e.message for e in ctx.store.events(host.mac))

        # Netboot on after an install: a new install with a new token, which completes it.
        for i in range(HOSTS):
            mac, url = mac_of(i), f"{base}/api/hosts/{mac_of(i)}"
            before = ctx.store.get_host(MacAddress.parse(mac))
            if before.netboot:  # its racing PATCH started a new install: finish that one first
                assert request("POST", f"{url}/installed?token={before.install_token}")[0] == 200
            status, body = request("PATCH", url, {"netboot": True})
            assert status == 200 and body["status"] == "registered" and body["netboot"] is True
            token = ctx.store.get_host(MacAddress.parse(mac)).install_token
            assert token and token not in (tokens[mac], before.install_token or "-")
            assert request("POST", f"{url}/installed?token={tokens[mac]}")[0] == 403
            status, body = request("POST", f"{url}/installed?token={token}")
            assert status == 200 and body["status"] == "installed" and body["netboot"] is False
            assert body["hostname"] == f"renamed{i}" and body["xen"]["memory"] == 512 + i


def test_a_patch_names_only_its_fields_and_a_conflict_changes_nothing(ctx: Context) -> None:
    ctx.provisioning.add_profile(PROFILE)
    first = ctx.provisioning.add_host({"mac": mac_of(1), "hostname": "one", "profile": "centos5",
                                       "ip": "10.0.0.5",
                                       "xen": {"memory": 2048, "disk": "/var/lib/xen/images/one.img"}})
    ctx.provisioning.add_host({"mac": mac_of(2), "hostname": "two", "profile": "centos5"})
    updated = ctx.provisioning.update_host(first.mac, {"xen": {"vcpus": 4}, "netboot": False})
    assert updated.xen.to_dict() == {"memory": 2048, "vcpus": 4, "bridge": "xenbr0",
                                      "disk": "format=raw,vdev=xvda,access=rw,target=/var/lib/xen/images/one.img"}
    assert (updated.hostname, updated.ip, updated.netboot, updated.status.value) == (
        "one", "10.0.0.5", False, "registered")
    assert updated.install_token == first.install_token, "netboot off keeps the install's token"
    with pytest.raises(Conflict, match="hostname 'two' is already taken"):
        ctx.provisioning.update_host(first.mac, {"hostname": "two", "netboot": True})
    assert ctx.store.get_host(first.mac) == updated, "a refused PATCH changes nothing, netboot too"
