"""HTTP benchmark: 100 concurrent downloads of a 40 MB initrd from pxeserver and from nginx.

Run: ``.venv/bin/python bench/web.py [--clients 100] [--size-mb 40] [--rounds 3]``.

Both servers run as their own processes on loopback and serve the same file from the same
TFTP root: ``pxeserver serve`` (HTTP only) and Debian's nginx-light in the foreground with a
temporary config (``sendfile on``, ``worker_processes auto``, no access log). One curl process
drives each round with ``--parallel`` (all transfers at once, event-driven, so the client's
own CPU is small and the same for both); every transfer must end 200 with the full size. The
rounds alternate between the servers so background load hits both alike. The table shows the
median wall time, throughput and the server processes' CPU seconds, and ours/nginx.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FILE = "images/bench/initrd.img"
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_listening(port: int, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with status {process.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{what} is not listening on port {port}")


def cpu_seconds(pid: int) -> float:
    """User plus system time of a process and its children that have exited or still run."""
    total = 0.0
    for task in [pid, *children(pid)]:
        try:
            fields = Path(f"/proc/{task}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
    return total


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def start_pxeserver(workdir: Path, root: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = workdir / "pxeserver.toml"
    config.write_text(
        f'[server]\naddress = "127.0.0.1"\ndata_dir = "{workdir / "var"}"\ntftp_root = "{root}"\n'
        f'[tftp]\nenabled = false\n[http]\naddress = "127.0.0.1"\nport = {port}\n'
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "pxeserver", "--config", str(config), "serve"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_listening(port, process, "pxeserver")
    return process, port


def start_nginx(workdir: Path, root: Path) -> tuple[subprocess.Popen, int]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    temp = workdir / "nginx"
    temp.mkdir()
    config = temp / "nginx.conf"
    config.write_text(
        "daemon off;\nmaster_process on;\nworker_processes auto;\n"
        f"pid {temp}/nginx.pid;\nerror_log {temp}/error.log;\n"
        "events { worker_connections 1024; }\n"
        "http {\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n"
        "  default_type application/octet-stream;\n"
        + "".join(f"  {kind}_temp_path {temp}/{kind};\n"
                  for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        + f"  server {{\n    listen 127.0.0.1:{port};\n"
        f"    location /boot/ {{ alias {root}/; }}\n  }}\n}}\n"
    )
    process = subprocess.Popen([nginx, "-c", str(config), "-p", str(temp)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(port, process, "nginx")
    return process, port


def download_all(port: int, clients: int, size: int, workdir: Path) -> float:
    """One round: ``clients`` transfers at once; returns the wall time of the slowest."""
    url = f"http://127.0.0.1:{port}/boot/{FILE}"
    listing = workdir / "curl.conf"
    listing.write_text("".join(f'url = "{url}"\noutput = "/dev/null"\n' for _ in range(clients)))
    started = time.perf_counter()
    done = subprocess.run(
        ["curl", "-sS", "--parallel", "--parallel-immediate", "--parallel-max", str(clients),
         "-w", "%{http_code} %{size_download}\\n", "-K", str(listing)],
        capture_output=True, text=True, timeout=600,
    )
    elapsed = time.perf_counter() - started
    results = done.stdout.split("\n")[:-1]
    if done.returncode != 0 or results != [f"200 {size}"] * clients:
        bad = [r for r in results if r != f"200 {size}"]
        raise SystemExit(f"port {port}: {len(bad) + clients - len(results)} bad transfers: "
                         f"{bad[:3]} {done.stderr.strip()[:200]}")
    return elapsed


def checksum(name: str, port: int) -> str:
    fetched = subprocess.run(["curl", "-sSf", f"http://127.0.0.1:{port}/boot/{FILE}"],
                             capture_output=True, timeout=120)
    if fetched.returncode != 0:
        raise SystemExit(f"{name}: {fetched.stderr.decode().strip()}")
    return hashlib.sha256(fetched.stdout).hexdigest()


@dataclass
class Result:
    name: str
    process: subprocess.Popen
    port: int
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--size-mb", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    size = options.size_mb * 1024 * 1024

    with tempfile.TemporaryDirectory(prefix="bench-http-") as scratch:
        workdir = Path(scratch)
        workdir.chmod(0o755)  # nginx's workers run as nobody
        root = workdir / "tftproot"
        (root / "pxelinux.cfg").mkdir(parents=True)
        (root / FILE).parent.mkdir(parents=True)
        with open(root / FILE, "wb") as file:
            file.write(os.urandom(size))
        expected = hashlib.sha256((root / FILE).read_bytes()).hexdigest()

        servers: list[Result] = []
        try:
            for name, start in (("pxeserver", start_pxeserver), ("nginx", start_nginx)):
                process, port = start(workdir, root)
                servers.append(Result(name, process, port))
            for server in servers:
                if checksum(server.name, server.port) != expected:
                    raise SystemExit(f"{server.name} served different bytes")
                download_all(server.port, min(options.clients, 10), size, workdir)  # warm up
            for _ in range(options.rounds):
                for server in servers:
                    before = cpu_seconds(server.process.pid)
                    server.times.append(download_all(server.port, options.clients, size, workdir))
                    server.cpu.append(cpu_seconds(server.process.pid) - before)
        finally:
            for server in servers:
                server.process.terminate()
                server.process.wait(timeout=10)

    total_mb = options.clients * options.size_mb
    print(f"{options.clients} concurrent downloads of a {options.size_mb} MB file over loopback, "
          f"median of {options.rounds} rounds ({os.cpu_count()} CPUs)")
    print(f"{'server':<10} {'wall s':>8} {'MB/s':>8} {'server CPU s':>13}  rounds (s)")
    for server in servers:
        wall = statistics.median(server.times)
        print(f"{server.name:<10} {wall:8.2f} {total_mb / wall:8.0f} "
              f"{statistics.median(server.cpu):13.2f}  "
              + " ".join(f"{t:.2f}" for t in server.times))
    ours, nginx = (statistics.median(s.times) for s in servers)
    print(f"ratio ours/nginx (wall): {ours / nginx:.2f}  (target <= 1.5)")


if __name__ == "__main__":
    main()
