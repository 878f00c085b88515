"""``pxeserver lab``: a throwaway provisioning network and a QEMU guest booting from it.

Two network namespaces, created here and always deleted again: the server's, where
``pxeserver serve`` runs DHCP (full mode), TFTP, HTTP and DNS on 10.77.12.1/24, and the
guests', where a bridge joins the veth to the server and a tap that QEMU opens (QEMU runs
inside that namespace). Nothing is added to the machine's own network. The guest is real
firmware under software emulation: SeaBIOS with iPXE (Debian's ipxe-qemu ROMs), or OVMF with
iPXE's EFI driver or its own PXE. The firmware test suite (tests/test_firmware.py) builds the
same lab from these pieces.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pxeserver import app, config as config_module
from pxeserver.mac import MacAddress

SERVER_IP = "10.77.12.1"
TESTER_IP = "10.77.12.2"  # the bridge's own address: clients of the lab's user (curl, tftp)
GUEST_IP = "10.77.12.50"
SUBNET = "10.77.12.0/24"
SERVER_IF = "fws0"
UPLINK_IF = "fwc0"  # the veth's end in the guests' namespace, a bridge port
BRIDGE = "fwbr0"
TAP = "fwtap0"
GUEST_MAC = "52:54:00:12:00:01"

INSTALLER = Path("/usr/lib/debian-installer/images/12/amd64/text/debian-installer/amd64")
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")
IPXE_ROMS = Path("/usr/lib/ipxe/qemu")  # ipxe-qemu: BIOS and EFI iPXE in one ROM per NIC
QEMU = "qemu-system-x86_64"
# Bootloaders as scripts/setup copies them into tftproot/, from Debian's packages.
LOADERS = {
    "pxelinux.0": Path("/usr/lib/PXELINUX/pxelinux.0"),
    "ldlinux.c32": Path("/usr/lib/syslinux/modules/bios/ldlinux.c32"),
    "syslinux.efi": Path("/usr/lib/SYSLINUX.EFI/efi64/syslinux.efi"),
    "ldlinux.e64": Path("/usr/lib/syslinux/modules/efi64/ldlinux.e64"),
}
REPO = Path(__file__).resolve().parents[2]  # holds kickstarts/ and preseeds/
NICS = {"e1000": "e1000", "virtio": "virtio-net-pci"}  # our name: QEMU's device


def missing_packages() -> list[str]:
    """The Debian packages the lab needs that this machine lacks."""
    needs = {
        "qemu-system-x86": shutil.which(QEMU),
        "ipxe-qemu": (IPXE_ROMS / "efi-e1000.rom").exists(),
        "ovmf": OVMF_CODE.exists(),
        "debian-installer-12-netboot-amd64": (INSTALLER / "linux").exists(),
        "pxelinux": LOADERS["pxelinux.0"].exists(),
        "syslinux-common": LOADERS["ldlinux.c32"].exists(),
        "syslinux-efi": LOADERS["syslinux.efi"].exists(),
    }
    return [package for package, present in needs.items() if not present]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=30)


@dataclass(frozen=True)
class Network:
    server_ns: str
    guest_ns: str

    def in_server(self, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.server_ns, *command]

    def in_guests(self, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.guest_ns, *command]


@contextmanager
def network(tag: str) -> Iterator[Network]:
    """The namespaces, veth, bridge and tap; deleted again however the block ends. ``tag``
    and the pid name the namespaces, so labs of different processes never meet."""
    net = Network(f"{tag}-{os.getpid()}-s", f"{tag}-{os.getpid()}-g")
    server, guests = net.server_ns, net.guest_ns
    try:
        _run("ip", "netns", "add", server)
        _run("ip", "netns", "add", guests)
        _run("ip", "link", "add", SERVER_IF, "netns", server, "type", "veth", "peer", "name", UPLINK_IF,
             "netns", guests)
        _run("ip", "-n", server, "addr", "add", f"{SERVER_IP}/24", "dev", SERVER_IF)
        _run("ip", "-n", guests, "link", "add", BRIDGE, "type", "bridge", "forward_delay", "0")
        _run("ip", "-n", guests, "addr", "add", f"{TESTER_IP}/24", "dev", BRIDGE)
        _run("ip", "-n", guests, "tuntap", "add", "dev", TAP, "mode", "tap")
        for port in (UPLINK_IF, TAP):
            _run("ip", "-n", guests, "link", "set", port, "master", BRIDGE)
        for namespace, interfaces in ((server, ("lo", SERVER_IF)), (guests, ("lo", UPLINK_IF, TAP, BRIDGE))):
            for interface in interfaces:
                _run("ip", "-n", namespace, "link", "set", interface, "up")
        yield net
    finally:
        for namespace in (guests, server):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)


def prepare_server(workdir: Path, repo: Path, *, ipxe_chain: str = "script") -> Path:
    """A TFTP root with Debian's loaders and a pxeserver.toml for the lab; the config's path.
    ``repo`` holds the kickstarts/ and preseeds/ templates."""
    tftproot = workdir / "tftproot"
    for name in ("pxelinux.cfg", "images"):
        (tftproot / name).mkdir(parents=True, exist_ok=True)
    for name, source in LOADERS.items():
        shutil.copy(source, tftproot / name)
    config = workdir / "pxeserver.toml"
    config.write_text(
        f'[server]\naddress = "{SERVER_IP}"\n'
        f'kickstarts = "{repo / "kickstarts"}"\npreseeds = "{repo / "preseeds"}"\n'
        f'[boot]\nipxe_chain = "{ipxe_chain}"\n'
        f'[dhcp]\nenabled = true\ninterface = "{SERVER_IF}"\nsubnet = "{SUBNET}"\nrouter = "{SERVER_IP}"\n'
        '[dns]\nenabled = true\ndomain = "lab.example"\n')
    return config


def copy_installer(tftproot: Path, name: str = "debian12") -> tuple[str, str]:
    """Debian's netboot installer under tftproot/images/<name>/; its kernel and initrd paths.
    Copied, not linked: the TFTP root publishes no symlink that leaves it."""
    images = tftproot / "images" / name
    images.mkdir(parents=True, exist_ok=True)
    for file in ("linux", "initrd.gz"):
        shutil.copy(INSTALLER / file, images / file)
    return f"images/{name}/linux", f"images/{name}/initrd.gz"


def qemu_command(net: Network, workdir: Path, name: str, *, serial: str, mac: str = GUEST_MAC,
                 uefi: bool = False, nic: str = "e1000", option_rom: bool = True,
                 memory: int = 1024) -> list[str]:
    """QEMU booting from the network on the lab's tap, in the guests' namespace. ``serial``
    is QEMU's -serial backend; ``option_rom`` False leaves the NIC without iPXE, so the
    firmware's own PXE runs (OVMF has one for virtio; SeaBIOS has none)."""
    rom = f"romfile={IPXE_ROMS / f'efi-{nic}.rom'}" if option_rom else "romfile="
    command = net.in_guests(
        QEMU, "-accel", "tcg", "-m", str(memory), "-smp", "1", "-display", "none", "-monitor", "none",
        "-no-reboot", "-serial", serial, "-boot", "n",
        "-netdev", f"tap,id=net0,ifname={TAP},script=no,downscript=no",
        "-device", f"{NICS[nic]},netdev=net0,mac={mac},{rom}")
    if uefi:
        variables = workdir / f"{name}.OVMF_VARS.fd"  # the firmware writes its boot entries here
        shutil.copy(OVMF_VARS, variables)
        command += ["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                    "-drive", f"if=pflash,format=raw,file={variables}"]
    else:
        command += ["-device", "sga"]  # SeaBIOS and iPXE text on the serial console
    return command


# -- the command ----------------------------------------------------------------------------

def _cli(workdir: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "pxeserver", *args], cwd=workdir,
                            capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip())
    return result.stdout


