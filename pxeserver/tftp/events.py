"""Transfers told to the hosts' timelines, off the event loop.

Tying a transfer to a host needs a registry read (the host by IP), and moving it to
NETBOOTING may write; neither belongs on the thread that sends DATA packets. The event loop
only queues a :class:`Transfer`; one worker thread resolves the host, logs the line
``pxeserver serve`` shows, records the event and advances the host's lifecycle.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from pxeserver.mac import InvalidMac, MacAddress
from pxeserver.offpath import OffPathWorker
from pxeserver.policy import PXELINUX_DIR, BootPolicy
from pxeserver.registry import Status

log = logging.getLogger(__name__)

QUEUE_LIMIT = 100_000


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


class EventRecorder:
    def __init__(self, policy: BootPolicy) -> None:
        self.policy = policy
        self.worker = OffPathWorker("tftp-events", self._record, QUEUE_LIMIT)
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
        mac = host_mac(self.policy, transfer)
        if mac is None or self.policy.host(mac) is None:
            return
        what = f"sent {transfer.name} ({transfer.size} bytes, blksize {transfer.blksize})"
        self.policy.record(mac, "tftp", what, logged=True)
        if transfer.boot_config:
            self.policy.advance(mac, Status.NETBOOTING)
