"""The whole boot chain against one `pxeserver serve`, as a domU on a Xen bridge sees it.

The server runs in its own network namespace with DHCP, DNS, TFTP and HTTP enabled; the
"domU" is a second namespace joined by a veth pair, with a registered 00:16:3e MAC. Every
step uses the real client a guest or pypxeboot would: busybox udhcpc, the tftp-hpa client,
curl, dig. Then the install-complete callback the preseed carries, and the next boot is local.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import REPO
from dhcp_support import (
    CLIENT_IF,
    RELAY_IP,
    SERVER_IF,
    SERVER_IP,
    Link,
    can_make_namespaces,
    guest_curl,
    guest_tftp_get,
    udhcpc,
    veth_link,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.skipif(not can_make_namespaces(), reason="needs root for network namespaces"),
]

MAC = "00:16:3e:12:34:56"
GUEST_IP = "10.77.0.50"


def cli(workdir: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "pxeserver", *args], cwd=workdir,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def dig(link: Link, *args: str) -> str:
    return link.in_client("dig", f"@{SERVER_IP}", "+short", "+time=2", "+tries=2", *args).stdout.strip()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    images = tmp_path / "tftproot" / "images" / "debian12"
    images.mkdir(parents=True)
    (images / "linux").write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    (images / "initrd.gz").write_bytes(bytes(reversed(range(256))) * 12288)  # 3 MiB
    shutil.copy("/usr/lib/PXELINUX/pxelinux.0", tmp_path / "tftproot" / "pxelinux.0")
    (tmp_path / "pxeserver.toml").write_text(
        f'[server]\naddress = "{SERVER_IP}"\n'
        f'kickstarts = "{REPO / "kickstarts"}"\npreseeds = "{REPO / "preseeds"}"\n'
        f'[dhcp]\nenabled = true\ninterface = "{SERVER_IF}"\nsubnet = "10.77.0.0/24"\n'
        f'router = "{SERVER_IP}"\n'
        '[dns]\nenabled = true\ndomain = "lab.example"\n'
    )
    return tmp_path


@contextmanager
def serving(link: Link, workdir: Path) -> Iterator[list[str]]:
    """`pxeserver serve` inside the server namespace; stopped with SIGTERM, which must be clean.

    Yields a list that holds the server's log lines once the block has ended."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", link.server_ns, sys.executable, "-m", "pxeserver", "serve"],
        cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = []
        for line in server.stdout:
            banner.append(line)
            if line.startswith("pxeserver: next:"):
                break
        assert any("dhcp listening" in line for line in banner), (banner, server.stderr.read())
        log: list[str] = []
        yield log
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    stderr = server.stderr.read()
    assert code == 0 and "Traceback" not in stderr, stderr
    log.extend(stderr.splitlines())


def register(workdir: Path) -> None:
    cli(workdir, "profile", "add", "debian12", "--kernel", "images/debian12/linux",
        "--initrd", "images/debian12/initrd.gz", "--append", "console=hvc0",
        "--autoinstall", "debian-xen.cfg")
    cli(workdir, "host", "add", "--mac", MAC, "--hostname", "web1", "--profile", "debian12", "--ip", GUEST_IP)


