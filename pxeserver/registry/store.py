"""The storage interface the rest of pxeserver sees.

Services and the API depend on this protocol only, so a PostgreSQL store (several servers
sharing one registry) can replace the SQLite one without touching them. Every method is one
transaction; a method that returns has made its change durable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from pxeserver.mac import MacAddress
from pxeserver.registry.models import BootFile, Event, Host, HostChanges, Profile, Status


@dataclass(frozen=True)
class Lease:
    """A dynamic DHCP lease (reservations are the hosts' registered IPs, not leases)."""

    mac: MacAddress
    ip: str
    expires: float


class Unavailable(Exception):
    """The registry database cannot be reached: a change was not made (the API answers 503)."""


@dataclass(frozen=True)
class Change:
    """What another node changed: ``kind`` host (key: the MAC), profile (key: its name), lease
    (key: the MAC), boot-file (key: its path), or all (key empty: changes were missed while
    the database was away)."""

    kind: str
    key: str


@dataclass(frozen=True)
class Contact:
    """Whether this node reaches the registry database now, and when it last did."""

    up: bool
    last: float  # time.time() of the last answer from the database; 0 if none yet


@dataclass(frozen=True)
class Tally:
    """How much the registry holds, for the metrics a scrape reads."""

    hosts: dict[Status, int]  # by install status
    profiles: int
    leases: int  # unexpired dynamic leases


@dataclass(frozen=True)
class HostSummary:
    """A host as a list of many shows it: no vars or xen settings, and its newest event."""

    mac: MacAddress
    hostname: str
    ip: str | None
    profile: str
    netboot: bool
    status: Status
    last_event: Event | None


class Store(Protocol):
    # Profiles. add_profile raises Conflict on a duplicate name; get/put/delete raise NotFound;
    # delete_profile raises Conflict while a host still uses the profile.
    def add_profile(self, profile: Profile) -> None: ...
    def put_profile(self, profile: Profile) -> None: ...
    def get_profile(self, name: str) -> Profile: ...
    def list_profiles(self) -> list[Profile]: ...
    def delete_profile(self, name: str) -> None: ...
    def add_imported_profile(self, profile: Profile, files: Iterable[BootFile]) -> bool:
        """Record the files an import published and add its profile, in one transaction.

        True if the profile was added; False if an identical one already existed (a repeated
        import); Conflict if a profile of that name differs.
        """
        ...
    def boot_files(self, paths: Iterable[str]) -> dict[str, BootFile]:
        """The recorded size and SHA-256 of those of ``paths`` an import recorded."""
        ...

    # Hosts. add_host and update_host raise Conflict on a duplicate MAC, hostname or IP and
    # ValidationError for an unknown profile; get/update/delete raise NotFound.
    def add_host(self, host: Host) -> None: ...
    def update_host(self, mac: MacAddress, changes: HostChanges) -> tuple[Host, Host]:
        """Write only the fields ``changes`` names; returns the host before and after.

        Netboot turned on (from off) starts a new install in the same transaction: status
        registered and ``changes.install_token``. Status and the install token change nowhere
        else but in advance_status and complete_install, so a PATCH never undoes a callback.
        """
        ...
    def get_host(self, mac: MacAddress) -> Host: ...
    def find_host(self, mac: MacAddress) -> Host | None: ...
    def find_host_by_ip(self, ip: str) -> Host | None: ...
    def list_hosts(self) -> list[Host]: ...
    def delete_host(self, mac: MacAddress) -> None: ...
    def macs(self) -> set[MacAddress]: ...

    # Atomic lifecycle steps, safe against a concurrent PATCH of the same host.
    def advance_status(self, mac: MacAddress, to: Status, allowed_from: Iterable[Status]) -> bool:
        """Set ``to`` if the host netboots and is in one of ``allowed_from``; True if it did."""
        ...
    def complete_install(self, mac: MacAddress, token: str) -> Host | None:
        """Mark installed, stop netbooting and use up the token if ``token`` is the current
        install token; the host as it is then, or None if the token did not match."""
        ...

    # Provisioning timeline. add_events stores only events of registered hosts (anyone on the
    # guest network can make events for made-up MACs) and keeps each host's newest ``keep``.
    def add_events(self, events: Iterable[Event], keep: int = 1000) -> None: ...
    def events(self, mac: MacAddress, limit: int = 1000) -> list[Event]: ...
    # Every host with its newest event, in one light query (the dashboard at 10,000 hosts).
    def host_summaries(self) -> list[HostSummary]: ...
    # How many hosts are in each status, and under "stalled" how many netbooting or installing
    # hosts had their newest event (or none) before ``stalled_before``. One query.
    def status_counts(self, stalled_before: float) -> dict[str, int]: ...
    # Events of all hosts at or after ``since`` among the newest ``limit``, oldest first.
    def recent_events(self, since: float, limit: int = 10_000) -> list[Event]: ...

    # DHCP leases for hosts without a registered IP.
    def find_lease(self, mac: MacAddress) -> Lease | None: ...
    def find_lease_by_ip(self, ip: str) -> Lease | None: ...
    def put_lease(self, lease: Lease, expired_before: float | None = None) -> None:
        """Raises Conflict if another MAC holds the address; with ``expired_before``, a lease
        of another MAC that ran out before then is taken over in the same transaction (so two
        servers sharing the registry can never both give the address away)."""
        ...
    def delete_lease(self, mac: MacAddress) -> None: ...
    def list_leases(self) -> list[Lease]: ...

    # Host names and addresses for DNS: (hostname, ip, lease expiry or None) for every host with
    # a registered IP, else an unexpired lease. One light query, so a large registry's zone
    # rebuilds in milliseconds.
    def host_addresses(self, now: float) -> list[tuple[str, str, float | None]]: ...

    # Increases on every change of a profile, host or lease: the DNS SOA serial, and a cheap
    # "has anything changed" check for caches.
    def generation(self) -> int: ...

    # Counts only (two light queries), read at every metrics scrape.
    def tally(self, now: float) -> Tally: ...

    def contact(self) -> Contact:
        """Whether the database answers this node now (no query: a scrape during an outage must
        not wait for a timeout)."""
        ...

    def watch(self, on_change: Callable[[Change], None]) -> None:
        """Call ``on_change`` for each change another node makes, as it commits (from another
        thread); a store only this process writes never calls it."""
        ...

    def close(self) -> None: ...
