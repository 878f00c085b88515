"""TFTP benchmark: pxeserver's service against tftp-hpa's in.tftpd and dnsmasq, on loopback.

Workloads (issue 3): (a) one 40 MB file at blksize 512, 1468 and 8192; (b) 300 concurrent
1 MB transfers at blksize 1468; (c) 1,000 concurrent pxelinux config fetches (one registered
host each: ours answers from the registry, the others serve the files the config writer put
on disk); (d) windowsize 16 against lockstep on our server; plus 2,000 concurrent sessions.

Each server runs in its own process; runs are interleaved and the fastest of ``--repeat``
counts, since other work on the machine adds noise (on a shared 2-core VM the same run varies
by a third). Ours sends repeat transfers of an unchanged file from its packet cache
(pxeserver/tftp/cache.py), as it would all day in production; a file younger than the cache's
racy window is not cached, so the first run right after the files are written may not be.
The load comes from this one process, which simulates every client with epoll from its own
127.1.x.y address (tests/tftp_support.py). curl fetches the 40 MB file once per server as a
spot check. dnsmasq 2.90 has no TFTP port option, so it gets port 69 on its own loopback
address. Run: ``.venv/bin/python bench/tftp.py [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from tftp_support import Job, drive, sources  # noqa: E402

DNSMASQ_ADDRESS = "127.69.0.1"


def serve_ours(root: str, data_dir: str) -> None:
    """Child process: run pxeserver's TFTP service until stdin closes; print its port."""
    from child import serve_until_stdin_closes

    from pxeserver.config import Config
    from pxeserver.tftp import TftpService

    config = Config(base_dir=Path(data_dir))
    config.server.address = "127.0.0.1"
    config.server.data_dir = data_dir
    config.server.tftp_root = root
    config.tftp.address, config.tftp.port = "127.0.0.1", 0
    serve_until_stdin_closes(config, TftpService)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    def __init__(self, name: str, argv: list[str], host: str, port: int | None) -> None:
        self.name, self.host = name, host
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True)
        self.port = port if port is not None else int(self.process.stdout.readline())  # type: ignore[union-attr]
        time.sleep(0.3)
        if self.process.poll() is not None:
            raise SystemExit(f"{name} did not start")

    def cpu_seconds(self) -> float:
        """User and system time of the server and its reaped children (in.tftpd forks)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.stdin.close()  # type: ignore[union-attr]
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_servers(root: Path, data_dir: Path) -> list[Server]:
    hpa_port = free_port()
    return [
        Server("pxeserver", [sys.executable, __file__, "--serve", str(root), str(data_dir)], "127.0.0.1", None),
        Server("in.tftpd", ["in.tftpd", "-L", "-u", "root", "-s", str(root), "-a", f"127.0.0.1:{hpa_port}"],
               "127.0.0.1", hpa_port),
        Server("dnsmasq", ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
                           "--user=root", "--group=root", "--pid-file=", "--no-resolv", "--no-hosts",
                           "--bind-interfaces", f"--listen-address={DNSMASQ_ADDRESS}", "--enable-tftp",
                           f"--tftp-root={root}", "--tftp-max=5000", "--quiet-tftp", "--log-facility=/dev/null"],
               DNSMASQ_ADDRESS, 69),
    ]


def prepare(workdir: Path, hosts: int) -> tuple[Path, Path, list[str]]:
    """A TFTP root with the files, and a registry with one host per config fetch."""
    from pxeserver import app
    from pxeserver.config import Config

    root, data_dir = workdir / "tftproot", workdir / "var"
    (root / "images").mkdir(parents=True)
    (root / "images" / "initrd.img").write_bytes(os.urandom(40 * 1024 * 1024))
    (root / "images" / "one-mb").write_bytes(os.urandom(1024 * 1024))
    (root / "images" / "pxelinux.0").write_bytes(os.urandom(64 * 1024))
    (root / "images" / "linux").write_bytes(b"kernel")
    config = Config(base_dir=workdir)
    config.server.address = "127.0.0.1"
    config.server.data_dir, config.server.tftp_root = str(data_dir), str(root)
    context = app.build(config)
    context.provisioning.add_profile({"name": "bench", "kernel": "images/linux", "initrd": "images/initrd.img",
                                      "append": "console=hvc0"})
    names = []
    for index in range(hosts):
        host = context.provisioning.add_host({"mac": f"00:16:3e:00:{index >> 8:02x}:{index & 255:02x}",
                                              "hostname": f"bench{index}", "profile": "bench"})
        names.append(f"pxelinux.cfg/{host.mac.pxelinux_name}")
    context.close()
    return root, data_dir, names


def timed(server: Server, jobs: list[Job], deadline: float = 180) -> tuple[float, int]:
    started = time.monotonic()
    outcomes = drive(server.port, jobs, host=server.host, deadline=deadline)
    return time.monotonic() - started, sum(not outcome.ok for outcome in outcomes)


def curl_seconds(server: Server, name: str, blksize: int) -> float:
    started = time.monotonic()
    subprocess.run(["curl", "-sS", "--max-time", "120", "--tftp-blksize", str(blksize), "-o", "/dev/null",
                    f"tftp://{server.host}:{server.port}/{name}"], check=True)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve", nargs=2, metavar=("ROOT", "DATA_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    parser.add_argument("--only", default="", help="run only workloads whose label holds this text")
    parser.add_argument("--repeat", type=int, default=3, help="runs per server; the fastest counts")
    args = parser.parse_args()
    if args.serve:
        serve_ours(*args.serve)
        return
    scale = 10 if args.quick else 1
    workdir = Path(tempfile.mkdtemp(prefix="tftp-bench-"))
    workdir.chmod(0o755)
    root, data_dir, configs = prepare(workdir, 1000 // scale)
    servers = start_servers(root, data_dir)
    ours = servers[0]
    workloads: list[tuple[str, Callable[[Server], tuple[float, int]]]] = [
        (f"(a) 40 MB, blksize {size}",
         lambda s, size=size: timed(s, [Job("images/initrd.img", {"blksize": str(size)})]))
        for size in (512, 1468, 8192)
    ]
    workloads += [
        ("(a) curl 40 MB, blksize 1468", lambda s: (curl_seconds(s, "images/initrd.img", 1468), 0)),
        (f"(b) {300 // scale} x 1 MB, blksize 1468", lambda s: timed(
            s, [Job("images/one-mb", {"blksize": "1468"}, ip) for ip in sources(300 // scale)])),
        (f"(c) {len(configs)} config fetches", lambda s: timed(
            s, [Job(name, {"tsize": "0", "blksize": "1408"}, ip)
                for name, ip in zip(configs, sources(len(configs)), strict=True)])),
        (f"    {2000 // scale} x 64 KB sessions", lambda s: timed(
            s, [Job("images/pxelinux.0", {"blksize": "1468"}, ip) for ip in sources(2000 // scale)])),
    ]
    try:
        print(f"{'wall time (server CPU time)':34} " + " ".join(f"{s.name:>19}" for s in servers)
              + "  ours/hpa  ours/dnsmasq")
        for label, run in workloads:
            if args.only not in label:
                continue
            runs: dict[str, list[tuple[float, float, int]]] = {server.name: [] for server in servers}
            for _ in range(args.repeat):  # interleaved, so a burst of other load hits all alike
                for server in servers:
                    cpu = server.cpu_seconds()
                    seconds, failed = run(server)
                    runs[server.name].append((seconds, server.cpu_seconds() - cpu, failed))
            cells, walls = [], []
            for server in servers:
                seconds, cpu, _ = min(runs[server.name])
                failed = sum(run[2] for run in runs[server.name])
                walls.append(seconds)
                shown = f"{cpu:5.2f}" if server.name != "in.tftpd" else "    -"  # its forked children go uncounted
                cells.append(f"{seconds:7.2f} s ({shown}){'' if not failed else f'!{failed}':>4}")
            print(f"{label:34} {' '.join(cells)}  {walls[0] / walls[1]:8.2f}  {walls[0] / walls[2]:12.2f}",
                  flush=True)
        lockstep = min(timed(ours, [Job("images/initrd.img", {"blksize": "1468"})])[0] for _ in range(args.repeat))
        windowed_runs = [timed(ours, [Job("images/initrd.img", {"blksize": "1468", "windowsize": "16"})])
                         for _ in range(args.repeat)]
        windowed, failed = min(windowed_runs)[0], sum(run[1] for run in windowed_runs)
        print(f"(d) ours 40 MB blksize 1468: lockstep {lockstep:.2f} s, windowsize 16 {windowed:.2f} s "
              f"({'' if not failed else f'{failed} failed, '}{lockstep / windowed:.1f} times faster)")
        print(f"fastest of {args.repeat} runs each; (CPU s) is the server's user+system time "
              "(in.tftpd's forked children are not counted); "
              "!N: N transfers failed over all runs")
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
