"""Dashboard benchmark: the hosts page at 10,000 hosts, and the live feed's lag in a boot burst.

Run: .venv/bin/python bench/dashboard.py [--hosts N] [--burst N]

1. Render and filter: GET the hosts page from the real HTTP service (waitress) with 10,000
   registered hosts, each with a few timeline events: the first page, a text filter, a status
   filter sorted by age, and a late page. Target: each under a second.
2. Live lag: one Server-Sent Events client (what the hosts page opens) listens while 200 hosts
   boot at once, each from its own registered address (127.1.x.y): GET /ipxe/<mac> (netbooting),
   then GET /ks/<mac> (installing). The lag of a host is the time from its kickstart response
   reaching the client to the stream message that shows the host installing. Target: < 1 s.

The 10,000 hosts are seeded in one transaction straight into the SQLite store (registering
them one by one through the API costs a durable transaction each and is bench/registry.py's
subject, not this one's).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# bench/http.py would shadow the standard library's http package: run from the repository.
sys.path[0] = str(REPO)

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from pxeserver import app  # noqa: E402
from pxeserver.config import Config  # noqa: E402
from pxeserver.mac import MacAddress  # noqa: E402
from pxeserver.registry import Event, Host, Status  # noqa: E402
from pxeserver.registry.sqlite import _host_params  # noqa: E402
from pxeserver.web.server import HttpService  # noqa: E402


def seed(context: app.Context, count: int) -> list[Host]:
    context.provisioning.add_profile({"name": "c5", "kernel": "images/c5/vmlinuz",
                                      "initrd": "images/c5/initrd.img",
                                      "autoinstall": "centos5-xen-pv.ks"})
    hosts = [Host(mac=MacAddress(bytes((0, 0x16, 0x3E, i >> 16 & 0x7F, i >> 8 & 0xFF, i & 0xFF))),
                  hostname=f"host{i:05d}", profile="c5", ip=f"127.1.{i // 250}.{i % 250 + 1}"
                  if i < 250 * 250 else None, install_token=f"token{i}",
                  status=[Status.REGISTERED, Status.INSTALLED][i % 2])
             for i in range(count)]
    store = context.store
    with store._write() as conn:  # bench-only shortcut, see the module docstring
        conn.executemany(
            "INSERT INTO hosts (mac, hostname, ip, profile, netboot, status, vars, xen, install_token) "
            "VALUES (:mac, :hostname, :ip, :profile, :netboot, :status, :vars, :xen, :install_token)",
            [_host_params(h) for h in hosts])
    now = time.time()
    store.add_events([Event(h.mac, now - 3600 + k, source, f"{source} step {k}")
                      for h in hosts for k, source in enumerate(("dhcp", "tftp", "http"))])
    return hosts


def get(port: int, path: str, source: str = "127.0.0.1") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def page_times(port: int, rounds: int) -> None:
    for path in ("/", "/?q=host0999", "/?status=installed&sort=last&order=desc", "/?page=80",
                 "/?sort=ip&order=desc"):
        samples = []
        for _ in range(rounds):
            started = time.perf_counter()
            status, body = get(port, path)
            samples.append(time.perf_counter() - started)
            assert status == 200 and b"<tr data-mac=" in body, (path, status)
        print(f"  GET {path:45s} median {statistics.median(samples) * 1000:6.1f} ms, "
              f"max {max(samples) * 1000:6.1f} ms  (target < 1000 ms)")


class StreamListener(threading.Thread):
    """An SSE client: notes when each host is first shown installing."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.installing: dict[str, float] = {}
        self.ready = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.request("GET", "/stream")
        reply = conn.getresponse()
        self.ready.set()
        for line in reply:
            if not line.startswith(b"data: "):
                continue
            arrived = time.time()
            for mac, row in json.loads(line[6:]).get("hosts", {}).items():
                if row["status"] == "installing":
                    self.installing.setdefault(mac, arrived)


def burst(context: app.Context, port: int, hosts: list[Host], size: int) -> None:
    booting = [h for h in hosts if h.ip and h.status is Status.REGISTERED][:size]
    stored: dict[str, float] = {}  # when each host's "installing" event was recorded
    feed = context.timeline.feed
    publish = feed.publish

    def noting(events: list[Event]) -> None:
        now = time.time()
        for event in events:
            if event.message.endswith(f"-> {Status.INSTALLING.value}"):
                stored.setdefault(str(event.mac), now)
        publish(events)

    feed.publish = noting  # type: ignore[method-assign]
    listener = StreamListener(port)
    listener.start()
    listener.ready.wait(10)
    time.sleep(0.2)
    served: dict[str, float] = {}
    start_gate = threading.Barrier(len(booting))

    def boot(host: Host) -> None:
        start_gate.wait()
        assert get(port, f"/ipxe/{host.mac.dashed}", host.ip)[0] == 200
        status, _ = get(port, f"/ks/{host.mac.dashed}", host.ip)
        assert status == 200, status
        served[str(host.mac)] = time.time()

    started = time.perf_counter()
    threads = [threading.Thread(target=boot, args=(h,)) for h in booting]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    took = time.perf_counter() - started
    deadline = time.time() + 10
    while len(listener.installing) < len(served) and time.time() < deadline:
        time.sleep(0.05)
    lags = sorted(max(0.0, listener.installing[mac] - when) for mac, when in served.items()
                  if mac in listener.installing)
    print(f"  {len(served)} hosts booted (iPXE script + kickstart each) in {took:.2f} s; "
          f"{len(lags)} seen installing on the stream")
    if lags:
        p95 = lags[int(len(lags) * 0.95) - 1]
        print(f"  live lag: median {statistics.median(lags) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
              f"max {lags[-1] * 1000:.0f} ms  (target < 1000 ms)")
        to_page = sorted(max(0.0, listener.installing[mac] - stored[mac]) for mac in served
                         if mac in stored and mac in listener.installing)
        print(f"    from the event's recording to the stream client: median "
              f"{statistics.median(to_page) * 1000:.0f} ms, max {to_page[-1] * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=10_000)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        config = Config(base_dir=base)
        config.server.address = "127.0.0.1"
        config.server.data_dir = str(base / "var")
        config.server.tftp_root = str(base / "tftproot")
        config.server.kickstarts = str(REPO / "kickstarts")
        config.server.preseeds = str(REPO / "preseeds")
        config.http.address, config.http.port = "127.0.0.1", 0
        config.dashboard.stream_seconds = 120  # one stream for the whole burst
        context = app.build(config)
        started = time.perf_counter()
        hosts = seed(context, args.hosts)
        print(f"seeded {len(hosts)} hosts with 3 events each in {time.perf_counter() - started:.1f} s")
        service = HttpService(context)
        service.start()
        try:
            print(f"hosts page at {len(hosts)} hosts ({config.dashboard.page_size} rows a page):")
            page_times(service.port, args.rounds)
            print(f"burst of {args.burst} booting hosts:")
            burst(context, service.port, hosts, args.burst)
        finally:
            service.stop()
            context.close()


if __name__ == "__main__":
    main()
