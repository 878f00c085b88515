"""The registry: canonical MACs, validation, storage and its durability."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace

import psycopg
import pytest

from pxeserver.mac import InvalidMac, MacAddress
from pxeserver.registry import (
    BootFile,
    Conflict,
    Host,
    Lease,
    NotFound,
    Profile,
    SqliteStore,
    Store,
    ValidationError,
    open_store,
    postgres,
)
from pxeserver.registry.sqlite import MIGRATIONS

pytestmark = pytest.mark.both_stores


@pytest.fixture
def store(database: str, tmp_path) -> Iterator[Store]:
    opened = open_store(database or str(tmp_path / "r.db"))
    yield opened
    opened.close()


@pytest.mark.parametrize("text", [
    "00:16:3e:aa:bb:cc", "00:16:3E:AA:BB:CC", "00-16-3e-aa-bb-cc", "00163eaabbcc", " 00163EAABBCC ",
])
def test_every_accepted_spelling_is_one_mac(text: str) -> None:
    mac = MacAddress.parse(text)
    assert str(mac) == "00:16:3e:aa:bb:cc"
    assert mac.pxelinux_name == "01-00-16-3e-aa-bb-cc"
    assert mac == MacAddress.parse("00:16:3e:aa:bb:cc")


@pytest.mark.parametrize("text", [
    "", "00:16:3e:aa:bb", "00:16:3e:aa:bb:cc:dd", "00:16-3e:aa:bb:cc", "00:16:3e:aa:bb:cg",
    "0:16:3e:aa:bb:cc", "00163eaabbc", "00.16.3e.aa.bb.cc", "00:16:3e:aa\n:bb:cc", 42, None,
])
def test_malformed_macs_are_refused_with_the_reason(text: object) -> None:
    with pytest.raises(InvalidMac, match="MAC address"):
        MacAddress.parse(text)


def test_generated_macs_are_xen_and_avoid_taken_ones() -> None:
    taken: set[MacAddress] = set()
    for _ in range(2000):
        mac = MacAddress.random_xen(taken)
        assert mac.is_xen and mac not in taken
        assert mac.packed[3] < 0x80
        taken.add(mac)


def _profile(name: str = "deb") -> Profile:
    return Profile.from_input({"name": name, "kernel": "images/deb/linux", "initrd": "images/deb/initrd.gz"})


def _host(mac: str, hostname: str, ip: str | None = None) -> Host:
    data = {"hostname": hostname, "profile": "deb"}
    if ip:
        data["ip"] = ip
    return Host.from_input(data, mac=MacAddress.parse(mac))


def test_uniqueness_is_on_the_canonical_mac_hostname_and_ip(store: Store) -> None:
    store.add_profile(_profile())
    store.add_host(_host("00:16:3E:AA:BB:CC", "web1", "10.0.0.5"))
    with pytest.raises(Conflict, match="MAC"):
        store.add_host(_host("00-16-3e-aa-bb-cc", "web2"))
    with pytest.raises(Conflict, match="hostname"):
        store.add_host(_host("00:16:3e:00:00:01", "web1"))
    with pytest.raises(Conflict, match="IP"):
        store.add_host(_host("00:16:3e:00:00:02", "web3", "10.0.0.5"))
    assert [str(h.mac) for h in store.list_hosts()] == ["00:16:3e:aa:bb:cc"]


def test_a_profile_in_use_cannot_be_deleted(store: Store) -> None:
    store.add_profile(_profile())
    store.add_host(_host("00:16:3e:aa:bb:cc", "web1"))
    with pytest.raises(Conflict, match="used by 1 host"):
        store.delete_profile("deb")
    store.delete_host(MacAddress.parse("00:16:3e:aa:bb:cc"))
    store.delete_profile("deb")
    with pytest.raises(NotFound):
        store.get_profile("deb")


def test_generation_increases_on_each_change_only(store: Store) -> None:
    first = store.generation()
    store.add_profile(_profile())
    assert store.generation() == first + 1
    with pytest.raises(Conflict):
        store.add_profile(_profile())
    assert store.generation() == first + 1, "a refused write changed the generation"


def test_schema_is_versioned_and_reopening_keeps_data(tmp_path) -> None:
    path = tmp_path / "r.db"
    store = SqliteStore(path)
    store.add_profile(_profile())
    store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert SqliteStore(path).list_profiles() == [_profile()]


def test_postgresql_schema_is_versioned_and_migrated_once(pg_cluster) -> None:
    url = pg_cluster.new_database()
    assert postgres.migrate(url) == (0, len(postgres.MIGRATIONS))
    assert postgres.migrate(url) == (len(postgres.MIGRATIONS), len(postgres.MIGRATIONS))
    store = postgres.PostgresStore(url)
    store.add_profile(_profile())
    store.close()
    assert postgres.check(url) == len(postgres.MIGRATIONS)
    reopened = postgres.PostgresStore(url)
    assert reopened.list_profiles() == [_profile()]
    reopened.close()


def test_a_newer_postgresql_schema_is_refused_not_damaged(pg_cluster) -> None:
    url = pg_cluster.new_database()
    postgres.migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = version + 5")
    with pytest.raises(RuntimeError, match="newer"):
        postgres.PostgresStore(url)
    with pytest.raises(RuntimeError, match="schema version"):
        postgres.check(url)
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT COUNT(*) FROM hosts").fetchone() == (0,)


def test_a_newer_schema_is_refused_not_damaged(tmp_path) -> None:
    path = tmp_path / "r.db"
    SqliteStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 5}")
    with pytest.raises(RuntimeError, match="newer"):
        SqliteStore(path)


@pytest.mark.parametrize("field, value, message", [
    ("hostname", "web 1", "hostname"),
    ("hostname", "web1\nevil", "line break"),
    ("hostname", "-web", "hostname"),
    ("hostname", "a" * 64, "hostname"),
    ("hostname", 7, "must be a string"),
    ("ip", "10.0.0.256", "IPv4"),
    ("ip", "255.255.255.255", "cannot be given"),
    ("ip", 10, "must be a string"),
    ("netboot", "yes", "true or false"),
    ("vars", [1], "object"),
    ("vars", {"bad-name": 1}, "variable name"),
    ("vars", {"packages": ["vim", "x\n%post\nrm -rf /"]}, r"vars.packages\[1\] must not contain a line break"),
    ("xen", {"memory": "lots"}, "xen.memory"),
    ("xen", {"bridge": "br0; rm -rf /"}, "xen.bridge"),
    ("profile", "../x", "profile name"),
    ("color", "blue", "unknown host field"),
])
def test_host_field_validation(field: str, value: object, message: str) -> None:
    data = {"hostname": "web1", "profile": "deb", field: value}
    with pytest.raises(ValidationError, match=message):
        Host.from_input(data, mac=MacAddress.parse("00:16:3e:aa:bb:cc"))


@pytest.mark.parametrize("field, value, message", [
    ("kernel", "../../etc/passwd", "relative to the TFTP root"),
    ("kernel", "/boot/vmlinuz", "relative to the TFTP root"),
    ("initrd", "a b", "no spaces"),
    ("autoinstall", "../../etc/passwd", "not a path"),
    ("autoinstall", "sub/dir.ks", "not a path"),
    ("append", "quiet", "exactly one key=value"),
    ("append", "repo=http://x/?a=b", "exactly one key=value"),
    ("append", "initrd=other.gz", "must not set 'initrd'"),
    ("append", "ks=http://x/ks", "must not set 'ks'"),
    ("name", "a/b", "profile name"),
])
def test_profile_field_validation(field: str, value: object, message: str) -> None:
    data = {"name": "deb", "kernel": "images/deb/linux", "initrd": "images/deb/initrd.gz", field: value}
    with pytest.raises(ValidationError, match=message):
        Profile.from_input(data)


def test_a_pool_address_goes_to_a_second_mac_only_once_its_lease_ran_out(store: Store) -> None:
    """The store decides in one transaction, so two DHCP servers sharing it cannot both give
    an address away: a live lease is never taken over, an expired one only when asked to."""
    first, second = MacAddress.parse("00:16:3e:00:00:01"), MacAddress.parse("00:16:3e:00:00:02")
    store.put_lease(Lease(first, "10.0.0.100", 1000.0))
    with pytest.raises(Conflict, match="leased to another MAC"):
        store.put_lease(Lease(second, "10.0.0.100", 5000.0))
    with pytest.raises(Conflict):  # first's lease runs until 1000
        store.put_lease(Lease(second, "10.0.0.100", 5000.0), expired_before=999.0)
    store.put_lease(Lease(second, "10.0.0.100", 5000.0), expired_before=1001.0)
    assert store.find_lease_by_ip("10.0.0.100") == Lease(second, "10.0.0.100", 5000.0)
    assert store.find_lease(first) is None
    assert store.list_leases() == [Lease(second, "10.0.0.100", 5000.0)]


SYNC_SCRIPT = """
import sys, time
from pxeserver.mac import MacAddress
from pxeserver.registry import Event, Lease, Profile, open_store
store = open_store(sys.argv[1])
macs = [MacAddress.parse(f"00:16:3e:00:01:{i:02x}") for i in range(20)]
if sys.argv[2] == "leases":
    for i, mac in enumerate(macs):
        store.put_lease(Lease(mac, f"10.0.0.{100 + i}", time.time() + 600))
