"""Real firmware network-boots Debian's installer from `pxeserver serve`.

Each test builds a lab (tests/firmware_support.py): network namespaces, a bridge and a tap,
`pxeserver serve` with DHCP (full mode), TFTP, HTTP and DNS, and a QEMU guest under software
emulation whose firmware does the booting: SeaBIOS with iPXE (Debian's ipxe-qemu ROM), iPXE
chained to pxelinux over TFTP, OVMF with iPXE's EFI driver and with its own PXE. The guest boots
Debian's real netboot installer (debian-installer-12-netboot-amd64), which fetches the host's
preseed; with no mirror it goes no further, so the tests assert on the preseed fetch, the
status and the timeline. A failing test keeps the serial consoles and the server log under
test-artifacts/.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from dhcp_support import can_make_namespaces, run
from firmware_support import Guest, Lab, artifacts_on_failure, guest, lab, lifecycle_initrd, serving, wait_for

from pxeserver.lab.firmware import BRIDGE, GUEST_IP, GUEST_MAC, SERVER_IP, copy_installer, missing_packages

pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.skipif(not can_make_namespaces(), reason="needs root for network namespaces"),
    pytest.mark.timeout(600),
    pytest.mark.skipif(bool(missing_packages()), reason=f"needs Debian packages {' '.join(missing_packages())}"),
]

MAC = GUEST_MAC
DASHED = MAC.replace(":", "-")
INSTALLER_TIMEOUT = 420  # seconds from power-on to the preseed fetch, under TCG on a busy machine


def register_installer(the_lab: Lab) -> None:
    kernel, initrd = copy_installer(the_lab.tftproot)
    the_lab.cli("profile", "add", "debian12", "--kernel", kernel, "--initrd", initrd,
                "--append", "console=ttyS0", "--autoinstall", "debian-xen.cfg")
    the_lab.cli("host", "add", "--mac", MAC, "--hostname", "web1", "--profile", "debian12", "--ip", GUEST_IP)


def wait_installing(the_lab: Lab, machine: Guest) -> None:
    """The installer has fetched the host's preseed: the status says so."""
    wait_for(lambda: True if the_lab.status(MAC) == "installing" else None, INSTALLER_TIMEOUT,
             "the installer to fetch its preseed", alive=machine.process, interval=3)


def messages(the_lab: Lab) -> list[str]:
    return [f"{e['source']}: {e['message']}" for e in the_lab.events(MAC)]


def assert_in_order(timeline: list[str], *steps: str) -> None:
    """Each step is the start of some event, in this order."""
    position = -1
    for step in steps:
        found = [i for i, line in enumerate(timeline) if line.startswith(step) and i > position]
        assert found, (step, timeline)
        position = found[0]


def test_bios_ipxe_boots_the_installer_through_the_ipxe_script(tmp_path: Path) -> None:
    with lab("fwipxe", tmp_path) as the_lab, artifacts_on_failure(the_lab, "bios-ipxe"):
        register_installer(the_lab)
        with serving(the_lab, "bios-ipxe"), guest(the_lab, "bios-ipxe", MAC) as machine:
            wait_installing(the_lab, machine)
            timeline = messages(the_lab)
        assert_in_order(timeline,
                        f"dhcp: ACK {GUEST_IP}, boot file http://{SERVER_IP}/ipxe/{DASHED}",
                        f"http: served iPXE script to {GUEST_IP}",
                        "http: downloaded /boot/images/debian12/linux",
                        "http: downloaded /boot/images/debian12/initrd.gz",
                        f"dhcp: ACK {GUEST_IP}, boot file",  # the installer's own DHCP
                        f"http: served preseed debian-xen.cfg to {GUEST_IP}")
        console = machine.console_text()
        assert "iPXE" in console and "Linux version" in console, console[-2000:]


def test_bios_ipxe_chained_to_pxelinux_boots_the_installer_over_tftp(tmp_path: Path) -> None:
    with lab("fwpxl", tmp_path, ipxe_chain="pxelinux") as the_lab, \
            artifacts_on_failure(the_lab, "bios-pxelinux"):
        register_installer(the_lab)
        with serving(the_lab, "bios-pxelinux"), guest(the_lab, "bios-pxelinux", MAC) as machine:
            wait_installing(the_lab, machine)
            timeline = messages(the_lab)
        assert_in_order(timeline,
                        f"dhcp: ACK {GUEST_IP}, boot file pxelinux.0",
                        "tftp: sent pxelinux.0",
                        "tftp: sent ldlinux.c32",
                        f"tftp: sent pxelinux.cfg/01-{DASHED}",
                        "tftp: sent images/debian12/linux",
                        "tftp: sent images/debian12/initrd.gz",
                        f"http: served preseed debian-xen.cfg to {GUEST_IP}")
        assert not any("iPXE script" in line for line in timeline), timeline
        console = machine.console_text()
        assert "PXELINUX" in console and "Linux version" in console, console[-2000:]


def test_uefi_ipxe_boots_the_installer_through_the_ipxe_script(tmp_path: Path) -> None:
    with lab("fwuipxe", tmp_path) as the_lab, artifacts_on_failure(the_lab, "uefi-ipxe"):
        register_installer(the_lab)
        with serving(the_lab, "uefi-ipxe"), guest(the_lab, "uefi-ipxe", MAC, uefi=True, nic="virtio") as machine:
            wait_installing(the_lab, machine)
            timeline = messages(the_lab)
        assert_in_order(timeline,
                        f"dhcp: ACK {GUEST_IP}, boot file http://{SERVER_IP}/ipxe/{DASHED}",
                        f"http: served iPXE script to {GUEST_IP}",
                        "http: downloaded /boot/images/debian12/linux",
                        "http: downloaded /boot/images/debian12/initrd.gz",
                        f"http: served preseed debian-xen.cfg to {GUEST_IP}")
        console = machine.console_text()
        assert "iPXE" in console and "Linux version" in console, console[-2000:]