def run(*, uefi: bool, firmware_pxe: bool, pxelinux: bool, memory: int, timeout: float,
        until: str | None, repo: Path = REPO) -> int:
    """Build the lab, boot the guest, show its console and timeline, tear it all down."""
    if os.geteuid() != 0:
        print("pxeserver lab: needs root (it creates network namespaces): run it with sudo", file=sys.stderr)
        return 1
    missing = missing_packages()
    if missing:
        print(f"pxeserver lab: missing {', '.join(missing)}: apt-get install {' '.join(missing)}",
              file=sys.stderr)
        return 1
    if firmware_pxe and not uefi:
        print("pxeserver lab: --firmware-pxe needs --uefi (SeaBIOS has no PXE of its own)", file=sys.stderr)
        return 1
    interrupted = False

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    workdir = Path(tempfile.mkdtemp(prefix="pxeserver-lab-"))
    try:
        with network("pxelab") as net, _stopped_on_exit() as processes:
            config = prepare_server(workdir, repo, ipxe_chain="pxelinux" if pxelinux else "script")
            kernel, initrd = copy_installer(workdir / "tftproot")
            _cli(workdir, "profile", "add", "debian12", "--kernel", kernel, "--initrd", initrd,
                 "--append", "console=ttyS0", "--autoinstall", "debian-xen.cfg")
            _cli(workdir, "host", "add", "--mac", GUEST_MAC, "--hostname", "lab1", "--profile", "debian12",
                 "--ip", GUEST_IP)
            server_log = workdir / "server.log"
            with open(server_log, "wb") as log:
                processes.append(subprocess.Popen(
                    net.in_server(sys.executable, "-m", "pxeserver", "--config", str(config), "serve"),
                    cwd=workdir, stdout=log, stderr=subprocess.STDOUT))
            _wait_for_banner(server_log, processes[0])
            console = workdir / "console.log"
            firmware = ("OVMF" if uefi else "SeaBIOS") + (" PXE" if firmware_pxe else " + iPXE")
            print(f"pxeserver lab: {firmware} guest {GUEST_MAC} booting Debian's installer from "
                  f"pxeserver at {SERVER_IP} ({'pxelinux' if pxelinux else 'iPXE script'}); "
                  "Ctrl-C ends it", flush=True)
            processes.append(subprocess.Popen(
                qemu_command(net, workdir, "lab", serial=f"file:{console}", uefi=uefi,
                             nic="virtio" if uefi else "e1000", option_rom=not firmware_pxe, memory=memory),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            context = app.build(config_module.load(config))  # the server's registry, read here
            try:
                reached = _watch(console, processes[1], context, until, timeout)
            finally:
                context.close()
            if until and not reached:
                print(f"\npxeserver lab: the host did not reach {until} "
                      f"({'QEMU exited' if processes[1].poll() is not None else f'{timeout:.0f} s passed'})",
                      file=sys.stderr)
                return 1
            return 0
    except RuntimeError as exc:  # the server did not start, or registering the host failed
        print(f"pxeserver lab: {exc}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:  # building the network (a name in use, no tun)
        print(f"pxeserver lab: {' '.join(exc.cmd)} failed: {exc.stderr.strip()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        interrupted = True
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"\npxeserver lab: {'interrupted; ' if interrupted else ''}lab removed", file=sys.stderr)


@contextmanager
def _stopped_on_exit() -> Iterator[list[subprocess.Popen[bytes]]]:
    """A list of processes, each stopped (SIGTERM, then SIGKILL) when the block ends, last
    started first, before the namespaces they run in are deleted."""
    processes: list[subprocess.Popen[bytes]] = []
    try:
        yield processes
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)


def _wait_for_banner(log: Path, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while b"pxeserver: next:" not in log.read_bytes():
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"pxeserver serve did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.2)


def _watch(console: Path, qemu: subprocess.Popen[bytes], context: app.Context, until: str | None,
           timeout: float) -> bool:
    """Copy the guest's console to the terminal and the host's new timeline events between
    its lines, until the host reaches status ``until``, QEMU exits, or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    shown = 0
    offset = 0
    out = sys.stdout.buffer
    while time.monotonic() < deadline:
        if console.exists():
            with open(console, "rb") as file:
                file.seek(offset)
                chunk = file.read()
            offset += len(chunk)
            out.write(chunk)
        events = context.store.events(MacAddress.parse(GUEST_MAC))
        for event in events[shown:]:
            stamp = time.strftime("%H:%M:%S", time.localtime(event.time))
            out.write(f"\r\n\x1b[0m[timeline {stamp}] {event.source}: {event.message}\r\n".encode())
            if until and event.source == "policy" and event.message.endswith(f"-> {until}"):
                out.flush()
                return True
        shown = max(shown, len(events))
        out.flush()
        if qemu.poll() is not None:
            return False
        time.sleep(0.5)
    return False
