"""The write side of the registry: every change made through the API or the CLI.

It validates input into models, stores them, and rewrites the one bootloader config file the
change affects. The API and the CLI are thin shells over it, so both accept and refuse exactly
the same things.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import replace
from typing import Any

from pxeserver.bootconfig import BootConfigWriter
from pxeserver.mac import MacAddress
from pxeserver.policy import BootPolicy, status_change
from pxeserver.registry import (
    Host,
    NotFound,
    Profile,
    Status,
    Store,
    ValidationError,
)
from pxeserver.registry.models import parse_mac


class InvalidToken(PermissionError):
    """The install-complete callback presented a wrong or used-up token."""


class Provisioning:
    def __init__(self, store: Store, policy: BootPolicy, writer: BootConfigWriter) -> None:
        self.store = store
        self.policy = policy
        self.writer = writer

    # -- profiles -------------------------------------------------------------------------

    def add_profile(self, data: Any) -> Profile:
        profile = Profile.from_input(data)
        self._check_template(profile)
        self.store.add_profile(profile)
        return profile

    def replace_profile(self, name: str, data: Any) -> Profile:
        profile = Profile.from_input(data, name=name)
        self._check_template(profile)
        self.store.put_profile(profile)
        for host in self.store.list_hosts():
            if host.profile == name:
                self.writer.write_host(host)
        if self.policy.config.boot.default_profile == name:
            self.writer.write_default()
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
        host = replace(host, install_token=secrets.token_urlsafe(24))
        self.store.add_host(host)
        self.writer.write_host(host)
        self.policy.record(mac, "api", f"registered as {host.hostname} with profile {host.profile}",
                           step=Status.REGISTERED)
        return host

    def update_host(self, mac: MacAddress, data: Any) -> Host:
        current = self.store.get_host(mac)
        host = current.patched(data)
        if host.profile != current.profile:
            self._check_profile(host.profile)
        if host.netboot and not current.netboot:
            # Netboot turned back on: a new install, with a new secret for its callback.
            host = replace(host, status=Status.REGISTERED, install_token=secrets.token_urlsafe(24))
        self.store.update_host(host)
        self.writer.write_host(host)
        if host.install_token != current.install_token:  # a new install begins
            self.policy.record(mac, "api", status_change(current.status, host.status), step=host.status)
        changed = sorted(k for k in data if getattr(current, k) != getattr(host, k))
        if changed:
            self.policy.record(mac, "api", "changed " + ", ".join(changed))
        return host

    def set_netboot(self, mac: MacAddress, enabled: bool) -> Host:
        return self.update_host(mac, {"netboot": enabled})

    def delete_host(self, mac: MacAddress) -> None:
        self.store.delete_host(mac)
        self.writer.remove_host(mac)

    def install_done(self, mac: MacAddress, token: str) -> Host:
        """The installer's callback: the host is installed and boots locally from now on."""
        host = self.store.get_host(mac)
        matches = bool(host.install_token) and hmac.compare_digest(
            host.install_token.encode(), token.encode("utf-8", "surrogateescape"))
        if not matches or not self.store.complete_install(mac, token):
            self.policy.record(mac, "callback", "refused install-complete call: wrong token")
            raise InvalidToken("wrong or already used install token")
        host = self.store.get_host(mac)
        self.writer.write_host(host)
        self.policy.record(mac, "callback", "install complete; next boot is local", step=Status.INSTALLED)
        return host

    def _check_profile(self, name: str) -> None:
        try:
            self.store.get_profile(name)
        except NotFound:
            raise ValidationError(f"unknown profile {name!r}") from None