def test_uefi_firmware_pxe_boots_the_installer_through_syslinux_efi(tmp_path: Path) -> None:
    with lab("fwupxe", tmp_path) as the_lab, artifacts_on_failure(the_lab, "uefi-pxe"):
        register_installer(the_lab)
        with serving(the_lab, "uefi-pxe"), guest(the_lab, "uefi-pxe", MAC, uefi=True, nic="virtio",
                                     option_rom=False) as machine:
            wait_installing(the_lab, machine)
            timeline = messages(the_lab)
        assert_in_order(timeline,
                        f"dhcp: ACK {GUEST_IP}, boot file syslinux.efi",
                        "tftp: sent syslinux.efi",
                        "tftp: sent ldlinux.e64",
                        f"tftp: sent pxelinux.cfg/01-{DASHED}",
                        "tftp: sent images/debian12/linux",
                        "tftp: sent images/debian12/initrd.gz",
                        f"http: served preseed debian-xen.cfg to {GUEST_IP}")
        console = machine.console_text()
        assert "Linux version" in console, console[-2000:]


def test_lifecycle_in_seconds_installed_then_the_next_netboot_is_local(tmp_path: Path) -> None:
    """A stand-in installer (busybox in a tiny initrd the test builds, on the installer's
    kernel) fetches the preseed, calls its callback and powers off; the same guest's next
    network boot gets the local-boot answer."""
    with lab("fwlife", tmp_path) as the_lab, artifacts_on_failure(the_lab, "lifecycle"):
        kernel, _ = copy_installer(the_lab.tftproot)
        lifecycle_initrd(the_lab.tftproot / "images" / "debian12" / "tiny.gz")
        the_lab.cli("profile", "add", "tiny", "--kernel", kernel, "--initrd", "images/debian12/tiny.gz",
                    "--append", "console=ttyS0 panic=1", "--autoinstall", "debian-xen.cfg")
        the_lab.cli("host", "add", "--mac", MAC, "--hostname", "web1", "--profile", "tiny", "--ip", GUEST_IP)
        with serving(the_lab, "lifecycle"):
            with guest(the_lab, "install", MAC, memory=512) as machine:
                assert machine.wait_exit(timeout=300) == 0, machine.console_text()[-2000:]
            console = machine.console_text()
            assert "lifecycle: callback answered" in console and '"installed"' in console, console[-2000:]
            assert the_lab.status(MAC) == "installed"
            before = len(the_lab.events(MAC))

            with guest(the_lab, "localboot", MAC, memory=512) as machine:
                wait_for(lambda: True if any(e["message"].startswith("served iPXE script")
                                             for e in the_lab.events(MAC)[before:]) else None,
                         180, "the second boot's iPXE script", alive=machine.process, interval=2)
                # iPXE ran the script's `exit`: the firmware goes on to its next boot device.
                machine.wait_console("No bootable device", 120)
            timeline = messages(the_lab)
            assert the_lab.http_get(f"ipxe/{DASHED}") == "#!ipxe\nexit\n"
            assert "localboot 0" in the_lab.tftp_get(f"pxelinux.cfg/01-{DASHED}")
        assert_in_order(timeline,
                        f"dhcp: ACK {GUEST_IP}, boot file http://{SERVER_IP}/ipxe/{DASHED}",
                        f"http: served iPXE script to {GUEST_IP}",
                        "http: downloaded /boot/images/debian12/tiny.gz",
                        f"http: served preseed debian-xen.cfg to {GUEST_IP}",
                        "callback: install complete",
                        f"dhcp: ACK {GUEST_IP}, boot file http://{SERVER_IP}/ipxe/{DASHED}",
                        f"http: served iPXE script to {GUEST_IP}")
        installed = next(i for i, line in enumerate(timeline) if line.startswith("callback: install complete"))
        assert not any(line.startswith("http: downloaded") for line in timeline[installed:]), timeline


def test_pypxeboot_gets_its_lease_on_the_same_bridge(tmp_path: Path) -> None:
    """pypxeboot's DHCP client, as xl runs it in dom0 on the guests' bridge with the guest's
    MAC (no firmware here: its exchange joins the golden captures)."""
    with lab("fwpxb", tmp_path) as the_lab, artifacts_on_failure(the_lab, "pypxeboot"):
        register_installer(the_lab)
        with serving(the_lab, "pypxeboot"):
            lease = run(*the_lab.net.in_guests(
                sys.executable, "-c", "import dataclasses, json, sys, time; from pxeserver.mac import MacAddress; "
                "from pxeserver.pypxeboot.dhcp import obtain_lease; "
                "print(json.dumps(dataclasses.asdict(obtain_lease(MacAddress.parse(sys.argv[1]), sys.argv[2], "
                "sys.argv[3], time.monotonic() + 30))))",
                MAC, BRIDGE, SERVER_IP), timeout=60).stdout
        assert json.loads(lease) == {"ip": GUEST_IP, "next_server": SERVER_IP, "boot_file": "pxelinux.0"}
