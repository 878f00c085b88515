"""Dynamic addresses for hosts without a registered IP, kept as leases in the registry.

Reservations (a host's registered IP) never pass through here. A lease is written to the Store
only when a client's REQUEST binds it, so several servers sharing one registry hand out the
same address to the same MAC and a restart forgets nothing; the store's unique IP refuses a
double grant. Offers and quarantines of declined addresses live in memory only: a DISCOVER
costs no disk write, a flood of DISCOVERs writes nothing, and after a restart a client that
was only offered an address simply asks again.

The guest network is hostile, so what a client can take is bounded:

- A DECLINE counts only from the MAC the address was offered or leased to, and one MAC can
  keep at most ``MAX_DECLINES_PER_CLIENT`` addresses in quarantine at a time.
- MACs the registry does not know (served with ``serve_unknown``) hold at most
  ``unknown_share`` of the pool, counting their offers, their leases and the addresses they
  declined; their offers are held for ``UNKNOWN_OFFER_HOLD`` seconds only, and a registered
  host that finds the pool full takes over an address merely offered to an unknown MAC.

Finding a free address does not scan the lease table: :class:`FreeAddresses` keeps the pool
as "never handed out" (a cursor), "given back" (a heap) and "busy until" (a heap of expiries),
and every candidate it yields is checked against the registry with indexed lookups before it
is offered. The index only makes the search fast; the registry decides what is free.
"""

from __future__ import annotations

import heapq
import ipaddress
import logging
import math
import time
from dataclasses import dataclass

from pxeserver.mac import MacAddress
from pxeserver.registry import Conflict, Lease, Store

log = logging.getLogger(__name__)

OFFER_HOLD = 60.0  # seconds an address offered to a registered host waits for its REQUEST
UNKNOWN_OFFER_HOLD = 15.0  # the same for an unknown MAC: enough for a PXE ROM, not for a flood
QUARANTINE = 600.0  # seconds a declined address is not offered again
MAX_QUARANTINED = 4096
MAX_DECLINES_PER_CLIENT = 4  # quarantined addresses one MAC may be responsible for at once
RECHECK = 60.0  # seconds before an address reserved by a host is looked at again
MAX_POOL_SCAN = 65536  # a pool larger than a /16 is a configuration mistake, not a workload


@dataclass(frozen=True)
class Offer:
    mac: MacAddress
    ip: int
    expires: float
    known: bool


class FreeAddresses:
    """Pool addresses in the order they are handed out: lowest first, each looked at once.

    Every address of the pool is in exactly one place: at or above ``cursor`` (never looked
    at), in the ``returned`` heap (believed free), or in the ``busy`` heap until a time after
    which it is looked at again. Finding the next candidate is O(log n) amortised.
    """

    def __init__(self, first: int, last: int) -> None:
        self.cursor, self.last = first, last
        self._returned: list[int] = []
        self._in_returned: set[int] = set()
        self._busy: list[tuple[float, int]] = []
        self._busy_until: dict[int, float] = {}

    def busy(self, ip: int, until: float) -> None:
        """Skip ``ip`` until ``until`` (math.inf: for good)."""
        self._busy_until[ip] = until
        if until != math.inf:
            heapq.heappush(self._busy, (until, ip))

    def free(self, ip: int) -> None:
        """``ip`` may be free again now (the caller's candidate check has the last word)."""
        self._busy_until.pop(ip, None)
        if ip < self.cursor and ip not in self._in_returned:
            heapq.heappush(self._returned, ip)
            self._in_returned.add(ip)

    def next(self, now: float) -> int | None:
        """The lowest address not known to be busy, taken out of the index; the caller marks
        it busy or frees it again."""
        while self._busy and self._busy[0][0] <= now:
            until, ip = heapq.heappop(self._busy)
            if self._busy_until.get(ip) == until:  # else re-marked or freed since
                self.free(ip)
        while True:
            if self._returned and (self.cursor > self.last or self._returned[0] < self.cursor):
                ip = heapq.heappop(self._returned)
                self._in_returned.discard(ip)
            elif self.cursor <= self.last:
                ip, self.cursor = self.cursor, self.cursor + 1
            else:
                return None
            if self._busy_until.get(ip, 0.0) <= now:
                return ip


