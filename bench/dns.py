"""DNS benchmark: dnsperf against pxeserver's DNS and dnsmasq, the same 10,000 names, one run.

Run: ``.venv/bin/python bench/dns.py [--hosts 10000] [--seconds 10] [--rounds 2]``.

pxeserver gets the names from its registry (one host per name, each with a registered IP);
dnsmasq gets them as an addn-hosts file and runs in the foreground with ``--no-resolv
--no-hosts``. Each server runs as its own process on 127.0.0.1 and another port, and dnsperf
sends the same query files to each: one with every name's A record, one with every address's
PTR (dnsmasq scans its whole cache for a PTR, so the two differ a lot). Per file first one pass
(cold: pxeserver packs each record with dnslib when it is first asked for), then timed rounds,
alternating between the servers so that other load on the machine hits both alike. While
dnsperf runs, a second thread asks random names with dig and checks every answer against the
registry.
The target for pxeserver: at least 20,000 queries/s, no query lost, every sampled answer right.
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from child import serve_until_stdin_closes

from pxeserver import app, config as configuration
from pxeserver.dns import DnsService
from pxeserver.mac import XEN_OUI, MacAddress
from pxeserver.registry import Host

DOMAIN = "domu.example"
TARGET_QPS = 20_000


def host_name(number: int) -> str:
    return f"host{number}.{DOMAIN}"


def host_ip(number: int) -> str:
    return f"10.1.{number // 250}.{number % 250 + 1}"


def write_config(workdir: Path) -> Path:
    path = workdir / "pxeserver.toml"
    path.write_text(
        f'[server]\naddress = "127.0.0.1"\ndata_dir = "{workdir}"\n'
        f'[dns]\nenabled = true\naddress = "127.0.0.1"\nport = 0\ndomain = "{DOMAIN}"\n'
        '[dhcp]\nsubnet = "10.1.0.0/16"\n'
    )
    return path


def populate(config_path: Path, hosts: int) -> None:
    """Register the hosts straight into the store: the benchmark measures DNS, not the API."""
    context = app.build(configuration.load(config_path))
    try:
        context.provisioning.add_profile({"name": "debian", "kernel": "k", "initrd": "i"})
        for number in range(hosts):
            context.store.add_host(Host(MacAddress(XEN_OUI + number.to_bytes(3, "big")),
                                        f"host{number}", "debian", ip=host_ip(number)))
    finally:
        context.close()


def serve(config_path: str) -> None:
    """The child process: run pxeserver's DNS until stdin closes."""
    serve_until_stdin_closes(configuration.load(config_path), DnsService)


@dataclass
class Result:
    qps: float
    sent: int
    lost: int
    sampled: int
    wrong: list[str]


def check_answers(port: int, hosts: int, stop: threading.Event, wrong: list[str]) -> int:
    """Ask random names with dig while the load runs; returns how many were asked."""
    rng = random.Random(port)
    asked = 0
    while not stop.wait(0.25):
        number = rng.randrange(hosts)
        dig = ["dig", "@127.0.0.1", "-p", str(port), "+short", "+time=2", "+tries=3"]
        forward = subprocess.run([*dig, host_name(number), "A"], capture_output=True, text=True)
        reverse = subprocess.run([*dig, "-x", host_ip(number)], capture_output=True, text=True)
        asked += 1
        if forward.stdout.split() != [host_ip(number)]:
            wrong.append(f"{host_name(number)} A -> {forward.stdout.strip()!r}")
        if reverse.stdout.split() != [host_name(number) + "."]:
            wrong.append(f"{host_ip(number)} PTR -> {reverse.stdout.strip()!r}")
    return asked


def dnsperf(port: int, queries: Path, *limits: str) -> dict[str, float]:
    output = subprocess.run(
        ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), *limits],
        capture_output=True, text=True, check=True,
    ).stdout
    numbers = {}
    for label in ("Queries per second", "Queries sent", "Queries lost"):
        match = re.search(rf"{label}:\s+([\d.]+)", output)
        if match is None:
            raise RuntimeError(f"dnsperf printed no {label!r}:\n{output}")
        numbers[label] = float(match.group(1))
    return numbers


def measure(port: int, queries: Path, hosts: int, seconds: int) -> Result:
    """dnsperf for ``seconds`` while random answers are checked with dig."""
    stop = threading.Event()
    wrong: list[str] = []
    asked: list[int] = []
    sampler = threading.Thread(target=lambda: asked.append(check_answers(port, hosts, stop, wrong)))
    sampler.start()
    try:
        numbers = dnsperf(port, queries, "-l", str(seconds))
    finally:
        stop.set()
        sampler.join()
    return Result(numbers["Queries per second"], int(numbers["Queries sent"]),
                  int(numbers["Queries lost"]), asked[0], wrong)


def best(runs: list[Result]) -> Result:
    """The fastest round, with the losses and wrong answers of every round."""
    fastest = max(runs, key=lambda run: run.qps)
    return Result(fastest.qps, fastest.sent, sum(run.lost for run in runs),
                  sum(run.sampled for run in runs), [line for run in runs for line in run.wrong])


