"""The registry: profiles, hosts, their timelines and leases, behind the Store interface."""

from pxeserver.registry.models import (
    BootFile,
    Conflict,
    Event,
    Host,
    NotFound,
    Profile,
    Status,
    ValidationError,
    XenSettings,
)
from pxeserver.registry.sqlite import SqliteStore
from pxeserver.registry.store import HostSummary, Lease, Store


def open_store(database: str) -> Store:
    """The store for a configured database: a SQLite file path (PostgreSQL to follow)."""
    return SqliteStore(database)


__all__ = [
    "BootFile", "Conflict", "Event", "Host", "HostSummary", "Lease", "NotFound", "Profile", "SqliteStore", "Status",
    "Store", "ValidationError", "XenSettings", "open_store",
]
