"""Registry benchmark: register 10,000 hosts, then time boot-spec lookups and one change.

Run: .venv/bin/python bench/registry.py [--hosts N]
Registration goes through Provisioning (what the API and CLI call: validation, one durable
transaction, the host's pxelinux file); lookups go through the boot policy the services ask.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from pxeserver import app
from pxeserver.config import Config
from pxeserver.mac import MacAddress


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=10_000)
    parser.add_argument("--lookups", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "preseeds").mkdir()
        (base / "preseeds" / "debian.cfg").write_text("d-i x string y\n")
        config = Config(base_dir=base)
        config.server.address = "10.0.0.1"
        config.server.preseeds = str(base / "preseeds")
        context = app.build(config)
        context.provisioning.add_profile({"name": "deb", "kernel": "images/deb/linux",
                                          "initrd": "images/deb/initrd.gz", "autoinstall": "debian.cfg"})
        macs: list[MacAddress] = []
        started = time.perf_counter()
        for i in range(args.hosts):
            host = context.provisioning.add_host({
                "mac": str(MacAddress(bytes((0, 0x16, 0x3E, i >> 16 & 0x7F, i >> 8 & 0xFF, i & 0xFF)))),
                "hostname": f"host{i}", "profile": "deb", "ip": f"10.{i >> 16 & 0xFF}.{i >> 8 & 0xFF}.{i & 0xFF or 1}"
                if i & 0xFF else None,
            })
            macs.append(host.mac)
        elapsed = time.perf_counter() - started
        print(f"registered {args.hosts} hosts in {elapsed:.2f} s: {args.hosts / elapsed:,.0f} hosts/s "
              "(each one durable transaction with fsync + one pxelinux file)")

        samples = []
        unknown = MacAddress.parse("00:16:3e:7f:ff:ff")
        for _ in range(args.lookups):
            mac = random.choice(macs)
            t0 = time.perf_counter()
            context.policy.boot_spec(mac)
            samples.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        context.policy.boot_spec(unknown)
        unknown_time = time.perf_counter() - t0
        samples.sort()
        ms = 1000
        print(f"boot_spec lookup at {args.hosts} hosts: median {statistics.median(samples) * ms:.3f} ms, "
              f"p99 {samples[int(len(samples) * 0.99)] * ms:.3f} ms, max {samples[-1] * ms:.3f} ms; "
              f"unknown MAC {unknown_time * ms:.3f} ms")
        names = [f"01-{m.dashed.upper()}" for m in random.sample(macs, 2000)]
        t0 = time.perf_counter()
        for name in names:
            context.policy.pxelinux_config(name)
        print(f"pxelinux.cfg name lookup (upper-case MAC as pypxeboot asks): "
              f"{(time.perf_counter() - t0) / len(names) * ms:.3f} ms mean")

        directory = config.tftp_root / "pxelinux.cfg"
        before = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
        old = 1_000_000_000
        for name in before:
            os.utime(directory / name, (old, old))
        t0 = time.perf_counter()
        context.provisioning.update_host(macs[1234], {"hostname": "renamed"})
        change = time.perf_counter() - t0
        rewritten = [p.name for p in directory.iterdir() if p.stat().st_mtime != old]
        print(f"one host change: {change * ms:.2f} ms, files rewritten: {len(rewritten)} of {len(before)}")
        context.close()


if __name__ == "__main__":
    main()