def start_dnsmasq(workdir: Path, hosts: int) -> tuple[subprocess.Popen[bytes], int]:
    workdir.chmod(0o755)  # dnsmasq reads the file after dropping root for "nobody"
    hosts_file = workdir / "addn-hosts"
    hosts_file.write_text("".join(f"{host_ip(n)} {host_name(n)}\n" for n in range(hosts)))
    for port in random.Random().sample(range(20000, 60000), 20):
        process = subprocess.Popen(
            ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
             f"--addn-hosts={hosts_file}", "--listen-address=127.0.0.1", "--bind-interfaces",
             f"--port={port}", "--pid-file=", "--conf-file=/dev/null", f"--local=/{DOMAIN}/"],
            stderr=subprocess.PIPE,
        )
        try:
            process.wait(timeout=1.0)  # exited at once: the port was taken, try another
        except subprocess.TimeoutExpired:
            return process, port
    raise RuntimeError("dnsmasq did not start")


def reverse_name(ip: str) -> str:
    return ".".join(reversed(ip.split("."))) + ".in-addr.arpa"


def write_queries(workdir: Path, hosts: int) -> dict[str, Path]:
    """One dnsperf file per workload, every name once, in the same shuffled order."""
    order = list(range(hosts))
    random.Random(1).shuffle(order)
    files = {"A": workdir / "a.queries", "PTR": workdir / "ptr.queries"}
    files["A"].write_text("".join(f"{host_name(n)} A\n" for n in order))
    files["PTR"].write_text("".join(f"{reverse_name(host_ip(n))} PTR\n" for n in order))
    return files


def run_workload(ports: dict[str, int], queries: Path, args: argparse.Namespace
                 ) -> tuple[dict[str, dict[str, float]], dict[str, Result]]:
    """A cold pass through the file per server, then alternating timed rounds."""
    cold = {name: dnsperf(port, queries, "-n", "1") for name, port in ports.items()}
    rounds: dict[str, list[Result]] = {name: [] for name in ports}
    for _ in range(args.rounds):  # alternating evens out other load on the machine
        for name, port in ports.items():
            rounds[name].append(measure(port, queries, args.hosts, args.seconds))
    return cold, {name: best(runs) for name, runs in rounds.items()}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(sys.argv[2])
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=10_000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2,
                        help="measure the servers alternately this often; the best round counts")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        workdir = Path(tmp)
        config_path = write_config(workdir)
        started = time.monotonic()
        populate(config_path, args.hosts)
        print(f"registered {args.hosts} hosts in {time.monotonic() - started:.1f} s")
        workloads = write_queries(workdir, args.hosts)
        ours = subprocess.Popen([sys.executable, __file__, "--serve", str(config_path)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        dnsmasq, dnsmasq_port = start_dnsmasq(workdir, args.hosts)
        try:
            assert ours.stdout is not None
            ports = {"pxeserver": int(ours.stdout.readline()), "dnsmasq": dnsmasq_port}
            measured = {kind: run_workload(ports, path, args) for kind, path in workloads.items()}
        finally:
            ours.communicate(input="", timeout=10)
            dnsmasq.terminate()
            dnsmasq.wait(timeout=10)

    print(f"\ndnsperf on loopback, {args.hosts} names: per workload one pass through every name"
          f" (cold), then {args.rounds} rounds of {args.seconds} s per server while dig checks"
          " random A and PTR answers (best round; losses and samples summed)")
    print(f"{'workload':<9} {'server':<10} {'cold q/s':>9} {'lost':>5} {'queries/s':>10} "
          f"{'sent':>9} {'lost':>5} {'dig samples':>12} {'wrong':>6}")
    met = True
    for kind, (cold, results) in measured.items():
        for name, result in results.items():
            print(f"{kind:<9} {name:<10} {cold[name]['Queries per second']:>9.0f} "
                  f"{cold[name]['Queries lost']:>5.0f} {result.qps:>10.0f} {result.sent:>9} "
                  f"{result.lost:>5} {result.sampled:>12} {len(result.wrong):>6}")
            for line in result.wrong[:5]:
                print(f"    wrong: {line}")
        ours_result = results["pxeserver"]
        met = met and ours_result.qps >= TARGET_QPS and ours_result.lost == 0
        met = met and not ours_result.wrong and not cold["pxeserver"]["Queries lost"]
    for kind, (cold, results) in measured.items():
        ratio = results["pxeserver"].qps / results["dnsmasq"].qps
        cold_ratio = cold["pxeserver"]["Queries per second"] / cold["dnsmasq"]["Queries per second"]
        print(f"ratio pxeserver/dnsmasq, {kind}: {ratio:.2f} (cold pass {cold_ratio:.2f})")
    print(f"target (>= {TARGET_QPS} queries/s, none lost, all answers right): "
          f"{'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