def test_a_guest_goes_from_dhcp_to_installed_and_then_boots_locally(workdir: Path) -> None:
    register(workdir)
    with veth_link("chain") as link, serving(link, workdir) as log:
        link.set_client_mac(MAC)
        # 1. DHCP, as the original pypxeboot's udhcpc reads it.
        lease = udhcpc(link, workdir)
        assert lease is not None, "no DHCP lease"
        assert (lease["ip"], lease["siaddr"], lease["boot_file"]) == (GUEST_IP, SERVER_IP, "pxelinux.0")
        assert (lease["hostname"], lease["dns"], lease["domain"]) == ("web1", SERVER_IP, "lab.example")
        link.in_client("ip", "addr", "add", f"{GUEST_IP}/24", "dev", CLIENT_IF)

        # 2. TFTP: the boot loader, then the config by the MAC as a user typed it.
        assert guest_tftp_get(link, workdir, "pxelinux.0") == Path("/usr/lib/PXELINUX/pxelinux.0").read_bytes()
        config = guest_tftp_get(link, workdir, "pxelinux.cfg/01-00-16-3E-12-34-56").decode()
        append = dict(w.split("=", 1) for w in re.search(r"append (.*)", config).group(1).split())
        kernel = re.search(r"kernel (\S+)", config).group(1)
        assert guest_tftp_get(link, workdir, kernel) == (workdir / "tftproot" / kernel).read_bytes()
        guest_curl(link, "-o", str(workdir / "initrd"), f"http://{SERVER_IP}/boot/{append['initrd']}")
        assert (workdir / "initrd").read_bytes() == (workdir / "tftproot" / append["initrd"]).read_bytes()

        # 3. The installer: its name service and its preseed.
        assert dig(link, "web1.lab.example") == GUEST_IP
        assert dig(link, "-x", GUEST_IP) == "web1.lab.example."
        assert append["url"] == f"http://{SERVER_IP}/preseed/00-16-3e-12-34-56"
        # Another machine on the bridge (the namespace's first address) gets nothing.
        status = ("-s", "-o", "/dev/null", "-w", "%{http_code}", "--interface", RELAY_IP)
        assert link.in_client("curl", *status, append["url"]).stdout == "403"
        preseed = guest_curl(link, "--interface", GUEST_IP, append["url"])
        assert "d-i partman-auto/disk string /dev/xvda" in preseed
        callback = re.search(r"curl -fsS -X POST '([^']+)'", preseed).group(1)
        assert json.loads(cli(workdir, "host", "show", MAC))["status"] == "installing"

        # 4. Install done: the callback, once, from the guest; the next boot is local.
        assert link.in_client("curl", *status, "-X", "POST", callback).stdout == "403"
        assert json.loads(cli(workdir, "host", "show", MAC))["status"] == "installing"
        assert json.loads(guest_curl(link, "--interface", GUEST_IP, "-X", "POST", callback))["status"] == "installed"
        replay = link.in_client("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--interface", GUEST_IP,
                                "-X", "POST", callback)
        assert replay.stdout == "403"
        assert "localboot 0" in guest_tftp_get(link, workdir, "pxelinux.cfg/01-00-16-3e-12-34-56").decode()

        events = json.loads(guest_curl(link, f"http://{SERVER_IP}/api/hosts/{MAC}/events"))
        sources = [e["source"] for e in events]
        for earlier, later in (("dhcp", "tftp"), ("tftp", "http"), ("http", "callback")):
            assert sources.index(earlier) < sources.index(later), sources
        assert [e["time"] for e in events] == sorted(e["time"] for e in events)
    # One log line per boot event, as `pxeserver serve` promises.
    for expected in (f"dhcp {MAC}: ACK {GUEST_IP}, boot file pxelinux.0", "tftp: sent pxelinux.0 to",
                     f"http {MAC}: served preseed debian-xen.cfg", f"callback {MAC}: install complete"):
        assert sum(expected in line for line in log) == 1, (expected, log)


def installed_disk(directory: Path) -> Path:
    """An ext2 image holding an installed system's /boot, as pygrub reads a domU's disk."""
    root = directory / "disk-root"
    (root / "boot" / "grub").mkdir(parents=True)
    (root / "boot" / "vmlinuz-6.1").write_bytes(b"installed kernel" * 4096)
    (root / "boot" / "initrd.img-6.1").write_bytes(b"installed initrd" * 2048)
    (root / "boot" / "grub" / "grub.cfg").write_text(
        "set default=0\nset timeout=0\nmenuentry 'Debian GNU/Linux' {\n"
        "  linux /boot/vmlinuz-6.1 root=/dev/xvda1 ro console=hvc0\n  initrd /boot/initrd.img-6.1\n}\n")
    image = directory / "disk.img"
    subprocess.run(["mke2fs", "-q", "-t", "ext2", "-d", str(root), str(image), "8M"], check=True)
    return image


def xl_runs_pypxeboot(link: Link, out: Path, disk: Path) -> dict[str, str]:
    """pypxeboot invoked as libxl invokes a bootloader, in the guest's namespace."""
    out.mkdir(exist_ok=True)
    result_file = out / "result"
    result_file.touch()  # libxl creates the output file before it starts the bootloader
    result = link.in_client(str(Path(sys.executable).parent / "pypxeboot"), f"--output={result_file}",
                            "--output-format=simple0", f"--output-directory={out}",
                            f"mac={MAC.upper()}", f"interface={CLIENT_IF}", str(disk), check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    fields = result_file.read_bytes().decode().rstrip("\0").split("\0")
    return dict(field.split(" ", 1) for field in fields)


def test_xl_s_view_pypxeboot_netboots_the_installer_then_hands_over_to_pygrub(workdir: Path) -> None:
    register(workdir)
    disk = installed_disk(workdir)
    with veth_link("pxb") as link, serving(link, workdir):
        netboot = xl_runs_pypxeboot(link, workdir / "run1", disk)
        assert Path(netboot["kernel"]).read_bytes() == (workdir / "tftproot/images/debian12/linux").read_bytes()
        assert Path(netboot["ramdisk"]).read_bytes() == (workdir / "tftproot/images/debian12/initrd.gz").read_bytes()
        assert "url=http://10.77.0.1/preseed/00-16-3e-12-34-56" in netboot["args"]
        assert json.loads(cli(workdir, "host", "show", MAC))["status"] == "netbooting"

        cli(workdir, "host", "netboot", MAC, "off")
        local = xl_runs_pypxeboot(link, workdir / "run2", disk)
        assert Path(local["kernel"]).read_bytes() == b"installed kernel" * 4096
        assert Path(local["ramdisk"]).read_bytes() == b"installed initrd" * 2048
        assert local["args"] == "root=/dev/xvda1 ro console=hvc0"
