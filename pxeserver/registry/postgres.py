"""The PostgreSQL registry store: several pxeserver nodes sharing one registry.

Writes are transactions on a psycopg_pool connection pool; the database decides every race
(unique MAC, hostname, IP and lease address; compare-and-set of status, netboot and install
token). Each write also bumps the ``generation`` row and sends ``NOTIFY pxeserver`` with what
changed, in the same transaction, so every node hears of every change the moment it commits.

Reads are answered from a per-node cache tagged with the generation they were read at: a
listener thread keeps this node's view of the generation current from the notifications, so
an answer is reused exactly until something changes anywhere. The cache is also the node's last
known state: while the database is unreachable, reads it holds are answered from it (TFTP,
HTTP, DHCP and DNS keep serving existing hosts), everything else raises :class:`Unavailable`,
and the node catches up by itself when the database returns.

DHCP leases and timeline events commit with ``synchronous_commit = off``, as the SQLite store
commits them without waiting for the disk: visible to every node at once, and lost only if the
database server itself crashes within a fraction of a second of the commit.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

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
from pxeserver.registry.store import Change, Contact, HostSummary, Lease, Tally, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

CHANNEL = "pxeserver"
MIGRATION_LOCK = 0x70786573  # pg_advisory_xact_lock key: one node migrates at a time
CONNECT_TIMEOUT = 5  # seconds to reach the server (or get a pooled connection) before giving up
LISTENER_NAME = "pxeserver listener"  # its application_name, as pg_stat_activity shows it
HEARTBEAT = 1.0  # seconds between the listener's checks that the database still answers
CACHE_ENTRIES = 200_000  # answers kept per node (a MAC-spraying client cannot grow it further)

# Each entry upgrades the schema by one version; never edit a released entry, append a new one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
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
        netboot BOOLEAN NOT NULL DEFAULT TRUE,
        status TEXT NOT NULL DEFAULT 'registered',
        vars TEXT NOT NULL DEFAULT '{}',
        xen JSONB NOT NULL DEFAULT '{}',
        install_token TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX hosts_profile ON hosts(profile);
    CREATE TABLE events (
        id BIGSERIAL PRIMARY KEY,
        mac TEXT NOT NULL,
        time DOUBLE PRECISION NOT NULL,
        source TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX events_mac ON events(mac, id);
    CREATE TABLE leases (
        mac TEXT PRIMARY KEY,
        ip TEXT NOT NULL UNIQUE,
        expires DOUBLE PRECISION NOT NULL
    );
    """,
    """
    CREATE TABLE boot_files (
        path TEXT PRIMARY KEY,
        size BIGINT NOT NULL,
        sha256 TEXT NOT NULL,
        source TEXT NOT NULL DEFAULT ''
    );
    """,
]

_UNREACHABLE = (psycopg.OperationalError, PoolTimeout)


def _profile(row: dict[str, Any]) -> Profile:
    return Profile(name=row["name"], kernel=row["kernel"], initrd=row["initrd"], append=row["append"],
                   autoinstall=row["autoinstall"], vars=json.loads(row["vars"]))


def _host(row: dict[str, Any]) -> Host:
    return Host(
        mac=MacAddress.parse(row["mac"]),
        hostname=row["hostname"],
        profile=row["profile"],
        ip=row["ip"],
        netboot=row["netboot"],
        status=Status(row["status"]),
        vars=json.loads(row["vars"]),
        xen=XenSettings(**row["xen"]),
        install_token=row["install_token"],
    )


def _host_conflict(exc: psycopg.IntegrityError, host: Host) -> Exception:
    constraint = exc.diag.constraint_name or ""
    if isinstance(exc, psycopg.errors.ForeignKeyViolation):
        return ValidationError(f"unknown profile {host.profile!r}")
    if constraint == "hosts_pkey":
        return Conflict(f"a host with MAC {host.mac} already exists")
    if constraint == "hosts_hostname_key":
        return Conflict(f"hostname {host.hostname!r} is already taken")
    if constraint == "hosts_ip_key":
        return Conflict(f"IP address {host.ip} is already taken")
    return Conflict(str(exc))


def schema_version(conn: psycopg.Connection[Any]) -> int:
    exists = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return 0
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return 0 if row is None else int(row[0])


