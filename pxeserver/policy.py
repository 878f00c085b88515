"""Boot policy: the one answer to "what should the machine with this MAC boot?".

Every protocol service (TFTP, HTTP, DHCP, DNS, and the config writer) asks a
:class:`BootPolicy`; none of them reads the registry directly. Like pixiecore's ``Booter``, it
separates the decision from the protocol code, and several servers sharing one registry give
the same answers because the answers come from the registry, not from files on one disk.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from pxeserver.bootfiles import BootFileGuard
from pxeserver.bootspec import BootSpec, LocalBoot, NetBoot
from pxeserver.config import Config
from pxeserver.mac import InvalidMac, MacAddress
from pxeserver.published import Published
from pxeserver.pxelinux import hex_ip
from pxeserver.registry import Host, NotFound, Profile, Status, Store, Unavailable
from pxeserver.registry.store import Contact, Tally
from pxeserver.timeline import Timeline

if TYPE_CHECKING:  # only for its type: pxelinux (and so pypxeboot) import the policy, not prometheus_client
    from pxeserver.metrics import Metrics

log = logging.getLogger(__name__)
events_log = logging.getLogger("pxeserver.events")

PXELINUX_DIR = "pxelinux.cfg/"


@dataclass(frozen=True)
class NameRecord:
    """A host's name and address for DNS; ``expires`` is set when the address is a lease."""

    hostname: str
    ip: str
    expires: float | None = None


class AutoinstallKind(StrEnum):
    KICKSTART = "kickstart"
    PRESEED = "preseed"


# The order in which a host moves through an install; only forward moves are recorded.
_LIFECYCLE = [Status.REGISTERED, Status.NETBOOTING, Status.INSTALLING]
# Timeline entries that begin an install: a new host ("registered as web1 ...") and a host whose
# netboot was turned back on ("status installed -> registered ...", from status_change()).
_INSTALL_START = re.compile(r"registered as |status \w+ -> registered\b")


def status_change(old: Status, new: Status) -> str:
    """How the timeline words a lifecycle step."""
    return f"status {old.value} -> {new.value}"


class SecretRefused(PermissionError):
    """A request for a host's install secrets (autoinstall file, install-complete call) that
    this client may not make; the message says why."""


class NotInstalling(SecretRefused):
    """The host has no install in progress: netboot is off or it is installed."""


class NotFromHost(SecretRefused):
    """The client is neither at the host's address nor in a trusted network."""


def _client_address(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text or "")
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:10.0.0.5 from a dual-stack socket
    return mapped or address


