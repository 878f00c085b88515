"""contrib/pxeserver.service: systemd accepts it without a warning, and it grants what the
services need (privileged ports, DHCP on its interface) and little else."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

UNIT = REPO / "contrib" / "pxeserver.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze missing: scripts/setup "
                                                        "installs Debian's systemd package")


def settings() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in UNIT.read_text().splitlines()
             if "=" in line and not line.startswith("#"))
    return {key: value for key, value in pairs}


def installed_copy(tmp_path: Path) -> Path:
    """The unit as installed with pxeserver where this test runs (verify checks ExecStart)."""
    pxeserver = Path(shutil.which("pxeserver") or REPO / ".venv" / "bin" / "pxeserver")
    assert pxeserver.is_file()
    copy = tmp_path / "pxeserver.service"
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/pxeserver", str(pxeserver)))
    return copy


@needs_analyze
def test_systemd_analyze_verify_accepts_the_unit_without_a_warning(tmp_path: Path) -> None:
    done = subprocess.run([ANALYZE, "verify", str(installed_copy(tmp_path))],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stdout + done.stderr


@needs_analyze
def test_a_unit_with_a_mistake_is_caught_by_the_same_check(tmp_path: Path) -> None:
    copy = installed_copy(tmp_path)
    copy.write_text(copy.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"))
    done = subprocess.run([ANALYZE, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert "Unknown key" in done.stdout + done.stderr


@needs_analyze
def test_the_unit_restarts_on_failure_and_is_sandboxed(tmp_path: Path) -> None:
    unit = settings()
    assert unit["ExecStart"] == "/usr/local/bin/pxeserver serve"
    assert unit["Restart"] == "on-failure"
    needed = {"CAP_NET_BIND_SERVICE", "CAP_NET_RAW", "CAP_NET_ADMIN"}
    assert set(unit["AmbientCapabilities"].split()) == needed
    assert set(unit["CapabilityBoundingSet"].split()) == needed
    assert (unit["NoNewPrivileges"], unit["ProtectSystem"], unit["ProtectHome"],
            unit["PrivateTmp"]) == ("yes", "strict", "yes", "yes")
    assert unit["ReadWritePaths"] == "/srv/tftp/pxelinux.cfg" and unit["StateDirectory"] == "pxeserver"
    assert set(unit["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}
    done = subprocess.run([ANALYZE, "security", "--offline=true", str(installed_copy(tmp_path))],
                          capture_output=True, text=True, timeout=60)
    exposure = re.search(r"Overall exposure level for pxeserver.service: ([0-9.]+)", done.stdout)
    assert exposure is not None, done.stdout + done.stderr
    assert float(exposure.group(1)) <= 2.5, done.stdout


def test_the_sample_configuration_is_valid_and_writes_only_where_the_unit_allows() -> None:
    from pxeserver import config

    sample = config.load(REPO / "contrib" / "pxeserver.toml")
    unit = settings()
    assert sample.data_dir == Path("/var/lib") / unit["StateDirectory"]
    assert sample.tftp_root / "pxelinux.cfg" == Path(unit["ReadWritePaths"])
    assert Path(sample.database).parent == sample.data_dir
    assert unit["Environment"] == "PXESERVER_CONFIG=/etc/pxeserver/pxeserver.toml"
