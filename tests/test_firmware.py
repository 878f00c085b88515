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

from pathlib import Path

import pytest
from dhcp_support import can_make_namespaces
from firmware_support import (SERVER_IP, Guest, Lab, add_installer, artifacts_on_failure, guest, lab, missing_tools,
                              serving, wait_for)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.skipif(not can_make_namespaces(), reason="needs root for network namespaces"),
    pytest.mark.skipif(bool(missing_tools()), reason=f"needs Debian packages {' '.join(missing_tools())}"),
]

MAC = "52:54:00:12:00:01"
GUEST_IP = "10.77.12.50"
DASHED = MAC.replace(":", "-")
INSTALLER_TIMEOUT = 420  # seconds from power-on to the preseed fetch, under TCG on a busy machine


def register_installer(the_lab: Lab) -> None:
    kernel, initrd = add_installer(the_lab)
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
        with serving(the_lab), guest(the_lab, "bios-ipxe", MAC) as machine:
            wait_installing(the_lab, machine)
            timeline = messages(the_lab)
        assert_in_order(timeline,
                        f"dhcp: ACK {GUEST_IP}, boot file http://{SERVER_IP}/ipxe/{DASHED}",
                        "http: served iPXE script",
                        "http: downloaded /boot/images/debian12/linux",
                        "http: downloaded /boot/images/debian12/initrd.gz",
                        f"dhcp: ACK {GUEST_IP}, boot file",  # the installer's own DHCP
                        f"http: served preseed debian-xen.cfg to {GUEST_IP}")
        console = machine.console_text()
        assert "iPXE" in console and "Linux version" in console, console[-2000:]


def test_bios_ipxe_chained_to_pxelinux_boots_the_installer_over_tftp(tmp_path: Path) -> None:
    with lab("fwpxl", tmp_path, boot='ipxe_chain = "pxelinux"') as the_lab, \
            artifacts_on_failure(the_lab, "bios-pxelinux"):
        register_installer(the_lab)
        with serving(the_lab), guest(the_lab, "bios-pxelinux", MAC) as machine:
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
