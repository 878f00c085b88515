"""The SQLite registry store: the default, one file under the data directory.

WAL mode lets the server's threads read while one writes and lets the CLI work beside a running
server; ``synchronous=FULL`` makes each acknowledged write survive a crash or power loss. Each
thread gets its own connection; every write is one ``BEGIN IMMEDIATE`` transaction.

DHCP leases and timeline events are the exception: they are committed with
``synchronous=NORMAL``, which in WAL mode survives a crash of pxeserver (kill -9 included) but
not a power loss, as dnsmasq's lease file does. A boot storm makes several of them per guest,
and waiting for the disk on each one, one after another under the single write lock, was most
of a storm's time. The next FULL commit (any host, profile or status change) makes them durable too.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from pxeserver.mac import MacAddress
from pxeserver.registry.models import (
    BootFile,
    Conflict,
    Event,
    Host,
    HostChanges,
    NotFound,
    Profile,
    Status,
    ValidationError,
    XenSettings,
)
from pxeserver.registry.store import Change, Contact, HostSummary, Lease, Tally

# Each entry upgrades the schema by one version; never edit a released entry, append a new one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO meta (key, value) VALUES ('generation', 0);
    CREATE TABLE profiles (
        name TEXT PRIMARY KEY,
        kernel TEXT NOT NULL,
        initrd TEXT NOT NULL,
        append TEXT NOT NULL DEFAULT '',
        autoinstall TEXT NOT NULL DEFAULT '',
        vars TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE hosts (
        mac TEXT PRIMARY KEY,
        hostname TEXT NOT NULL UNIQUE,
        ip TEXT UNIQUE,
        profile TEXT NOT NULL REFERENCES profiles(name),
        netboot INTEGER NOT NULL DEFAULT 1,
        status TEXT NOT NULL DEFAULT 'registered',
        vars TEXT NOT NULL DEFAULT '{}',
        xen TEXT NOT NULL DEFAULT '{}',
        install_token TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX hosts_profile ON hosts(profile);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        mac TEXT NOT NULL,
        time REAL NOT NULL,
        source TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX events_mac ON events(mac, id);
    CREATE TABLE leases (
        mac TEXT PRIMARY KEY,
        ip TEXT NOT NULL UNIQUE,
        expires REAL NOT NULL
    );
    """,
    """
    CREATE TABLE boot_files (
        path TEXT PRIMARY KEY,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        source TEXT NOT NULL DEFAULT ''
    );
    """,
]


def _profile(row: sqlite3.Row) -> Profile:
    return Profile(
        name=row["name"],
        kernel=row["kernel"],
        initrd=row["initrd"],
        append=row["append"],
        autoinstall=row["autoinstall"],
        vars=json.loads(row["vars"]),
    )


def _host(row: sqlite3.Row) -> Host:
    return Host(
        mac=MacAddress.parse(row["mac"]),
        hostname=row["hostname"],
        profile=row["profile"],
        ip=row["ip"],
        netboot=bool(row["netboot"]),
        status=Status(row["status"]),
        vars=json.loads(row["vars"]),
        xen=XenSettings(**json.loads(row["xen"])),
        install_token=row["install_token"],
    )


def _host_params(host: Host) -> dict[str, Any]:
    return {
        "mac": str(host.mac),
        "hostname": host.hostname,
        "ip": host.ip,
        "profile": host.profile,
        "netboot": int(host.netboot),
        "status": host.status.value,
        "vars": json.dumps(host.vars),
        "xen": json.dumps(host.xen.to_dict()),
        "install_token": host.install_token,
    }


def _unique_conflict(exc: sqlite3.IntegrityError, host: Host) -> Exception:
    text = str(exc)
    if "hosts.mac" in text:
        return Conflict(f"a host with MAC {host.mac} already exists")
    if "hosts.hostname" in text:
        return Conflict(f"hostname {host.hostname!r} is already taken")
    if "hosts.ip" in text:
        return Conflict(f"IP address {host.ip} is already taken")
    if "FOREIGN KEY" in text:
        return ValidationError(f"unknown profile {host.profile!r}")
    return Conflict(text)


