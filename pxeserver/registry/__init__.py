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


def describe_database(database: str) -> str:
    """The database as a log line may show it: a PostgreSQL URL without its password."""
    if not is_postgresql(database):
        return f"SQLite {database}"
    from psycopg.conninfo import conninfo_to_dict

    info = conninfo_to_dict(database)
    return f"PostgreSQL {info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


def open_store(database: str) -> Store:
    """The store for a configured database: a ``postgresql://`` URL (several nodes share it)
    or a SQLite file path."""
    if is_postgresql(database):
        from pxeserver.registry.postgres import PostgresStore  # psycopg only when used

        return PostgresStore(database)
    return SqliteStore(database)


__all__ = [
    "BootFile", "Change", "Conflict", "Contact", "Event", "Host", "HostSummary", "Lease", "NotFound", "Profile",
    "SqliteStore", "Status", "Store", "Unavailable", "ValidationError", "XenSettings", "describe_database",
    "is_postgresql", "open_store",
]
