"""Every configuration key is checked: `pxeserver --config bad.toml serve` exits 1 with one
line naming the key, before anything listens or is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

PXESERVER = [sys.executable, "-m", "pxeserver"]
# Loopback and port 0 everywhere, so a value that slipped through starts nothing harmful.
BASE: dict[str, dict[str, Any]] = {
    "server": {"address": "127.0.0.1"},
    "tftp": {"address": "127.0.0.1", "port": 0},
    "http": {"address": "127.0.0.1", "port": 0},
    "dns": {"address": "127.0.0.1", "port": 0},
}

# section, key, value, what the one line must say
BAD: list[tuple[str, str, Any, str]] = [
    ("dhcp", "dns_servers", "10.0.0.2", "[dhcp] dns_servers must be a list, not '10.0.0.2'"),
    ("server", "address", "10.0.0", "[server] address must be an IPv4 address"),
    ("server", "address", "0.0.0.0", "[server] address must be an address clients can use"),
    ("server", "data_dir", "", "[server] data_dir must be a directory path"),
    ("server", "tftp_root", "a-file", "[server] tftp_root must be a directory"),
    ("server", "kickstarts", "a-file", "[server] kickstarts must be a directory"),
    ("server", "preseeds", "a-file", "[server] preseeds must be a directory"),
    ("server", "database", "postgresql://pxe@db/pxe%zz",
     "[server] database is not a valid PostgreSQL URL: invalid percent-encoded token"),
    ("server", "database", "mysql://pxe@db/pxe",
     "[server] database must be empty, a SQLite file path or a postgresql:// URL, not a mysql:// URL"),
    ("server", "database", "a-dir", "[server] database must be a SQLite file"),
    ("server", "log_level", "verbose", "[server] log_level must be one of debug, info, warning, error"),
    ("boot", "default_profile", "no spaces", "[boot] default_profile must be a profile name"),
    ("boot", "efi_loader", "../syslinux.efi", "[boot] efi_loader must be a path under the TFTP root"),
    ("boot", "bios_loader", "/pxelinux.0", "[boot] bios_loader must be a path under the TFTP root"),
    ("boot", "kernel_transport", "ftp", "[boot] kernel_transport must be 'tftp' or 'http', not 'ftp'"),
    ("boot", "http_bios_loader", "../lpxelinux.0", "[boot] http_bios_loader must be a path under the TFTP root"),
    ("tftp", "address", "localhost", "[tftp] address must be an IPv4 address"),
    ("tftp", "port", 70000, "[tftp] port must be 0..65535"),
    ("tftp", "port", "69", "[tftp] port must be a whole number, not '69'"),
    ("tftp", "timeout", 0, "[tftp] timeout must be 1..255"),
    ("tftp", "retries", 101, "[tftp] retries must be 0..100"),
    ("tftp", "max_blksize", 4, "[tftp] max_blksize must be 8..65464"),
    ("tftp", "max_windowsize", 0, "[tftp] max_windowsize must be 1..65535"),
    ("tftp", "max_sessions", 0, "[tftp] max_sessions must be 1..1000000"),
    ("tftp", "max_sessions_per_client", 0, "[tftp] max_sessions_per_client must be 1..1000000"),
    ("tftp", "packet_cache_mb", -1, "[tftp] packet_cache_mb must be 0..1048576"),
    ("tftp", "batch_wait_us", 20_000, "[tftp] batch_wait_us must be 0..10000"),
    ("tftp", "enabled", "yes", "[tftp] enabled must be true or false, not 'yes'"),
    ("http", "address", "web.example", "[http] address must be an IP address"),
    ("http", "port", -1, "[http] port must be 0..65535"),
    ("http", "threads", 0, "[http] threads must be 1..1024"),
    ("dhcp", "address", "10.0.0.256", "[dhcp] address must be an IPv4 address"),
    ("dhcp", "port", 65536, "[dhcp] port must be 0..65535"),
    ("dhcp", "interface", "xen/br0", "[dhcp] interface must be a network interface name"),
    ("dhcp", "interface", "a-very-long-bridge", "[dhcp] interface must be a network interface name"),
    ("dhcp", "subnet", "10.0.0.1/24", "[dhcp] subnet must be an IPv4 network"),
    ("dhcp", "router", "10.9.0.1", "[dhcp] router must be inside [dhcp] subnet 10.0.0.0/24"),
    ("dhcp", "router", "10.0.0.255", "[dhcp] router must not be the network or broadcast address"),
    ("dhcp", "mode", "relay", "[dhcp] mode must be 'full' or 'proxy'"),
    ("dhcp", "pool_start", "10.0.0.10", "[dhcp] pool_end must be set with pool_start"),
    ("dhcp", "pool_end", "10.0.0.10", "[dhcp] pool_start must be set with pool_end"),
    ("dhcp", "lease_time", -5, "[dhcp] lease_time must be 60..4294967294"),
    ("dhcp", "lease_time", 0, "[dhcp] lease_time must be 60..4294967294"),
    ("dhcp", "dns_servers", ["10.0.0.300"], "[dhcp] dns_servers must be an IPv4 address"),
    ("dhcp", "dns_servers", [53], "[dhcp] dns_servers must be IPv4 address strings"),
    ("dhcp", "dns_servers", ["224.0.0.1"], "[dhcp] dns_servers must be an address clients can use"),
    ("dhcp", "serve_unknown", 1, "[dhcp] serve_unknown must be true or false, not 1"),
    ("dns", "address", "1.2.3", "[dns] address must be an IPv4 address"),
    ("dns", "port", 99999, "[dns] port must be 0..65535"),
    ("dns", "domain", "bad..example", "[dns] domain must be a domain name"),
    ("dns", "upstream", "dns.example:53", "[dns] upstream must be an IPv4 address[:port]"),
    ("dns", "upstream", "192.0.2.53:0", "[dns] upstream must be an IPv4 address[:port]"),
    ("server", "node_name", "node a", "[server] node_name must be 1-64 letters, digits, '.', '_' or '-'"),
    ("api", "token", "two words", "[api] token must be printable ASCII without spaces"),
    ("api", "token", "t\u00f6ken", "[api] token must be printable ASCII without spaces"),
]
POOLS = [  # pool settings that only fail together
    ({"pool_start": "10.0.0.50", "pool_end": "10.0.0.10"},
     "[dhcp] pool_end must be at least pool_start 10.0.0.50, not 10.0.0.10"),
    ({"pool_start": "10.0.1.5", "pool_end": "10.0.1.9"},
     "[dhcp] pool_start must be inside [dhcp] subnet 10.0.0.0/24, not 10.0.1.5"),
    ({"pool_start": "10.0.0.5", "pool_end": "10.0.0.255"},
     "[dhcp] pool_end must not be the network or broadcast address of 10.0.0.0/24"),
    ({"subnet": "192.168.7.0/24"}, "[dhcp] router must be inside [dhcp] subnet 192.168.7.0/24, not 10.0.0.1"),
]


def toml(sections: dict[str, dict[str, Any]]) -> str:
    """JSON's strings, numbers, booleans and lists are TOML's too."""
    return "".join(f"[{name}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items())
                   for name, keys in sections.items())


def serve_with(tmp_path: Path, section: str, values: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    (tmp_path / "a-file").write_text("not a directory\n")
    (tmp_path / "a-dir").mkdir(exist_ok=True)
    sections = {name: dict(keys) for name, keys in BASE.items()}
    sections.setdefault(section, {}).update(values)
    (tmp_path / "bad.toml").write_text(toml(sections))
    return subprocess.run([*PXESERVER, "--config", "bad.toml", "serve"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)


def assert_one_line(result: subprocess.CompletedProcess[str], expected: str, tmp_path: Path) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("pxeserver: error: bad.toml") and expected in lines[0], lines[0]
    assert not (tmp_path / "var").exists(), "nothing is created for a refused configuration"


@pytest.mark.parametrize("section, key, value, expected", BAD,
                         ids=[f"{s}.{k}={v!r}" for s, k, v, _ in BAD])
def test_each_bad_key_is_one_line_naming_it(tmp_path: Path, section: str, key: str, value: Any,
                                            expected: str) -> None:
    assert_one_line(serve_with(tmp_path, section, {key: value}), expected, tmp_path)


@pytest.mark.parametrize("values, expected", POOLS,
                         ids=[e.split(" must")[0] + str(i) for i, (_, e) in enumerate(POOLS)])
def test_dhcp_keys_that_must_agree(tmp_path: Path, values: dict[str, Any], expected: str) -> None:
    assert_one_line(serve_with(tmp_path, "dhcp", values), expected, tmp_path)


def test_database_is_a_sqlite_path_relative_to_the_config_file(tmp_path: Path) -> None:
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    (config_dir / "pxeserver.toml").write_text(toml({"server": {"database": "state/hosts.sqlite"}}))
    result = subprocess.run([*PXESERVER, "--config", str(config_dir / "pxeserver.toml"), "profile",
                             "add", "deb", "--kernel", "k", "--initrd", "i"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert (config_dir / "state" / "hosts.sqlite").is_file()
    assert not (tmp_path / "var").exists() and not (tmp_path / "state").exists()