class SqliteStore:
    """A :class:`~pxeserver.registry.store.Store` in one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._migrate()

    # -- connections and transactions ---------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    @contextmanager
    def _transaction(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction; not ``durable``: its commit does not wait for the disk."""
        conn = self._connection()
        if not durable:
            conn.execute("PRAGMA synchronous=NORMAL")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            if not durable:
                conn.execute("PRAGMA synchronous=FULL")

    @contextmanager
    def _write(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A transaction that moves the generation on (readers' caches and the DNS serial)."""
        with self._transaction(durable) as conn:
            yield conn
            conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")

    def _migrate(self) -> None:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise RuntimeError(
                    f"{self.path} has schema version {version}, newer than this pxeserver knows"
                )
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in filter(str.strip, script.split(";")):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def watch(self, on_change: Callable[[Change], None]) -> None:
        """One node: the CLI beside it writes the boot config files of its own changes."""

    def generation(self) -> int:
        row = self._connection().execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0])

    # -- profiles -----------------------------------------------------------------------------

    def add_profile(self, profile: Profile) -> None:
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO profiles (name, kernel, initrd, append, autoinstall, vars) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (profile.name, profile.kernel, profile.initrd, profile.append,
                     profile.autoinstall, json.dumps(profile.vars)),
                )
        except sqlite3.IntegrityError:
            raise Conflict(f"profile {profile.name!r} already exists") from None

    def put_profile(self, profile: Profile) -> None:
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE profiles SET kernel = ?, initrd = ?, append = ?, autoinstall = ?, vars = ? "
                "WHERE name = ?",
                (profile.kernel, profile.initrd, profile.append, profile.autoinstall,
                 json.dumps(profile.vars), profile.name),
            )
            if cursor.rowcount == 0:
                raise NotFound(f"no profile named {profile.name!r}")

    def get_profile(self, name: str) -> Profile:
        row = self._connection().execute("SELECT * FROM profiles WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no profile named {name!r}")
        return _profile(row)

    def list_profiles(self) -> list[Profile]:
        rows = self._connection().execute("SELECT * FROM profiles ORDER BY name").fetchall()
        return [_profile(row) for row in rows]

    def add_imported_profile(self, profile: Profile, files: Iterable[BootFile]) -> bool:
        rows = sorted((f.path, f.size, f.sha256, f.source) for f in files)
        with self._write() as conn:
            conn.executemany(
                "INSERT INTO boot_files (path, size, sha256, source) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(path) DO UPDATE SET size = excluded.size, sha256 = excluded.sha256, "
                "source = excluded.source", rows)
            row = conn.execute("SELECT * FROM profiles WHERE name = ?", (profile.name,)).fetchone()
            if row is not None:
                if _profile(row) != profile:
                    raise Conflict(f"profile {profile.name!r} already exists with other settings")
                return False
            conn.execute(
                "INSERT INTO profiles (name, kernel, initrd, append, autoinstall, vars) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (profile.name, profile.kernel, profile.initrd, profile.append,
                 profile.autoinstall, json.dumps(profile.vars)),
            )
            return True

    def boot_files(self, paths: Iterable[str]) -> dict[str, BootFile]:
        wanted = list(paths)
        rows = self._connection().execute(
            f"SELECT * FROM boot_files WHERE path IN ({', '.join('?' * len(wanted))})", wanted
        ).fetchall()
        return {row["path"]: BootFile(row["path"], row["size"], row["sha256"], row["source"])
                for row in rows}

    def delete_profile(self, name: str) -> None:
        with self._write() as conn:
            users = conn.execute(
                "SELECT COUNT(*) FROM hosts WHERE profile = ?", (name,)
            ).fetchone()[0]
            if users:
                raise Conflict(f"profile {name!r} is used by {users} host(s)")
            if conn.execute("DELETE FROM profiles WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"no profile named {name!r}")

    # -- hosts --------------------------------------------------------------------------------

    def add_host(self, host: Host) -> None:
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO hosts (mac, hostname, ip, profile, netboot, status, vars, xen, "
                    "install_token) VALUES (:mac, :hostname, :ip, :profile, :netboot, :status, "
                    ":vars, :xen, :install_token)",
                    _host_params(host),
                )
        except sqlite3.IntegrityError as exc:
            raise _unique_conflict(exc, host) from None

    def update_host(self, mac: MacAddress, changes: HostChanges) -> tuple[Host, Host]:
        values = {**changes.fields, "mac": str(mac)}
        assignments = [f"{name} = :{name}" for name in changes.fields]  # names HostChanges checked
        if "vars" in values:
            values["vars"] = json.dumps(values["vars"])
        if changes.xen:
            assignments.append("xen = json_patch(xen, :xen)")
            values["xen"] = json.dumps(changes.xen)
        try:
            with self._write() as conn:
                before = conn.execute("SELECT * FROM hosts WHERE mac = ?", (str(mac),)).fetchone()
                if before is None:
                    raise NotFound(f"no host with MAC {mac}")
                if assignments:
                    conn.execute(f"UPDATE hosts SET {', '.join(assignments)} WHERE mac = :mac", values)
                if changes.netboot:
                    conn.execute(
                        "UPDATE hosts SET netboot = 1, status = 'registered', install_token = ? "
                        "WHERE mac = ? AND netboot = 0",
                        (changes.install_token, str(mac)),
                    )
                elif changes.netboot is False:
                    conn.execute("UPDATE hosts SET netboot = 0 WHERE mac = ?", (str(mac),))
                after = conn.execute("SELECT * FROM hosts WHERE mac = ?", (str(mac),)).fetchone()
        except sqlite3.IntegrityError as exc:
            raise _unique_conflict(exc, replace(_host(before), **changes.fields)) from None
        return _host(before), _host(after)

    def find_host(self, mac: MacAddress) -> Host | None:
        row = self._connection().execute("SELECT * FROM hosts WHERE mac = ?", (str(mac),)).fetchone()
        return None if row is None else _host(row)

    def get_host(self, mac: MacAddress) -> Host:
        host = self.find_host(mac)
        if host is None:
            raise NotFound(f"no host with MAC {mac}")
        return host

    def find_host_by_ip(self, ip: str) -> Host | None:
        row = self._connection().execute("SELECT * FROM hosts WHERE ip = ?", (ip,)).fetchone()
        return None if row is None else _host(row)

    def list_hosts(self) -> list[Host]:
        rows = self._connection().execute("SELECT * FROM hosts ORDER BY mac").fetchall()
        return [_host(row) for row in rows]

    def delete_host(self, mac: MacAddress) -> None:
        with self._write() as conn:
            if conn.execute("DELETE FROM hosts WHERE mac = ?", (str(mac),)).rowcount == 0:
                raise NotFound(f"no host with MAC {mac}")
            conn.execute("DELETE FROM events WHERE mac = ?", (str(mac),))
            conn.execute("DELETE FROM leases WHERE mac = ?", (str(mac),))

    def macs(self) -> set[MacAddress]:
        rows = self._connection().execute("SELECT mac FROM hosts").fetchall()
        return {MacAddress.parse(row[0]) for row in rows}

    def advance_status(self, mac: MacAddress, to: Status, allowed_from: Iterable[Status]) -> bool:
        allowed = [s.value for s in allowed_from]
        with self._write() as conn:
            cursor = conn.execute(
                f"UPDATE hosts SET status = ? WHERE mac = ? AND netboot = 1 AND status IN "
                f"({', '.join('?' * len(allowed))})",
                (to.value, str(mac), *allowed),
            )
            return cursor.rowcount == 1

    def complete_install(self, mac: MacAddress, token: str) -> Host | None:
        with self._write() as conn:
            row = conn.execute(
                "UPDATE hosts SET status = 'installed', netboot = 0, install_token = '' "
                "WHERE mac = ? AND install_token = ? AND install_token != '' RETURNING *",
                (str(mac), token),
            ).fetchone()
            return None if row is None else _host(row)

    # -- events -------------------------------------------------------------------------------

    def add_events(self, events: Iterable[Event], keep: int = 1000) -> None:
        rows = [(str(e.mac), e.time, e.source, e.message, str(e.mac)) for e in events]
        if not rows:
            return
        with self._transaction(durable=False) as conn:
            conn.executemany(
                "INSERT INTO events (mac, time, source, message) SELECT ?, ?, ?, ? "
                "WHERE EXISTS (SELECT 1 FROM hosts WHERE mac = ?)", rows
            )
            for mac in {row[0] for row in rows}:
                conn.execute(
                    "DELETE FROM events WHERE mac = ? AND id <= (SELECT id FROM events "
                    "WHERE mac = ? ORDER BY id DESC LIMIT 1 OFFSET ?)", (mac, mac, keep)
                )

    def events(self, mac: MacAddress, limit: int = 1000) -> list[Event]:
        rows = self._connection().execute(
            "SELECT * FROM (SELECT * FROM events WHERE mac = ? ORDER BY id DESC LIMIT ?) "
            "ORDER BY id",
            (str(mac), limit),
        ).fetchall()
        return [Event(mac, row["time"], row["source"], row["message"]) for row in rows]

    def host_summaries(self) -> list[HostSummary]:
        rows = self._connection().execute(
            "SELECT h.mac, h.hostname, h.ip, h.profile, h.netboot, h.status, e.time, e.source, "
            "e.message FROM hosts h LEFT JOIN events e "
            "ON e.id = (SELECT MAX(id) FROM events WHERE mac = h.mac)"
        ).fetchall()
        summaries = []
        for mac_text, hostname, ip, profile, netboot, status, when, source, message in rows:
            mac = MacAddress(bytes.fromhex(mac_text.replace(":", "")))  # stored canonical
            last = None if when is None else Event(mac, when, source, message)
            summaries.append(HostSummary(mac, hostname, ip, profile, bool(netboot), Status(status), last))
        return summaries

    def status_counts(self, stalled_before: float) -> dict[str, int]:
        rows = self._connection().execute(
            "SELECT h.status, COUNT(*), SUM(h.netboot = 1 AND h.status IN ('netbooting', "
            "'installing') AND COALESCE((SELECT time FROM events WHERE id = (SELECT MAX(id) "
            "FROM events WHERE mac = h.mac)), 0) < ?) FROM hosts h GROUP BY h.status",
            (stalled_before,),
        ).fetchall()
        counts = {status.value: 0 for status in Status} | {"stalled": 0}
        for status, count, stalled in rows:
            counts[status] = count
            counts["stalled"] += stalled
        return counts

    def recent_events(self, since: float, limit: int = 10_000) -> list[Event]:
        # Newest first by id with the time filter applied outside: at most ``limit`` rows are
        # read whatever the window (events has no time index; ids follow time closely).
        rows = self._connection().execute(
            "SELECT * FROM (SELECT * FROM events ORDER BY id DESC LIMIT ?) ORDER BY id", (limit,)
        ).fetchall()
        return [Event(MacAddress.parse(r["mac"]), r["time"], r["source"], r["message"])
                for r in rows if r["time"] >= since]

    # -- leases -------------------------------------------------------------------------------

    def find_lease(self, mac: MacAddress) -> Lease | None:
        row = self._connection().execute("SELECT * FROM leases WHERE mac = ?", (str(mac),)).fetchone()
        return None if row is None else Lease(mac, row["ip"], row["expires"])

    def find_lease_by_ip(self, ip: str) -> Lease | None:
        row = self._connection().execute("SELECT * FROM leases WHERE ip = ?", (ip,)).fetchone()
        return None if row is None else Lease(MacAddress.parse(row["mac"]), ip, row["expires"])

    def put_lease(self, lease: Lease, expired_before: float | None = None) -> None:
        try:
            with self._write(durable=False) as conn:
                if expired_before is not None:
                    conn.execute("DELETE FROM leases WHERE ip = ? AND mac != ? AND expires < ?",
                                 (lease.ip, str(lease.mac), expired_before))
                conn.execute(
                    "INSERT INTO leases (mac, ip, expires) VALUES (?, ?, ?) ON CONFLICT(mac) "
                    "DO UPDATE SET ip = excluded.ip, expires = excluded.expires",
                    (str(lease.mac), lease.ip, lease.expires),
                )
        except sqlite3.IntegrityError:
            raise Conflict(f"IP address {lease.ip} is leased to another MAC") from None

    def delete_lease(self, mac: MacAddress) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM leases WHERE mac = ?", (str(mac),))

    def list_leases(self) -> list[Lease]:
        rows = self._connection().execute("SELECT * FROM leases ORDER BY ip").fetchall()
        return [Lease(MacAddress.parse(r["mac"]), r["ip"], r["expires"]) for r in rows]

    def host_addresses(self, now: float) -> list[tuple[str, str, float | None]]:
        rows = self._connection().execute(
            "SELECT h.hostname, COALESCE(h.ip, l.ip), CASE WHEN h.ip IS NULL THEN l.expires END "
            "FROM hosts h LEFT JOIN leases l ON l.mac = h.mac "
            "WHERE h.ip IS NOT NULL OR l.expires > ?",
            (now,),
        ).fetchall()
        return [(row[0], row[1], row[2]) for row in rows]

    def contact(self) -> Contact:
        """A file on this machine: always there (a disk error shows on the write that meets it)."""
        return Contact(True, time.time())

    def tally(self, now: float) -> Tally:
        conn = self._connection()
        hosts = conn.execute("SELECT status, COUNT(*) FROM hosts GROUP BY status").fetchall()
        profiles, leases = conn.execute(
            "SELECT (SELECT COUNT(*) FROM profiles), (SELECT COUNT(*) FROM leases WHERE expires > ?)",
            (now,),
        ).fetchone()
        return Tally({Status(row[0]): row[1] for row in hosts}, profiles, leases)
