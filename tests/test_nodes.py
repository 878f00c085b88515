"""Several pxeserver nodes sharing one PostgreSQL registry, checked with the real clients.

Each node is its own Context (its own pool, listener, caches and TFTP root) on one database in
a throwaway cluster. A change made through node A must be answered by node B's TFTP (tftp-hpa),
HTTP (curl), DNS (dig) and DHCP (its responder, scapy packets) within a second, and node B's
pxelinux.cfg file must follow. Then the database is killed with SIGKILL: node B keeps answering
from its last known state, refuses writes with a 503, says so in pxeserver_registry_up, and
recovers by itself; a bulk registration through the outage loses nothing it acknowledged.

Also: a node whose copy of a recorded initrd differs refuses it (tftp-hpa, curl, pypxeboot's
clients) while the other serves it; a `pxeserver serve` node killed with SIGKILL during bulk
registration through its API loses nothing it acknowledged; a node that missed notifications
catches up by itself; overlapping imports on two nodes never fail; and two DHCP nodes (real
processes in network namespaces, busybox udhcpc clients) survive the death of one mid-storm.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psycopg
import pytest
from conftest import free_port, make_config, started
from dhcp_support import can_make_namespaces, run
from dns_support import dig
from http_support import curl, post_json
from pg_support import Cluster, available, database_rows
from prometheus_client.parser import text_string_to_metric_families
from scapy.layers.dhcp import BOOTP, DHCP

from pxeserver import app
from pxeserver.dhcp.responder import Responder
from pxeserver.dns import DnsService
from pxeserver.mac import MacAddress
from pxeserver.pypxeboot import http as pypxeboot_http, tftp as pypxeboot_tftp
from pxeserver.registry import BootFile, Unavailable
from pxeserver.registry.postgres import LISTENER_NAME
from pxeserver.tftp import TftpService
from pxeserver.web.server import HttpService

pytestmark = pytest.mark.skipif(not available(), reason="PostgreSQL is not installed")

DOMAIN = "domu.example"
MAC = "00:16:3e:00:0a:01"
PROFILE = {"name": "deb", "kernel": "images/deb/linux", "initrd": "images/deb/initrd.gz",
           "append": "console=hvc0"}


def node(root: Path, url: str, address: str = "10.0.0.1", name: str = "") -> app.Context:
    cfg = make_config(root, url)
    cfg.server.node_name = name
    cfg.server.address = address  # the DHCP server identifier and next-server
    cfg.http.address = cfg.tftp.address = cfg.dns.address = "127.0.0.1"
    cfg.dns.domain = DOMAIN
    cfg.dhcp.pool_start, cfg.dhcp.pool_end = "10.0.0.100", "10.0.0.150"
    return app.build(cfg)


@pytest.fixture
def nodes(tmp_path: Path, pg_cluster: Cluster) -> Iterator[tuple[app.Context, app.Context]]:
    url = pg_cluster.new_database()
    a, b = node(tmp_path / "a", url), node(tmp_path / "b", url)
    yield a, b
    a.close()
    b.close()


def tftp_fetch(port: int, name: str, scratch: Path) -> tuple[bytes | None, str]:
    """The file as tftp-hpa fetched it (None if the server refused it) and what tftp said."""
    target = scratch / "fetched"
    target.unlink(missing_ok=True)
    done = subprocess.run(["tftp", "127.0.0.1", str(port), "-m", "octet", "-c", "get", name, str(target)],
                          capture_output=True, text=True, timeout=60)
    said = done.stderr + done.stdout
    if "Error" in said or not target.exists():
        return None, said
    return target.read_bytes(), said


def tftp_get(port: int, name: str, scratch: Path) -> str | None:
    """The file as tftp-hpa fetched it, as text, or None if the server refused it."""
    data, _ = tftp_fetch(port, name, scratch)
    return None if data is None else data.decode()


def metric(base: str, name: str, **labels: str) -> float | None:
    """One sample of the node's /metrics as curl reads it; None when it is not exposed."""
    for family in text_string_to_metric_families(curl(f"{base}/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def dhcp_offer(context: app.Context, mac: str) -> str | None:
    """The address node's DHCP responder offers this MAC (a DISCOVER built by scapy)."""
    request = bytes(BOOTP(op=1, xid=7, chaddr=MacAddress.parse(mac).packed + bytes(10))
                    / DHCP(options=[("message-type", "discover"), "end"]))
    reply = Responder(context).respond(request, ("0.0.0.0", 68), 67)
    return None if reply is None else BOOTP(reply.payload).yiaddr


def until(check: Callable[[], bool], limit: float = 5.0) -> float:
    """Seconds until ``check`` first holds (polled; Unavailable counts as not yet); fails
    after ``limit``."""
    start = time.monotonic()
    while not _holds(check):
        assert time.monotonic() - start < limit, f"not visible after {limit} s"
        time.sleep(0.005)
    return time.monotonic() - start


def _holds(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except Unavailable:
        return False


def test_a_change_through_node_a_is_answered_by_node_b_within_a_second(
        nodes: tuple[app.Context, app.Context], tmp_path: Path) -> None:
    a, b = nodes
    a.provisioning.add_profile(PROFILE)
    file_b = b.writer.host_path(MacAddress.parse(MAC))
    name = f"pxelinux.cfg/{MacAddress.parse(MAC).pxelinux_name}"
    with started(TftpService(b)) as tftp, started(HttpService(b)) as http, started(DnsService(b)) as dns:
        base = f"http://127.0.0.1:{http.port}"
        serial = int(dig(dns.port, DOMAIN, "SOA").answer[0][6])

        def visible() -> dict[str, Callable[[], bool]]:
            return {
                "tftp": lambda: "kernel images/deb/linux" in (tftp_get(tftp.port, name, tmp_path) or ""),
                "http": lambda: json.loads(curl(f"{base}/api/hosts/{MAC}").text or "{}").get("hostname") == "web1",
                "dns": lambda: dig(dns.port, f"web1.{DOMAIN}", "A").values() == ["10.0.0.5"],
                "dhcp": lambda: dhcp_offer(b, MAC) == "10.0.0.5",
                "file": lambda: file_b.exists() and "kernel images/deb/linux" in file_b.read_text(),
            }

        changed = time.monotonic()
        a.provisioning.add_host({"mac": MAC, "hostname": "web1", "profile": "deb", "ip": "10.0.0.5"})
        seen = {}
        for key, check in visible().items():
            until(check)
            seen[key] = time.monotonic() - changed
        total = time.monotonic() - changed
        print(f"add on A visible on B: {', '.join(f'{k} {v * 1000:.0f} ms' for k, v in seen.items())}"
              f"; all five {total * 1000:.0f} ms")
        assert total < 1.0, seen
        assert int(dig(dns.port, DOMAIN, "SOA").answer[0][6]) > serial

        # A change: renamed, readdressed and netboot off; node B follows in each protocol.
        changed = time.monotonic()
        a.provisioning.update_host(MacAddress.parse(MAC), {"hostname": "web2", "ip": "10.0.0.6",
                                                           "netboot": False})
        checks = {
            "tftp": lambda: "localboot 0" in (tftp_get(tftp.port, name, tmp_path) or ""),
            "http": lambda: json.loads(curl(f"{base}/api/hosts/{MAC}").text).get("hostname") == "web2",
            "dns": lambda: (dig(dns.port, f"web2.{DOMAIN}", "A").values() == ["10.0.0.6"]
                            and dig(dns.port, f"web1.{DOMAIN}", "A").status == "NXDOMAIN"),
            "dhcp": lambda: dhcp_offer(b, MAC) == "10.0.0.6",
            "file": lambda: "localboot 0" in file_b.read_text(),
        }
        seen = {}
        for key, check in checks.items():
            until(check)
            seen[key] = time.monotonic() - changed
        total = time.monotonic() - changed
        print(f"update on A visible on B: {', '.join(f'{k} {v * 1000:.0f} ms' for k, v in seen.items())}")
        assert total < 1.0, seen

        # Deleted on A: gone from node B's answers and its disk.
        changed = time.monotonic()
        a.provisioning.delete_host(MacAddress.parse(MAC))
        until(lambda: curl(f"{base}/api/hosts/{MAC}").status == 404)
        until(lambda: not file_b.exists())
        until(lambda: dig(dns.port, f"web2.{DOMAIN}", "A").status == "NXDOMAIN")
        assert time.monotonic() - changed < 1.0


@pytest.fixture
def own_cluster() -> Iterator[Cluster]:
    """A cluster of the test's own, as the test kills it."""
    cluster = Cluster()
    yield cluster
    cluster.destroy()


def test_database_killed_nodes_answer_from_last_state_refuse_writes_and_recover(
        own_cluster: Cluster, tmp_path: Path) -> None:
    url = own_cluster.new_database()
    with ExitStack() as stack:
        a, b = node(tmp_path / "a", url), node(tmp_path / "b", url)
        stack.callback(a.close)
        stack.callback(b.close)
        a.provisioning.add_profile(PROFILE)
        a.provisioning.add_host({"mac": MAC, "hostname": "web1", "profile": "deb", "ip": "10.0.0.5"})
        tftp = stack.enter_context(started(TftpService(b)))
        http = stack.enter_context(started(HttpService(b)))
        dns = stack.enter_context(started(DnsService(b)))
        base = f"http://127.0.0.1:{http.port}"
        name = f"pxelinux.cfg/{MacAddress.parse(MAC).pxelinux_name}"
        until(lambda: dig(dns.port, f"web1.{DOMAIN}", "A").values() == ["10.0.0.5"])
        until(lambda: curl(f"{base}/api/hosts/{MAC}").status == 200)
        assert metric(base, "pxeserver_registry_up") == 1
        assert time.time() - 3 < (metric(base, "pxeserver_registry_last_contact_timestamp_seconds") or 0)

        own_cluster.kill()
        killed_at = time.time()  # the postmaster and every backend are gone: no answer after this
        # The scrape says so (and still works: the registry's counts come from the last known state).
        noticed = until(lambda: metric(base, "pxeserver_registry_up") == 0)
        assert not b.store.healthy()  # type: ignore[attr-defined]
        assert (metric(base, "pxeserver_registry_last_contact_timestamp_seconds") or 0) <= killed_at
        assert metric(base, "pxeserver_hosts", status="registered") == 1
        print(f"pxeserver_registry_up 0 within {noticed:.2f} s of the kill -9")
        started_at = time.monotonic()
        # Reads: what node B knew is still answered, by every protocol.
        assert "kernel images/deb/linux" in (tftp_get(tftp.port, name, tmp_path) or "")
        assert dig(dns.port, f"web1.{DOMAIN}", "A").values() == ["10.0.0.5"]
        assert json.loads(curl(f"{base}/api/hosts/{MAC}").text)["hostname"] == "web1"
        assert dhcp_offer(b, MAC) == "10.0.0.5"
        # Writes: a clear 503, nothing half done.
        refused = post_json(f"{base}/api/hosts", json.dumps(
            {"mac": "00:16:3e:00:0a:02", "hostname": "web2", "profile": "deb"}))
        assert refused.status == 503, refused.text
        assert "registry database is unreachable" in json.loads(refused.text)["error"]
        assert refused.headers.get("retry-after") == "5"
        with pytest.raises(Unavailable):
            a.provisioning.update_host(MacAddress.parse(MAC), {"hostname": "web9"})
        outage_answers = time.monotonic() - started_at
        print(f"during the outage: 4 reads answered and 2 writes refused in {outage_answers:.2f} s")
        assert outage_answers < 5

        restarted_at = time.time()
        own_cluster.start()
        back = time.monotonic()
        up_again = until(lambda: metric(base, "pxeserver_registry_up") == 1, 15)
        assert (metric(base, "pxeserver_registry_last_contact_timestamp_seconds") or 0) >= restarted_at
        print(f"pxeserver_registry_up 1 again {up_again:.2f} s after the database restarted")
        until(lambda: post_json(f"{base}/api/hosts", json.dumps(
            {"mac": "00:16:3e:00:0a:02", "hostname": "web2", "profile": "deb", "ip": "10.0.0.7"})).status == 201, 15)
        recovered = time.monotonic() - back
        # The other node sees the write made through B once the database is back.
        until(lambda: a.store.find_host(MacAddress.parse("00:16:3e:00:0a:02")) is not None, 15)
        until(lambda: dig(dns.port, f"web2.{DOMAIN}", "A").values() == ["10.0.0.7"])
        print(f"writes accepted again {recovered:.2f} s after the database restarted")


def test_bulk_registration_through_a_kill_9_loses_nothing_acknowledged(
        own_cluster: Cluster, tmp_path: Path) -> None:
    url = own_cluster.new_database()
    a = node(tmp_path / "a", url)
    a.provisioning.add_profile(PROFILE)
    acknowledged: list[str] = []
    refused: list[str] = []
    lock = threading.Lock()

    def register(worker: int) -> None:
        for i in range(150):
            mac = f"00:16:3e:{worker:02x}:{i >> 8:02x}:{i & 0xFF:02x}"
            try:
                a.provisioning.add_host({"mac": mac, "hostname": f"h{worker}-{i}", "profile": "deb"})
            except Unavailable:
                with lock:
                    refused.append(mac)
                time.sleep(0.02)
                continue
            with lock:
                acknowledged.append(mac)

    workers = [threading.Thread(target=register, args=(w,)) for w in range(4)]
    for worker in workers:
        worker.start()
    until(lambda: len(acknowledged) >= 100, 60)
    own_cluster.kill()
    # Long enough that writes are refused, not just delayed: a write already waiting for a
    # pooled connection when the database died may wait until it is back (loaded machines).
    until(lambda: not a.store.healthy(), 10)  # type: ignore[attr-defined]
    time.sleep(1.5)
    own_cluster.start()
    for worker in workers:
        worker.join(timeout=120)
    stored = {row[0] for row in database_rows(url, "SELECT mac FROM hosts")}
    a.close()
    print(f"bulk registration: {len(acknowledged)} acknowledged, {len(refused)} refused "
          f"during the outage, {len(stored)} stored")
    assert refused, "the kill did not interrupt the registration"
    assert set(acknowledged) <= stored, sorted(set(acknowledged) - stored)[:5]
    assert stored <= set(acknowledged) | set(refused)


def dhcp(responder: Responder, lock: threading.Lock, kind: str, mac: str, *options: tuple[str, object],
         ciaddr: str = "0.0.0.0") -> tuple[str, str] | None:
    """(message type, yiaddr) of the node's reply to one packet, or None if it stays silent.
    ``lock``: the node's DHCP service answers one packet at a time."""
    request = bytes(BOOTP(op=1, xid=9, ciaddr=ciaddr, chaddr=MacAddress.parse(mac).packed + bytes(10))
                    / DHCP(options=[("message-type", kind), *options, "end"]))
    with lock:
        reply = responder.respond(request, ("0.0.0.0", 68), 67)
    if reply is None:
        return None
    parsed = BOOTP(reply.payload)
    kinds = {2: "offer", 5: "ack", 6: "nak"}
    message = next(o[1] for o in parsed[DHCP].options if isinstance(o, tuple) and o[0] == "message-type")
    return kinds[message], parsed.yiaddr


def test_two_dhcp_nodes_never_lease_one_address_to_two_macs(tmp_path: Path, pg_cluster: Cluster) -> None:
    """Twenty clients race for a pool of twenty through two nodes at once, each DISCOVER to
    both; then each rebinds through the node it did not use (its server is gone)."""
    url = pg_cluster.new_database()
    a, b = node(tmp_path / "a", url, "10.0.0.1"), node(tmp_path / "b", url, "10.0.0.2")
    try:
        a.provisioning.add_profile(PROFILE)
        macs = [f"00:16:3e:00:0b:{i:02x}" for i in range(20)]
        for i, mac in enumerate(macs):
            a.provisioning.add_host({"mac": mac, "hostname": f"c{i}", "profile": "deb"})
        for context in (a, b):
            context.config.dhcp.pool_start, context.config.dhcp.pool_end = "10.0.0.100", "10.0.0.119"
        servers = {"10.0.0.1": (Responder(a), threading.Lock()), "10.0.0.2": (Responder(b), threading.Lock())}
        acked: dict[str, tuple[str, str]] = {}  # mac -> (ip, server)
        naks = 0
        lock = threading.Lock()

        def client(index: int) -> None:
            nonlocal naks
            mac = macs[index]
            for attempt in range(20):
                order = list(servers) if (index + attempt) % 2 else list(reversed(servers))
                offers = [(server, dhcp(*servers[server], "discover", mac)) for server in order]
                chosen = next(((server, reply[1]) for server, reply in offers if reply), None)
                if chosen is None:
                    time.sleep(0.05)
                    continue
                server, ip = chosen
                replies = {other: dhcp(*servers[other], "request", mac, ("server_id", server),
                                       ("requested_addr", ip)) for other in order}
                assert all(replies[other] is None for other in servers if other != server)
                if replies[server] == ("ack", ip):
                    with lock:
                        acked[mac] = (ip, server)
                    return
                with lock:
                    naks += 1
            raise AssertionError(f"{mac} got no address in 20 rounds")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(macs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        ips = [ip for ip, _ in acked.values()]
        print(f"two DHCP nodes: {len(acked)} clients bound, {naks} NAKs from lost races, "
              f"{sum(1 for _, s in acked.values() if s == '10.0.0.1')} through node A")
        assert len(acked) == len(macs)
        assert len(set(ips)) == len(ips), "an address was acknowledged to two MACs"
        stored = {row[0]: row[1] for row in database_rows(url, "SELECT mac, ip FROM leases")}
        assert stored == {mac: ip for mac, (ip, _) in acked.items()}
        # Its server is gone: each client rebinds (broadcast REQUEST with ciaddr, no server id)
        # and renews through the other node, which acknowledges the same address.
        for mac, (ip, server) in acked.items():
            other = next(s for s in servers if s != server)
            assert dhcp(*servers[other], "request", mac, ciaddr=ip) == ("ack", ip)
    finally:
        a.close()
        b.close()


def pypxeboot_fetch(url: str, tftp_port: int) -> bytes:
    """A file as pypxeboot's own clients fetch it: an http:// URL, else a TFTP path."""
    bounds = pypxeboot_tftp.Bounds(max_file=1 << 30, max_total=1 << 30, min_rate=1, rate_window=10,
                                   deadline=time.monotonic() + 30)
    output = io.BytesIO()
    if pypxeboot_http.is_url(url):
        pypxeboot_http.download(url, "127.0.0.1", output, 1 << 30, "too big", bounds)
    else:
        pypxeboot_tftp.download("127.0.0.1", tftp_port, url, output, 1 << 30, "too big", bounds)
    return output.getvalue()


def test_a_node_whose_boot_file_differs_from_the_registry_refuses_it_until_fixed(
        tmp_path: Path, pg_cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    """One registry records a profile's kernel and initrd; node A has the recorded copies, node
    B an initrd with one byte flipped (a disk error, a half-done rsync). B refuses that initrd
    to tftp-hpa, curl and pypxeboot's clients, under any spelling of its name, with one log
    line and its metrics; A and B's kernel are served. Fixed in place, it is served again."""
    url = pg_cluster.new_database()
    kernel, initrd = os.urandom(200_000), os.urandom(2_000_000)
    bad = bytearray(initrd)
    bad[1_234_567] ^= 0xFF
    a, b = node(tmp_path / "a", url, name="node-a"), node(tmp_path / "b", url, name="node-b")
    with ExitStack() as stack:
        stack.callback(a.close)
        stack.callback(b.close)
        for context, initrd_copy in ((a, initrd), (b, bytes(bad))):
            images = context.config.tftp_root / "images" / "deb"
            images.mkdir()
            (images / "linux").write_bytes(kernel)
            (images / "initrd.gz").write_bytes(initrd_copy)
            (context.config.tftp_root / "images" / "alias").symlink_to("deb")
        expected, actual = hashlib.sha256(initrd).hexdigest(), hashlib.sha256(bad).hexdigest()
        a.provisioning.add_imported_profile(PROFILE, [
            BootFile(PROFILE["kernel"], len(kernel), hashlib.sha256(kernel).hexdigest(), "test"),
            BootFile(PROFILE["initrd"], len(initrd), expected, "test")])
        servers = {}
        for label, context in (("a", a), ("b", b)):
            tftp = stack.enter_context(started(TftpService(context)))
            http = stack.enter_context(started(HttpService(context)))
            servers[label] = (tftp.port, f"http://127.0.0.1:{http.port}")
        caplog.set_level(logging.WARNING, logger="pxeserver.bootfiles")

        # Node A serves both files by every client.
        tftp_a, base_a = servers["a"]
        assert tftp_fetch(tftp_a, PROFILE["initrd"], tmp_path)[0] == initrd
        assert curl(f"{base_a}/boot/{PROFILE['initrd']}").body == initrd
        assert pypxeboot_fetch(PROFILE["initrd"], tftp_a) == initrd
        assert pypxeboot_fetch(f"{base_a}/boot/{PROFILE['initrd']}", tftp_a) == initrd

        # Node B serves its kernel (it matches) and refuses the initrd, whoever asks and however.
        tftp_b, base_b = servers["b"]
        assert tftp_fetch(tftp_b, PROFILE["kernel"], tmp_path)[0] == kernel
        assert curl(f"{base_b}/boot/{PROFILE['kernel']}").body == kernel
        refusals = 0
        for name in (PROFILE["initrd"], "/images/deb/initrd.gz", "images/alias/initrd.gz"):
            data, said = tftp_fetch(tftp_b, name, tmp_path)
            assert data is None and "differs from the registry's checksum" in said, said
            reply = curl(f"{base_b}/boot/{name.lstrip('/')}")
            assert reply.status == 503 and "differs from the registry's checksum" in reply.text, reply
            refusals += 2
        with pytest.raises(pypxeboot_tftp.ServerRefused, match="differs from the registry's checksum"):
            pypxeboot_fetch(PROFILE["initrd"], tftp_b)
        with pytest.raises(pypxeboot_tftp.ServerRefused, match="503"):
            pypxeboot_fetch(f"{base_b}/boot/{PROFILE['initrd']}", tftp_b)
        refusals += 2

        lines = [r.getMessage() for r in caplog.records if r.name == "pxeserver.bootfiles"]
        assert lines == [f"boot file images/deb/initrd.gz on node node-b does not match the registry: "
                         f"sha256 {actual}, expected {expected}; refusing it over tftp until it is fixed"]
        assert metric(base_b, "pxeserver_boot_file_refusals_total", file=PROFILE["initrd"]) == refusals
        assert metric(base_b, "pxeserver_boot_files_mismatched") == 1
        assert metric(base_a, "pxeserver_boot_files_mismatched") == 0
        assert metric(base_a, "pxeserver_boot_file_refusals_total", file=PROFILE["initrd"]) is None

        # Fixed in place (same inode and size, a new mtime): the next scrape and request see it.
        with open(b.config.tftp_root / PROFILE["initrd"], "r+b") as repaired:
            repaired.write(initrd)
        assert metric(base_b, "pxeserver_boot_files_mismatched") == 0
        assert tftp_fetch(tftp_b, PROFILE["initrd"], tmp_path)[0] == initrd
        assert curl(f"{base_b}/boot/{PROFILE['initrd']}").body == initrd
        assert pypxeboot_fetch(PROFILE["initrd"], tftp_b) == initrd
        assert metric(base_b, "pxeserver_boot_file_refusals_total", file=PROFILE["initrd"]) == refusals
        assert any(r.getMessage() == "boot file images/deb/initrd.gz on node node-b matches the registry "
                   "again: serving it" for r in caplog.records)


def serve_process(root: Path, url: str, name: str) -> tuple[subprocess.Popen[str], str]:
    """A real `pxeserver serve` node on loopback (TFTP and HTTP) on the shared registry; its
    API's base URL once it answers."""
    http_port = free_port()
    process = launch(root, f'[server]\naddress = "127.0.0.1"\ndatabase = "{url}"\nnode_name = "{name}"\n'
                           f'[tftp]\naddress = "127.0.0.1"\nport = {free_port(socket.SOCK_DGRAM)}\n'
                           f'[http]\naddress = "127.0.0.1"\nport = {http_port}\n')
    return process, f"http://127.0.0.1:{http_port}/api"


def launch(root: Path, config: str, *prefix: str) -> subprocess.Popen[str]:
    """`pxeserver serve` with ``config`` as its pxeserver.toml in ``root`` (after ``prefix``,
    e.g. ``ip netns exec NS``), once its banner says it serves."""
    root.mkdir()
    (root / "pxeserver.toml").write_text(config)
    process = subprocess.Popen([*prefix, sys.executable, "-m", "pxeserver", "serve"], cwd=root,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith("pxeserver: next:") or not line:
            break
    assert process.poll() is None and line, f"pxeserver serve in {root} did not start"
    return process


def post(url: str, body: dict[str, object]) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_kill_9_of_a_node_during_bulk_registration_loses_nothing_it_acknowledged(
        tmp_path: Path, pg_cluster: Cluster) -> None:
    """Four clients register hosts through node A's API (a real `pxeserver serve`) as fast as it
    answers; A is killed with SIGKILL mid-stream. Every host A acknowledged is in the registry,
    nothing is there that no client sent, and node B answers every one of them (API and its
    pxelinux.cfg files) without being told anything but the notifications."""
    url = pg_cluster.new_database()
    process, api_a = serve_process(tmp_path / "a", url, "node-a")
    b = node(tmp_path / "b", url, name="node-b")
    try:
        assert post(f"{api_a}/profiles", PROFILE) == 201
        acknowledged: list[str] = []
        in_flight: list[str] = []  # sent when A died: stored or not, never half
        lock = threading.Lock()

        def register(worker: int) -> None:
            for i in range(2000):
                mac = f"00:16:3e:{worker:02x}:{i >> 8:02x}:{i & 0xFF:02x}"
                try:
                    status = post(f"{api_a}/hosts", {"mac": mac, "hostname": f"n{worker}-{i}", "profile": "deb"})
                except (urllib.error.URLError, ConnectionError, OSError):
                    with lock:
                        in_flight.append(mac)
                    return
                assert status == 201, status
                with lock:
                    acknowledged.append(mac)

        writers = [threading.Thread(target=register, args=(w,)) for w in range(4)]
        started_at = time.monotonic()
        for writer in writers:
            writer.start()
        until(lambda: len(acknowledged) >= 300, 120)
        os.kill(process.pid, signal.SIGKILL)
        rate = len(acknowledged) / (time.monotonic() - started_at)
        for writer in writers:
            writer.join(timeout=60)
        process.wait(timeout=10)
        stored = {row[0] for row in database_rows(url, "SELECT mac FROM hosts")}
        print(f"node killed: {len(acknowledged)} acknowledged ({rate:.0f}/s through 4 clients), "
              f"{len(in_flight)} in flight, {len(stored)} stored")
        assert len(in_flight) == 4  # each client was cut off mid-request
        assert set(acknowledged) <= stored, sorted(set(acknowledged) - stored)[:5]
        assert stored <= set(acknowledged) | set(in_flight)

        # Node B has it all: its API (from its cache, kept current by the notifications) and
        # a pxelinux.cfg file for every stored host.
        with started(HttpService(b)) as http:
            listed = {h["mac"] for h in json.loads(curl(f"http://127.0.0.1:{http.port}/api/hosts").text)}
        assert listed == stored
        files = lambda: {p.name for p in (b.config.tftp_root / "pxelinux.cfg").glob("01-*")}  # noqa: E731
        wanted = {MacAddress.parse(mac).pxelinux_name for mac in stored}
        waited = until(lambda: files() == wanted, 10)
        print(f"node B listed all {len(listed)} and had every pxelinux.cfg file ({waited:.2f} s more)")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        b.close()


def test_a_node_that_missed_notifications_catches_up_by_itself(tmp_path: Path, pg_cluster: Cluster) -> None:
    """Node B's listener connection is terminated (pg_terminate_backend) and its role may not
    log in again for a while, so B hears nothing while node A renames, readdresses, turns off
    netboot for, deletes and adds hosts. B answers from its last known state meanwhile; once it
    may reconnect it converges by itself (no write through B, no restart): its cache, its DNS
    serial and answers, and its pxelinux.cfg files, within two seconds."""
    url = pg_cluster.new_database()
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("CREATE ROLE node_b LOGIN SUPERUSER")
    a = node(tmp_path / "a", url, name="node-a")
    b = node(tmp_path / "b", url.replace("//pxeserver@", "//node_b@"), name="node-b")
    macs = [MacAddress.parse(f"00:16:3e:00:0c:{i:02x}") for i in range(6)]
    try:
        a.provisioning.add_profile(PROFILE)
        for i, mac in enumerate(macs):
            a.provisioning.add_host({"mac": str(mac), "hostname": f"old{i}", "profile": "deb",
                                     "ip": f"10.0.0.{20 + i}"})
        pxelinux_dir = b.config.tftp_root / "pxelinux.cfg"
        with started(DnsService(b)) as dns:
            until(lambda: dig(dns.port, f"old5.{DOMAIN}", "A").values() == ["10.0.0.25"])
            until(lambda: all((pxelinux_dir / mac.pxelinux_name).exists() for mac in macs))
            for mac in macs:
                assert b.policy.host(mac) is not None  # in B's cache
            serial = int(dig(dns.port, DOMAIN, "SOA").answer[0][6])

            with psycopg.connect(url, autocommit=True) as admin:
                admin.execute("ALTER ROLE node_b NOLOGIN")
                killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                                       "usename = 'node_b' AND application_name = %s",
                                       (LISTENER_NAME,)).fetchall()
                assert len(killed) == 1
                until(lambda: not b.store.healthy())  # type: ignore[attr-defined]
                for i, mac in enumerate(macs[:4]):
                    a.provisioning.update_host(mac, {"hostname": f"new{i}", "ip": f"10.0.0.{40 + i}",
                                                     "netboot": i % 2 == 0})
                a.provisioning.delete_host(macs[5])
                added = MacAddress.parse("00:16:3e:00:0c:99")
                a.provisioning.add_host({"mac": str(added), "hostname": "added", "profile": "deb", "ip": "10.0.0.99"})
                # B heard none of it: it answers what it knew.
                time.sleep(0.5)
                assert b.policy.host(macs[0]).hostname == "old0"  # type: ignore[union-attr]
                assert dig(dns.port, f"old5.{DOMAIN}", "A").values() == ["10.0.0.25"]
                assert (pxelinux_dir / macs[5].pxelinux_name).exists()
                assert not (pxelinux_dir / added.pxelinux_name).exists()
                admin.execute("ALTER ROLE node_b LOGIN")
                allowed = time.monotonic()

            def converged() -> bool:
                hosts = {mac: b.policy.host(mac) for mac in [*macs, added]}
                files = {mac: pxelinux_dir / mac.pxelinux_name for mac in [*macs, added]}
                return (all(hosts[mac].hostname == f"new{i}" for i, mac in enumerate(macs[:4]))  # type: ignore[union-attr]
                        and hosts[macs[5]] is None and hosts[added] is not None
                        and int(dig(dns.port, DOMAIN, "SOA").answer[0][6]) > serial
                        and dig(dns.port, f"new3.{DOMAIN}", "A").values() == ["10.0.0.43"]
                        and dig(dns.port, f"old5.{DOMAIN}", "A").status == "NXDOMAIN"
                        and dig(dns.port, f"added.{DOMAIN}", "A").values() == ["10.0.0.99"]
                        and all("localboot 0" in files[mac].read_text() for mac in macs[1:4:2])
                        and all("kernel images/deb/linux" in files[mac].read_text() for mac in macs[0:4:2])
                        and not files[macs[5]].exists() and files[added].exists())

            until(converged, 2.0)
            print(f"node B caught up {time.monotonic() - allowed:.2f} s after it could reconnect")
    finally:
        a.close()
        b.close()


def test_two_nodes_importing_overlapping_files_at_once_never_fail(tmp_path: Path, pg_cluster: Cluster) -> None:
    """Both nodes record the same profiles' files at the same moment, listing them in opposite
    orders (the row locks two transactions would take crosswise, a deadlock). Each round one
    node adds the profile and the other finds it there: no error, no 500."""
    url = pg_cluster.new_database()
    a, b = node(tmp_path / "a", url), node(tmp_path / "b", url)
    outcomes: dict[str, list[bool]] = {}
    failures: list[BaseException] = []
    rounds = 300
    barrier = threading.Barrier(2, timeout=30)
    lock = threading.Lock()

    def importer(context: app.Context, reverse: bool) -> None:
        for i in range(rounds):
            profile = {**PROFILE, "name": f"p{i}", "kernel": f"images/p{i}/linux", "initrd": f"images/p{i}/initrd.gz"}
            files = [BootFile(profile["kernel"], 10, "a" * 64, "test"),
                     BootFile(profile["initrd"], 20, "b" * 64, "test")]
            barrier.wait()
            try:
                _, added = context.provisioning.add_imported_profile(profile, files[::-1] if reverse else files)
            except Exception as exc:  # what the API would answer 5xx (or 409) for
                with lock:
                    failures.append(exc)
                continue
            with lock:
                outcomes.setdefault(profile["name"], []).append(added)

    try:
        threads = [threading.Thread(target=importer, args=(a, False)),
                   threading.Thread(target=importer, args=(b, True))]
        started_at = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        print(f"{rounds} overlapping imports on two nodes in {time.monotonic() - started_at:.2f} s")
        assert not failures, failures[:3]
        assert all(sorted(added) == [False, True] for added in outcomes.values()) and len(outcomes) == rounds
        recorded = database_rows(url, "SELECT COUNT(*) FROM boot_files")[0][0]
        assert recorded == 2 * rounds
    finally:
        a.close()
        b.close()


# -- two DHCP nodes on one network, real clients --------------------------------------------

LAN_SUBNET, NODE_A_IP, NODE_B_IP = "10.77.0.0/24", "10.77.0.1", "10.77.0.2"
UDHCPC_SCRIPT = """#!/bin/sh
# One line per event: the event, the address and the server that answered.
case "$1" in
  deconfig) ip addr flush dev "$interface" ;;
  bound|renew) ip addr flush dev "$interface"; ip addr add "$ip/24" dev "$interface" ;;
esac
echo "$1 ${ip:-} ${serverid:-}" >> "$EVENTS"
exit 0
"""


@contextmanager
def dhcp_lan(clients: int) -> Iterator[tuple[str, str, str, list[str]]]:
    """One layer-2 network (bridge br0 in a namespace of its own, node A's port ps0, node B's
    ps1) joining two server namespaces (interface dhs0, 10.77.0.1 and .2) and ``clients`` client
    namespaces (interface dhc0, no address); yields the namespaces' names (the bridge's, A's,
    B's, the clients') and deletes them all afterwards."""
    tag = f"n{os.getpid()}"
    lan, servers = f"{tag}-lan", [f"{tag}-a", f"{tag}-b"]
    guests = [f"{tag}-c{i}" for i in range(clients)]
    made: list[str] = []
    try:
        for namespace in [lan, *servers, *guests]:
            run("ip", "netns", "add", namespace)
            made.append(namespace)
            run("ip", "-n", namespace, "link", "set", "lo", "up")
        run("ip", "-n", lan, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", lan, "link", "set", "br0", "up")
        ends = [(ns, "dhs0", f"ps{i}") for i, ns in enumerate(servers)]
        ends += [(ns, "dhc0", f"pc{i}") for i, ns in enumerate(guests)]
        for namespace, interface, port in ends:
            run("ip", "link", "add", interface, "netns", namespace, "type", "veth", "peer", "name", port, "netns", lan)
            run("ip", "-n", lan, "link", "set", port, "master", "br0", "up")
            run("ip", "-n", namespace, "link", "set", interface, "up")
        for namespace, address in zip(servers, (NODE_A_IP, NODE_B_IP), strict=True):
            run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", "dhs0")
        yield lan, servers[0], servers[1], guests
    finally:
        for namespace in reversed(made):
            run("ip", "netns", "del", namespace, check=False)


def dhcp_node(root: Path, namespace: str, database: str, address: str, name: str) -> subprocess.Popen[str]:
    """`pxeserver serve` with DHCP only, inside ``namespace``, on the shared registry (reached
    through PostgreSQL's Unix socket: the namespace has no route to the host's loopback)."""
    return launch(root, f'[server]\naddress = "{address}"\ndatabase = "{database}"\nnode_name = "{name}"\n'
                        '[tftp]\nenabled = false\n[http]\nenabled = false\n'
                        f'[dhcp]\nenabled = true\ninterface = "dhs0"\nsubnet = "{LAN_SUBNET}"\n'
                        f'router = "{NODE_A_IP}"\npool_start = "10.77.0.100"\npool_end = "10.77.0.150"\n'
                        'lease_time = 60\n', "ip", "netns", "exec", namespace)


def client_events(path: Path) -> list[tuple[str, str, str]]:
    """(event, address, server) for each time udhcpc ran its script."""
    if not path.exists():
        return []
    return [tuple((line.split() + ["", "", ""])[:3]) for line in path.read_text().splitlines()]  # type: ignore[misc]


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.skipif(not can_make_namespaces(), reason="needs root for network namespaces")
def test_node_a_killed_mid_boot_storm_clients_complete_and_rebind_with_node_b(
        tmp_path: Path, pg_cluster: Cluster) -> None:
    """Sixteen busybox udhcpc clients, each in its own namespace, start at once on a network
    with two pxeserver DHCP nodes (real `serve` processes) sharing one registry (B deaf to
    broadcasts until A has bound one client). Node A is killed with SIGKILL once a third of them
    are bound. Every client still gets an address, no
    address goes to two clients, and when the clients renew (SIGUSR1, as at T1), those node A
    served find it silent and rebind by broadcast: node B acknowledges each the address it had,
    and the registry's leases are exactly the clients' addresses."""
    clients = 16
    url = pg_cluster.new_database()
    socket_url = f"postgresql://pxeserver@/{url.rsplit('/', 1)[1]}?host={pg_cluster.root}&port={pg_cluster.port}"
    registrar = node(tmp_path / "registrar", url)
    macs = [f"00:16:3e:00:0d:{i:02x}" for i in range(clients)]
    registrar.provisioning.add_profile(PROFILE)
    for i, mac in enumerate(macs):
        registrar.provisioning.add_host({"mac": mac, "hostname": f"storm{i}", "profile": "deb"})
    script = tmp_path / "udhcpc.sh"
    script.write_text(UDHCPC_SCRIPT)
    script.chmod(0o755)
    events = [tmp_path / f"client{i}.events" for i in range(clients)]
    processes: list[subprocess.Popen[str]] = []
    try:
        with dhcp_lan(clients) as (lan, ns_a, ns_b, guests):
            node_a = dhcp_node(tmp_path / "a", ns_a, socket_url, NODE_A_IP, "node-a")
            processes.append(node_a)
            processes.append(dhcp_node(tmp_path / "b", ns_b, socket_url, NODE_B_IP, "node-b"))
            for guest, mac in zip(guests, macs, strict=True):
                run("ip", "-n", guest, "link", "set", "dhc0", "address", mac)
            # Which node's OFFER reaches a client first is a scheduling race that node B may win
            # sixteen times in a row; then A would die having served no one. So B hears no
            # broadcast until A has bound its first client, and both race from then on.
            run("ip", "netns", "exec", lan, "bridge", "link", "set", "dev", "ps1", "bcast_flood", "off")
            udhcpcs = []
            storm = time.monotonic()
            for guest, path in zip(guests, events, strict=True):
                udhcpcs.append(subprocess.Popen(
                    ["ip", "netns", "exec", guest, "busybox", "udhcpc", "-i", "dhc0", "-f", "-t", "30", "-T", "1",
                     "-A", "1", "-s", str(script)], env={"EVENTS": str(path), "PATH": os.environ["PATH"]},
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            processes.extend(udhcpcs)  # type: ignore[arg-type]

            def bound() -> dict[int, tuple[str, str]]:
                """client -> (address, server) of its first bound event."""
                found = {}
                for i, path in enumerate(events):
                    first = next((e for e in client_events(path) if e[0] == "bound"), None)
                    if first:
                        found[i] = (first[1], first[2])
                return found

            until(lambda: NODE_A_IP in {s for _, s in bound().values()}, 60)
            run("ip", "netns", "exec", lan, "bridge", "link", "set", "dev", "ps1", "bcast_flood", "on")
            until(lambda: len(bound()) >= clients // 3, 60)
            os.kill(node_a.pid, signal.SIGKILL)
            node_a.wait(timeout=10)
            at_kill = bound()
            until(lambda: len(bound()) == clients, 60)
            first = bound()
            storm_seconds = time.monotonic() - storm
            by_a = [i for i, (_, server) in first.items() if server == NODE_A_IP]
            addresses = [ip for ip, _ in first.values()]
            print(f"boot storm: {len(at_kill)} of {clients} bound when node A was killed "
                  f"({len(by_a)} by A), all {clients} bound after {storm_seconds:.1f} s")
            assert len(set(addresses)) == clients, "an address was given to two clients"
            # (node A may have sent an ACK just before the kill that its client reported after it)
            after_kill = [server for i, (_, server) in first.items() if i not in at_kill]
            assert after_kill.count(NODE_B_IP) >= len(after_kill) - 2, after_kill

            # T1 for everyone (SIGUSR1: renew now). Node A's clients get no answer to their
            # unicast renewal and rebind by broadcast; node B acknowledges the same address.
            renewed_at = time.monotonic()
            counts = {i: len(client_events(path)) for i, path in enumerate(events)}
            for udhcpc_process in udhcpcs:
                udhcpc_process.send_signal(signal.SIGUSR1)

            def renewed() -> dict[int, tuple[str, str]]:
                found = {}
                for i, path in enumerate(events):
                    later = [e for e in client_events(path)[counts[i]:] if e[0] in ("renew", "bound")]
                    if later:
                        found[i] = (later[-1][1], later[-1][2])
                return found

            until(lambda: len(renewed()) == clients, 60)
            print(f"renewal: all {clients} renewed with node B in {time.monotonic() - renewed_at:.1f} s "
                  f"({len(by_a)} of them by rebinding from node A)")
            assert renewed() == {i: (first[i][0], NODE_B_IP) for i in range(clients)}
            leases = dict(database_rows(url, "SELECT mac, ip FROM leases"))
            assert leases == {macs[i]: first[i][0] for i in range(clients)}
            # A NAK in the storm is a lost race (both nodes offered one pool address from memory,
            # the registry gave it to the first REQUEST); after it, none: a lease is kept.
            assert not [e for i, path in enumerate(events) for e in client_events(path)[counts[i]:] if e[0] == "nak"]
            raced = sum(e[0] == "nak" for path in events for e in client_events(path))
            print(f"{raced} NAKs from lost races during the storm, each followed by a bound address")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        registrar.close()
