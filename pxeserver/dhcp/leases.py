"""Dynamic addresses for hosts without a registered IP, kept as leases in the registry.

Reservations (a host's registered IP) never pass through here. Leases live in the Store, so
several servers sharing one registry hand out the same address to the same MAC and a restart
forgets nothing. Declined addresses are quarantined in memory only: a DECLINE reports a
conflict on the live network right now, and after a restart a re-offer would simply be
declined again, so it is not worth a schema change.
"""

from __future__ import annotations

import ipaddress
import time

from pxeserver.mac import MacAddress
from pxeserver.registry import Conflict, Lease, Store

OFFER_HOLD = 60.0  # seconds an offered address stays reserved for the client's REQUEST
QUARANTINE = 600.0  # seconds a declined address is not offered again
MAX_QUARANTINED = 4096
MAX_POOL_SCAN = 65536  # a pool larger than a /16 is a configuration mistake, not a workload


class LeaseManager:
    def __init__(
        self,
        store: Store,
        pool_start: str,
        pool_end: str,
        excluded: set[str],
        subnet: ipaddress.IPv4Network,
    ) -> None:
        self.store = store
        self.excluded = excluded
        self._quarantine: dict[str, float] = {}
        if pool_start and pool_end:
            first, last = ipaddress.IPv4Address(pool_start), ipaddress.IPv4Address(pool_end)
            if first > last or first not in subnet or last not in subnet:
                raise ValueError(f"DHCP pool {first}-{last} is not an ascending range inside {subnet}")
            self._first, self._last = int(first), min(int(last), int(first) + MAX_POOL_SCAN - 1)
        else:
            self._first, self._last = 1, 0  # an empty pool

    def in_pool(self, ip: str) -> bool:
        try:
            return self._first <= int(ipaddress.IPv4Address(ip)) <= self._last
        except ValueError:
            return False

    def offer(self, mac: MacAddress, hint: str | None, now: float | None = None) -> str | None:
        """An address for this MAC, held briefly for its REQUEST: its lease, the one it asks
        for, or the lowest free one. None when the pool is empty or exhausted."""
        now = time.time() if now is None else now
        current = self.store.find_lease(mac)
        candidates: list[str] = []
        if current is not None:
            candidates.append(current.ip)
        if hint is not None:
            candidates.append(hint)
        for ip in candidates:
            if self.in_pool(ip) and self._free_for(mac, ip, now):
                expires = max(now + OFFER_HOLD, current.expires if current and current.ip == ip else 0)
                if self._hold(mac, ip, expires):
                    return ip
        leased = {lease.ip: lease for lease in self.store.list_leases()}
        for number in range(self._first, self._last + 1):
            ip = str(ipaddress.IPv4Address(number))
            lease = leased.get(ip)
            if lease is not None and lease.expires >= now and lease.mac != mac:
                continue
            if self._free_for(mac, ip, now) and self._hold(mac, ip, now + OFFER_HOLD):
                return ip
        return None

    def bind(self, mac: MacAddress, ip: str, lease_time: int, now: float | None = None) -> bool:
        """Confirm ``ip`` for ``mac`` for lease_time seconds; False if it is not ours to give."""
        now = time.time() if now is None else now
        return self.in_pool(ip) and self._free_for(mac, ip, now) and self._hold(mac, ip, now + lease_time)

    def release(self, mac: MacAddress, ip: str) -> bool:
        lease = self.store.find_lease(mac)
        if lease is None or lease.ip != ip:
            return False
        self.store.delete_lease(mac)
        return True

    def decline(self, mac: MacAddress, ip: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if len(self._quarantine) >= MAX_QUARANTINED:
            self._quarantine = {a: t for a, t in self._quarantine.items() if t > now}
            if len(self._quarantine) >= MAX_QUARANTINED:
                self._quarantine.pop(next(iter(self._quarantine)))
        self._quarantine[ip] = now + QUARANTINE
        self.release(mac, ip)

    def forget_offer(self, mac: MacAddress, now: float | None = None) -> None:
        """The client took another server's offer: give back an address only offered to it."""
        now = time.time() if now is None else now
        lease = self.store.find_lease(mac)
        if lease is not None and lease.expires <= now + OFFER_HOLD:
            self.store.delete_lease(mac)

    def _free_for(self, mac: MacAddress, ip: str, now: float) -> bool:
        if ip in self.excluded or self._quarantine.get(ip, 0.0) > now:
            return False
        if self.store.find_host_by_ip(ip) is not None:
            return False
        lease = self.store.find_lease_by_ip(ip)
        return lease is None or lease.mac == mac or lease.expires < now

    def _hold(self, mac: MacAddress, ip: str, expires: float) -> bool:
        stale = self.store.find_lease_by_ip(ip)
        if stale is not None and stale.mac != mac:
            self.store.delete_lease(stale.mac)  # _free_for checked that it has expired
        try:
            self.store.put_lease(Lease(mac, ip, expires))
        except Conflict:  # another server sharing the registry took it in between
            return False
        return True