def migrate(url: str) -> tuple[int, int]:
    """Bring the database's schema up to date; (version before, version after).

    Under an advisory lock, so nodes starting together migrate once; a schema newer than this
    pxeserver knows is refused, never touched.
    """
    with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        before = schema_version(conn)
        if before > len(MIGRATIONS):
            raise RuntimeError(f"the database has schema version {before}, newer than this "
                               f"pxeserver knows ({len(MIGRATIONS)})")
        if before == 0:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO schema_version (version) VALUES (0)")
        for script in MIGRATIONS[before:]:
            conn.execute(script)
        conn.execute("UPDATE schema_version SET version = %s", (len(MIGRATIONS),))
    return before, len(MIGRATIONS)


def check(url: str) -> int:
    """The database's schema version; raises RuntimeError unless it is the one this pxeserver
    uses, Unavailable if the server cannot be reached."""
    try:
        with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT) as conn:
            version = schema_version(conn)
    except psycopg.OperationalError as exc:
        raise Unavailable(f"cannot reach the registry database: {_reason(exc)}") from None
    if version != len(MIGRATIONS):
        raise RuntimeError(f"the database has schema version {version}; this pxeserver needs "
                           f"{len(MIGRATIONS)} (run 'pxeserver db migrate')")
    return version


def _reason(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class _Answers:
    """Read answers tagged with the store version they were read at; the newest ones are kept."""

    def __init__(self, limit: int = CACHE_ENTRIES) -> None:
        self._entries: OrderedDict[tuple[Any, ...], tuple[tuple[int, int], Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._limit = limit

    def get(self, key: tuple[Any, ...]) -> tuple[tuple[int, int], Any] | None:
        with self._lock:
            return self._entries.get(key)

    def put(self, key: tuple[Any, ...], version: tuple[int, int], value: Any) -> None:
        with self._lock:
            current = self._entries.pop(key, None)
            if current is not None and current[0] > version:
                version, value = current  # a slower reader must not replace a newer answer
            self._entries[key] = (version, value)
            while len(self._entries) > self._limit:
                self._entries.popitem(last=False)


class PostgresStore:
    """A :class:`~pxeserver.registry.store.Store` in a PostgreSQL database several nodes share."""

    def __init__(self, url: str, *, pool_size: int = 10, migrate_schema: bool = True) -> None:
        self.url = url
        if migrate_schema:
            try:
                migrate(url)
            except psycopg.OperationalError as exc:
                raise Unavailable(f"cannot reach the registry database: {_reason(exc)}") from None
        self.node = uuid.uuid4().hex[:12]  # tells this node's notifications from the others'
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, timeout=CONNECT_TIMEOUT,
                                    check=ConnectionPool.check_connection,  # none the outage broke
                                    kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT},
                                    name="pxeserver-registry", open=True)
        self._answers = _Answers()
        self._generation = 0  # the database's, as this node last heard it
        self._epoch = 0  # how often this node answered from before: caches built then are stale
        self._generation_lock = threading.Lock()
        self._live = threading.Event()  # the listener is connected: the generation is current
        self._last_contact = 0.0  # time.time() of the listener's last answer from the database
        self._watchers: list[Callable[[Change], None]] = []
        self._closing = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="registry-listener", daemon=True)
        self._listener.start()
        self._live.wait(CONNECT_TIMEOUT * 2)
        self._warm()

    # -- connections, transactions and notifications --------------------------------------------

    def _saw(self, generation: int) -> None:
        with self._generation_lock:
            if generation > self._generation:
                self._generation = generation

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        # Down: fail fast, the callers answer from the last known state.
        timeout = CONNECT_TIMEOUT if self._live.is_set() else 0.2
        try:
            with self._pool.connection(timeout=timeout) as conn:
                conn.row_factory = dict_row  # type: ignore[assignment]
                yield conn  # type: ignore[misc]
        except psycopg.errors.TransactionRollback as exc:  # a deadlock or serialization failure
            raise Conflict(f"a concurrent change of the same records got in the way; try again "
                           f"({_reason(exc)})") from None
        except _UNREACHABLE as exc:
            raise Unavailable(f"the registry database is unreachable: {_reason(exc)}") from None

    @contextmanager
    def _write(self, durable: bool = True) -> Iterator[tuple[psycopg.Connection[dict[str, Any]], list[Change]]]:
        """One transaction; the changes the body lists bump the generation and are announced to
        every node on commit. A body that lists none changed nothing and announces nothing.
        Not ``durable``: the commit does not wait for the database's disk."""
        changes: list[Change] = []
        with self._connection() as conn, conn.transaction():
            if not durable:
                conn.execute("SET LOCAL synchronous_commit = off")
            yield conn, changes
            if changes:
                row = conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation' "
                                   "RETURNING value").fetchone()
                generation = int(row["value"])  # type: ignore[index]
                for change in changes:
                    conn.execute("SELECT pg_notify(%s, %s)",
                                 (CHANNEL, f"{generation} {self.node} {change.kind} {change.key}"))
        if changes:
            self._saw(generation)

    def _read(self, key: tuple[Any, ...], query: Callable[[psycopg.Connection[Any]], T],
              *, reuse: bool = True) -> T:
        """``query``'s answer, from the cache while nothing has changed (``reuse``), else from
        the database; the last known answer when the database cannot be reached."""
        version = self._version()
        cached = self._answers.get(key)
        live = self._live.is_set()
        if cached is not None and (not live or (reuse and cached[0] == version)):
            return cached[1]  # type: ignore[no-any-return]
        for attempt in (1, 2):  # a second try on a fresh connection: the outage broke pooled ones
            try:
                with self._connection() as conn:
                    value = query(conn)
                break
            except Unavailable:
                if attempt == 1 and self._live.is_set():
                    continue
                if cached is None:
                    raise
                # Answered from before: whoever caches this answer must not keep it past
                # the outage, so the generation moves on.
                with self._generation_lock:
                    self._epoch += 1
                return cached[1]  # type: ignore[no-any-return]
        self._answers.put(key, version, value)
        return value

    def _listen(self) -> None:
        """Keep this node's generation current and tell the watchers what other nodes changed;
        reconnect by itself after the database went away."""
        delay, down = 0.1, False
        while not self._closing.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                                     application_name=LISTENER_NAME) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    row = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
                    missed = down and row is not None and int(row[0]) != self._generation
                    self._saw(int(row[0]) if row else 0)
                    if down:
                        self._pool.check()  # drop the connections the outage broke
                        with self._generation_lock:
                            self._epoch += 1  # rebuild what was built from the last known state
                        log.warning("registry database is reachable again")
                    self._last_contact = time.time()
                    self._live.set()
                    if missed:  # other nodes changed things meanwhile
                        self._tell(Change("all", ""))
                    delay, down = 0.1, False
                    while not self._closing.is_set():
                        for notify in conn.notifies(timeout=HEARTBEAT / 2):
                            self._notified(notify.payload)
                        if time.time() - self._last_contact >= HEARTBEAT:
                            conn.execute("SELECT 1")  # raises once the database is gone
                            self._last_contact = time.time()
            except psycopg.Error as exc:
                if self._live.is_set():
                    log.error("registry database unreachable (%s): serving the last known state, "
                              "refusing changes", _reason(exc))
                self._live.clear()
                down = True
                self._closing.wait(delay)
                delay = min(delay * 2, 1.0)

    def _notified(self, payload: str) -> None:
        generation, node, kind, key = (payload.split(" ", 3) + ["", "", ""])[:4]
        self._saw(int(generation))
        if node != self.node:
            self._tell(Change(kind, key))

    def _tell(self, change: Change) -> None:
        for watcher in list(self._watchers):
            try:
                watcher(change)
            except Exception:  # one failing watcher must not stop the listener
                log.exception("could not apply registry change %s", change)

    def watch(self, on_change: Callable[[Change], None]) -> None:
        self._watchers.append(on_change)

    def _warm(self) -> None:
        """Read every host, profile and lease once, so the last known state covers them all."""
        try:
            self.list_hosts()
            self.list_profiles()
            self.list_leases()
        except Unavailable as exc:
            log.warning("%s; starting with nothing cached", exc)

    def close(self) -> None:
        self._closing.set()
        self._listener.join(timeout=5)
        self._pool.close()

    def generation(self) -> int:
        """The database's generation as this node last heard it, plus one for every answer it
        gave from its last known state (so caches built from those are rebuilt)."""
        return self._generation + self._epoch

    def _version(self) -> tuple[int, int]:
        """What a cached answer is tagged with: valid while both are unchanged."""
        return self._generation, self._epoch

    def healthy(self) -> bool:
        """Whether this node is connected to the database right now."""
        return self._live.is_set()

    def contact(self) -> Contact:
        return Contact(self._live.is_set(), self._last_contact)

    # -- profiles -----------------------------------------------------------------------------

    def add_profile(self, profile: Profile) -> None:
        try:
            with self._write() as (conn, changes):
                conn.execute(
                    "INSERT INTO profiles (name, kernel, initrd, append, autoinstall, vars) "
                    "VALUES (%s, %s, %s, %s, %s, %s)",
                    (profile.name, profile.kernel, profile.initrd, profile.append,
                     profile.autoinstall, json.dumps(profile.vars)),
                )
                changes.append(Change("profile", profile.name))
        except psycopg.errors.UniqueViolation:
            raise Conflict(f"profile {profile.name!r} already exists") from None

    def put_profile(self, profile: Profile) -> None:
        with self._write() as (conn, changes):
            cursor = conn.execute(
                "UPDATE profiles SET kernel = %s, initrd = %s, append = %s, autoinstall = %s, "
                "vars = %s WHERE name = %s",
                (profile.kernel, profile.initrd, profile.append, profile.autoinstall,
                 json.dumps(profile.vars), profile.name),
            )
            if cursor.rowcount == 0:
                raise NotFound(f"no profile named {profile.name!r}")
            changes.append(Change("profile", profile.name))

    def get_profile(self, name: str) -> Profile:
        profile = self._read(("profile", name), lambda conn: self._one_profile(conn, name))
        if profile is None:
            raise NotFound(f"no profile named {name!r}")
        return profile

    @staticmethod
    def _one_profile(conn: psycopg.Connection[Any], name: str) -> Profile | None:
        row = conn.execute("SELECT * FROM profiles WHERE name = %s", (name,)).fetchone()
        return None if row is None else _profile(row)

    def list_profiles(self) -> list[Profile]:
        version = self._version()
        profiles = self._read(("profiles",), lambda conn: [
            _profile(row) for row in conn.execute("SELECT * FROM profiles ORDER BY name")])
        for profile in profiles:
            self._answers.put(("profile", profile.name), version, profile)
        return list(profiles)

    def add_imported_profile(self, profile: Profile, files: Iterable[BootFile]) -> bool:
        # In path order: two nodes importing overlapping files lock the rows in one order, so
        # neither waits for the other while holding what the other waits for (a deadlock).
        rows = sorted((f.path, f.size, f.sha256, f.source) for f in files)
        with self._write() as (conn, changes):
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO boot_files (path, size, sha256, source) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (path) DO UPDATE SET size = excluded.size, "
                    "sha256 = excluded.sha256, source = excluded.source", rows)
            changes.extend(Change("boot-file", path) for path, *_ in rows)
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (profile.name,))
            existing = self._one_profile(conn, profile.name)
            if existing is not None:
                if existing != profile:
                    raise Conflict(f"profile {profile.name!r} already exists with other settings")
                return False
            conn.execute(
                "INSERT INTO profiles (name, kernel, initrd, append, autoinstall, vars) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (profile.name, profile.kernel, profile.initrd, profile.append,
                 profile.autoinstall, json.dumps(profile.vars)))
            changes.append(Change("profile", profile.name))
            return True

    def boot_files(self, paths: Iterable[str]) -> dict[str, BootFile]:
        wanted = sorted(set(paths))

        def query(conn: psycopg.Connection[Any]) -> dict[str, BootFile]:
            rows = conn.execute("SELECT * FROM boot_files WHERE path = ANY(%s)", (wanted,)).fetchall()
            return {row["path"]: BootFile(row["path"], row["size"], row["sha256"], row["source"])
                    for row in rows}
        return dict(self._read(("boot-files", *wanted), query))

    def delete_profile(self, name: str) -> None:
        with self._write() as (conn, changes):
            conn.execute("SELECT name FROM profiles WHERE name = %s FOR UPDATE", (name,))
            users = conn.execute("SELECT COUNT(*) AS n FROM hosts WHERE profile = %s", (name,)).fetchone()
            if users and users["n"]:
                raise Conflict(f"profile {name!r} is used by {users['n']} host(s)")
            if conn.execute("DELETE FROM profiles WHERE name = %s", (name,)).rowcount == 0:
                raise NotFound(f"no profile named {name!r}")
            changes.append(Change("profile", name))

    # -- hosts --------------------------------------------------------------------------------

    def add_host(self, host: Host) -> None:
        try:
            with self._write() as (conn, changes):
                conn.execute(
                    "INSERT INTO hosts (mac, hostname, ip, profile, netboot, status, vars, xen, "
                    "install_token) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (str(host.mac), host.hostname, host.ip, host.profile, host.netboot,
                     host.status.value, json.dumps(host.vars), json.dumps(host.xen.to_dict()),
                     host.install_token),
                )
                changes.append(Change("host", str(host.mac)))
        except psycopg.IntegrityError as exc:
            raise _host_conflict(exc, host) from None

    def update_host(self, mac: MacAddress, changes: HostChanges) -> tuple[Host, Host]:
        values = dict(changes.fields)
        if "vars" in values:
            values["vars"] = json.dumps(values["vars"])
        assignments = [sql.SQL("{} = {}").format(sql.Identifier(name), sql.Placeholder(name))
                       for name in values]
        if changes.xen:
            assignments.append(sql.SQL("xen = xen || {}::jsonb").format(sql.Placeholder("xen")))
            values["xen"] = json.dumps(changes.xen)
        before: dict[str, Any] | None = None
        try:
            with self._write() as (conn, announced):
                before = conn.execute("SELECT * FROM hosts WHERE mac = %s FOR UPDATE", (str(mac),)).fetchone()
                if before is None:
                    raise NotFound(f"no host with MAC {mac}")
                if assignments:
                    conn.execute(sql.SQL("UPDATE hosts SET {} WHERE mac = %(mac)s").format(
                        sql.SQL(", ").join(assignments)), {**values, "mac": str(mac)})
                if changes.netboot:
                    conn.execute(
                        "UPDATE hosts SET netboot = TRUE, status = 'registered', install_token = %s "
                        "WHERE mac = %s AND NOT netboot", (changes.install_token, str(mac)))
                elif changes.netboot is False:
                    conn.execute("UPDATE hosts SET netboot = FALSE WHERE mac = %s", (str(mac),))
                after = conn.execute("SELECT * FROM hosts WHERE mac = %s", (str(mac),)).fetchone()
                announced.append(Change("host", str(mac)))
        except psycopg.IntegrityError as exc:
            assert before is not None
            raise _host_conflict(exc, replace(_host(before), **changes.fields)) from None
        return _host(before), _host(after)  # type: ignore[arg-type]

    def find_host(self, mac: MacAddress) -> Host | None:
        return self._read(("host", str(mac)), lambda conn: self._one_host(conn, "mac", str(mac)))

    @staticmethod
    def _one_host(conn: psycopg.Connection[Any], column: str, value: str) -> Host | None:
        query = sql.SQL("SELECT * FROM hosts WHERE {} = %s").format(sql.Identifier(column))
        row = conn.execute(query, (value,)).fetchone()
        return None if row is None else _host(row)

    def get_host(self, mac: MacAddress) -> Host:
        host = self.find_host(mac)
        if host is None:
            raise NotFound(f"no host with MAC {mac}")
        return host

    def find_host_by_ip(self, ip: str) -> Host | None:
        return self._read(("host-ip", ip), lambda conn: self._one_host(conn, "ip", ip))

    def list_hosts(self) -> list[Host]:
        version = self._version()
        hosts = self._read(("hosts",), lambda conn: [
            _host(row) for row in conn.execute("SELECT * FROM hosts ORDER BY mac")])
        for host in hosts:
            self._answers.put(("host", str(host.mac)), version, host)
            if host.ip:
                self._answers.put(("host-ip", host.ip), version, host)
        return list(hosts)

    def delete_host(self, mac: MacAddress) -> None:
        with self._write() as (conn, changes):
            if conn.execute("DELETE FROM hosts WHERE mac = %s", (str(mac),)).rowcount == 0:
                raise NotFound(f"no host with MAC {mac}")
            conn.execute("DELETE FROM events WHERE mac = %s", (str(mac),))
            conn.execute("DELETE FROM leases WHERE mac = %s", (str(mac),))
            changes.append(Change("host", str(mac)))

    def macs(self) -> set[MacAddress]:
        return {host.mac for host in self.list_hosts()}

    def advance_status(self, mac: MacAddress, to: Status, allowed_from: Iterable[Status]) -> bool:
        with self._write() as (conn, changes):
            cursor = conn.execute(
                "UPDATE hosts SET status = %s WHERE mac = %s AND netboot AND status = ANY(%s)",
                (to.value, str(mac), [s.value for s in allowed_from]))
            if cursor.rowcount == 1:
                changes.append(Change("host", str(mac)))
            return cursor.rowcount == 1

    def complete_install(self, mac: MacAddress, token: str) -> Host | None:
        with self._write() as (conn, changes):
            row = conn.execute(
                "UPDATE hosts SET status = 'installed', netboot = FALSE, install_token = '' "
                "WHERE mac = %s AND install_token = %s AND install_token != '' RETURNING *",
                (str(mac), token)).fetchone()
            if row is not None:
                changes.append(Change("host", str(mac)))
            return None if row is None else _host(row)

    # -- events -------------------------------------------------------------------------------

    def add_events(self, events: Iterable[Event], keep: int = 1000) -> None:
        batch = list(events)
        if not batch:
            return
        columns = ([str(e.mac) for e in batch], [e.time for e in batch],
                   [e.source for e in batch], [e.message for e in batch])
        with self._connection() as conn, conn.transaction():
            conn.execute("SET LOCAL synchronous_commit = off")
            conn.execute(
                "INSERT INTO events (mac, time, source, message) "
                "SELECT e.mac, e.time, e.source, e.message "
                "FROM unnest(%s::text[], %s::float8[], %s::text[], %s::text[]) WITH ORDINALITY "
                "AS e(mac, time, source, message, n) "
                "WHERE EXISTS (SELECT 1 FROM hosts h WHERE h.mac = e.mac) ORDER BY e.n", columns)
            conn.execute(
                "DELETE FROM events e USING (SELECT id, row_number() OVER (PARTITION BY mac "
                "ORDER BY id DESC) AS newer FROM events WHERE mac = ANY(%s)) ranked "
                "WHERE e.id = ranked.id AND ranked.newer > %s", (sorted(set(columns[0])), keep))

    def events(self, mac: MacAddress, limit: int = 1000) -> list[Event]:
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT * FROM (SELECT * FROM events WHERE mac = %s ORDER BY id DESC LIMIT %s) "
                "AS newest ORDER BY id", (str(mac), limit)).fetchall()
        return [Event(mac, row["time"], row["source"], row["message"]) for row in rows]

    # -- the dashboard (events change without a generation bump: always read) -----------------

    def host_summaries(self) -> list[HostSummary]:
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT h.mac, h.hostname, h.ip, h.profile, h.netboot, h.status, e.time, e.source, "
                "e.message FROM hosts h LEFT JOIN LATERAL (SELECT time, source, message FROM events "
                "WHERE mac = h.mac ORDER BY id DESC LIMIT 1) e ON TRUE").fetchall()
        summaries = []
        for row in rows:
            mac = MacAddress.parse(row["mac"])
            last = None if row["time"] is None else Event(mac, row["time"], row["source"], row["message"])
            summaries.append(HostSummary(mac, row["hostname"], row["ip"], row["profile"],
                                         row["netboot"], Status(row["status"]), last))
        return summaries

    def status_counts(self, stalled_before: float) -> dict[str, int]:
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT h.status, COUNT(*) AS n, COUNT(*) FILTER (WHERE h.netboot AND h.status IN "
                "('netbooting', 'installing') AND COALESCE((SELECT time FROM events WHERE mac = h.mac "
                "ORDER BY id DESC LIMIT 1), 0) < %s) AS stalled FROM hosts h GROUP BY h.status",
                (stalled_before,)).fetchall()
        counts = {status.value: 0 for status in Status} | {"stalled": 0}
        for row in rows:
            counts[row["status"]] = row["n"]
            counts["stalled"] += row["stalled"]
        return counts

    def recent_events(self, since: float, limit: int = 10_000) -> list[Event]:
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT * FROM (SELECT * FROM events ORDER BY id DESC LIMIT %s) AS newest "
                "WHERE time >= %s ORDER BY id", (limit, since)).fetchall()
        return [Event(MacAddress.parse(r["mac"]), r["time"], r["source"], r["message"]) for r in rows]

    # -- leases -------------------------------------------------------------------------------

    def find_lease(self, mac: MacAddress) -> Lease | None:
        return self._read(("lease", str(mac)), lambda conn: self._one_lease(conn, "mac", str(mac)))

    def find_lease_by_ip(self, ip: str) -> Lease | None:
        return self._read(("lease-ip", ip), lambda conn: self._one_lease(conn, "ip", ip))

    @staticmethod
    def _one_lease(conn: psycopg.Connection[Any], column: str, value: str) -> Lease | None:
        query = sql.SQL("SELECT * FROM leases WHERE {} = %s").format(sql.Identifier(column))
        row = conn.execute(query, (value,)).fetchone()
        return None if row is None else Lease(MacAddress.parse(row["mac"]), row["ip"], row["expires"])

    def put_lease(self, lease: Lease, expired_before: float | None = None) -> None:
        try:
            with self._write(durable=False) as (conn, changes):
                if expired_before is not None:
                    conn.execute("DELETE FROM leases WHERE ip = %s AND mac <> %s AND expires < %s",
                                 (lease.ip, str(lease.mac), expired_before))
                conn.execute(
                    "INSERT INTO leases (mac, ip, expires) VALUES (%s, %s, %s) ON CONFLICT (mac) "
                    "DO UPDATE SET ip = excluded.ip, expires = excluded.expires",
                    (str(lease.mac), lease.ip, lease.expires))
                changes.append(Change("lease", str(lease.mac)))
        except psycopg.errors.UniqueViolation:
            raise Conflict(f"IP address {lease.ip} is leased to another MAC") from None

    def delete_lease(self, mac: MacAddress) -> None:
        with self._write() as (conn, changes):
            if conn.execute("DELETE FROM leases WHERE mac = %s", (str(mac),)).rowcount:
                changes.append(Change("lease", str(mac)))

    def list_leases(self) -> list[Lease]:
        version = self._version()
        leases = self._read(("leases",), lambda conn: [
            Lease(MacAddress.parse(r["mac"]), r["ip"], r["expires"])
            for r in conn.execute("SELECT * FROM leases ORDER BY ip")])
        for lease in leases:
            self._answers.put(("lease", str(lease.mac)), version, lease)
            self._answers.put(("lease-ip", lease.ip), version, lease)
        return list(leases)

    def host_addresses(self, now: float) -> list[tuple[str, str, float | None]]:
        def query(conn: psycopg.Connection[Any]) -> list[tuple[str, str, float | None]]:
            rows = conn.execute(
                "SELECT h.hostname, COALESCE(h.ip, l.ip) AS ip, "
                "CASE WHEN h.ip IS NULL THEN l.expires END AS expires "
                "FROM hosts h LEFT JOIN leases l ON l.mac = h.mac "
                "WHERE h.ip IS NOT NULL OR l.expires > %s", (now,)).fetchall()
            return [(row["hostname"], row["ip"], row["expires"]) for row in rows]
        return self._read(("addresses",), query, reuse=False)

    def tally(self, now: float) -> Tally:
        def query(conn: psycopg.Connection[Any]) -> Tally:
            hosts = conn.execute("SELECT status, COUNT(*) AS n FROM hosts GROUP BY status").fetchall()
            counts = conn.execute(
                "SELECT (SELECT COUNT(*) FROM profiles) AS profiles, "
                "(SELECT COUNT(*) FROM leases WHERE expires > %s) AS leases", (now,)).fetchone()
            return Tally({Status(row["status"]): row["n"] for row in hosts},
                         counts["profiles"], counts["leases"])  # type: ignore[index]
        return self._read(("tally",), query, reuse=False)
