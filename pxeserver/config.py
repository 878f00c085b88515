"""Configuration: a TOML file layered over built-in defaults that work on one machine.

Lookup order: ``--config FILE``, ``$PXESERVER_CONFIG``, ``./pxeserver.toml``, defaults.
Relative paths in the file are taken relative to the file's directory; with no file, relative
to the current directory. Unknown keys are an error, so a typo never silently does nothing.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from pxeserver.registry.models import (
    ValidationError,
    validate_boot_path,
    validate_hostname,
    validate_profile_name,
)


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and key."""


@dataclass
class ServerSection:
    address: str = ""  # what clients are told; empty: the address of the default route
    data_dir: str = "var"
    tftp_root: str = "tftproot"
    kickstarts: str = "kickstarts"
    preseeds: str = "preseeds"
    # Empty: SQLite file registry.db under data_dir; a SQLite file path; or a postgresql:// URL
    # (libpq's form) of a registry several pxeserver nodes share.
    database: str = ""
    log_level: str = "info"  # debug, info, warning or error
    events_per_host: int = 1000  # timeline entries kept per host; older ones are dropped
    # How this node names itself in log lines that other nodes' operators read (a boot file
    # refused here, not there); empty: the machine's host name.
    node_name: str = ""


@dataclass
class BootSection:
    # Profile booted by MACs the registry does not know; empty means "boot locally".
    default_profile: str = ""
    efi_loader: str = "syslinux.efi"  # boot file for x64 UEFI firmware
    bios_loader: str = "pxelinux.0"
    # What iPXE clients are handed: "script" (/ipxe/<mac> over HTTP) or "pxelinux" (the
    # firmware's loader above over TFTP, for admins who want pxelinux menus).
    ipxe_chain: str = "script"
    # How boot configs name kernels and initrds: "tftp" paths, or "http" URLs under /boot/ on
    # this server (pypxeboot and lpxelinux fetch them over HTTP: faster in a boot storm).
    kernel_transport: str = "tftp"
    http_bios_loader: str = "lpxelinux.0"  # the BIOS boot file when kernel_transport is "http"


@dataclass
class TftpSection:
    enabled: bool = True
    address: str = "0.0.0.0"
    port: int = 69
    max_sessions: int = 4096
    max_sessions_per_client: int = 32  # per source address (dom0's pypxeboot: one per booting guest)
    max_sessions_per_subnet: int = 1024  # per /24 of source addresses: spoofed floods stay in theirs
    timeout: int = 1  # seconds before a block is resent, unless the client asks (RFC 2349)
    max_timeout: int = 5  # a client asking more is not acknowledged and gets `timeout`
    retries: int = 5  # resends of one block before the transfer is abandoned
    session_deadline: int = 10  # seconds without an ACK of anything new before a transfer is dropped
    max_blksize: int = 65464  # larger requests are answered with this (RFC 2348)
    max_windowsize: int = 64  # larger requests are answered with this (RFC 7440)
    packet_cache_mb: int = 256  # all file data in memory, shared by transfers (tftp/cache.py)
    # Under 64 or more moving transfers, the longest the event loop sleeps after a wakeup that
    # found few packets, for 32 to gather (tftp/server.py); microseconds, 0: never.
    batch_wait_us: int = 1000