class LeaseManager:
    def __init__(
        self,
        store: Store,
        pool_start: str,
        pool_end: str,
        excluded: set[str],
        subnet: ipaddress.IPv4Network,
        unknown_share: float = 0.25,
        now: float | None = None,
    ) -> None:
        now = time.time() if now is None else now
        self.store = store
        self.excluded = {int(ipaddress.IPv4Address(ip)) for ip in excluded if ip}
        if pool_start and pool_end:
            first, last = ipaddress.IPv4Address(pool_start), ipaddress.IPv4Address(pool_end)
            if first > last or first not in subnet or last not in subnet:
                raise ValueError(f"DHCP pool {first}-{last} is not an ascending range inside {subnet}")
            self._first, self._last = int(first), min(int(last), int(first) + MAX_POOL_SCAN - 1)
        else:
            self._first, self._last = 1, 0  # an empty pool
        size = self._last - self._first + 1
        self.unknown_limit = max(1, int(size * unknown_share)) if unknown_share > 0 else 0
        self._free = FreeAddresses(self._first, self._last)
        self._offers: dict[MacAddress, Offer] = {}
        self._offered: dict[int, Offer] = {}
        self._quarantine: dict[int, tuple[float, MacAddress]] = {}
        self._unknown: dict[int, float] = {}  # address -> until when an unknown MAC holds it
        self._unknown_expiry: list[tuple[float, int]] = []
        self._load(now)

    def _load(self, now: float) -> None:
        """What the registry already holds: one read at start-up instead of one per address."""
        registered = self.store.macs()
        for lease in self.store.list_leases():
            number = _number(lease.ip)
            if number is not None and self._in_pool(number) and lease.expires > now:
                self._free.busy(number, lease.expires)
                if lease.mac not in registered:
                    self._hold_unknown(number, lease.expires)

    # -- what the responder asks ----------------------------------------------------------

    def offer(self, mac: MacAddress, hint: str | None, known: bool,
              now: float | None = None) -> str | None:
        """An address for this MAC, held in memory for its REQUEST: its lease, its current
        offer, the one it asks for, or the lowest free one. None when nothing may be given."""
        now = time.time() if now is None else now
        lease = self.store.find_lease(mac)
        current = self._offers.get(mac)
        candidates = [lease.ip if lease else None, _text(current.ip) if current else None, hint]
        for ip in candidates:
            number = _number(ip) if ip else None
            if number is None or not self._in_pool(number):
                continue
            if self._blocked_until(mac, number, now) is None and (
                    known or self._holds(mac, number, lease, now) or self._room_for_unknown(now)):
                return self._hold_offer(mac, number, known, now)
        if not known and not self._room_for_unknown(now):
            log.debug("dhcp: unknown MACs hold their share of the pool; nothing for %s", mac)
            return None
        number = self._next_free(mac, now)
        if number is None and known:
            number = self._reclaim_unknown_offer(now)
        return None if number is None else self._hold_offer(mac, number, known, now)

    def bind(self, mac: MacAddress, ip: str, lease_time: int, known: bool,
             now: float | None = None) -> bool:
        """Confirm ``ip`` for ``mac`` for lease_time seconds (a durable registry write);
        False if it is not ours to give."""
        now = time.time() if now is None else now
        number = _number(ip)
        if number is None or not self._in_pool(number) or self._blocked_until(mac, number, now) is not None:
            return False
        lease = self.store.find_lease(mac)
        if not known and not self._holds(mac, number, lease, now) and not self._room_for_unknown(now):
            return False
        expires = now + lease_time
        try:  # an expired lease of another MAC is taken over in the same transaction
            self.store.put_lease(Lease(mac, ip, expires), expired_before=now)
        except Conflict:  # another server sharing the registry took or renewed it in between
            return False
        self._drop_offer(mac)
        if lease is not None and lease.ip != ip:
            self._let_go(_number(lease.ip))
        self._free.busy(number, expires)
        if known:
            self._unknown.pop(number, None)
        else:
            self._hold_unknown(number, expires)
        return True

    def release(self, mac: MacAddress, ip: str) -> bool:
        """The client gives its address back; False when it was not this MAC's lease."""
        lease = self.store.find_lease(mac)
        if lease is None or lease.ip != ip:
            return False
        self.store.delete_lease(mac)
        self._let_go(_number(ip))
        return True

    def decline(self, mac: MacAddress, ip: str, known: bool, now: float | None = None) -> bool:
        """Quarantine ``ip`` if it was offered or leased to this MAC; False (ignored) if not.

        Anyone on the network can send a DECLINE naming any address, so only the client the
        address was given to can take it out of the pool, and only a few at a time.
        """
        now = time.time() if now is None else now
        number = _number(ip)
        if number is None:
            return False
        offer = self._offers.get(mac)
        offered = offer is not None and offer.ip == number and offer.expires > now
        lease = self.store.find_lease(mac)
        if not offered and (lease is None or lease.ip != ip):
            return False
        if len(self._quarantine) >= MAX_QUARANTINED:
            self._quarantine = {a: q for a, q in self._quarantine.items() if q[0] > now}
        mine = sum(1 for until, who in self._quarantine.values() if who == mac and until > now)
        self._drop_offer(mac)
        if lease is not None and lease.ip == ip:
            self.store.delete_lease(mac)
        if mine >= MAX_DECLINES_PER_CLIENT or len(self._quarantine) >= MAX_QUARANTINED:
            log.warning("dhcp: %s declined %s but already keeps %d addresses in quarantine; "
                        "not quarantined", mac, ip, mine)
            self._let_go(number)
            return True
        until = now + QUARANTINE
        self._quarantine[number] = (until, mac)
        self._free.busy(number, until)
        if known:
            self._unknown.pop(number, None)
        else:
            self._hold_unknown(number, until)  # an unknown MAC's declines count in its share
        return True

    def forget_offer(self, mac: MacAddress) -> None:
        """The client took another server's offer: give back an address only offered to it."""
        self._drop_offer(mac)

    def unknown_holdings(self, now: float | None = None) -> int:
        """How many pool addresses unknown MACs hold now (offers, leases, quarantines)."""
        self._prune_unknown(time.time() if now is None else now)
        return len(self._unknown)

    def leased_ip(self, mac: MacAddress, now: float | None = None) -> str | None:
        """The address leased to this MAC, if its lease has not run out."""
        lease = self.store.find_lease(mac)
        now = time.time() if now is None else now
        return lease.ip if lease is not None and lease.expires > now else None

    # -- the pieces -----------------------------------------------------------------------

    def _in_pool(self, number: int) -> bool:
        return self._first <= number <= self._last

    def _next_free(self, mac: MacAddress, now: float) -> int | None:
        """The lowest free address; each blocked one found on the way is parked until it
        may be free again, so the next search does not look at it."""
        while (number := self._free.next(now)) is not None:
            blocked = self._blocked_until(mac, number, now)
            if blocked is None:
                return number
            self._free.busy(number, blocked)
        return None

    def _blocked_until(self, mac: MacAddress, number: int, now: float) -> float | None:
        """None if ``number`` may be given to ``mac``, else until when it may not."""
        if number in self.excluded:
            return math.inf
        quarantined = self._quarantine.get(number)
        if quarantined is not None and quarantined[0] > now:
            return quarantined[0]
        offer = self._offered.get(number)
        if offer is not None and offer.mac != mac and offer.expires > now:
            return offer.expires
        ip = _text(number)
        if self.store.find_host_by_ip(ip) is not None:
            return now + RECHECK
        lease = self.store.find_lease_by_ip(ip)
        if lease is not None and lease.mac != mac and lease.expires >= now:
            return lease.expires
        return None

    def _holds(self, mac: MacAddress, number: int, lease: Lease | None, now: float) -> bool:
        """Is ``number`` already this MAC's (its lease or its offer)?"""
        offer = self._offers.get(mac)
        if offer is not None and offer.ip == number and offer.expires > now:
            return True
        return lease is not None and lease.ip == _text(number) and lease.expires > now

    def _hold_offer(self, mac: MacAddress, number: int, known: bool, now: float) -> str:
        previous = self._offers.get(mac)
        if previous is not None and previous.ip != number:
            self._drop_offer(mac)
        offer = Offer(mac, number, now + (OFFER_HOLD if known else UNKNOWN_OFFER_HOLD), known)
        self._offers[mac] = self._offered[number] = offer
        self._free.busy(number, offer.expires)
        if not known:
            self._hold_unknown(number, offer.expires)
        return _text(number)

    def _drop_offer(self, mac: MacAddress) -> None:
        offer = self._offers.pop(mac, None)
        if offer is None:
            return
        if self._offered.get(offer.ip) is offer:
            del self._offered[offer.ip]
        if self.store.find_lease_by_ip(_text(offer.ip)) is None:
            self._let_go(offer.ip)

    def _let_go(self, number: int | None) -> None:
        if number is not None:
            self._unknown.pop(number, None)
            self._free.free(number)

    def _reclaim_unknown_offer(self, now: float) -> int | None:
        """A registered host before unknown ones: the address of the unknown MAC's offer
        that runs out first, if any."""
        offers = [o for o in self._offered.values() if not o.known and o.expires > now]
        if not offers:
            return None
        victim = min(offers, key=lambda o: o.expires)
        self._drop_offer(victim.mac)
        return victim.ip

    def _hold_unknown(self, number: int, until: float) -> None:
        until = max(until, self._unknown.get(number, 0.0))
        self._unknown[number] = until
        heapq.heappush(self._unknown_expiry, (until, number))

    def _prune_unknown(self, now: float) -> None:
        expiry = self._unknown_expiry
        while expiry and expiry[0][0] <= now:
            until, number = heapq.heappop(expiry)
            if self._unknown.get(number) == until:
                del self._unknown[number]

    def _room_for_unknown(self, now: float) -> bool:
        self._prune_unknown(now)
        return len(self._unknown) < self.unknown_limit


def _number(ip: str) -> int | None:
    try:
        return int(ipaddress.IPv4Address(ip))
    except ValueError:
        return None


def _text(number: int) -> str:
    return str(ipaddress.IPv4Address(number))
