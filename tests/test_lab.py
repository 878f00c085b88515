"""`pxeserver lab`: what a newcomer runs first.

It says in one line what is missing; it shows the guest's serial console and the host's
timeline in the terminal while the guest boots; Ctrl-C tears everything down: no namespace,
no QEMU, no server left behind.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from dhcp_support import can_make_namespaces, run
from firmware_support import wait_for

from pxeserver.lab.firmware import GUEST_IP, SERVER_IP, missing_packages

PXESERVER = [sys.executable, "-m", "pxeserver"]


@pytest.mark.skipif(not can_make_namespaces(), reason="the root check comes first")
def test_a_missing_package_is_named_in_one_line_with_how_to_get_it(tmp_path: Path) -> None:
    # A PATH without QEMU (sys.executable is absolute, so pxeserver itself still runs).
    result = subprocess.run([*PXESERVER, "lab"], env={"PATH": str(tmp_path)}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "pxeserver lab: missing qemu-system-x86: apt-get install qemu-system-x86"], result.stderr


def lab_processes(pid: int) -> list[str]:
    """Namespaces, and processes in them, that a `pxeserver lab` of this pid left."""
    names = [name.split()[0] for name in run("ip", "netns", "list").stdout.splitlines()
             if name.startswith(f"pxelab-{pid}-")]
    return names + [f"{name}: pid {p}" for name in names for p in run("ip", "netns", "pids", name).stdout.split()]


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.skipif(not can_make_namespaces(), reason="needs root for network namespaces")
@pytest.mark.skipif(bool(missing_packages()), reason="needs the QEMU lab's Debian packages")
@pytest.mark.timeout(300)
def test_the_lab_shows_console_and_timeline_and_ctrl_c_removes_it_all(tmp_path: Path) -> None:
    output = tmp_path / "terminal"
    with open(output, "wb") as terminal, open(tmp_path / "stderr", "wb") as errors:
        lab = subprocess.Popen([*PXESERVER, "lab"], stdout=terminal, stderr=errors)
    try:
        shown = lambda: output.read_bytes().decode(errors="replace")  # noqa: E731
        wait_for(lambda: True if "-> netbooting" in shown() else None, 240,
                 "the guest to netboot in the lab's terminal", alive=lab)
        lab.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert lab.wait(timeout=60) == 130
    finally:
        if lab.poll() is None:
            lab.kill()
            lab.wait(timeout=30)
    terminal_text = shown()
    assert "iPXE" in terminal_text  # the guest's firmware on its serial console
    assert f"dhcp: ACK {GUEST_IP}, boot file http://{SERVER_IP}/ipxe/" in terminal_text  # the timeline
    assert "lab removed" in (tmp_path / "stderr").read_text()
    assert lab_processes(lab.pid) == []
