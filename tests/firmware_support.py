"""The firmware tests' lab: QEMU guests network-booting from ``pxeserver serve``.

The network, the server's directory and the QEMU command are `pxeserver lab`'s own
(pxeserver/lab/firmware.py): namespaces for the server and the guests joined through a bridge and a
tap, QEMU under software emulation (``-accel tcg``) in the guests' namespace. Here: running
the server and guests for a test, waiting on them with bounds, keeping the serial consoles and
the server's log under ``test-artifacts/`` when a test fails, and a tiny busybox installer.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from conftest import REPO
from dhcp_support import run

from pxeserver.lab.firmware import INSTALLER, SERVER_IF, SERVER_IP, Network, network, prepare_server, qemu_command

ARTIFACTS = REPO / "test-artifacts"
CAPTURES = REPO / "tests" / "data"

T = TypeVar("T")
_ESCAPES = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|[()][0-9A-Za-z])")


@dataclass
class Lab:
    """The namespaces, the server's working directory and the files worth keeping."""

    net: Network
    workdir: Path
    logs: list[Path] = field(default_factory=list)

    @property
    def tftproot(self) -> Path:
        return self.workdir / "tftproot"

    def cli(self, *args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "pxeserver", *args], cwd=self.workdir,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def api(self, path: str) -> object:
        """A GET on the server's API, from the server's own namespace."""
        result = run(*self.net.in_server("curl"), "-fsS", "--max-time", "10",
                     f"http://{SERVER_IP}/api/{path}")
        return json.loads(result.stdout)

    def status(self, mac: str) -> str:
        return json.loads(self.cli("host", "show", mac))["status"]

    def events(self, mac: str) -> list[dict[str, str]]:
        return self.api(f"hosts/{mac}/events")  # type: ignore[return-value]

    def tftp_get(self, name: str) -> str:
        """A file as a TFTP client on the guests' network gets it (tftp-hpa)."""
        target = self.workdir / "tftp-fetched"
        target.unlink(missing_ok=True)
        run(*self.net.in_guests("tftp"), SERVER_IP, "-m", "binary", "-c", "get",
            name, str(target), check=False)
        return target.read_text() if target.exists() else ""

    def http_get(self, path: str) -> str:
        return run(*self.net.in_guests("curl"), "-fsS", "--max-time", "10",
                   f"http://{SERVER_IP}/{path}").stdout


@contextmanager
def lab(tag: str, workdir: Path, *, ipxe_chain: str = "script") -> Iterator[Lab]:
    """The lab's network (deleted again however the test ends) and a server directory."""
    with network(tag) as net:
        prepare_server(workdir, REPO, ipxe_chain=ipxe_chain)
        yield Lab(net, workdir)


@contextmanager
def serving(the_lab: Lab, capture: str = "") -> Iterator[Path]:
    """``pxeserver serve`` in the server's namespace until the block ends; yields its log file.
    SIGTERM must stop it cleanly. With $PXESERVER_RECORD_DHCP set, the DHCP exchanges are
    recorded into tests/data/dhcp-<capture>.pcap (the golden captures, test_dhcp_golden.py)."""
    log_file = the_lab.workdir / "server.log"
    the_lab.logs.append(log_file)
    with open(log_file, "w") as log:
        server = subprocess.Popen(
            the_lab.net.in_server(sys.executable, "-m", "pxeserver", "serve"),
            cwd=the_lab.workdir, stdout=log, stderr=subprocess.STDOUT, text=True)
    recorder: subprocess.Popen[bytes] | None = None
    try:
        if capture and os.environ.get("PXESERVER_RECORD_DHCP"):
            recorder_log = the_lab.workdir / "tcpdump.log"
            with open(recorder_log, "w") as errors:
                recorder = subprocess.Popen(
                    [*the_lab.net.in_server("tcpdump"), "-i", SERVER_IF, "-U", "-Z", "root", "-w",
                     str(CAPTURES / f"dhcp-{capture}.pcap"), "udp port 67 or udp port 68"],
                    stdout=subprocess.DEVNULL, stderr=errors)
            wait_for(lambda: True if "listening on" in recorder_log.read_text() else None, 30,
                     "tcpdump to start", alive=recorder, interval=0.2)
        wait_for(lambda: "pxeserver: next:" in log_file.read_text() or None, 60,
                 "pxeserver serve to start", alive=server)
        assert "dhcp listening" in log_file.read_text(), log_file.read_text()
        yield log_file
    finally:
        if recorder is not None:
            recorder.send_signal(signal.SIGINT)
            recorder.wait(timeout=30)
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
            raise
    text = log_file.read_text()
    assert code == 0 and "Traceback" not in text, text[-3000:]


def wait_for(check: Callable[[], T | None], timeout: float, what: str,
             alive: subprocess.Popen[str] | None = None, interval: float = 1.0) -> T:
    """Poll ``check`` until it returns something other than None; fail after ``timeout``
    seconds, or as soon as ``alive`` (a process the wait depends on) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"gave up waiting for {what}: the process exited with {alive.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(interval)


@dataclass
class Guest:
    """One QEMU machine on the lab's tap: its process and serial console file."""

    process: subprocess.Popen[str]
    console: Path

    def console_text(self) -> str:
        """The console as read on a terminal, less its escape sequences: BIOS text reaches
        the serial port through SGABIOS one cursor-positioned character at a time."""
        text = self.console.read_text(errors="replace") if self.console.exists() else ""
        return _ESCAPES.sub("", text)

    def wait_console(self, text: str, timeout: float) -> None:
        wait_for(lambda: True if text in self.console_text() else None, timeout,
                 f"{text!r} on the serial console", alive=self.process)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the guest was still running after {timeout:.0f} s") from None


