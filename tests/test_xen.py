"""The whole life of domUs under a real Xen 4.17 dom0 (in QEMU), booted by pypxeboot from xl.

One lab run (pxeserver/lab/xen.py, also `pxeserver lab --xen`) for the module: hosts
registered through the API, their xl configs from `pxeserver domu-config` used unchanged,
a dom0 set up as the README says (pypxeboot fetched from GET /dom0/pypxeboot into
/usr/local/bin, its checksum compared with `pxeserver build-pypxeboot --print-sha256`).
Phases in one boot of dom0: web1 and web2 install side by side (two pypxeboots in dom0 at
once), then web1 boots its installed system through pygrub. The tests read the guests' consoles (xenconsoled's
logs), the bootloader logs, the server's timelines and statuses. When one fails, the run's
logs are copied to test-artifacts/xen/ and the message says where.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import REPO

from pxeserver.lab import image as lab_image
from pxeserver.lab.xen import SERVER_IP, LabRun, run_lab

TIMEOUT = 5400  # a cold build (debootstrap) and the boots, under software emulation


def _missing() -> str:
    if os.geteuid() != 0:
        return "needs root (network namespace, tap, chroot)"
    for tool in ("qemu-system-x86_64", "debootstrap", "mke2fs", "debugfs", "cpio", "curl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/debian-packages.txt)"
    if not lab_image.XEN_HYPERVISOR.exists() or not os.path.exists("/dev/net/tun"):
        return f"needs {lab_image.XEN_HYPERVISOR} and /dev/net/tun"
    return ""


pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.timeout(TIMEOUT),
    pytest.mark.skipif(bool(_missing()), reason=_missing() or "ok"),
]

ARTIFACTS = REPO / "test-artifacts" / "xen"


@pytest.fixture(scope="module")
def lab() -> Iterator[LabRun]:
    # Not under pytest's basetemp: other pytest runs on the machine prune it, even mid-run.
    workdir = Path(tempfile.mkdtemp(prefix="pxeserver-xen-lab-", dir="/var/tmp"))
    try:
        result = run_lab(REPO, workdir)
        print(f"\nxen lab: image {result.build_seconds:.0f} s, dom0 boot and scenario "
              f"{result.boot_seconds:.0f} s, logs in {result.workdir}")
        for seconds, step in result.milestones():
            print(f"{seconds:5d} {step}")
        yield result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def evidence(lab: LabRun) -> Iterator[None]:
    """On a failed assertion: keep the serial, guest, bootloader and server logs."""
    try:
        yield
    except AssertionError as exc:
        shutil.rmtree(ARTIFACTS, ignore_errors=True)
        ARTIFACTS.mkdir(parents=True)
        for name in ("serial.log", "serve.log", "serve.err", "qemu.log", "pxeserver.toml", "lab-disk", "out"):
            source = lab.workdir / name
            if source.is_dir():
                shutil.copytree(source, ARTIFACTS / name, symlinks=True)
            elif source.is_file():
                shutil.copy(source, ARTIFACTS / name)
        raise AssertionError(f"{exc}\n(logs kept in {ARTIFACTS}; the run was in {lab.workdir})") from None


def in_order(text: str, *needles: str) -> None:
    """Each needle occurs in ``text`` after the previous one."""
    position = 0
    for needle in needles:
        found = text.find(needle, position)
        assert found >= 0, f"{needle!r} not found after position {position} in:\n{text[-4000:]}"
        position = found + len(needle)


def timeline_text(lab: LabRun, hostname: str) -> str:
    return "\n".join(f"{e['source']}: {e['message']}" for e in lab.hosts[hostname].events)


def test_dom0_ran_every_phase(lab: LabRun) -> None:
    with evidence(lab):
        assert lab.qemu_exit == 0, f"QEMU exit {lab.qemu_exit} (None: killed at the timeout)"
        assert lab.dom0_result == "scenario ended with status 0", lab.serial[-3000:]
        assert "because of timeout" not in lab.scenario_log, (
            "libxl killed a hotplug script at its fixed 40 s: dom0 was too slow under emulation "
            f"(host load average {os.getloadavg()[0]:.0f} on {os.cpu_count()} cores):\n{lab.scenario_log}")
        in_order(lab.serial, "lab-dom0: ", "pypxeboot installed from http://", "lab-dom0: ", "xen started")
        in_order(lab.scenario_log, "phase install side by side: xl create web1 web2",
                 "phase local boot: xl create web1", "web1: xl create exited 0", "web1 has powered off",
                 "scenario done")
        for name in ("web1", "web2"):
            in_order(lab.scenario_log, "phase install side by side", f"{name}: xl create exited 0",
                     f"{name} has powered off", "phase local boot")
        assert "still running" not in lab.scenario_log
        assert "was not destroyed" not in lab.scenario_log, (
            "a domU powered off but xl's monitor (on_poweroff = destroy) had died; look for "
            f"'traps: xl' in serial.log:\n{lab.scenario_log}")


def test_the_xl_config_is_domu_configs_output_unchanged(lab: LabRun) -> None:
    with evidence(lab):
        built = subprocess.run([sys.executable, "-m", "pxeserver", "build-pypxeboot", "-o",
                                str(lab.workdir / "pypxeboot.again"), "--print-sha256"],
                               capture_output=True, text=True, timeout=60, check=True).stdout.split()[0]
        # What dom0 ran: the file GET /dom0/pypxeboot served, as `sha256sum` saw it in dom0.
        assert (lab.out / "pypxeboot.sha256").read_text().split() == [built, "/usr/local/bin/pypxeboot"]
        for host in lab.hosts.values():
            assert host.mac.startswith("00:16:3e:")
            written = subprocess.run(
                [sys.executable, "-m", "pxeserver", "--config", str(lab.workdir / "pxeserver.toml"),
                 "domu-config", host.mac], capture_output=True, text=True, timeout=60, check=True).stdout
            assert host.domu_config == written
            # The path the README installs pypxeboot at on a dom0; xl ran it from there.
            assert 'bootloader = "/usr/local/bin/pypxeboot"' in written


def test_first_create_installs_through_pypxeboot(lab: LabRun) -> None:
    web1 = lab.hosts["web1"]
    with evidence(lab):
        said = f"pypxeboot: {web1.mac} boots 'install' from tftp://{SERVER_IP}/pxelinux.cfg/01-"
        assert said in lab.bootloader_logs()
        console = lab.console("web1")
        in_order(console, "pxeserver-lab: lease 10.77.0.",
                 f"pxeserver-lab: preseed http://{SERVER_IP}/preseed/{web1.mac.replace(':', '-')}: ",
                 "pxeserver-lab: installed system written to xvda",
                 '''pxeserver-lab: install-complete call answered: {"hostname":"web1"''')
        assert "FAILED" not in console
        assert web1.status == "installed"


def test_second_create_boots_the_installed_system_through_pygrub(lab: LabRun) -> None:
    with evidence(lab):
        # lab.role=installed is only in the grub.cfg the installer wrote onto xvda.
        in_order(lab.console("web1"), "pxeserver-lab: install-complete call answered",
                 "pxeserver-lab: installed system up on ")
        logs = lab.bootloader_logs()
        in_order(logs, f"pypxeboot: {lab.hosts['web1'].mac} boots 'local' from tftp://{SERVER_IP}/pxelinux.cfg/01-",
                 "Using <class 'grub.GrubConf.Grub2ConfigFile'> to parse /boot/grub/grub.cfg")


def test_the_timeline_shows_every_step_of_both_boots(lab: LabRun) -> None:
    web1 = lab.hosts["web1"]
    dashed = web1.mac.replace(":", "-")
    with evidence(lab):
        timeline = timeline_text(lab, "web1")
        in_order(timeline,
                 "dhcp: ACK 10.77.0.",  # pypxeboot's, from dom0
                 f"tftp: sent pxelinux.cfg/01-{dashed}",
                 "tftp: sent images/lab-installer/vmlinuz", "to 10.77.0.2, which fetched this host's boot config",
                 "tftp: sent images/lab-installer/initrd.img", "to 10.77.0.2, which fetched this host's boot config",
                 "dhcp: ACK 10.77.0.",  # the installer's, from the domU
                 "http: served preseed debian-xen.cfg to 10.77.0.",
                 "callback: install complete; next boot is local",
                 f"tftp: sent pxelinux.cfg/01-{dashed}")  # the second boot: localboot
        assert "status netbooting -> installing" in timeline
        assert timeline.count("tftp: sent images/lab-installer/vmlinuz") == 1


def test_two_domus_created_at_once_both_install(lab: LabRun) -> None:
    with evidence(lab):
        leases = set()
        logs = lab.bootloader_logs()
        for name in ("web1", "web2"):
            host = lab.hosts[name]
            console = lab.console(name)
            in_order(console, "pxeserver-lab: lease 10.77.0.", "pxeserver-lab: install-complete call answered")
            leases.add(re.search(r"pxeserver-lab: lease (\S+)", console).group(1))
            assert host.status == "installed", name
            timeline = timeline_text(lab, name)
            for file in ("vmlinuz", "initrd.img"):
                assert timeline.count(f"tftp: sent images/lab-installer/{file}") == 1, (name, timeline)
            # Its own config: a pypxeboot that took the other's DHCP reply would not ask for it.
            dashed = host.mac.replace(":", "-")
            assert f"pypxeboot: {host.mac} boots 'install' from tftp://{SERVER_IP}/pxelinux.cfg/01-{dashed}" in logs
        assert len(leases) == 2, leases
