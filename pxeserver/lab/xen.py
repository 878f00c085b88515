"""``pxeserver lab --xen``: the whole life of domUs under a real Xen dom0, booted in QEMU.

The network is one namespace made for the run: QEMU's NIC is a tap there, and `pxeserver
serve` runs there too, in DHCP full mode on a subnet that exists only in that namespace, as
it would on a site's provisioning network; dom0 bridges that NIC into ``xenbr0``. Hosts are
registered through the HTTP API (MACs generated, 00:16:3e), their xl configs written by
``pxeserver domu-config`` and used unchanged. dom0 installs pypxeboot as the README says
(fetched from ``GET /dom0/pypxeboot`` into /usr/local/bin, its SHA-256 checked against
``pxeserver build-pypxeboot --print-sha256``), then runs a scenario from a second disk: each
phase ``xl create``s its domUs at once (several: paused, then unpaused together) and waits
for them to power off. The domUs boot this module's small installer (busybox: netfront,
DHCP, preseed, writes the installed system onto xvda, install-complete call), and after it
the installed system through pygrub.

Afterwards the run holds the serial console (Xen and dom0), dom0's /var/log/xen (guest
consoles from xenconsoled, bootloader and xl logs), the server's log, each host's timeline
and status; :class:`LabRun` reads them for the command and the slow test.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pxeserver.lab.image import HERE, BuildFailed, Dom0Image, dom0_image, run

NETWORK = "10.77.0"
SERVER_IP = f"{NETWORK}.1"
DOM0_ADDRESS = f"{NETWORK}.2/24"
TAP = "labtap0"
PROFILE = "lab-installer"
GUEST_MEMORY_MB = 256
GUEST_DISK_MB = 64
INSTALL_TIMEOUT = 1500  # seconds one phase's domUs may run under emulation
QEMU_TIMEOUT = 3600
SERVE_START_TIMEOUT = 60
QEMU_NICE = -10  # CPU priority of the emulator on a shared host (see qemu_command)


@dataclass(frozen=True)
class Phase:
    """domUs created at once (``xl create`` side by side), then awaited until they power off."""

    label: str
    hosts: tuple[str, ...]


# Two installs side by side (their pypxeboots in dom0 at once), then the first host's second
# life: each guest boot costs minutes under emulation, so no phase boots a guest alone twice.
DEFAULT_PHASES = (
    Phase("install side by side", ("web1", "web2")),
    Phase("local boot", ("web1",)),
)
# Under QEMU's software emulation every TLB flush is dear: Xen's page-table isolation for PV
# guests (XPTI) flushes at each guest kernel entry, which made every boot several times slower.
# The lab's guests are ours, so XPTI and the PV L1TF shadowing are off, and Linux's mitigations.
# Not spec-ctrl=no: that also drops Xen's GDS mitigation, which hides AVX from dom0, and with
# AVX under TCG xl's domain monitor died of a general protection fault in libc.
XEN_ARGS = "console=com1 com1=115200 dom0_mem=1536M,max:1536M xpti=false pv-l1tf=false"
LINUX_ARGS = "mitigations=off"


@dataclass
class LabHost:
    hostname: str
    mac: str
    domu_config: str = ""
    status: str = ""
    events: list[dict[str, object]] = field(default_factory=list)


@dataclass
class LabRun:
    """Where a run's evidence is, and what the server said about each host afterwards."""

    workdir: Path
    hosts: dict[str, LabHost] = field(default_factory=dict)
    build_seconds: float = 0.0
    boot_seconds: float = 0.0
    qemu_exit: int | None = None
    booted_at: float = 0.0  # wall clock (time.time()) when QEMU started: dom0's clock is the host's

    @property
    def out(self) -> Path:
        return self.workdir / "out"

    @property
    def serial(self) -> str:
        return _read(self.workdir / "serial.log")

    @property
    def scenario_log(self) -> str:
        return _read(self.out / "scenario.log")

    @property
    def dom0_result(self) -> str:
        return _read(self.out / "dom0-result").strip()

    def console(self, hostname: str) -> str:
        """The guest's console as xenconsoled kept it (every boot of that name, in order)."""
        return _read(self.out / "xen" / "console" / f"guest-{hostname}.log")

    def bootloader_logs(self) -> str:
        return "".join(f"== {path.name}\n{_read(path)}" for path in sorted((self.out / "xen").glob("bootloader.*.log")))

    def server_log(self) -> str:
        return _read(self.workdir / "serve.log") + _read(self.workdir / "serve.err")

    def milestones(self) -> list[tuple[int, str]]:
        """dom0's and the scenario's steps (``lab-dom0:``/``lab-scenario:`` lines with dom0's
        HH:MM:SS, UTC like the host's) as seconds since QEMU started: where the time went."""
        start = time.gmtime(self.booted_at)
        day_start = self.booted_at - (start.tm_hour * 3600 + start.tm_min * 60 + start.tm_sec)
        found = []
        for match in re.finditer(r"^(lab-dom0|lab-scenario): (\d\d):(\d\d):(\d\d) (.*)$", self.serial, re.M):
            clock = int(match[2]) * 3600 + int(match[3]) * 60 + int(match[4])
            found.append((round((day_start + clock - self.booted_at) % 86400), f"{match[1]}: {match[5]}"))
        return found


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


