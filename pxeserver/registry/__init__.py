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
from pxeserver.registry.store import Change, Contact, HostSummary, Lease, Store, Unavailable


def is_postgresql(database: str) -> bool:
    return database.startswith(("postgresql://", "postgres://"))


def open_store(database: str) -> Store:
    """The store for a configured database: a ``postgresql://`` URL (several nodes share it)
    or a SQLite file path."""
    if is_postgresql(database):
        from pxeserver.registry.postgres import PostgresStore  # psycopg only when used

        return PostgresStore(database)
    return SqliteStore(database)


__all__ = [
    "BootFile", "Change", "Conflict", "Contact", "Event", "Host", "HostSummary", "Lease", "NotFound", "Profile",
    "SqliteStore", "Status", "Store", "Unavailable", "ValidationError", "XenSettings", "is_postgresql",
    "open_store",
]
