"""Writes each host's ``pxelinux.cfg/01-<mac>`` file, one file per change.

The TFTP service answers ``pxelinux.cfg/`` names from the boot policy itself; these files are
for interoperability (another TFTP server, a look with ``cat``). A change rewrites only the
changed host's file (Cobbler re-syncs every file on every change: minutes at a thousand hosts),
atomically: a temporary file in the same directory, then rename. A host whose netboot is off
gets a local-boot file, never a deleted one, which would drop it through to ``default``.

A file is always written from the host as the registry holds it at that moment, under a lock
on the directory (flock, so the CLI in another process takes it too): whichever change writes
last writes the newest state, never a copy read before a concurrent callback.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pxeserver import pxelinux
from pxeserver.mac import MacAddress
from pxeserver.policy import BootPolicy
from pxeserver.registry import Change, Host


class BootConfigWriter:
    def __init__(self, tftp_root: Path, policy: BootPolicy) -> None:
        self.directory = tftp_root / "pxelinux.cfg"
        self.policy = policy

    def host_path(self, mac: MacAddress) -> Path:
        return self.directory / mac.pxelinux_name

    def sync_host(self, mac: MacAddress) -> None:
        """Make the host's file match the registry now; remove it if the host is gone."""
        with self._locked():
            host = self.policy.host(mac)
            if host is None:
                self.host_path(mac).unlink(missing_ok=True)
            else:
                self._write_host(host)

    def sync_profile(self, name: str) -> None:
        """Rewrite the files of every host that boots this profile (and ``default`` if it is
        the default profile)."""
        for host in self.policy.store.list_hosts():
            if host.profile == name:
                self.sync_host(host.mac)
        if self.policy.config.boot.default_profile == name:
            self.write_default()

    def apply(self, change: Change) -> None:
        """Another node changed the shared registry: make this node's files match it."""
        if change.kind == "host":
            self.sync_host(MacAddress.parse(change.key))
        elif change.kind == "profile":
            self.sync_profile(change.key)
        elif change.kind == "all":
            hosts = self.policy.store.list_hosts()
            for host in hosts:
                self.sync_host(host.mac)
            self.write_default()
            registered = {host.mac.pxelinux_name for host in hosts}
            with self._locked():
                for path in self.directory.glob("01-*"):
                    if path.name not in registered:
                        path.unlink(missing_ok=True)

    def _write_host(self, host: Host) -> Path:
        spec = self.policy.host_spec(host)
        text = pxelinux.render(spec, comment=f"{host.hostname} ({host.mac}), written by pxeserver")
        return self._write(self.host_path(host.mac), text)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def write_default(self) -> Path:
        spec = self.policy.default_spec()
        text = pxelinux.render(spec, comment="unknown hosts, written by pxeserver")
        return self._write(self.directory / "default", text)

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