class Namespace:
    """The run's network namespace with the tap QEMU attaches to; deleted on exit."""

    def __init__(self) -> None:
        self.name = f"xenlab-{os.getpid()}"

    def __enter__(self) -> Namespace:
        run(["ip", "netns", "add", self.name], "ip netns add")
        try:
            for command in (["tuntap", "add", "dev", TAP, "mode", "tap"],
                            ["addr", "add", f"{SERVER_IP}/24", "dev", TAP],
                            ["link", "set", TAP, "up"], ["link", "set", "lo", "up"]):
                run(["ip", "-n", self.name, *command], f"ip {command[0]}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)

    def exec(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]


class Server:
    """`pxeserver serve` in the namespace, with its own config, data dir and TFTP root."""

    def __init__(self, workdir: Path, namespace: Namespace, preseeds: Path) -> None:
        self.workdir, self.namespace = workdir, namespace
        self.config = workdir / "pxeserver.toml"
        self.config.write_text(
            f'[server]\naddress = "{SERVER_IP}"\ndata_dir = "{workdir / "var"}"\n'
            f'tftp_root = "{workdir / "tftproot"}"\npreseeds = "{preseeds}"\n'
            f'[dhcp]\nenabled = true\ninterface = "{TAP}"\nsubnet = "{NETWORK}.0/24"\n'
            f'router = "{SERVER_IP}"\npool_start = "{NETWORK}.100"\npool_end = "{NETWORK}.199"\n')
        self.process: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> str:
        return run([sys.executable, "-m", "pxeserver", "--config", str(self.config), *args],
                   f"pxeserver {args[0]}", timeout=60)

    def start(self) -> None:
        with open(self.workdir / "serve.log", "wb") as out, open(self.workdir / "serve.err", "wb") as err:
            self.process = subprocess.Popen(
                self.namespace.exec(sys.executable, "-m", "pxeserver", "--config", str(self.config), "serve"),
                stdout=out, stderr=err)
        deadline = time.monotonic() + SERVE_START_TIMEOUT
        while "pxeserver: next:" not in _read(self.workdir / "serve.log"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise BuildFailed(f"pxeserver serve did not start: {_read(self.workdir / 'serve.err')[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=10)

    def api(self, method: str, path: str, body: object | None = None) -> object:
        """The HTTP API, called from inside the namespace with curl."""
        args = ["curl", "-sS", "--max-time", "30", "-X", method, "-w", "\n%{http_code}",
                f"http://{SERVER_IP}/api{path}"]
        if body is not None:
            args += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
        text, _, code = run(self.namespace.exec(*args), f"API {method} {path}", timeout=60).rpartition("\n")
        if not code.startswith("2"):
            raise BuildFailed(f"API {method} {path}: {code} {text}")
        return json.loads(text)


def build_guest_files(image: Dom0Image, workdir: Path, tftproot: Path) -> None:
    """The installer initrd (also the installed system's: lab.role= picks), the kernel, and
    the installed system's disk image with the GRUB config pygrub reads."""
    images = tftproot / "images" / PROFILE
    images.mkdir(parents=True, exist_ok=True)
    shutil.copy(image.kernel, images / "vmlinuz")
    root = workdir / "initrd-root"
    for directory in ("bin", "dev", "proc", "sys", "tmp", "lib/modules"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    shutil.copy(image.busybox, root / "bin/busybox")
    for name in ("xen-netfront", "xen-blkfront"):
        shutil.copy(image.module(name), root / "lib/modules" / f"{name}.ko")
    shutil.copy(HERE / "guest-init.sh", root / "init")
    shutil.copy(HERE / "udhcpc.script", root / "udhcpc.script")
    for script in ("init", "udhcpc.script", "bin/busybox"):
        (root / script).chmod(0o755)
    os.mknod(root / "dev/console", 0o600 | 0o020000, os.makedev(5, 1))
    target = shlex.quote(str(images / "initrd.img"))
    cpio = subprocess.run(f"find . | cpio -o -H newc --owner=0:0 --quiet | gzip -9 > {target}",
                          shell=True, cwd=root, capture_output=True, text=True, timeout=120)
    if cpio.returncode != 0:
        raise BuildFailed(f"installer initrd: {cpio.stderr}")
    system = workdir / "installed-root"
    (system / "boot/grub").mkdir(parents=True, exist_ok=True)
    shutil.copy(images / "vmlinuz", system / "boot/vmlinuz")
    shutil.copy(images / "initrd.img", system / "boot/initrd.img")
    (system / "boot/grub/grub.cfg").write_text(
        "set default=0\nset timeout=0\n"
        'menuentry "pxeserver lab: installed system" {\n'
        f"    linux /boot/vmlinuz console=hvc0 {LINUX_ARGS} lab.role=installed\n"
        "    initrd /boot/initrd.img\n}\n")
    run(["mke2fs", "-q", "-t", "ext2", "-L", "installed", "-d", str(system), str(images / "disk.img"), "24M"],
        "mke2fs installed system")


def scenario_script(phases: tuple[Phase, ...], hosts: dict[str, LabHost]) -> str:
    lines = [
        "# Run by dom0's /sbin/lab-init from the lab disk; each step is said on the console.",
        'say() { echo "lab-scenario: $(date +%T) $*" | tee /dev/console; }',
        "shut_down() {  # NAME: xl lists it in state s (shut down, not yet destroyed)",
        '    xl list "$1" 2>/dev/null | awk \'NR == 2 && $5 ~ /s/ {found = 1} END {exit !found}\'',
        "}",
        "wait_gone() {  # NAME SECONDS: until xl no longer knows the domain",
        "    waited=0",
        '    while xl domid "$1" >/dev/null 2>&1; do',
        "        # Powered off but not destroyed: xl's monitor, which applies on_poweroff, is gone.",
        '        if shut_down "$1" && sleep 10 && shut_down "$1"; then',
        '            say "$1 shut down but was not destroyed: xl\'s monitor process died"; xl destroy "$1"; return 1',
        "        fi",
        '        if [ "$waited" -ge "$2" ]; then',
        '            say "$1 still running after $2 s: destroyed"; xl destroy "$1"; return 1',
        "        fi",
        "        sleep 2; waited=$((waited + 2))",
        "    done",
        '    say "$1 has powered off"',
        "}",
        "# Each guest's disk, as a site's LVM volume would be: a block device under /dev/vg_domu/",
        "# (in [xen] disk_roots), here a loop device on a file kept on the lab disk. A file disk",
        "# would do too, but Xen's block script takes too long for it under emulation when two",
        "# domUs start at once (libxl gives hotplug scripts 40 s).",
        "mkdir -p /lab/disks /dev/vg_domu",
    ]
    lines += [f"truncate -s {GUEST_DISK_MB}M /lab/disks/{name}.img && "
              f'ln -s "$(losetup -f --show /lab/disks/{name}.img)" /dev/vg_domu/{name}' for name in hosts]
    # Under emulation a booting guest starves dom0: Xen's hotplug scripts for a second domU
    # then overrun libxl's 40 s. So dom0 comes first in Xen's scheduler, and domUs created
    # together (their pypxeboots side by side) are created paused and unpaused together.
    lines.append("xl sched-credit2 -d Domain-0 -w 65535 || xl sched-credit -d Domain-0 -w 65535")
    lines.append("cat /etc/xen/scripts/* /usr/bin/xenstore* /sbin/losetup > /dev/null; losetup -a > /dev/null"
                 "  # their first run reads them from disk")
    for phase in phases:
        together = len(phase.hosts) > 1
        lines.append(f'say "phase {phase.label}: xl create {" ".join(phase.hosts)}"')
        for name in phase.hosts:
            create = "xl create -p" if together else "xl create"
            lines.append(f'( {create} /lab/{name}.cfg; say "{name}: xl create exited $?" ) &')
        lines.append("wait")
        if together:
            lines += [f"xl unpause {name}" for name in phase.hosts]
        lines += [f"wait_gone {name} {INSTALL_TIMEOUT}" for name in phase.hosts]
    lines.append('say "scenario done"')
    return "\n".join(lines) + "\n"


def register_hosts(server: Server, phases: tuple[Phase, ...]) -> dict[str, LabHost]:
    server.api("POST", "/profiles", {
        "name": PROFILE, "kernel": f"images/{PROFILE}/vmlinuz", "initrd": f"images/{PROFILE}/initrd.img",
        "append": f"console=hvc0 {LINUX_ARGS} lab.role=installer lab.disk=http://{SERVER_IP}/boot/images/{PROFILE}/disk.img",
        "autoinstall": "debian-xen.cfg"})
    hosts: dict[str, LabHost] = {}
    for phase in phases:
        for name in phase.hosts:
            if name in hosts:
                continue
            created = server.api("POST", "/hosts", {
                "hostname": name, "profile": PROFILE,
                "xen": {"memory": GUEST_MEMORY_MB, "disk": f"phy:/dev/vg_domu/{name},xvda,w"}})
            hosts[name] = LabHost(name, created["mac"])  # type: ignore[index]
    return hosts


def qemu_command(image: Dom0Image, lab_disk: Path, serial: Path) -> list[str]:
    """QEMU with Xen and dom0, ahead of the host's other work (``nice``): libxl kills a hotplug
    script after a fixed 40 s, and a dom0 whose emulator waits behind a busy host's other
    processes overruns that for reasons that have nothing to do with pxeserver."""
    return [
        "nice", "-n", str(QEMU_NICE),
        "qemu-system-x86_64", "-accel", "tcg", "-cpu", "Haswell-noTSX", "-m", "4096", "-smp", "2",
        # No default devices: no floppy, CD-ROM, VGA or parallel port for dom0 to probe.
        "-nodefaults", "-display", "none", "-monitor", "none", "-no-reboot", "-serial", f"file:{serial}",
        "-kernel", str(image.xen),
        "-append", XEN_ARGS,
        "-initrd", f"{image.kernel} root=LABEL=dom0 rw console=hvc0 {LINUX_ARGS} init=/sbin/lab-init,{image.initrd}",
        "-drive", f"file={image.disk},format=raw,if=ide,snapshot=on",
        "-drive", f"file={lab_disk},format=raw,if=ide",
        "-netdev", f"tap,id=net0,ifname={TAP},script=no,downscript=no",
        "-device", "e1000,netdev=net0,mac=52:54:00:77:00:02",
    ]


def run_lab(source: Path, workdir: Path, phases: tuple[Phase, ...] = DEFAULT_PHASES,
            qemu_timeout: float = QEMU_TIMEOUT) -> LabRun:
    """Build (or take from the cache) the dom0 image, boot it and run the phases."""
    workdir.mkdir(parents=True, exist_ok=True)
    result = LabRun(workdir)
    started = time.monotonic()
    image = dom0_image()
    result.build_seconds = time.monotonic() - started
    tftproot = workdir / "tftproot"
    (tftproot / "pxelinux.cfg").mkdir(parents=True, exist_ok=True)
    build_guest_files(image, workdir, tftproot)
    with Namespace() as namespace:
        server = Server(workdir, namespace, source / "preseeds")
        server.start()
        try:
            result.hosts = register_hosts(server, phases)
            lab = workdir / "lab-disk"
            lab.mkdir(exist_ok=True)
            for host in result.hosts.values():
                server.cli("domu-config", host.mac, "-o", str(lab / f"{host.hostname}.cfg"))
                host.domu_config = (lab / f"{host.hostname}.cfg").read_text()
            pypxeboot_sha256 = server.cli("build-pypxeboot", "-o", str(workdir / "pypxeboot"),
                                          "--print-sha256").split()[0]
            (lab / "lab.env").write_text(f"DOM0_ADDRESS={DOM0_ADDRESS}\nSERVER_IP={SERVER_IP}\n"
                                         f"PYPXEBOOT_SHA256={pypxeboot_sha256}\n")
            (lab / "scenario.sh").write_text(scenario_script(phases, result.hosts))
            lab_disk = workdir / "lab.ext4"
            run(["mke2fs", "-q", "-t", "ext4", "-L", "lab", "-d", str(lab), str(lab_disk), "1G"], "mke2fs lab disk")
            booted = time.monotonic()
            result.booted_at = time.time()
            qemu = subprocess.Popen(namespace.exec(*qemu_command(image, lab_disk, workdir / "serial.log")),
                                    stdout=open(workdir / "qemu.log", "wb"), stderr=subprocess.STDOUT)
            try:
                result.qemu_exit = qemu.wait(timeout=qemu_timeout)
            except subprocess.TimeoutExpired:
                qemu.kill()
                qemu.wait(timeout=30)
            result.boot_seconds = time.monotonic() - booted
            subprocess.run(["debugfs", "-R", f"rdump /out {workdir}", str(lab_disk)],
                           capture_output=True, timeout=120)
            for host in result.hosts.values():
                host.status = str(server.api("GET", f"/hosts/{host.mac}")["status"])  # type: ignore[index]
                host.events = server.api("GET", f"/hosts/{host.mac}/events")  # type: ignore[assignment]
        finally:
            server.stop()
    return result


def source_checkout() -> Path:
    """The checkout this pxeserver runs from (its preseeds/ are the lab server's)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file() or not (root / "preseeds").is_dir():
        raise BuildFailed(f"pxeserver lab --xen runs from a source checkout; {root} is not one")
    return root


def summary(result: LabRun) -> str:
    """What the command shows: timings, each guest's console and timeline, where the logs are."""
    parts = [f"dom0 image ready in {result.build_seconds:.0f} s; dom0 boot and scenario "
             f"{result.boot_seconds:.0f} s; dom0: {result.dom0_result or 'no result (see serial.log)'}",
             "-- steps (seconds since QEMU started)",
             *(f"{seconds:5d} {step}" for seconds, step in result.milestones()),
             "-- scenario log", result.scenario_log]
    for host in result.hosts.values():
        parts.append(f"== {host.hostname} ({host.mac}): status {host.status}\n-- console\n"
                     + "\n".join(line for line in result.console(host.hostname).splitlines()
                                 if line.startswith("pxeserver-lab:"))
                     + "\n-- timeline\n"
                     + "\n".join(f"{e['source']}: {e['message']}" for e in host.events))
    parts.append(f"logs: {result.workdir} (serial.log, out/xen/console/, out/xen/bootloader.*.log, serve.err)")
    return "\n".join(parts)


def succeeded(result: LabRun) -> bool:
    return result.dom0_result == "scenario ended with status 0" and bool(result.hosts) and \
        all(host.status == "installed" for host in result.hosts.values())


def main(workdir: Path | None = None) -> int:
    """``pxeserver lab --xen``: run the lab, print what it saw; 0 when every host is installed."""
    if os.geteuid() != 0:
        print("pxeserver lab --xen: needs root (network namespace, tap, chroot): run it with sudo", file=sys.stderr)
        return 1
    missing = [tool for tool in ("qemu-system-x86_64", "debootstrap", "mke2fs", "debugfs", "cpio", "curl")
               if shutil.which(tool) is None]
    if missing:
        print(f"pxeserver lab --xen: missing {', '.join(missing)} (see scripts/debian-packages.txt)", file=sys.stderr)
        return 1
    try:
        result = run_lab(source_checkout(),
                         (workdir or Path(tempfile.mkdtemp(prefix="pxeserver-xen-lab-", dir="/var/tmp"))).resolve())
    except BuildFailed as exc:
        print(f"pxeserver lab --xen: {exc}", file=sys.stderr)
        return 1
    print(summary(result))
    return 0 if succeeded(result) else 1
