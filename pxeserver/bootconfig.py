"""Writes each host's ``pxelinux.cfg/01-<mac>`` file, one file per change.

The TFTP service answers ``pxelinux.cfg/`` names from the boot policy itself; these files are
for interoperability (another TFTP server, a look with ``cat``). A change rewrites only the
changed host's file (Cobbler re-syncs every file on every change: minutes at a thousand hosts),
atomically: a temporary file in the same directory, then rename. A host whose netboot is off
gets a local-boot file, never a deleted one, which would drop it through to ``default``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pxeserver import pxelinux
from pxeserver.mac import MacAddress
from pxeserver.policy import BootPolicy
from pxeserver.registry import Host


class BootConfigWriter:
    def __init__(self, tftp_root: Path, policy: BootPolicy) -> None:
        self.directory = tftp_root / "pxelinux.cfg"
        self.policy = policy

    def host_path(self, mac: MacAddress) -> Path:
        return self.directory / mac.pxelinux_name

    def write_host(self, host: Host) -> Path:
        spec = self.policy.host_spec(host)
        text = pxelinux.render(spec, comment=f"{host.hostname} ({host.mac}), written by pxeserver")
        return self._write(self.host_path(host.mac), text)

    def remove_host(self, mac: MacAddress) -> None:
        self.host_path(mac).unlink(missing_ok=True)

    def write_default(self) -> Path:
        spec = self.policy.default_spec()
        return self._write(self.directory / "default", pxelinux.render(spec, comment="unknown hosts, written by pxeserver"))

    def _write(self, path: Path, text: str) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as file:
                file.write(text)
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path
