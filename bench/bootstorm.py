"""Boot storm: N domUs network-boot and install at once, against pxeserver and against the
stack an admin would build instead (dnsmasq for DHCP and TFTP, nginx for files and preseeds).

Every simulated guest does what a real one does, in order, all guests at once:
  1. pypxeboot, run as xl runs it in a dom0 (its own process, the zipapp ``pxeserver
     build-pypxeboot`` writes, on /usr/bin/python3, ``interface=br0 mac=...``): DHCP with the
     guest's MAC, the pxelinux.cfg/ lookup over TFTP, then the kernel and the initrd (over
     TFTP, or over HTTP when the config names ``http://`` URLs); the files it wrote are
     checked for size, then removed;
  2. the installer's own DHCP, with the guest's MAC (pypxeboot's DHCP client: the shared codec);
  3. the preseed named by ``url=`` on the kernel command line, fetched from the guest's leased
     address (pxeserver's /preseed/ answers only the host's address);
  4. the install callback the preseed's late_command makes (a POST; nginx answers 204).

Network: two namespaces this script creates (``bs<pid>-srv`` for the servers, ``bs<pid>-dom0``
for the guests) joined by a veth pair on a bridge ``br0`` in dom0, as domUs sit on xenbr0;
each guest's fixed address (a DHCP reservation in both stacks) is added to br0 before the
storm, so the installer steps leave from it. Nothing else is contacted.

Stacks (``--stacks``): ``ours-tftp`` (pxeserver serve: DHCP, TFTP, HTTP; kernels over TFTP),
``ours-http`` ([boot] kernel_transport = "http"), ``peer-tftp`` (dnsmasq DHCP+TFTP, nginx for
the static preseeds and the callback), ``peer-http`` (the same, with configs naming nginx
URLs for the kernel and initrd), and ``ours-cache`` / ``peer-cache``: the two HTTP stacks again
with every pypxeboot given ``cache_dir=`` its dom0's cache. The guests are spread over
``--dom0s`` H simulated Xen hosts (guest i on dom0 i % H; they share one network namespace,
but each dom0 has its own cache directory, empty at the start of each run). pxeserver
announces each boot file's SHA-256, so one guest per dom0 downloads it and the others copy it;
nginx announces none, so the same pypxeboot downloads every file as without the cache (after
one HEAD each). Both ratios, with and without the cache, are printed. The servers of both
stacks run on ``--server-cpus`` (default CPU 0) and the guests on the other CPUs: a boot
server is its own machine, and sharing cores with 200 guest processes would measure how a
server's threads fare in the scheduler among them rather than how fast it serves. ``--link-mbit`` shapes
what the server sends to a line rate with tbf, one FIFO queue (a real boot server's NIC, though
Linux would put fq_codel under it, which this kernel lacks; unshaped, the veth pair is as
fast as this machine copies memory, and the storm measures CPU instead).

Ours runs with per-address caps raised to 4N + 64: every
guest's pypxeboot runs in dom0 and so comes from dom0's one address (the default caps, 32,
would refuse the rest of a storm; a TFTP transfer whose last ACK was lost holds its slot until
it times out, hence the margin; an admin booting N guests at once from one dom0 sets them so).
With ``--rounds R`` the stacks run in turn R times and each one's fastest round counts (the
machine's other load adds noise, as in bench/tftp.py); every round's time is printed.

Figures per stack: the time until every guest is done, p50/p95/max per guest, failures, and
the server processes' CPU seconds (user+system; nginx's and dnsmasq's together) and the
guests' (every pypxeboot and installer step, all in dom0); the median time per phase
(pypxeboot's DHCP, config, kernel, initrd from its success line; the installer's DHCP,
preseed, callback); then the ratios ours/peer. Needs root. Run: ``.venv/bin/python bench/bootstorm.py [--guests 200]
[--initrd-mb 40] [--kernel-mb 8] [--stacks ours-tftp,ours-http,peer-tftp,peer-http]``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from web import cpu_seconds  # noqa: E402

from pxeserver.dom0 import INTERPRETER, build_pypxeboot  # noqa: E402

SERVER_IP, DOM0_IP, PREFIX = "10.88.0.1", "10.88.0.2", 16
SERVER_IF, DOM0_PORT, BRIDGE = "srv0", "vif0", "br0"
KERNEL, INITRD = "images/bench/linux", "images/bench/initrd.img"
DOMAIN = "storm.example"
STACKS = ("ours-tftp", "ours-http", "ours-cache", "peer-tftp", "peer-http", "peer-cache")
PHASES = ("DHCP", "config", "kernel", "initrd", "dhcp", "preseed", "callback")  # pypxeboot's, then the installer's


def guest_mac(index: int) -> str:
    return f"00:16:3e:88:{index >> 8:02x}:{index & 255:02x}"


def guest_ip(index: int) -> str:
    return f"10.88.{1 + (index >> 8)}.{index & 255}"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=60)


# -- the network -------------------------------------------------------------------------------


class Lan:
    """The server namespace and dom0 (with br0 and every guest's address), deleted on exit."""

    def __init__(self, guests: int, link_mbit: int, server_cpus: str) -> None:
        self.server, self.dom0 = f"bs{os.getpid()}-srv", f"bs{os.getpid()}-dom0"
        self.cpus = split_cpus(server_cpus)
        try:
            self._build(guests)
            if link_mbit:  # the boot server's NIC: what it sends is shaped to its line rate
                sh("ip", "netns", "exec", self.server, "tc", "qdisc", "add", "dev", SERVER_IF, "root", "tbf",
                   "rate", f"{link_mbit}mbit", "burst", "1mb", "latency", "100ms")
        except BaseException:
            self.close()
            raise

    def _build(self, guests: int) -> None:
        for namespace in (self.server, self.dom0):
            sh("ip", "netns", "add", namespace)
            sh("ip", "-n", namespace, "link", "set", "lo", "up")
        sh("ip", "-n", self.dom0, "link", "add", "name", BRIDGE, "type", "bridge")
        sh("ip", "link", "add", "name", SERVER_IF, "netns", self.server, "type", "veth",
           "peer", "name", DOM0_PORT, "netns", self.dom0)
        sh("ip", "-n", self.dom0, "link", "set", DOM0_PORT, "master", BRIDGE)
        for namespace, device in ((self.dom0, DOM0_PORT), (self.dom0, BRIDGE), (self.server, SERVER_IF)):
            sh("ip", "-n", namespace, "link", "set", device, "up")
        sh("ip", "-n", self.server, "addr", "add", f"{SERVER_IP}/{PREFIX}", "dev", SERVER_IF)
        batch = [f"addr add {DOM0_IP}/{PREFIX} dev {BRIDGE}"]
        batch += [f"addr add {guest_ip(i)}/{PREFIX} dev {BRIDGE}" for i in range(guests)]
        subprocess.run(["ip", "-n", self.dom0, "-batch", "-"], input="\n".join(batch) + "\n", text=True,
                       check=True, timeout=120)

    def close(self) -> None:
        for namespace in (self.server, self.dom0):
            sh("ip", "netns", "del", namespace, check=False)

    def exec(self, namespace: str) -> list[str]:
        """Run in ``namespace``, on that side's CPUs (the server's, or the guests')."""
        cpus = self.cpus.get(namespace == self.server)
        return ["ip", "netns", "exec", namespace, *(["taskset", "-c", cpus] if cpus else [])]


def split_cpus(server_cpus: str) -> dict[bool, str]:
    """{True: the servers' CPU list, False: the guests' (every other CPU)}; empty: shared."""
    if not server_cpus:
        return {}
    chosen = {int(cpu) for cpu in server_cpus.split(",")}
    others = sorted(os.sched_getaffinity(0) - chosen)
    if not others or not chosen <= os.sched_getaffinity(0):
        raise SystemExit(f"--server-cpus {server_cpus}: must name some, not all, of the CPUs "
                         f"{sorted(os.sched_getaffinity(0))}")
    return {True: server_cpus, False: ",".join(map(str, others))}


# -- the files both stacks serve ---------------------------------------------------------------


def make_images(root: Path, kernel_mb: int, initrd_mb: int) -> dict[str, int]:
    """A kernel and an initrd of random bytes (incompressible, as a real initrd.gz is)."""
    sizes = {}
    for name, megabytes in ((KERNEL, kernel_mb), (INITRD, initrd_mb)):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as file:
            chunk = os.urandom(1 << 20)
            for index in range(megabytes):
                file.write(chunk[index:] + chunk[:index])  # each MiB different
        sizes[name] = path.stat().st_size
    return sizes


# -- the stacks ----------------------------------------------------------------------------------


@dataclass
class Running:
    name: str
    processes: list[subprocess.Popen]

    def cpu(self) -> float:
        return sum(cpu_seconds(process.pid) for process in self.processes)

    def stop(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def start_ours(lan: Lan, workdir: Path, root: Path, guests: int, transport: str) -> Running:
    """pxeserver serve in the server namespace, with a fresh registry of ``guests`` hosts."""
    from pxeserver import app, config as config_module

    data = workdir / f"var-{transport}"
    shutil.rmtree(data, ignore_errors=True)  # each round starts from a fresh registry
    config_file = workdir / f"pxeserver-{transport}.toml"
    cap = 4 * guests + 64  # a transfer whose last ACK is lost holds its slot until it times out
    config_file.write_text(
        f'[server]\naddress = "{SERVER_IP}"\ndata_dir = "{data}"\ntftp_root = "{root}"\n'
        f'kickstarts = "{REPO / "kickstarts"}"\npreseeds = "{REPO / "preseeds"}"\nlog_level = "warning"\n'
        f'[boot]\nkernel_transport = "{transport}"\n'
        f'[tftp]\nmax_sessions_per_client = {cap}\n'
        f'[http]\nmax_connections_per_address = {cap}\n'
        f'[dhcp]\nenabled = true\ninterface = "{SERVER_IF}"\nsubnet = "10.88.0.0/{PREFIX}"\nrouter = "{SERVER_IP}"\n'
        f'[dns]\ndomain = "{DOMAIN}"\n'
    )
    context = app.build(config_module.load(config_file))
    try:
        context.provisioning.add_profile({"name": "bench", "kernel": KERNEL, "initrd": INITRD,
                                          "append": "console=hvc0", "autoinstall": "debian-xen.cfg"})
        for index in range(guests):
            context.provisioning.add_host({"mac": guest_mac(index), "hostname": f"g{index}.{DOMAIN}",
                                           "profile": "bench", "ip": guest_ip(index)})
    finally:
        context.close()
    process = subprocess.Popen([*lan.exec(lan.server), sys.executable, "-m", "pxeserver", "--config",
                                str(config_file), "serve"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, cwd=workdir)
    ends = time.monotonic() + 60
    assert process.stdout is not None
    while time.monotonic() < ends:
        line = process.stdout.readline()
        if not line:
            raise SystemExit("pxeserver serve exited before it was ready")
        if line.startswith("pxeserver: next:"):
            break
    threading.Thread(target=process.stdout.read, daemon=True).start()  # drain
    return Running(f"ours-{transport}", [process])


STATIC_PRESEED_TAIL = "d-i preseed/late_command string in-target curl -fsS -X POST '{url}'\n"


def start_peer(lan: Lan, workdir: Path, root: Path, guests: int, transport: str) -> Running:
    """dnsmasq (DHCP reservations, TFTP) and nginx (kernels when ``http``, static preseeds,
    a callback location answering 204), with the pxelinux configs an admin writes."""
    peer = workdir / f"peer-{transport}"
    shutil.rmtree(peer, ignore_errors=True)  # and a fresh setup (dnsmasq's lease file too)
    peer_root = peer / "tftproot"
    for name in (KERNEL, INITRD):
        (peer_root / name).parent.mkdir(parents=True, exist_ok=True)
        os.link(root / name, peer_root / name)
    (peer_root / "pxelinux.cfg").mkdir()
    (peer / "preseed").mkdir()
    template = (REPO / "preseeds" / "debian-xen.cfg").read_text()
    body = "".join(line + "\n" for line in template.splitlines() if "late_command" not in line)
    base = f"http://{SERVER_IP}/boot/" if transport == "http" else ""
    hosts = []
    for index in range(guests):
        mac = guest_mac(index)
        dashed = mac.replace(":", "-")
        (peer / "preseed" / dashed).write_text(body + STATIC_PRESEED_TAIL.format(url=f"http://{SERVER_IP}/done/{dashed}"))
        (peer_root / "pxelinux.cfg" / f"01-{dashed}").write_text(
            f"default install\n\nlabel install\n  kernel {base}{KERNEL}\n  append initrd={base}{INITRD} "
            f"auto=true priority=critical url=http://{SERVER_IP}/preseed/{dashed} hostname=g{index} "
            f"domain={DOMAIN} console=hvc0\n")
        hosts.append(f"{mac},{guest_ip(index)}\n")
    (peer / "hosts").write_text("".join(hosts))
    peer.chmod(0o755)
    dnsmasq = subprocess.Popen([
        *lan.exec(lan.server), "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
        "--user=root", "--group=root", "--pid-file=", "--no-resolv", "--no-hosts", f"--interface={SERVER_IF}",
        "--bind-interfaces", "--dhcp-range=10.88.0.0,static,255.255.0.0,1h", f"--dhcp-hostsfile={peer / 'hosts'}",
        f"--dhcp-leasefile={peer / 'leases'}", f"--dhcp-lease-max={guests + 100}",
        f"--dhcp-boot={'lpxelinux.0' if transport == 'http' else 'pxelinux.0'}",
        "--enable-tftp", f"--tftp-root={peer_root}", f"--tftp-max={max(5000, 4 * guests)}", "--quiet-tftp",
        "--quiet-dhcp", "--no-ping", "--log-facility=/dev/null"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    temp = peer / "nginx"
    temp.mkdir()
    (temp / "nginx.conf").write_text(
        "daemon off;\nmaster_process on;\nworker_processes auto;\n"
        f"pid {temp}/nginx.pid;\nerror_log {temp}/error.log;\n"
        f"events {{ worker_connections {max(1024, 4 * guests)}; }}\n"
        "http {\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  default_type application/octet-stream;\n"
        + "".join(f"  {kind}_temp_path {temp}/{kind};\n"
                  for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        + f"  server {{\n    listen {SERVER_IP}:80;\n"
        f"    location /boot/ {{ alias {peer_root}/; }}\n"
        f"    location /preseed/ {{ alias {peer / 'preseed'}/; default_type text/plain; }}\n"
        "    location /done/ { return 204; }\n  }\n}\n")
    nginx = subprocess.Popen([*lan.exec(lan.server), shutil.which("nginx") or "/usr/sbin/nginx", "-c",
                              str(temp / "nginx.conf"), "-p", str(temp)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    for process, what in ((dnsmasq, "dnsmasq"), (nginx, "nginx")):
        if process.poll() is not None:
            raise SystemExit(f"{what} exited at start: {process.stderr.read() if process.stderr else ''}")
    return Running(f"peer-{transport}", [dnsmasq, nginx])


# -- the guests (run inside dom0) --------------------------------------------------------------


def one_guest(index: int, sizes: dict[str, int], workdir: Path, deadline: float, cache: str,
              pypxeboot: str) -> dict[str, object]:
    """One domU's boot and install; returns its step times, or the error that stopped it."""
    from pxeserver.mac import MacAddress
    from pxeserver.pypxeboot.dhcp import obtain_lease

    mac, ip = guest_mac(index), guest_ip(index)
    started = time.monotonic()
    steps: dict[str, float] = {}
    try:
        out = workdir / f"g{index}"
        out.mkdir()
        result = out / "result"
        result.touch()
        booted = subprocess.run([pypxeboot, f"--output={result}", "--output-format=simple0",
                                 f"--output-directory={out}", f"mac={mac}", f"interface={BRIDGE}",
                                 f"dhcp_server={SERVER_IP}", f"deadline={int(deadline - time.monotonic())}",
                                 *cache_words(cache), "/dev/null"],
                                capture_output=True, text=True, timeout=max(deadline - time.monotonic(), 1),
                                stdin=subprocess.DEVNULL)
        if booted.returncode != 0:
            raise RuntimeError(f"pypxeboot: {booted.stderr.strip()[-300:]}")
        items = dict(item.split(" ", 1) for item in result.read_text().split("\0") if item)
        for key, name in (("kernel", KERNEL), ("ramdisk", INITRD)):
            size = os.path.getsize(items[key])
            os.unlink(items[key])
            if size != sizes[name]:
                raise RuntimeError(f"{key}: {size} bytes, not {sizes[name]}")
        steps["pypxeboot"] = time.monotonic() - started
        said = re.search(r"\((DHCP [^)]*)\)", booted.stderr)  # "(DHCP 0.12 s, config 0.01 s, ...; 1 from ...)"
        phases = dict(re.findall(r"(\w+) ([0-9.]+) s", said.group(1))) if said else {}
        lease = obtain_lease(MacAddress.parse(mac), BRIDGE, SERVER_IP, deadline)
        if lease.ip != ip:
            raise RuntimeError(f"the installer's DHCP gave {lease.ip}, not {ip}")
        steps["dhcp"] = time.monotonic() - started
        url = next(word[4:] for word in items["args"].split() if word.startswith("url="))
        preseed = fetch("GET", url, ip, deadline)
        callback = re.search(r"-X POST '?(http://[^' ]+)'?", preseed)
        if callback is None:
            raise RuntimeError("the preseed has no install callback")
        steps["preseed"] = time.monotonic() - started
        fetch("POST", callback.group(1), ip, deadline)
        steps["done"] = time.monotonic() - started
        return {"index": index, "steps": steps, "phases": {
            **{name: float(value) for name, value in phases.items()}, "dhcp": steps["dhcp"] - steps["pypxeboot"],
            "preseed": steps["preseed"] - steps["dhcp"], "callback": steps["done"] - steps["preseed"]}}
    except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops the storm
        return {"index": index, "steps": steps, "error": f"{type(exc).__name__}: {exc}"[:400]}


def fetch(method: str, url: str, source: str, deadline: float) -> str:
    """One request from the guest's own address; the body of a 2xx answer."""
    found = re.fullmatch(r"http://([^/:]+)(?::(\d+))?(/.*)", url)
    if found is None:
        raise RuntimeError(f"not an http URL: {url!r}")
    connection = http.client.HTTPConnection(found.group(1), int(found.group(2) or 80),
                                            timeout=max(deadline - time.monotonic(), 1), source_address=(source, 0))
    try:
        connection.request(method, found.group(3))
        response = connection.getresponse()
        body = response.read().decode("utf-8", "replace")
        if not 200 <= response.status < 300:
            raise RuntimeError(f"{method} {url}: {response.status} {body.strip()[:100]}")
        return body
    finally:
        connection.close()


def cache_words(cache: str) -> list[str]:
    return [f"cache_dir={cache}"] if cache else []


def storm(guests: int, sizes: dict[str, int], workdir: Path, timeout: float, dom0s: int, cached: bool,
          pypxeboot: str) -> None:
    """Inside dom0: every guest at once (one thread each, pypxeboot its own process); prints
    one JSON line per guest, then one with the CPU seconds the guests' side used. Guest i runs
    on simulated dom0 i % dom0s: with ``cached``, that dom0's pypxeboot cache directory."""
    start = threading.Barrier(guests)
    results: list[dict[str, object]] = [{} for _ in range(guests)]
    deadline = time.monotonic() + timeout

    def run(index: int) -> None:
        start.wait()
        cache = str(workdir / f"cache-dom0-{index % dom0s}") if cached else ""
        results[index] = one_guest(index, sizes, workdir, deadline, cache, pypxeboot)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(guests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0) + 30)
    for index, result in enumerate(results):
        print(json.dumps(result or {"index": index, "steps": {}, "error": "no result by the deadline"}))
    used = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    print(json.dumps({"client_cpu": sum(u.ru_utime + u.ru_stime for u in used),
                      "pypxeboot_cpu": used[1].ru_utime + used[1].ru_stime}))


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class Figures:
    stack: str
    wall: float
    totals: list[float]
    failures: list[str]
    cpu: float
    steps: dict[str, float]  # median time at which each step ended
    phases: dict[str, float]  # median seconds each phase took
    client_cpu: float  # every guest's pypxeboot and installer steps together
    pypxeboot_cpu: float  # the pypxeboot processes' share of it


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))] if ordered else float("nan")


def run_stack(name: str, lan: Lan, workdir: Path, root: Path, sizes: dict[str, int],
              options: argparse.Namespace) -> Figures:
    kind, transport = name.split("-")
    served = "http" if transport == "cache" else transport
    running = (start_ours if kind == "ours" else start_peer)(lan, workdir, root, options.guests, served)
    guests_dir = Path(tempfile.mkdtemp(prefix=f"bootstorm-{name}-", dir=options.output_dir))
    try:
        before = running.cpu()
        started = time.monotonic()
        driven = subprocess.run([*lan.exec(lan.dom0), sys.executable, __file__, "--storm", str(guests_dir),
                                 json.dumps(sizes), "--guests", str(options.guests), "--timeout", str(options.timeout),
                                 "--dom0s", str(options.dom0s), "--pypxeboot", str(workdir / "pypxeboot"),
                                 *(["--cached"] if transport == "cache" else [])],
                                capture_output=True, text=True, timeout=options.timeout + 120, cwd=REPO)
        wall = time.monotonic() - started
        cpu = running.cpu() - before
    finally:
        running.stop()
        shutil.rmtree(guests_dir, ignore_errors=True)
    lines = [json.loads(line) for line in driven.stdout.splitlines() if line.startswith("{")]
    results = [line for line in lines if "index" in line]
    client_cpu = sum(line.get("client_cpu", 0.0) for line in lines)
    pypxeboot_cpu = sum(line.get("pypxeboot_cpu", 0.0) for line in lines)
    if len(results) != options.guests:
        raise SystemExit(f"{name}: the storm driver failed: {driven.stderr[-2000:]}")
    failures = [f"g{r['index']}: {r['error']}" for r in results if "error" in r]
    totals = [r["steps"]["done"] for r in results if "error" not in r]
    steps = {step: statistics.median(r["steps"][step] for r in results if "error" not in r) if totals else float("nan")
             for step in ("pypxeboot", "dhcp", "preseed", "done")}
    phases = {phase: statistics.median(r["phases"].get(phase, float("nan")) for r in results if "error" not in r)
              if totals else float("nan") for phase in PHASES}
    wall = max(totals) if totals and not failures else wall
    return Figures(name, wall, totals, failures, cpu, steps, phases, client_cpu, pypxeboot_cpu)


def fastest(runs: list[Figures]) -> Figures:
    """The fastest round, with the failures of every round (each must have none)."""
    best = min(runs, key=lambda f: (bool(f.failures), f.wall))
    return Figures(best.stack, best.wall, best.totals, [x for f in runs for x in f.failures], best.cpu, best.steps,
                   best.phases, best.client_cpu, best.pypxeboot_cpu)


def report(figures: list[Figures], options: argparse.Namespace, sizes: dict[str, int],
           rounds: dict[str, list[Figures]]) -> None:
    link = f"a {options.link_mbit} Mbit/s server link" if options.link_mbit else "an unshaped link"
    print(f"\nboot storm: {options.guests} guests at once on {options.dom0s} dom0s over {link}, "
          f"kernel {sizes[KERNEL] >> 20} MiB + initrd {sizes[INITRD] >> 20} MiB each, written to {options.output_dir} "
          f"({os.cpu_count()} CPUs, "
          + (f"servers on CPUs {options.server_cpus}, guests on the others, " if options.server_cpus
             else "clients and servers sharing every CPU, ")
          + f"load average at the start {options.load_before:.1f})")
    print(f"{'stack':<10} {'all done s':>10} {'p50 s':>7} {'p95 s':>7} {'max s':>7} {'failed':>6} "
          f"{'server CPU s':>12} {'guests CPU s':>12} {'of it pypxeboot':>15}")
    for f in figures:
        print(f"{f.stack:<10} {f.wall:10.2f} {percentile(f.totals, 0.5):7.2f} {percentile(f.totals, 0.95):7.2f} "
              f"{max(f.totals, default=float('nan')):7.2f} {len(f.failures):6d} {f.cpu:12.2f} {f.client_cpu:12.2f} "
              f"{f.pypxeboot_cpu:15.2f}")
        for failure in f.failures[:5]:
            print(f"    {failure}")
    print("median seconds per phase and guest: pypxeboot's " + ", ".join(PHASES[:4]) + "; the installer's "
          + ", ".join(PHASES[4:]))
    for f in figures:
        print(f"{f.stack:<10} " + " ".join(f"{f.phases[phase]:7.2f}" for phase in PHASES))
    if options.rounds > 1:
        print(f"fastest of {options.rounds} rounds per stack; all rounds (s): " + "; ".join(
            f"{name} " + " ".join(f"{f.wall:.1f}" for f in runs) for name, runs in rounds.items()))
    by_name = {f.stack: f for f in figures}
    summary = []
    for ours, peer, target in (("ours-tftp", "peer-tftp", 1.0), ("ours-http", "peer-tftp", 0.8),
                               ("ours-http", "peer-http", 0.8), ("ours-cache", "peer-cache", 0.8)):
        if ours in by_name and peer in by_name:
            ratio = by_name[ours].wall / by_name[peer].wall
            summary.append(f"{ours}/{peer} {ratio:.2f} (target <= {target}: {'met' if ratio <= target else 'missed'})")
    failed = sum(len(f.failures) for f in figures)
    print(f"summary: N={options.guests} on {options.dom0s} dom0s, {link}, initrd {sizes[INITRD] >> 20} MiB: "
          + "; ".join(summary) + f"; failures {failed}")


def output_directory(peak_bytes: int) -> str:
    """tmpfs (as xl's /var/run/xen is) when every guest's files fit in half the free memory:
    on disk, the writeback of gigabytes of initrds that are deleted at once anyway is noise
    that hits whichever stack runs while it happens."""
    available = next((int(line.split()[1]) << 10 for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemAvailable:")), 0)
    return "/dev/shm" if Path("/dev/shm").is_dir() and peak_bytes < available // 2 else tempfile.gettempdir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guests", type=int, default=200, help="domUs booting at once (default 200)")
    parser.add_argument("--initrd-mb", type=int, default=40)
    parser.add_argument("--kernel-mb", type=int, default=8)
    parser.add_argument("--dom0s", type=int, default=10, help="Xen hosts the guests are spread over (guest i on "
                        "dom0 i %% H); the guests of one dom0 share its pypxeboot cache in the *-cache stacks")
    parser.add_argument("--link-mbit", type=int, default=0, help="the boot server's line rate in Mbit/s "
                        "(tc tbf on its side of the link; default 0: unshaped, as fast as the machine copies)")
    parser.add_argument("--server-cpus", default="0" if len(os.sched_getaffinity(0)) >= 2 else "",
                        help="CPUs the servers run on (both stacks), the guests get the others: a boot server is "
                        "its own machine, not one more process among 200 guests (default: 0 when there are two "
                        "or more CPUs; empty: shared)")
    parser.add_argument("--cached", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pypxeboot", help=argparse.SUPPRESS)
    parser.add_argument("--stacks", default=",".join(STACKS), help="which of " + ", ".join(STACKS))
    parser.add_argument("--rounds", type=int, default=1, help="runs per stack, in turn; the fastest counts")
    parser.add_argument("--timeout", type=float, default=900, help="seconds the storm may take per stack")
    parser.add_argument("--output-dir", default="", help="where pypxeboot writes kernels and initrds "
                        "(default: /dev/shm when they all fit in half the free memory, as xl's /run does; else /tmp)")
    parser.add_argument("--storm", nargs=2, metavar=("DIR", "SIZES"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.storm:
        storm(options.guests, json.loads(options.storm[1]), Path(options.storm[0]), options.timeout, options.dom0s,
              options.cached, options.pypxeboot)
        return
    if os.geteuid() != 0:
        raise SystemExit("bootstorm needs root (network namespaces, DHCP, port 69 and 80)")
    if not os.access(INTERPRETER, os.X_OK):
        raise SystemExit(f"bootstorm runs pypxeboot as a dom0 does, on {INTERPRETER}, which is missing")
    stacks = [s for s in options.stacks.split(",") if s]
    if not stacks or set(stacks) - set(STACKS) or not 1 <= options.guests <= 4000 or not 1 <= options.rounds <= 20 \
            or not 1 <= options.dom0s <= options.guests \
            or not 0 <= options.link_mbit <= 100_000:
        raise SystemExit(f"--stacks takes {', '.join(STACKS)}; --guests 1..4000; --rounds 1..20; "
                         "--dom0s 1..guests; --link-mbit 0..100000")
    options.load_before = os.getloadavg()[0]
    if not options.output_dir:
        options.output_dir = output_directory(options.guests * (options.kernel_mb + options.initrd_mb) << 20)
    workdir = Path(tempfile.mkdtemp(prefix="bootstorm-"))
    workdir.chmod(0o755)  # nginx's workers read as nobody
    lan = None
    try:
        root = workdir / "tftproot"
        sizes = make_images(root, options.kernel_mb, options.initrd_mb)
        build_pypxeboot(workdir / "pypxeboot")
        lan = Lan(options.guests, options.link_mbit, options.server_cpus)
        rounds: dict[str, list[Figures]] = {name: [] for name in stacks}
        for round_number in range(options.rounds):
            for name in stacks:
                rounds[name].append(run_stack(name, lan, workdir, root, sizes, options))
                last = rounds[name][-1]
                print(f"round {round_number + 1} {name}: all done in {last.wall:.2f} s, {len(last.failures)} failed, "
                      f"server CPU {last.cpu:.2f} s", flush=True)
        report([fastest(rounds[name]) for name in stacks], options, sizes, rounds)
    finally:
        if lan is not None:
            lan.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