class BootPolicy:
    def __init__(self, store: Store, config: Config, timeline: Timeline, metrics: Metrics) -> None:
        self.store = store
        self.config = config
        self.timeline = timeline
        self.metrics = metrics
        self.boot_files = BootFileGuard(store, config.tftp_root, config.node_name,
                                        metrics.boot_file_refused)

    # -- lookups --------------------------------------------------------------------------

    def host(self, mac: MacAddress) -> Host | None:
        return self.store.find_host(mac)

    def host_by_ip(self, ip: str) -> Host | None:
        return self.store.find_host_by_ip(ip)

    def profile(self, name: str) -> Profile | None:
        """A host's profile, for the HTTP service's autoinstall files; None if it is gone."""
        try:
            return self.store.get_profile(name)
        except NotFound:
            return None

    def name_records(self) -> list[NameRecord]:
        """Every host with an address: its registered IP, else its current DHCP lease."""
        rows = self.store.host_addresses(time.time())
        return [NameRecord(hostname, ip, expires) for hostname, ip, expires in rows]

    def tally(self) -> Tally:
        """How many hosts (by status), profiles and live leases: the metrics' registry gauges."""
        return self.store.tally(time.time())

    def registry_contact(self) -> Contact:
        """Whether the registry database answers this node, for the metrics."""
        return self.store.contact()

    def generation(self) -> int:
        """Increases on every registry change: the DNS SOA serial and a cheap "changed?" check."""
        return self.store.generation()

    def autoinstall_kind(self, template: str) -> AutoinstallKind | None:
        """Which directory holds the template decides kickstart or preseed."""
        if not template:
            return None
        if (self.config.kickstarts_dir / template).is_file():
            return AutoinstallKind.KICKSTART
        if (self.config.preseeds_dir / template).is_file():
            return AutoinstallKind.PRESEED
        return None

    # -- the decision ---------------------------------------------------------------------

    def boot_spec(self, mac: MacAddress) -> BootSpec:
        """The boot spec for a MAC; an unknown MAC gets the configured default."""
        host = self.store.find_host(mac)
        return self.default_spec() if host is None else self.host_spec(host)

    def host_spec(self, host: Host) -> BootSpec:
        if not host.netboot:
            return LocalBoot()
        try:
            profile = self.store.get_profile(host.profile)
        except NotFound:
            log.error("host %s names missing profile %r: booting it locally", host.mac, host.profile)
            return LocalBoot()
        return NetBoot(
            kernel=profile.kernel,
            initrd=profile.initrd,
            cmdline=" ".join(filter(None, [self._autoinstall_args(host, profile), profile.append])),
            base_url=self.kernel_base_url(),
        )

    def default_spec(self) -> BootSpec:
        name = self.config.boot.default_profile
        if not name:
            return LocalBoot()
        try:
            profile = self.store.get_profile(name)
        except NotFound:
            log.error("default profile %r does not exist: unknown hosts boot locally", name)
            return LocalBoot()
        return NetBoot(kernel=profile.kernel, initrd=profile.initrd, cmdline=profile.append,
                       base_url=self.kernel_base_url())

    def kernel_base_url(self) -> str:
        """Where boot configs say kernels and initrds are: "" (TFTP paths) or this server's
        ``/boot/`` URL, by ``[boot] kernel_transport``."""
        return f"{self.config.http_base_url}/boot" if self.config.boot.kernel_transport == "http" else ""

    def bios_loader(self) -> str:
        """The boot file for BIOS PXE clients: lpxelinux (which reads http:// kernel paths)
        when configs name kernels by URL, so HVM guests read the same configs as pypxeboot."""
        boot = self.config.boot
        return boot.http_bios_loader if boot.kernel_transport == "http" else boot.bios_loader

    def autoinstall_url(self, host: Host, kind: AutoinstallKind) -> str:
        path = "ks" if kind is AutoinstallKind.KICKSTART else "preseed"
        return f"{self.config.http_base_url}/{path}/{host.mac.dashed}"

    def _autoinstall_args(self, host: Host, profile: Profile) -> str:
        kind = self.autoinstall_kind(profile.autoinstall)
        if kind is None:
            if profile.autoinstall:
                log.error("template %r of profile %r is in neither kickstarts/ nor preseeds/",
                          profile.autoinstall, profile.name)
            return ""
        url = self.autoinstall_url(host, kind)
        short = host.hostname.split(".", 1)[0]
        if kind is AutoinstallKind.KICKSTART:
            # Anaconda before RHEL 7 reads ks=, later ones only inst.ks=; each ignores the other.
            return f"ks={url} inst.ks={url}"
        domain = self.config.dns.domain
        return f"auto=true priority=critical url={url} hostname={short} domain={domain}"

    # -- who may have a host's install secrets --------------------------------------------

    def check_secret_access(self, host: Host, client_ip: str | None) -> None:
        """Raise SecretRefused unless ``client_ip`` may have this host's kickstart or preseed
        (which carries its install token) or make its install-complete call.

        Only during an install: netboot on and not yet installed. ``registered`` counts, as
        the move to ``netbooting`` is recorded off the packet path and may lag or be dropped
        under load. Only from the host itself: its registered IP or its current DHCP lease,
        or a network the operator trusts ([http] autoinstall_trusted_networks).
        """
        if not host.netboot or host.status is Status.INSTALLED:
            raise NotInstalling(f"host {host.mac} has no install in progress")
        address = _client_address(client_ip)
        if address is None:
            raise NotFromHost("the client's address is unknown")
        if str(address) in self.host_addresses(host) or any(
            address in ipaddress.ip_network(network)
            for network in self.config.http.autoinstall_trusted_networks
        ):
            return
        raise NotFromHost(f"{client_ip} is not the address of host {host.mac}")

    def host_addresses(self, host: Host, now: float | None = None) -> set[str]:
        """The host's registered IP and the address of its unexpired DHCP lease."""
        addresses = {host.ip} if host.ip else set()
        lease = self.store.find_lease(host.mac)
        if lease is not None and lease.expires > (time.time() if now is None else now):
            addresses.add(lease.ip)
        return addresses

    def check_boot_file(self, name: str, published: Published, protocol: str) -> None:
        """Raise :class:`~pxeserver.bootfiles.BootFileRefused` when the file the TFTP or HTTP
        service opened for ``name`` is a recorded kernel or initrd that this node's copy no
        longer matches (several nodes, each with its own copy, share one registry)."""
        self.boot_files.check(name, published, protocol)

    # -- pxelinux.cfg/ names --------------------------------------------------------------

    def pxelinux_config(self, name: str, client_ip: str | None = None) -> BootSpec | None:
        """The spec behind a ``pxelinux.cfg/`` file name, as pxelinux and pypxeboot ask them.

        ``01-<mac>`` in any case of hex digits (pypxeboot asks with the MAC as typed); the
        upper-case hex IP at full length, or any shorter prefix of the asking client's own
        address; ``default``. None means "no such file" so the client tries its next name.
        """
        if name == "default":
            return self.default_spec()
        if name[:3].lower() == "01-" and len(name) == 20:
            try:
                mac = MacAddress.parse(name[3:])
            except InvalidMac:
                return None
            host = self.store.find_host(mac)
            return None if host is None else self.host_spec(host)
        if 1 <= len(name) <= 8 and all(c in "0123456789ABCDEF" for c in name):
            if len(name) == 8:
                ip = str(ipaddress.IPv4Address(int(name, 16)))
            elif client_ip and hex_ip(client_ip).startswith(name):
                ip = client_ip
            else:
                return None
            host = self.store.find_host_by_ip(ip)
            return None if host is None else self.host_spec(host)
        return None

    # -- what happened --------------------------------------------------------------------

    def record(self, mac: MacAddress, source: str, message: str, *, logged: bool = False,
               step: Status | None = None) -> None:
        """Add an entry to the host's provisioning timeline (batched, never blocks a service).

        Each entry is also the one log line ``pxeserver serve`` shows for that boot event,
        unless the caller has ``logged`` it already with more detail. ``step`` says the entry
        is a lifecycle step (the host entered that status): it is counted for the metrics.
        """
        if not logged:
            events_log.info("%s %s: %s", source, mac, message)
        if step is not None:
            self.metrics.step(step, self._install_seconds(mac) if step is Status.INSTALLED else None)
        self.timeline.record(mac, source, message)

    def _install_seconds(self, mac: MacAddress) -> float | None:
        """How long the install that just ended took, from the timeline (so a host added with
        the CLI, or before a restart, is timed too); None if its start is not on record."""
        for event in reversed(self.timeline.events(mac)):
            if _INSTALL_START.match(event.message):
                return max(0.0, time.time() - event.time)
        return None

    def advance(self, mac: MacAddress, status: Status) -> None:
        """Move a netbooting host forward in its install (registered → netbooting → installing).

        Called by the services when they serve a boot config or an autoinstall file; a host
        that is not netbooting, or already further along, is left as it is. The read first
        keeps repeated boot steps from taking the write lock.
        """
        host = self.store.find_host(mac)
        if host is None or not host.netboot or host.status not in _LIFECYCLE:
            return
        earlier = _LIFECYCLE[: _LIFECYCLE.index(status)]
        try:
            advanced = host.status in earlier and self.store.advance_status(mac, status, earlier)
        except Unavailable as exc:  # the shared database is away: the boot goes on regardless
            log.warning("%s not recorded as %s: %s", mac, status.value, exc)
            return
        if advanced:
            self.record(mac, "policy", status_change(host.status, status), step=status)