elif sys.argv[2] == "events":
    for mac in macs:
        store.add_events([Event(mac, time.time(), "test", "one batch")])
elif sys.argv[2] == "profiles":
    for i in range(20):
        store.add_profile(Profile.from_input({"name": f"p{i}", "kernel": "k", "initrd": "i"}))
store.close()
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (scripts/debian-packages.txt)")
def test_sqlite_waits_for_the_disk_on_changes_but_not_on_each_lease_or_event(tmp_path) -> None:
    """A boot storm's leases and timeline events commit without an fdatasync each (they survive
    a crash of pxeserver, as WAL's synchronous=NORMAL does); host and profile changes still
    wait for the disk on every commit."""
    path = str(tmp_path / "r.db")
    open_store(path).close()  # created and migrated

    def syncs(step: str) -> int:
        traced = subprocess.run(["strace", "-f", "-c", "-e", "trace=fsync,fdatasync", sys.executable, "-c",
                                 SYNC_SCRIPT, path, step], capture_output=True, text=True, timeout=120)
        assert traced.returncode == 0, traced.stderr
        return sum(int(line.split()[3]) for line in traced.stderr.splitlines()
                   if line.rstrip().endswith(("fsync", "fdatasync")) and "total" not in line)

    base = syncs("nothing")
    checkpoint = 4  # closing the last connection checkpoints the WAL: a few syncs, once
    assert syncs("leases") - base <= checkpoint
    assert syncs("events") - base <= checkpoint
    assert syncs("profiles") - base >= 20


def test_an_imported_profile_and_its_boot_files_are_one_transaction(store: Store) -> None:
    files = [BootFile("images/deb/linux", 10, "a" * 64, "http://mirror/linux"),
             BootFile("images/deb/initrd.gz", 20, "b" * 64, "http://mirror/initrd.gz")]
    assert store.add_imported_profile(_profile(), files) is True
    assert store.add_imported_profile(_profile(), files) is False  # a repeated import
    with pytest.raises(Conflict, match="other settings"):
        store.add_imported_profile(replace(_profile(), append="quiet=1"), files)
    assert store.list_profiles() == [_profile()]
    assert store.boot_files(["images/deb/linux", "images/none"]) == {"images/deb/linux": files[0]}
