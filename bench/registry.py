"""Registry benchmark, SQLite and PostgreSQL side by side.

Run: .venv/bin/python bench/registry.py [--hosts N] [--register M] [--stores sqlite,postgresql]

For each store: register M hosts one by one through Provisioning (what the API and CLI call: validation,
one durable transaction, the host's pxelinux file); time boot-spec lookups through the boot
policy the services ask, at N hosts; time one change; and time a change made through one node
until a second node (another Context on the same database) answers it, and until the second
node's pxelinux.cfg file says it. PostgreSQL runs in a throwaway cluster (tests/pg_support.py)
with fsync on, like SQLite's synchronous=FULL. Two SQLite "nodes" can only be two processes on
one machine sharing the file; they see each change on the next read, but the second one's
files are not rewritten (its store hears of no change).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from pxeserver import app  # noqa: E402
from pxeserver.config import Config  # noqa: E402
from pxeserver.mac import MacAddress  # noqa: E402

MS = 1000


def _config(base: Path, database: str) -> Config:
    (base / "preseeds").mkdir(parents=True)
    (base / "preseeds" / "debian.cfg").write_text("d-i x string y\n")
    config = Config(base_dir=base)
    config.server.address = "10.0.0.1"
    config.server.preseeds = str(base / "preseeds")
    config.server.database = database
    return config


def _spread(samples: list[float]) -> str:
    samples = sorted(samples)
    return (f"median {statistics.median(samples) * MS:.3f} ms, p99 "
            f"{samples[int(len(samples) * 0.99)] * MS:.3f} ms, max {samples[-1] * MS:.3f} ms")


def _until(check: Callable[[], bool], limit: float = 10.0) -> float:
    started = time.perf_counter()
    while not check():
        if time.perf_counter() - started > limit:
            return float("inf")
        time.sleep(0.0002)
    return time.perf_counter() - started


def _host(i: int) -> dict[str, str | None]:
    return {"mac": str(MacAddress(bytes((0, 0x16, 0x3E, i >> 16 & 0x7F, i >> 8 & 0xFF, i & 0xFF)))),
            "hostname": f"host{i}", "profile": "deb",
            "ip": f"10.{i >> 16 & 0xFF}.{i >> 8 & 0xFF}.{i & 0xFF}" if i & 0xFF else None}


def _fill(database: str, first: int, hosts: int) -> None:
    """The hosts beyond those timed, written straight into the database in one transaction
    (registering all of them one durable transaction at a time takes minutes on a slow disk)."""
    rows = [(h["mac"], h["hostname"], h["ip"], "deb") for h in map(_host, range(first, hosts))]
    insert = "INSERT INTO hosts (mac, hostname, ip, profile, xen) VALUES ({0}, {0}, {0}, {0}, '{{}}')"
    bump = "UPDATE meta SET value = value + 1 WHERE key = 'generation'"
    if database.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(database) as conn, conn.cursor() as cursor:
            cursor.executemany(insert.format("%s"), rows)
            cursor.execute(bump)
    else:
        import sqlite3

        with sqlite3.connect(database) as conn:
            conn.executemany(insert.format("?"), rows)
            conn.execute(bump)


def run(kind: str, database: str, base: Path, hosts: int, timed: int, lookups: int) -> dict[str, str]:
    results: dict[str, str] = {}
    context = app.build(_config(base / "a", database))
    other = app.build(_config(base / "b", database))  # the second node
    context.provisioning.add_profile({"name": "deb", "kernel": "images/deb/linux",
                                      "initrd": "images/deb/initrd.gz", "autoinstall": "debian.cfg"})
    timed = min(timed, hosts)
    started = time.perf_counter()
    for i in range(timed):
        context.provisioning.add_host(_host(i))
    elapsed = time.perf_counter() - started
    results["registration (API path)"] = f"{timed / elapsed:,.0f} hosts/s ({timed} in {elapsed:.1f} s)"
    _fill(database, timed, hosts)
    macs = [MacAddress.parse(_host(i)["mac"]) for i in range(hosts)]

    sample = random.sample(macs, min(lookups, len(macs)))
    unknown = [MacAddress(bytes((0, 0x16, 0x3E, 0x7F, 0xFF, i))) for i in range(200)]
    for label, chosen in (("lookup on B, first time", sample), ("lookup on B, again", sample),
                          ("lookup on B, unknown MAC", unknown)):
        samples = []
        for mac in chosen:
            t0 = time.perf_counter()
            other.policy.boot_spec(mac)
            samples.append(time.perf_counter() - t0)
        results[label] = _spread(samples)

    visible, files, changes = [], [], []
    for _ in range(50):
        mac = random.choice(macs)
        path = other.writer.host_path(mac)
        before = path.read_text() if path.exists() else ""
        netboot = not context.store.get_host(mac).netboot
        t0 = time.perf_counter()
        context.provisioning.update_host(mac, {"netboot": netboot})
        changes.append(time.perf_counter() - t0)
        wanted = "localboot" if not netboot else "kernel "
        visible.append(_until(lambda mac=mac, netboot=netboot:
                              other.store.get_host(mac).netboot is netboot))
        if kind == "postgresql":
            files.append(_until(lambda path=path, wanted=wanted, before=before:
                                path.exists() and wanted in path.read_text()
                                and path.read_text() != before))
    results["one host change on A"] = _spread(changes)
    results["then answered by B after"] = _spread(visible)
    results["then B's pxelinux file after"] = _spread(files) if files else "never (no notifications)"
    other.close()
    context.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=10_000)
    parser.add_argument("--register", type=int, default=500, help="hosts registered one by one, timed")
    parser.add_argument("--lookups", type=int, default=5_000)
    parser.add_argument("--stores", default="sqlite,postgresql")
    args = parser.parse_args()
    table: dict[str, dict[str, str]] = {}
    for kind in args.stores.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp)
            if kind == "postgresql":
                import pg_support

                cluster = pg_support.Cluster(durable=True)
                try:
                    table[kind] = run(kind, cluster.new_database(), base, args.hosts, args.register,
                                       args.lookups)
                finally:
                    cluster.destroy()
            else:
                table[kind] = run(kind, str(base / "registry.db"), base, args.hosts, args.register,
                                   args.lookups)
        print(f"{kind}: done", file=sys.stderr)
    rows = list(next(iter(table.values())))
    width = max(map(len, rows))
    print(f"registry benchmark at {args.hosts} hosts ({os.cpu_count()} CPUs)")
    for row in rows:
        print(f"{row:<{width}}  " + "  |  ".join(f"{kind}: {table[kind][row]}" for kind in table))


if __name__ == "__main__":
    main()