@contextmanager
def guest(the_lab: Lab, name: str, mac: str, **machine: Any) -> Iterator[Guest]:
    """A QEMU guest booting from the network (pxeserver.lab.firmware.qemu_command takes ``machine``),
    killed when the block ends."""
    console = the_lab.workdir / f"{name}.console.log"
    the_lab.logs.append(console)
    command = qemu_command(the_lab.net, the_lab.workdir, name, serial=f"file:{console}", mac=mac, **machine)
    with open(the_lab.workdir / f"{name}.qemu.log", "w") as errors:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, text=True)
    try:
        yield Guest(process, console)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


@contextmanager
def artifacts_on_failure(the_lab: Lab, name: str) -> Iterator[None]:
    """On a failure, keep the consoles and the server log under test-artifacts/<name>/."""
    try:
        yield
    except BaseException:
        target = ARTIFACTS / name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for path in the_lab.logs + sorted(the_lab.workdir.glob("*.qemu.log")):
            if path.exists():
                shutil.copy(path, target / path.name)
        print(f"artifacts (serial consoles, server log): {target}")
        raise


# -- a tiny installer: busybox fetches the autoinstall file and calls its callback ----------

LIFECYCLE_INIT = r"""#!/bin/busybox sh
# A stand-in installer: network up, fetch the kickstart/preseed named on the kernel command
# line, call the install-complete URL it carries, power off. Every step says so on ttyS0.
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
insmod /e1000.ko
for word in $(cat /proc/cmdline); do
    case $word in url=*|ks=*|inst.ks=*) url=${word#*=} ;; esac
done
ip link set eth0 up
udhcpc -i eth0 -s /udhcpc.sh -q -n -t 10 -T 2 && echo "lifecycle: network up"
wget -q -O /tmp/autoinstall "$url" && echo "lifecycle: fetched $url"
callback=$(sed -n "s/.*curl -fsS -X POST '\([^']*\)'.*/\1/p" /tmp/autoinstall | head -n 1)
wget -q -O /tmp/answer --post-data= "$callback" && echo "lifecycle: callback answered $(cat /tmp/answer)"
echo "lifecycle: powering off"
poweroff -f
"""
UDHCPC_SCRIPT = """#!/bin/sh
[ "$1" = bound ] && ifconfig "$interface" "$ip" netmask "$subnet" up
exit 0
"""


def _newc(name: str, data: bytes, mode: int, device: tuple[int, int] = (0, 0)) -> bytes:
    fields = [0, mode, 0, 0, 1, 0, len(data), 0, 0, *device, len(name) + 1, 0]
    header = b"070701" + b"".join(b"%08x" % value for value in fields)
    entry = header + name.encode() + b"\0"
    entry += b"\0" * (-len(entry) % 4) + data
    return entry + b"\0" * (-len(entry) % 4)


def _read_newc(archive: bytes, wanted: str) -> bytes:
    """One file out of a newc cpio archive (what Debian's initrds are)."""
    offset = 0
    while archive[offset:offset + 6] == b"070701":
        size, name_size = int(archive[offset + 54:offset + 62], 16), int(archive[offset + 94:offset + 102], 16)
        name = archive[offset + 110:offset + 110 + name_size - 1].decode()
        start = (offset + 110 + name_size + 3) & ~3
        if name == wanted:
            return archive[start:start + size]
        if name == "TRAILER!!!":
            break
        offset = (start + size + 3) & ~3
    raise FileNotFoundError(f"{wanted} is not in the archive")


def lifecycle_initrd(target: Path) -> None:
    """A gzipped initrd of the host's busybox (and the libraries it links), the installer
    kernel's e1000 module, and LIFECYCLE_INIT as /init."""
    installer = gzip.decompress((INSTALLER / "initrd.gz").read_bytes())
    kernel_version = _installer_kernel_version(installer)
    module = _read_newc(installer, f"lib/modules/{kernel_version}/kernel/drivers/net/ethernet/intel/e1000/e1000.ko")
    busybox = shutil.which("busybox") or "/bin/busybox"
    libraries = re.findall(r"(/\S+) \(0x", run("ldd", busybox).stdout)
    files = {"init": (LIFECYCLE_INIT.encode(), 0o100755), "udhcpc.sh": (UDHCPC_SCRIPT.encode(), 0o100755),
             "e1000.ko": (module, 0o100644), "bin/busybox": (Path(busybox).read_bytes(), 0o100755)}
    for library in libraries:
        files[library.lstrip("/")] = (Path(library).read_bytes(), 0o100755)
    directories = sorted({str(Path(name).parents[i]) for name in files
                          for i in range(len(Path(name).parents) - 1)})
    archive = b"".join(_newc(name, b"", 0o040755) for name in directories)
    archive += _newc("dev", b"", 0o040755) + _newc("dev/console", b"", 0o020600, (5, 1))  # init's stdout
    archive += b"".join(_newc(name, data, mode) for name, (data, mode) in files.items())
    archive += _newc("TRAILER!!!", b"", 0)
    target.write_bytes(gzip.compress(archive, compresslevel=6))


def _installer_kernel_version(archive: bytes) -> str:
    match = re.search(rb"lib/modules/(\d[^/\0]*)/", archive)
    if match is None:
        raise FileNotFoundError("no lib/modules/<version>/ in the installer's initrd")
    return match.group(1).decode()
