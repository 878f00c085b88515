"""Transfers told to the hosts' timelines, off the event loop.

Tying a transfer to a host needs a registry read (the host by IP), and moving it to
NETBOOTING may write; neither belongs on the thread that sends DATA packets. The event loop
only queues a :class:`Transfer`; one worker thread resolves the host, logs the line
``pxeserver serve`` shows, records the event and advances the host's lifecycle.

pypxeboot downloads a domU's kernel and initrd from dom0's address, which is no host's: only
the config name it fetched first says whose boot it is. :class:`BootFileClaims` carries that
over to the downloads that follow it.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from pxeserver.mac import InvalidMac, MacAddress
from pxeserver.offpath import OffPathWorker
from pxeserver.policy import PXELINUX_DIR, BootPolicy, NetBoot
from pxeserver.registry import Status
from pxeserver.tftp.files import normalise
from pxeserver.tftp.packets import TftpError

log = logging.getLogger(__name__)

QUEUE_LIMIT = 100_000
# Seconds from a host's config fetch, or from its last download, to the start of its next one.
ATTRIBUTION_WINDOW = 60.0
CLAIMS_PER_ADDRESS = 64  # domUs booting through one dom0 at once, at most, that are told apart
CLAIM_ADDRESSES = 4096  # addresses with claims kept; the least recently claiming go first
CLAIM_LIFETIME = 3600.0  # seconds a claim with files left is kept: past any transfer's length


@dataclass(frozen=True)
class Transfer:
    client_ip: str
    name: str
    size: int
    blksize: int
    seconds: float
    boot_config: bool  # a pxelinux config the policy generated
    packets: int = 0
    retransmits: int = 0
    wrong_tid: int = 0


def host_mac(policy: BootPolicy, transfer: Transfer) -> MacAddress | None:
    """The host a transfer belongs to: the MAC or full hex IP in a pxelinux.cfg name, else
    the client's own registered IP (pypxeboot fetches from dom0, so the name matters most)."""
    config = transfer.name[len(PXELINUX_DIR):] if transfer.name.startswith(PXELINUX_DIR) else ""
    if config[:3].lower() == "01-":
        try:
            return MacAddress.parse(config[3:])
        except InvalidMac:
            return None
    ip = transfer.client_ip
    if len(config) == 8:
        try:
            ip = str(ipaddress.IPv4Address(int(config, 16)))
        except ValueError:
            pass
    host = policy.host_by_ip(ip)
    return None if host is None else host.mac


@dataclass
class _Claim:
    mac: MacAddress
    seen: float  # monotonic: the config fetch, then the end of each download given to it
    files: set[str] = field(default_factory=set)  # its kernel and initrd, not yet downloaded


class BootFileClaims:
    """Which host a kernel or initrd download from an address that is no host's belongs to.

    When a host's boot config is fetched from an address, that host claims its spec's kernel
    and initrd from that address. A later download of one of them from there, starting within
    :data:`ATTRIBUTION_WINDOW` of the claim's last activity, goes to the oldest claim still
    lacking that file; so several domUs booting through one dom0 at once get one kernel and
    one initrd each. Used by the one events thread only, so it needs no lock.
    """

    def __init__(self, window: float = ATTRIBUTION_WINDOW) -> None:
        self.window = window
        self._by_address: OrderedDict[str, list[_Claim]] = OrderedDict()

    def claim(self, address: str, mac: MacAddress, files: set[str], now: float) -> None:
        claims = [c for c in self._live(address, now) if c.mac != mac]
        claims.append(_Claim(mac, now, files))
        self._by_address[address] = claims[-CLAIMS_PER_ADDRESS:]
        self._by_address.move_to_end(address)
        while len(self._by_address) > CLAIM_ADDRESSES:
            self._by_address.popitem(last=False)

    def owner(self, address: str, name: str, started: float, now: float) -> MacAddress | None:
        """The host a download of ``name`` from ``address``, begun at ``started``, is for."""
        for claim in self._live(address, now):
            if name in claim.files and started - claim.seen <= self.window:
                claim.files.discard(name)
                claim.seen = now
                return claim.mac
        return None

    def _live(self, address: str, now: float) -> list[_Claim]:
        """The address's claims that can still match, oldest first; spent and old ones go.

        A download is recorded when it ends, long after it began under a slow guest, so
        claims are kept far longer than the window they are matched with."""
        claims = [c for c in self._by_address.get(address, []) if c.files and now - c.seen <= CLAIM_LIFETIME]
        if claims:
            self._by_address[address] = claims
        else:
            self._by_address.pop(address, None)
        return claims


def _boot_files(spec: NetBoot) -> set[str]:
    files = set()
    for path in (spec.kernel, spec.initrd):
        try:
            files.add(normalise(path))
        except TftpError:  # a path no client can download: nothing to claim
            pass
    return files


class EventRecorder:
    def __init__(self, policy: BootPolicy) -> None:
        self.policy = policy
        self.claims = BootFileClaims()
        self.worker = OffPathWorker("tftp-events", self._record, QUEUE_LIMIT,
                                    policy.metrics.queue_drop("tftp-events"))
        self.worker.start()

    def add(self, transfer: Transfer) -> None:
        if not self.worker.submit(transfer):
            log.warning("tftp event queue full: %s to %s not recorded", transfer.name, transfer.client_ip)

    def close(self) -> None:
        self.worker.stop()

    def _record(self, transfer: Transfer) -> None:
        log.info("tftp: sent %s to %s (%d bytes, blksize %d, %.2f s, %d packets, %d resent, %d wrong TID)",
                 transfer.name, transfer.client_ip, transfer.size, transfer.blksize, transfer.seconds,
                 transfer.packets, transfer.retransmits, transfer.wrong_tid)
        now = time.monotonic()
        what = f"sent {transfer.name} ({transfer.size} bytes, blksize {transfer.blksize})"
        mac = host_mac(self.policy, transfer)
        if mac is None and not transfer.boot_config:
            mac = self.claims.owner(transfer.client_ip, transfer.name, now - transfer.seconds, now)
            what += f" to {transfer.client_ip}, which fetched this host's boot config"
        host = None if mac is None else self.policy.host(mac)
        if host is None:
            return
        self.policy.record(host.mac, "tftp", what, logged=True)
        if transfer.boot_config:
            spec = self.policy.host_spec(host)
            if isinstance(spec, NetBoot):
                self.claims.claim(transfer.client_ip, host.mac, _boot_files(spec), now)
            self.policy.advance(host.mac, Status.NETBOOTING)