@dataclass
class HttpSection:
    enabled: bool = True
    address: str = "0.0.0.0"
    port: int = 80
    threads: int = 32
    # Who else may fetch a host's kickstart/preseed and make its install-complete call, besides
    # the host's registered IP or current DHCP lease: CIDR networks, e.g. a NAT gateway's
    # address. Anyone inside them can read every host's install secrets ("0.0.0.0/0": anyone).
    autoinstall_trusted_networks: list[str] = field(default_factory=list)
    # Slow and idle clients (web/server.py): seconds a client has to send a request's headers
    # (counted from connect, or from its first byte after a keep-alive wait), its body (from
    # the end of the headers), and to start its next request on a kept-alive connection.
    header_timeout: int = 10
    body_timeout: int = 30
    idle_timeout: int = 15
    max_connections: int = 1000  # open connections from all clients together
    max_connections_per_address: int = 32  # open connections from one client address
    # GET /dom0/pypxeboot: the file `pxeserver build-pypxeboot` writes, for a dom0 to fetch.
    serve_pypxeboot: bool = True
    # /boot/ answers carry the file's SHA-256 (Repr-Digest, X-Checksum-SHA256), hashed once per
    # file version: pypxeboot's dom0 cache (cache_dir=) uses it so a dom0 downloads each file once.
    announce_digests: bool = True


@dataclass
class DhcpSection:
    enabled: bool = False
    interface: str = "xenbr0"
    address: str = "0.0.0.0"
    port: int = 67
    subnet: str = "10.0.0.0/24"
    router: str = "10.0.0.1"
    mode: str = "full"  # or "proxy"
    pool_start: str = ""  # dynamic pool for registered hosts without an IP; empty: none
    pool_end: str = ""
    lease_time: int = 3600
    serve_unknown: bool = False
    unknown_pool_share: float = 0.25  # the most of the pool MACs the registry does not know hold
    dns_servers: list[str] = field(default_factory=list)


@dataclass
class DnsSection:
    enabled: bool = False
    address: str = "0.0.0.0"
    port: int = 53
    domain: str = "domu.example"
    upstream: str = ""  # "host:port" to forward names outside the zone; empty: REFUSED
    # Networks whose clients may use the upstream; empty: the DHCP subnet and loopback.
    forward_clients: list[str] = field(default_factory=list)


@dataclass
class ApiSection:
    token: str = ""
    # Template variables never shown by the API or the CLI, besides any named like *password*,
    # *secret*, *token* or *key* (models.SECRET_VAR).
    secret_vars: list[str] = field(default_factory=list)


@dataclass
class DashboardSection:
    # A host in netbooting or installing with no event for this long is marked stalled.
    stalled_after: int = 1800  # seconds
    page_size: int = 100  # hosts per page of the hosts table
    # Live-update streams held open at once, each on one of the HTTP service's threads; a page
    # over the limit, and every stream after stream_seconds, reconnects by itself.
    max_streams: int = 8
    stream_seconds: int = 25


@dataclass
class XenSection:
    # The only places an xen.disk target may lie under: an API client must not be able to hand
    # a guest dom0's own disk (an operator who needs more writes the xl config by hand).
    disk_roots: list[str] = field(default_factory=lambda: ["/var/lib/xen/images/", "/dev/vg_domu/"])
    # xl runs a bare bootloader name only from its own directory (/usr/lib/xen-4.17/bin on
    # Debian): domu-config writes this absolute path, where `build-pypxeboot -o` puts it.
    bootloader: str = "/usr/local/bin/pypxeboot"
    # domu-config adds cache_dir=<this> to bootloader_args: the guests of one dom0 then download
    # each kernel and initrd once (pypxeboot/cache.py). Empty: no cache word.
    pypxeboot_cache_dir: str = ""


@dataclass
class MetricsSection:
    enabled: bool = True  # GET <path> on the HTTP service; counting goes on either way
    path: str = "/metrics"
    # Who may scrape: the HTTP port also faces the guests, so only this machine by default.
    allow: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])


@dataclass
class ImportsSection:
    max_file_mb: int = 4096  # a kernel or initrd larger than this is refused (a runaway download)
    # Directories whose trees and images POST /api/imports may read; empty: the API imports only
    # from http(s):// URLs (the CLI reads any path its user can).
    api_local_roots: list[str] = field(default_factory=list)
    # Keys a Debian or Ubuntu suite's Release must be signed with (checked with gpgv).
    debian_keyrings: list[str] = field(default_factory=lambda: [
        "/usr/share/keyrings/debian-archive-keyring.gpg", "/usr/share/keyrings/ubuntu-archive-keyring.gpg"])


