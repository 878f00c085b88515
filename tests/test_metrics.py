"""The Prometheus metrics at /metrics: checked by Prometheus's own promtool, guarded by
``[metrics] allow``, and scraped while real clients boot a guest, counter by counter.

The boot test runs ``pxeserver serve`` in a network namespace with every service on, the
"guest" in a second namespace with the real clients (busybox udhcpc, tftp-hpa, curl, dig), and
scrapes from the server's own loopback before and after each step: every change of every
request, reply, drop, error and lifecycle counter must be exactly the one the step explains.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import REPO, started
from dhcp_support import (
    CLIENT_IF,
    SERVER_IF,
    SERVER_IP,
    Link,
    can_make_namespaces,
    guest_curl,
    guest_tftp_get,
    inside,
    udhcpc,
    veth_link,
)
from http_support import MAC, PROFILE, curl
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from pxeserver import config as config_module
from pxeserver.app import Context, build
from pxeserver.config import Config, ConfigError
from pxeserver.dns import DnsService
from pxeserver.tftp import TftpService
from pxeserver.web.server import HttpService

pytestmark = pytest.mark.both_stores  # registry behaviour: SQLite and PostgreSQL

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]
COUNTERS = ("pxeserver_requests_total", "pxeserver_replies_total", "pxeserver_drops_total",
            "pxeserver_errors_total", "pxeserver_lifecycle_steps_total")


def parse(text: str) -> Series:
    series: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return series


def value(series: Series, name: str, **labels: str) -> float:
    return series.get((name, frozenset(labels.items())), 0.0)


def counter_changes(before: Series, after: Series) -> dict[str, float]:
    """Every counter sample that moved, as ``name{label=value,...}``: delta."""
    moved = {}
    for key in before.keys() | after.keys():
        name, labels = key
        if name in COUNTERS:
            delta = after.get(key, 0.0) - before.get(key, 0.0)
            if delta:
                moved[name + "{" + ",".join(f"{k}={v}" for k, v in sorted(labels)) + "}"] = delta
    return moved


# -- the exposition on loopback ---------------------------------------------------------------

@contextmanager
def serving(context: Context) -> Iterator[str]:
    """HTTP, TFTP and DNS of ``context`` on loopback; yields the HTTP base URL."""
    with started(HttpService(context)), started(TftpService(context)) as tftp, \
            started(DnsService(context)) as dns:
        assert dns.port is not None
        context.config.tftp.port, context.config.dns.port = tftp.port, dns.port
        yield context.config.http_base_url


def registered(context: Context) -> None:
    images = context.config.tftp_root / "images" / "centos5"
    images.mkdir(parents=True)
    (images / "vmlinuz").write_bytes(b"k" * 3000)
    (images / "initrd.img").write_bytes(b"i" * 5000)
    context.provisioning.add_profile(PROFILE)
    context.provisioning.add_host({"mac": MAC, "hostname": "web1", "profile": "centos5", "ip": "127.0.0.9"})


def test_the_exposition_passes_promtool_and_names_no_host(ctx: Context, tmp_path: Path) -> None:
    registered(ctx)
    with serving(ctx) as base:
        # Something in every family: a TFTP transfer and a refusal, HTTP files, DNS answers.
        fetched = tmp_path / "fetched"
        subprocess.run(["tftp", "127.0.0.1", str(ctx.config.tftp.port), "-m", "binary", "-c", "get",
                        "images/centos5/vmlinuz", str(fetched)], check=True, timeout=30, capture_output=True)
        assert fetched.read_bytes() == b"k" * 3000
        assert curl(f"{base}/boot/images/centos5/initrd.img").status == 200
        assert curl(f"{base}/ks/{MAC}", "--interface", "127.0.0.9").status == 200  # from the host
        assert curl(f"{base}/boot/nothing").status == 404
        dig = subprocess.run(["dig", "@127.0.0.1", "-p", str(ctx.config.dns.port), "+short", "+time=2",
                              "web1.domu.example"], capture_output=True, text=True, timeout=30)
        assert dig.stdout.strip() == "127.0.0.9"
        reply = curl(f"{base}/metrics")
        # What Prometheus itself asks for: OpenMetrics, which must parse and end with # EOF.
        openmetrics = curl(f"{base}/metrics", "-H", "Accept: application/openmetrics-text; version=1.0.0")
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")
    assert any(f.name == "pxeserver_requests" for f in openmetrics_families(openmetrics.text))
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    check = subprocess.run(["promtool", "check", "metrics"], input=reply.body, capture_output=True, timeout=30)
    assert check.returncode == 0 and not check.stdout and not check.stderr, check.stdout + check.stderr
    series = parse(reply.text)
    assert value(series, "pxeserver_requests_total", protocol="tftp", kind="read") == 1
    assert value(series, "pxeserver_sent_bytes_total", protocol="tftp") == 3000
    assert value(series, "pxeserver_tftp_transfer_duration_seconds_count") == 1
    assert value(series, "pxeserver_requests_total", protocol="http", kind="boot") == 2
    assert value(series, "pxeserver_replies_total", protocol="http", kind="4xx") == 1
    assert value(series, "pxeserver_replies_total", protocol="dns", kind="noerror") == 1
    assert value(series, "pxeserver_hosts", status="installing") == 1  # the kickstart was served
    assert value(series, "pxeserver_profiles") == 1
    assert value(series, "pxeserver_registry_up") == 1
    assert time.time() - 5 < value(series, "pxeserver_registry_last_contact_timestamp_seconds") <= time.time()
    assert value(series, "pxeserver_lifecycle_steps_total", status="installing") == 1
    for queue in ("timeline", "dhcp-status", "tftp-events"):
        assert (("pxeserver_queue_drops_total", frozenset({("queue", queue)})) in series
                and value(series, "pxeserver_queue_drops_total", queue=queue) == 0), queue
    # Counts only: no MAC in any spelling, no host name, no address of a host.
    text = reply.text.lower()
    for secret in (MAC, MAC.replace(":", "-"), MAC.replace(":", ""), "web1", "127.0.0.9"):
        assert secret not in text, secret


@contextmanager
def events_table_locked(ctx: Context, store_kind: str) -> Iterator[None]:
    """Another client holds the registry's write lock on the events, as a long transaction would."""
    if store_kind == "postgresql":
        import psycopg

        with psycopg.connect(ctx.config.database) as conn:
            conn.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
            yield
    else:
        import sqlite3

        conn = sqlite3.connect(ctx.config.database, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()


def test_timeline_events_lost_to_a_full_queue_are_counted(ctx: Context, store_kind: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    registered(ctx)
    mac = ctx.store.get_host(MAC).mac
    recorded = 102_000  # the queue holds 100,000 and the blocked writer took at most one batch
    with events_table_locked(ctx, store_kind):
        for number in range(recorded):
            ctx.timeline.record(mac, "test", f"event {number}")
    assert ctx.timeline.flush(timeout=300), "the writer catches up once the lock is gone"
    ctx.timeline.record(mac, "test", "after the lock")
    with serving(ctx) as base:
        series = parse(curl(f"{base}/metrics").text)
    dropped = value(series, "pxeserver_queue_drops_total", queue="timeline")
    logged = sum("timeline queue full" in record.getMessage() for record in caplog.records)
    assert 1000 <= dropped <= 2000 and dropped == logged, (dropped, logged)
    assert value(series, "pxeserver_queue_drops_total", queue="dhcp-status") == 0
    assert ctx.timeline.events(mac)[-1].message == "after the lock", "the timeline works again"


def test_only_allowed_networks_may_scrape(config: Config) -> None:
    config.http.address = "0.0.0.0"  # reachable on every loopback address
    config.metrics.allow = ["127.0.0.2/32"]
    context = build(config)
    try:
        with started(HttpService(context)) as http:
            url = f"http://127.0.0.1:{http.port}/metrics"
            assert curl(url, "--interface", "127.0.0.1").status == 403
            allowed = curl(url, "--interface", "127.0.0.2")
            assert allowed.status == 200 and b"pxeserver_requests_total" in allowed.body
            # The refusal was counted like any other reply.
            assert value(parse(allowed.text), "pxeserver_replies_total", protocol="http", kind="4xx") == 1
    finally:
        context.close()


def test_metrics_disabled_is_a_404(config: Config) -> None:
    config.metrics.enabled = False
    context = build(config)
    try:
        with started(HttpService(context)) as http:
            assert curl(f"http://127.0.0.1:{http.port}/metrics").status == 404
    finally:
        context.close()


@pytest.mark.parametrize(("toml", "message"), [
    ('path = "metrics"', "[metrics] path must be an absolute URL path"),
    ('path = "/a b"', "[metrics] path must be an absolute URL path"),
    ('allow = ["10.0.0.0/33"]', "[metrics] allow must be networks like '10.0.0.5/32', not '10.0.0.0/33'"),
    ('allow = [5]', "[metrics] allow must be networks like '10.0.0.5/32', not 5"),
    ('allow = "127.0.0.1"', "[metrics] allow must be a list, not '127.0.0.1'"),
    ('enabled = "yes"', "[metrics] enabled must be true or false, not 'yes'"),
])
def test_a_bad_metrics_setting_is_a_one_line_error_naming_the_key(tmp_path: Path, toml: str, message: str) -> None:
    file = tmp_path / "pxeserver.toml"
    file.write_text(f"[metrics]\n{toml}\n")
    with pytest.raises(ConfigError) as error:
        config_module.load(file)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_good_metrics_section_loads(tmp_path: Path) -> None:
    file = tmp_path / "pxeserver.toml"
    file.write_text('[metrics]\npath = "/prometheus/metrics"\nallow = ["10.1.2.3/32", "fd00::/8"]\n')
    loaded = config_module.load(file)
    assert (loaded.metrics.path, loaded.metrics.allow) == ("/prometheus/metrics", ["10.1.2.3/32", "fd00::/8"])


# -- a guest boots while Prometheus watches ---------------------------------------------------

def netns(test: Callable[..., None]) -> Callable[..., None]:
    for mark in (pytest.mark.slow, pytest.mark.netns,
                 pytest.mark.skipif(not can_make_namespaces(), reason="needs root for network namespaces")):
        test = mark(test)
    return test


GUEST_MAC = "00:16:3e:12:34:56"
GUEST_IP = "10.77.0.50"
KERNEL_SIZE = 1 << 20
INITRD_SIZE = 3 << 20


class Watcher:
    """Prometheus's view: scrapes from the server namespace's loopback, as a local agent would."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.scrapes = 0
        self.series: Series = {}  # as of the last step
        self.series_at = 0  # the scrape that took it
        self.body_size = 0  # the last scrape's body, which the next scrape counts as HTTP bytes

    def scrape(self) -> Series:
        result = subprocess.run(["ip", "netns", "exec", self.link.server_ns, "curl", "-fsS", "--max-time", "10",
                                 "http://127.0.0.1/metrics"], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        self.body_size = len(result.stdout.encode())
        self.scrapes += 1
        return parse(result.stdout)

    def step(self, expected: dict[str, float], settle: float = 5.0) -> Series:
        """Scrape until the counters moved by exactly ``expected`` since the last step (the
        services count off the client's path, so a moment may pass); fail if they do not."""
        before = self.series
        deadline = time.monotonic() + settle
        while True:
            after = self.scrape()
            # Every scrape counts itself as an HTTP request, and the one before it as a 2xx reply.
            scrapes = self.scrapes - self.series_at
            wanted = dict(expected)
            for key in ("pxeserver_requests_total{kind=metrics,protocol=http}",
                        "pxeserver_replies_total{kind=2xx,protocol=http}"):
                wanted[key] = wanted.get(key, 0) + scrapes
            if counter_changes(before, after) == wanted or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert counter_changes(before, after) == wanted
        self.series, self.series_at = after, self.scrapes
        return after


@contextmanager
def pxeserver_serve(link: Link, workdir: Path) -> Iterator[None]:
    server = subprocess.Popen(
        ["ip", "netns", "exec", link.server_ns, sys.executable, "-m", "pxeserver", "serve"],
        cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = []
        assert server.stdout is not None
        for line in server.stdout:
            banner.append(line)
            if line.startswith("pxeserver: next:"):
                break
        assert any("dhcp listening" in line for line in banner), banner
        yield
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert server.stderr is not None
    stderr = server.stderr.read()
    assert code == 0 and "Traceback" not in stderr, stderr


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    images = tmp_path / "tftproot" / "images" / "debian12"
    images.mkdir(parents=True)
    (images / "linux").write_bytes(bytes(range(256)) * (KERNEL_SIZE // 256))
    (images / "initrd.gz").write_bytes(bytes(reversed(range(256))) * (INITRD_SIZE // 256))
    (tmp_path / "pxeserver.toml").write_text(
        f'[server]\naddress = "{SERVER_IP}"\n'
        f'kickstarts = "{REPO / "kickstarts"}"\npreseeds = "{REPO / "preseeds"}"\n'
        '[tftp]\ntimeout = 1\nretries = 1\nmax_sessions_per_client = 2\n'
        f'[dhcp]\nenabled = true\ninterface = "{SERVER_IF}"\nsubnet = "10.77.0.0/24"\nrouter = "{SERVER_IP}"\n'
        '[dns]\nenabled = true\ndomain = "lab.example"\n'
    )
    return tmp_path


def guest_socket(link: Link) -> socket.socket:
    with inside(link.client_ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(3)
    return sock


@netns
def test_counters_follow_a_guest_booting_with_real_clients(workdir: Path) -> None:
    with veth_link("mtr") as link, pxeserver_serve(link, workdir):
        watch = Watcher(link)
        watch.series, watch.series_at = watch.scrape(), 1
        local = "http://127.0.0.1"

        # The guests' side of the HTTP port may not scrape.
        refused = link.in_client("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://{SERVER_IP}/metrics")
        assert refused.stdout == "403"
        watch.step({"pxeserver_requests_total{kind=metrics,protocol=http}": 1,
                    "pxeserver_replies_total{kind=4xx,protocol=http}": 1})

        # Registration over the API, from the server's own loopback.
        profile = dict(PROFILE, name="debian12", kernel="images/debian12/linux",
                       initrd="images/debian12/initrd.gz", append="console=hvc0", autoinstall="debian-xen.cfg")
        server_curl = ["ip", "netns", "exec", link.server_ns, "curl", "-fsS", "-H", "Content-Type: application/json"]
        subprocess.run([*server_curl, "--data-binary", json.dumps(profile), f"{local}/api/profiles"],
                       check=True, capture_output=True, timeout=30)
        registering = time.time()
        subprocess.run([*server_curl, "--data-binary", json.dumps(
            {"mac": GUEST_MAC, "hostname": "web1", "profile": "debian12", "ip": GUEST_IP}), f"{local}/api/hosts"],
            check=True, capture_output=True, timeout=30)
        registered_at = time.time()
        series = watch.step({"pxeserver_requests_total{kind=api,protocol=http}": 2,
                             "pxeserver_replies_total{kind=2xx,protocol=http}": 2,
                             "pxeserver_lifecycle_steps_total{status=registered}": 1})
        assert value(series, "pxeserver_hosts", status="registered") == 1
        assert value(series, "pxeserver_profiles") == 1

        # 1. DHCP: one DISCOVER and one REQUEST, answered by an OFFER and an ACK; the ACK
        # moves the host to netbooting.
        link.set_client_mac(GUEST_MAC)
        dhcp_bytes = value(watch.series, "pxeserver_sent_bytes_total", protocol="dhcp")
        lease = udhcpc(link, workdir)
        assert lease is not None and lease["ip"] == GUEST_IP
        link.in_client("ip", "addr", "add", f"{GUEST_IP}/24", "dev", CLIENT_IF)  # as the guest would
        series = watch.step({"pxeserver_requests_total{kind=discover,protocol=dhcp}": 1,
                             "pxeserver_requests_total{kind=request,protocol=dhcp}": 1,
                             "pxeserver_replies_total{kind=offer,protocol=dhcp}": 1,
                             "pxeserver_replies_total{kind=ack,protocol=dhcp}": 1,
                             "pxeserver_lifecycle_steps_total{status=netbooting}": 1})
        assert value(series, "pxeserver_sent_bytes_total", protocol="dhcp") - dhcp_bytes >= 2 * 300
        assert value(series, "pxeserver_hosts", status="netbooting") == 1

        # 2. TFTP: the host's config and the kernel, every byte counted once.
        tftp_bytes = value(watch.series, "pxeserver_sent_bytes_total", protocol="tftp")
        config = guest_tftp_get(link, workdir, f"pxelinux.cfg/01-{GUEST_MAC.replace(':', '-')}")
        assert b"kernel images/debian12/linux" in config
        assert len(guest_tftp_get(link, workdir, "images/debian12/linux")) == KERNEL_SIZE
        series = watch.step({"pxeserver_requests_total{kind=read,protocol=tftp}": 2,
                             "pxeserver_replies_total{kind=transfer,protocol=tftp}": 2})
        assert value(series, "pxeserver_sent_bytes_total", protocol="tftp") - tftp_bytes == len(config) + KERNEL_SIZE
        assert value(series, "pxeserver_tftp_transfers_total", outcome="completed") == 2
        assert value(series, "pxeserver_tftp_transfer_duration_seconds_count") == 2
        assert value(series, "pxeserver_active_sessions", protocol="tftp") == 0
        assert value(series, "pxeserver_active_sessions", protocol="http") >= 1  # this scrape's own

        # 3. HTTP: the initrd from /boot/, then the installer's name service and its preseed.
        http_bytes = value(watch.series, "pxeserver_sent_bytes_total", protocol="http")
        last_scrape = watch.body_size
        guest_curl(link, "-o", str(workdir / "initrd"), f"http://{SERVER_IP}/boot/images/debian12/initrd.gz")
        assert (workdir / "initrd").stat().st_size == INITRD_SIZE
        series = watch.step({"pxeserver_requests_total{kind=boot,protocol=http}": 1,
                             "pxeserver_replies_total{kind=2xx,protocol=http}": 1})
        assert value(series, "pxeserver_sent_bytes_total", protocol="http") - http_bytes == INITRD_SIZE + last_scrape

        dns_bytes = value(watch.series, "pxeserver_sent_bytes_total", protocol="dns")
        answer = link.in_client("dig", f"@{SERVER_IP}", "+time=2", "+tries=1", "web1.lab.example").stdout
        assert re.search(rf"web1\.lab\.example\.\s+\d+\s+IN\s+A\s+{GUEST_IP}", answer), answer
        size = int(re.search(r"MSG SIZE\s+rcvd: (\d+)", answer).group(1))
        series = watch.step({"pxeserver_requests_total{kind=udp,protocol=dns}": 1,
                             "pxeserver_replies_total{kind=noerror,protocol=dns}": 1})
        assert value(series, "pxeserver_sent_bytes_total", protocol="dns") - dns_bytes == size

        preseed = guest_curl(link, "--interface", GUEST_IP, f"http://{SERVER_IP}/preseed/{GUEST_MAC.replace(':', '-')}")
        callback = re.search(r"curl -fsS -X POST '([^']+)'", preseed).group(1)
        watch.step({"pxeserver_requests_total{kind=preseed,protocol=http}": 1,
                    "pxeserver_replies_total{kind=2xx,protocol=http}": 1,
                    "pxeserver_lifecycle_steps_total{status=installing}": 1})

        # 4. The install-complete callback: one install, timed from its registration.
        calling = time.time()
        assert json.loads(guest_curl(link, "--interface", GUEST_IP, "-X", "POST", callback))["status"] == "installed"
        called = time.time()
        series = watch.step({"pxeserver_requests_total{kind=api,protocol=http}": 1,
                             "pxeserver_replies_total{kind=2xx,protocol=http}": 1,
                             "pxeserver_lifecycle_steps_total{status=installed}": 1})
        assert value(series, "pxeserver_install_duration_seconds_count") == 1
        took = value(series, "pxeserver_install_duration_seconds_sum")
        assert calling - registered_at - 0.01 <= took <= called - registering + 0.01, took
        assert value(series, "pxeserver_hosts", status="installed") == 1
        assert value(series, "pxeserver_hosts", status="registered") == 0

        # 5. Garbage: a TFTP packet with no such opcode, a stray DATA, a truncated DHCP
        # message, a DNS message too short for a header. Each is one drop with its reason.
        garbage = guest_socket(link)
        garbage.sendto(b"\x00\x09junk", (SERVER_IP, 69))
        assert garbage.recvfrom(100)[0][:4] == b"\x00\x05\x00\x04"  # ERROR 4, illegal operation
        garbage.sendto(b"\x00\x03\x00\x01stray", (SERVER_IP, 69))
        garbage.sendto(b"\x01\x01\x06\x00" + bytes(16), (SERVER_IP, 67))
        garbage.sendto(b"\x12\x34\x01", (SERVER_IP, 53))
        watch.step({"pxeserver_drops_total{protocol=tftp,reason=malformed}": 1,
                    "pxeserver_drops_total{protocol=tftp,reason=stray}": 1,
                    "pxeserver_drops_total{protocol=dhcp,reason=malformed}": 1,
                    "pxeserver_drops_total{protocol=dns,reason=malformed}": 1})

        # 6. A flood of DISCOVERs from one unregistered MAC: the first ones are read and
        # ignored (unknown client), the rest refused by the per-MAC rate limit.
        flood = b"\x01\x01\x06\x00" + bytes(24) + bytes.fromhex("00163eaabbcc") + bytes(202) + \
            bytes.fromhex("63825363") + b"\x35\x01\x01\xff"
        for _ in range(60):
            garbage.sendto(flood, (SERVER_IP, 67))
        time.sleep(0.5)
        after = watch.scrape()
        read = value(after, "pxeserver_requests_total", protocol="dhcp", kind="discover") - \
            value(watch.series, "pxeserver_requests_total", protocol="dhcp", kind="discover")
        assert 25 <= read < 60, read  # a burst of 30, refilled at 10 a second
        watch.step({"pxeserver_requests_total{kind=discover,protocol=dhcp}": read,
                    "pxeserver_drops_total{protocol=dhcp,reason=unknown_client}": read,
                    "pxeserver_drops_total{protocol=dhcp,reason=rate_limited}": 60 - read})

        # 7. Three transfers from one address that never ACK: the cap of two refuses the
        # third; the two time out (one resend each, retries = 1) and are abandoned.
        holders = [guest_socket(link) for _ in range(3)]
        for holder in holders:
            holder.sendto(b"\x00\x01images/debian12/linux\x00octet\x00", (SERVER_IP, 69))
        first_blocks = [holder.recvfrom(600)[0][:4] for holder in holders]
        assert sorted(first_blocks) == [b"\x00\x03\x00\x01"] * 2 + [b"\x00\x05\x00\x00"]
        series = watch.step({"pxeserver_requests_total{kind=read,protocol=tftp}": 3,
                             "pxeserver_replies_total{kind=transfer,protocol=tftp}": 2,
                             "pxeserver_drops_total{protocol=tftp,reason=client_limit}": 1})
        timeouts = value(series, "pxeserver_tftp_timeouts_total")
        resent = value(series, "pxeserver_tftp_retransmitted_blocks_total")
        deadline = time.monotonic() + 10
        while value(series, "pxeserver_tftp_transfers_total", outcome="abandoned") < 2 and time.monotonic() < deadline:
            time.sleep(0.3)
            series = watch.scrape()
        assert value(series, "pxeserver_tftp_transfers_total", outcome="abandoned") == 2
        assert value(series, "pxeserver_tftp_timeouts_total") - timeouts == 4  # two per transfer
        assert value(series, "pxeserver_tftp_retransmitted_blocks_total") - resent == 2
        assert value(series, "pxeserver_active_sessions", protocol="tftp") == 0

        # A good client is served after all of it, and nothing failed inside the server.
        kernel = (workdir / "tftproot/images/debian12/linux").read_bytes()
        assert guest_tftp_get(link, workdir, "images/debian12/linux") == kernel
        final = watch.scrape()
        assert not any(value(final, "pxeserver_errors_total", protocol=p) for p in ("tftp", "http", "dhcp", "dns"))
        for holder in [*holders, garbage]:
            holder.close()
