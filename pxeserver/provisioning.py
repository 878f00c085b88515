"""The write side of the registry: every change made through the API or the CLI.

It validates input into models, stores them, and rewrites the one bootloader config file the
change affects. The API and the CLI are thin shells over it, so both accept and refuse exactly
the same things.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from pxeserver.bootconfig import BootConfigWriter
from pxeserver.mac import MacAddress
from pxeserver.policy import BootPolicy, SecretRefused, status_change
from pxeserver.registry import BootFile, Conflict, Host, NotFound, Profile, Status, Store, ValidationError, XenSettings
from pxeserver.registry.models import HostChanges, XenDisk, parse_mac


class InvalidToken(PermissionError):
    """The install-complete callback presented a wrong or used-up token."""


class Provisioning:
    def __init__(self, store: Store, policy: BootPolicy, writer: BootConfigWriter) -> None:
        self.store = store
        self.policy = policy
        self.writer = writer

    # -- profiles -------------------------------------------------------------------------

    def check_profile(self, data: Any) -> Profile:
        """The profile ``data`` describes, checked but not stored."""
        profile = Profile.from_input(data)
        self._check_template(profile)
        return profile

    def add_profile(self, data: Any) -> Profile:
        profile = self.check_profile(data)
        self.store.add_profile(profile)
        return profile

    def add_imported_profile(self, data: Any, files: Iterable[BootFile]) -> tuple[Profile, bool]:
        """An import's profile and the checksums of the files it published, in one
        transaction; (profile, False) when the same profile was already there."""
        profile = self.check_profile(data)
        return profile, self.store.add_imported_profile(profile, files)

    def replace_profile(self, name: str, data: Any) -> Profile:
        profile = Profile.from_input(data, name=name, current=self.store.get_profile(name))
        self._check_template(profile)
        self.store.put_profile(profile)
        self.writer.sync_profile(name)
        return profile

    def delete_profile(self, name: str) -> None:
        self.store.delete_profile(name)

    def _check_template(self, profile: Profile) -> None:
        if profile.autoinstall:
            if self.policy.autoinstall_kind(profile.autoinstall) is None:
                raise ValidationError(
                    f"autoinstall template {profile.autoinstall!r} is in neither kickstarts/ "
                    "nor preseeds/"
                )

    # -- hosts ----------------------------------------------------------------------------

    def add_host(self, data: Any) -> Host:
        if not isinstance(data, dict):
            raise ValidationError("a host must be a JSON object")
        if data.get("mac") is not None:
            mac = parse_mac(data["mac"])
        else:
            mac = MacAddress.random_xen(self.store.macs())
        host = Host.from_input({**data, "mac": str(mac)}, mac=mac)
        self._check_profile(host.profile)
        self._check_ip(host)
        self.check_xen(host.xen)
        host = replace(host, install_token=secrets.token_urlsafe(24))
        self.store.add_host(host)
        self.writer.sync_host(mac)
        self.policy.record(mac, "api", f"registered as {host.hostname} with profile {host.profile}",
                           step=Status.REGISTERED)
        return host

    def update_host(self, mac: MacAddress, data: Any) -> Host:
        """Change the fields ``data`` names and only those; netboot turned back on starts a
        new install with a new secret for its callback."""
        current = self.store.get_host(mac)
        changes = HostChanges.from_input(data, current.vars)
        if "profile" in changes.fields:
            self._check_profile(changes.fields["profile"])
        if "ip" in changes.fields:
            self._check_ip(replace(current, ip=changes.fields["ip"]))
        if "disk" in changes.xen:
            self.check_xen(XenSettings.from_input({"disk": changes.xen["disk"]}))
        before, after = self.store.update_host(mac, changes)
        self.writer.sync_host(mac)
        changed = [name for name in changes.names if getattr(before, name) != getattr(after, name)]
        if changed:
            self.policy.record(mac, "api", "changed " + ", ".join(changed))
        if after.install_token != before.install_token:  # netboot on: a new install begins
            self.policy.record(mac, "api", status_change(before.status, after.status), step=after.status)
        return after

    def set_netboot(self, mac: MacAddress, enabled: bool) -> Host:
        return self.update_host(mac, {"netboot": enabled})

    def delete_host(self, mac: MacAddress) -> None:
        self.store.delete_host(mac)
        self.writer.sync_host(mac)

    def install_done(self, mac: MacAddress, token: str, *, client_ip: str | None) -> Host:
        """The installer's callback: the host is installed and boots locally from now on.

        Accepted only from where the host's kickstart may go (BootPolicy.check_secret_access);
        ``client_ip`` None is an administrator's call (the API token, the CLI), from anywhere.
        """
        host = self.store.get_host(mac)
        if client_ip is not None:
            try:
                self.policy.check_secret_access(host, client_ip)
            except SecretRefused as exc:
                self.policy.record(mac, "callback", f"refused install-complete call from {client_ip}: {exc}")
                raise InvalidToken(str(exc)) from None
        matches = bool(host.install_token) and hmac.compare_digest(
            host.install_token.encode(), token.encode("utf-8", "surrogateescape"))
        installed = self.store.complete_install(mac, token) if matches else None
        if installed is None:
            self.policy.record(mac, "callback", "refused install-complete call: wrong token")
            raise InvalidToken("wrong or already used install token")
        self.writer.sync_host(mac)
        self.policy.record(mac, "callback", "install complete; next boot is local",
                           step=Status.INSTALLED)
        return installed

    def check_xen(self, xen: XenSettings) -> None:
        """The disk must lie under [xen] disk_roots: a guest must never get dom0's own disk."""
        if not xen.disk:
            return  # the default image, under /var/lib/xen/images/
        roots, disk = self.policy.config.xen.disk_roots, XenDisk.parse(xen.disk)
        if not disk.under(roots):
            raise ValidationError(
                f"xen.disk target {disk.target!r} is not under the allowed roots "
                f"({', '.join(roots) or 'none configured'}; see [xen] disk_roots)")

    def _check_ip(self, host: Host) -> None:
        """An address this server hands out must be one it may hand out: inside the DHCP
        subnet, not its network or broadcast address, the router's or the server's own."""
        config = self.policy.config
        if host.ip is None or not config.dhcp.enabled or config.dhcp.mode != "full":
            return
        address, subnet = ipaddress.IPv4Address(host.ip), ipaddress.IPv4Network(config.dhcp.subnet)
        if address not in subnet or address in (subnet.network_address, subnet.broadcast_address):
            raise ValidationError(f"ip {host.ip} is not a host address of the DHCP subnet {subnet}")
        reserved = {"the router": config.dhcp.router, "this server": config.advertised_address,
                    "the DHCP service": config.dhcp.address}
        for whose, ip in reserved.items():
            if ip == host.ip:
                raise ValidationError(f"ip {host.ip} is the address of {whose}")
        lease = self.store.find_lease_by_ip(host.ip)
        if lease is not None and lease.mac != host.mac and lease.expires > time.time():
            raise Conflict(f"IP address {host.ip} is leased to {lease.mac}")

    def _check_profile(self, name: str) -> None:
        try:
            self.store.get_profile(name)
        except NotFound:
            raise ValidationError(f"unknown profile {name!r}") from None