@dataclass
class Config:
    server: ServerSection = field(default_factory=ServerSection)
    boot: BootSection = field(default_factory=BootSection)
    tftp: TftpSection = field(default_factory=TftpSection)
    http: HttpSection = field(default_factory=HttpSection)
    dhcp: DhcpSection = field(default_factory=DhcpSection)
    dns: DnsSection = field(default_factory=DnsSection)
    api: ApiSection = field(default_factory=ApiSection)
    xen: XenSection = field(default_factory=XenSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    imports: ImportsSection = field(default_factory=ImportsSection)
    dashboard: DashboardSection = field(default_factory=DashboardSection)
    base_dir: Path = field(default_factory=Path.cwd)
    source: str = "built-in defaults"

    def path(self, value: str) -> Path:
        """A configured path, resolved against the config file's directory."""
        return (self.base_dir / value).resolve()

    @property
    def data_dir(self) -> Path:
        return self.path(self.server.data_dir)

    @property
    def tftp_root(self) -> Path:
        return self.path(self.server.tftp_root)

    @property
    def kickstarts_dir(self) -> Path:
        return self.path(self.server.kickstarts)

    @property
    def preseeds_dir(self) -> Path:
        return self.path(self.server.preseeds)

    @property
    def database(self) -> str:
        if not self.server.database:
            return str(self.data_dir / "registry.db")
        if "://" in self.server.database:
            return self.server.database
        return str(self.path(self.server.database))

    @property
    def node_name(self) -> str:
        return self.server.node_name or socket.gethostname()

    @property
    def advertised_address(self) -> str:
        """The address written into boot configs and URLs."""
        return self.server.address or _default_route_address()

    @property
    def http_base_url(self) -> str:
        port = "" if self.http.port == 80 else f":{self.http.port}"
        return f"http://{self.advertised_address}{port}"


def _default_route_address() -> str:
    """The local address of the default route; connecting a UDP socket sends no packet."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: routed, never contacted
            address: str = probe.getsockname()[0]
            return address
    except OSError:
        return "127.0.0.1"


_TYPE_NAMES = {int: "a whole number", bool: "true or false", str: "a string", list: "a list"}


def _apply(section: Any, values: dict[str, Any], where: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a table")
    fields = {f.name: f for f in dataclasses.fields(section)}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}")
        expected = type(getattr(section, key))
        if expected is int and isinstance(value, bool) or not isinstance(value, expected):
            raise ConfigError(f"{where} {key} must be {_TYPE_NAMES[expected]}, not {value!r}")
        setattr(section, key, value)


LOG_LEVELS = ("debug", "info", "warning", "error")
KERNEL_TRANSPORTS = ("tftp", "http")
_INTERFACE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # IFNAMSIZ, and what ip-link accepts
_NODE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # it goes into log lines: no spaces, no controls
_TOKEN = re.compile(r"^[\x21-\x7e]*$")  # printable ASCII: it travels in an HTTP header
MAX_LEASE_TIME = 0xFFFFFFFE  # seconds; 0xFFFFFFFF means "infinite" in DHCP


def _fail(section: str, key: str, problem: str) -> NoReturn:
    raise ConfigError(f"[{section}] {key} {problem}")


def _range(config: Config, section: str, key: str, low: int, high: int) -> None:
    value = getattr(getattr(config, section), key)
    if not low <= value <= high:
        _fail(section, key, f"must be {low}..{high}, not {value}")


def _ipv4(section: str, key: str, value: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        _fail(section, key, f"must be an IPv4 address, not {value!r}")


def _bind_address(config: Config, section: str) -> None:
    """A local IPv4 address to bind, or 0.0.0.0 for every one (TFTP, DHCP and DNS are IPv4)."""
    _ipv4(section, "address", getattr(config, section).address)


def _host_address(section: str, key: str, value: str,
                  subnet: ipaddress.IPv4Network | None = None) -> ipaddress.IPv4Address:
    """An address a client is told or given: not 0.0.0.0, broadcast or multicast."""
    address = _ipv4(section, key, value)
    if address.is_unspecified or address.is_multicast or address == ipaddress.IPv4Address(
            "255.255.255.255"):
        _fail(section, key, f"must be an address clients can use, not {value}")
    if subnet is not None:
        if address not in subnet:
            _fail(section, key, f"must be inside [dhcp] subnet {subnet}, not {value}")
        if subnet.prefixlen < 31 and address in (subnet.network_address, subnet.broadcast_address):
            _fail(section, key, f"must not be the network or broadcast address of {subnet}")
    return address


def _directory(config: Config, key: str) -> None:
    value = getattr(config.server, key)
    if not value or "\0" in value:
        _fail("server", key, "must be a directory path")
    path = config.path(value)
    if path.exists() and not path.is_dir():
        _fail("server", key, f"must be a directory, and {path} is not one")


def _database(config: Config) -> None:
    """Empty (registry.db under data_dir), a SQLite file path or a postgresql:// URL; any other
    URL is refused, so it never silently becomes a SQLite file named like the URL."""
    value = config.server.database
    scheme, sep, _ = value.partition("://")
    if sep:
        if scheme in ("postgresql", "postgres"):
            from psycopg.conninfo import conninfo_to_dict  # only where PostgreSQL is configured

            try:
                conninfo_to_dict(value)
            except Exception as exc:  # psycopg.ProgrammingError: libpq's own message
                reason = str(exc).strip().splitlines()[0]
                _fail("server", "database", f"is not a valid PostgreSQL URL: {reason}")
            return
        _fail("server", "database", "must be empty, a SQLite file path or a postgresql:// URL, "
                                    f"not a {scheme}:// URL")
    if "\0" in value or value.endswith("/"):
        _fail("server", "database", f"must be a file path, not {value!r}")
    if value and config.path(value).is_dir():
        _fail("server", "database", f"must be a SQLite file, and {config.path(value)} is a directory")


def validate(config: Config) -> None:
    """Every key checked; the first bad one is a ConfigError naming it, on one line.

    Types were checked when the file was read; this checks values, and the keys that only make
    sense together (the pool inside the subnet, start before end, the router in the subnet).
    """
    server = config.server
    if server.address:
        _host_address("server", "address", server.address)
    for key in ("data_dir", "tftp_root", "kickstarts", "preseeds"):
        _directory(config, key)
    _database(config)
    if server.node_name and not _NODE_NAME.match(server.node_name):
        _fail("server", "node_name", f"must be 1-64 letters, digits, '.', '_' or '-', not {server.node_name!r}")
    if server.log_level not in LOG_LEVELS:
        _fail("server", "log_level",
              f"must be one of {', '.join(LOG_LEVELS)}, not {server.log_level!r}")

    try:
        if config.boot.default_profile:
            validate_profile_name(config.boot.default_profile)
    except ValidationError as exc:
        _fail("boot", "default_profile", f"must be a profile name: {exc}")
    if config.boot.ipxe_chain not in ("script", "pxelinux"):
        _fail("boot", "ipxe_chain", f"must be 'script' or 'pxelinux', not {config.boot.ipxe_chain!r}")
    if config.boot.kernel_transport not in KERNEL_TRANSPORTS:
        _fail("boot", "kernel_transport", f"must be 'tftp' or 'http', not {config.boot.kernel_transport!r}")
    for key in ("efi_loader", "bios_loader", "http_bios_loader"):
        try:
            validate_boot_path(key, getattr(config.boot, key))
        except ValidationError as exc:
            _fail("boot", key, f"must be a path under the TFTP root: {exc}")

    for section in ("tftp", "http", "dhcp", "dns"):
        _range(config, section, "port", 0, 65535)
    for section in ("tftp", "dhcp", "dns"):
        _bind_address(config, section)
    try:
        ipaddress.ip_address(config.http.address)
    except ValueError:
        _fail("http", "address", f"must be an IP address, not {config.http.address!r}")
    for key, low, high in (("timeout", 1, 255), ("max_timeout", 1, 255), ("retries", 0, 100),
                           ("session_deadline", 1, 3600), ("max_blksize", 8, 65464),
                           ("max_windowsize", 1, 65535), ("max_sessions", 1, 1_000_000),
                           ("max_sessions_per_client", 1, 1_000_000),
                           ("max_sessions_per_subnet", 1, 1_000_000), ("packet_cache_mb", 0, 1 << 20),
                           ("batch_wait_us", 0, 10_000)):
        _range(config, "tftp", key, low, high)
    longest_wait = max(config.tftp.timeout, config.tftp.max_timeout)
    if config.tftp.session_deadline < longest_wait:
        _fail("tftp", "session_deadline", f"must be at least timeout and max_timeout "
                                          f"({longest_wait}), not {config.tftp.session_deadline}")
    _range(config, "http", "threads", 1, 1024)
    for key, low, high in (("header_timeout", 1, 3600), ("body_timeout", 1, 3600),
                           ("idle_timeout", 1, 3600), ("max_connections", 1, 1_000_000),
                           ("max_connections_per_address", 1, config.http.max_connections)):
        _range(config, "http", key, low, high)
    for key, low, high in (("stalled_after", 1, 30 * 86400), ("page_size", 10, 1000),
                           ("max_streams", 1, 1000), ("stream_seconds", 1, 3600)):
        _range(config, "dashboard", key, low, high)
    if config.dashboard.max_streams >= config.http.threads:
        _fail("dashboard", "max_streams", f"must be less than [http] threads "
                                          f"({config.http.threads}), not {config.dashboard.max_streams}")

    dhcp = config.dhcp
    if dhcp.mode not in ("full", "proxy"):
        _fail("dhcp", "mode", f"must be 'full' or 'proxy', not {dhcp.mode!r}")
    if dhcp.interface and not _INTERFACE.match(dhcp.interface):
        _fail("dhcp", "interface", "must be a network interface name (1 to 15 letters, digits, "
                                   f"'.', '_' or '-'), not {dhcp.interface!r}")
    _range(config, "server", "events_per_host", 1, 1_000_000)
    for network in config.http.autoinstall_trusted_networks:
        try:
            if not isinstance(network, str):
                raise TypeError(network)
            ipaddress.ip_network(network)
        except (TypeError, ValueError):
            _fail("http", "autoinstall_trusted_networks",
                  f"must be networks such as '10.0.0.0/8', not {network!r}")
    for root in config.xen.disk_roots:
        if not isinstance(root, str) or not root.startswith("/") or ".." in root.split("/"):
            _fail("xen", "disk_roots", f"must be absolute paths without '..', not {root!r}")
    if not re.fullmatch(r"/[A-Za-z0-9._+/-]+", config.xen.bootloader):
        _fail("xen", "bootloader", f"must be an absolute path of plain characters, not {config.xen.bootloader!r}")
    if config.xen.pypxeboot_cache_dir and not re.fullmatch(r"/[A-Za-z0-9._+/-]+", config.xen.pypxeboot_cache_dir):
        _fail("xen", "pypxeboot_cache_dir", "must be empty or an absolute path of plain characters, "
                                            f"not {config.xen.pypxeboot_cache_dir!r}")
    for name in config.api.secret_vars:
        if not isinstance(name, str):
            _fail("api", "secret_vars", f"must be variable names, not {name!r}")
    try:
        subnet = ipaddress.IPv4Network(dhcp.subnet)
    except ValueError as exc:
        _fail("dhcp", "subnet", f"must be an IPv4 network such as 10.0.0.0/24: {exc}")
    if dhcp.router:
        _host_address("dhcp", "router", dhcp.router, subnet)
    if bool(dhcp.pool_start) != bool(dhcp.pool_end):
        missing, given = ("pool_start", "pool_end") if dhcp.pool_end else ("pool_end", "pool_start")
        _fail("dhcp", missing, f"must be set with {given} (both, or neither for no pool)")
    if dhcp.pool_start:
        first = _host_address("dhcp", "pool_start", dhcp.pool_start, subnet)
        last = _host_address("dhcp", "pool_end", dhcp.pool_end, subnet)
        if first > last:
            _fail("dhcp", "pool_end", f"must be at least pool_start {first}, not {last}")
    _range(config, "dhcp", "lease_time", 60, MAX_LEASE_TIME)
    if not 0.0 <= dhcp.unknown_pool_share <= 1.0:
        _fail("dhcp", "unknown_pool_share", f"must be 0..1, not {dhcp.unknown_pool_share}")
    for server_ip in dhcp.dns_servers:
        if not isinstance(server_ip, str):
            _fail("dhcp", "dns_servers", f"must be IPv4 address strings, not {server_ip!r}")
        _host_address("dhcp", "dns_servers", server_ip)

    try:
        validate_hostname(config.dns.domain)
    except ValidationError as exc:
        _fail("dns", "domain", f"must be a domain name: {exc}")
    for network in config.dns.forward_clients:
        try:
            ipaddress.IPv4Network(network)
        except (TypeError, ValueError) as exc:
            _fail("dns", "forward_clients",
                  f"must be IPv4 networks such as '10.0.0.0/8', not {network!r} ({exc})")
    if config.dns.upstream:
        from pxeserver.dns.forward import parse_upstream

        try:
            parse_upstream(config.dns.upstream)
        except ValueError:
            _fail("dns", "upstream", f"must be an IPv4 address[:port], not {config.dns.upstream!r}")

    _range(config, "imports", "max_file_mb", 1, 1 << 20)
    for root in config.imports.api_local_roots:
        if not isinstance(root, str) or not root.startswith("/"):
            _fail("imports", "api_local_roots", f"must be absolute directory paths, not {root!r}")
    for keyring in config.imports.debian_keyrings:
        if not isinstance(keyring, str) or not keyring.startswith("/"):
            _fail("imports", "debian_keyrings", f"must be absolute file paths, not {keyring!r}")

    if not _TOKEN.match(config.api.token):
        _fail("api", "token", "must be printable ASCII without spaces")
    _validate_metrics(config.metrics)


def _validate_metrics(section: MetricsSection) -> None:
    if not re.fullmatch(r"/[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*", section.path):
        _fail("metrics", "path", f"must be an absolute URL path like '/metrics', not {section.path!r}")
    for network in section.allow:
        try:
            if not isinstance(network, str):
                raise TypeError(network)
            ipaddress.ip_network(network)
        except (TypeError, ValueError):
            _fail("metrics", "allow", f"must be networks like '10.0.0.5/32', not {network!r}")


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load the configuration by the documented lookup order."""
    chosen = path or os.environ.get("PXESERVER_CONFIG") or None
    if chosen is None and Path("pxeserver.toml").is_file():
        chosen = "pxeserver.toml"
    config = Config()
    if chosen is not None:
        file = Path(chosen)
        try:
            data = tomllib.loads(file.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read {file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: {exc}") from None
        for key, values in data.items():
            if key not in ("server", "boot", "tftp", "http", "dhcp", "dns", "api", "xen", "metrics",
                           "imports", "dashboard"):
                raise ConfigError(f"{file}: unknown section [{key}]")
            _apply(getattr(config, key), values, f"{file}: [{key}]")
        config.base_dir = file.resolve().parent
        config.source = str(file)
    try:
        validate(config)
    except ConfigError as exc:
        raise ConfigError(f"{config.source}: {exc}" if chosen is not None else str(exc)) from None
    return config
