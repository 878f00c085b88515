"""Configuration: a TOML file layered over built-in defaults that work on one machine.

Lookup order: ``--config FILE``, ``$PXESERVER_CONFIG``, ``./pxeserver.toml``, defaults.
Relative paths in the file are taken relative to the file's directory; with no file, relative
to the current directory. Unknown keys are an error, so a typo never silently does nothing.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and key."""


@dataclass
class ServerSection:
    address: str = ""  # what clients are told; empty: the address of the default route
    data_dir: str = "var"
    tftp_root: str = "tftproot"
    kickstarts: str = "kickstarts"
    preseeds: str = "preseeds"
    database: str = ""  # empty: SQLite file registry.db under data_dir


@dataclass
class BootSection:
    # Profile booted by MACs the registry does not know; empty means "boot locally".
    default_profile: str = ""
    efi_loader: str = "syslinux.efi"  # boot file for x64 UEFI firmware
    bios_loader: str = "pxelinux.0"
    # What iPXE clients are handed: "script" (/ipxe/<mac> over HTTP) or "pxelinux" (the
    # firmware's loader above over TFTP, for admins who want pxelinux menus).
    ipxe_chain: str = "script"


@dataclass
class TftpSection:
    enabled: bool = True
    address: str = "0.0.0.0"
    port: int = 69
    max_sessions: int = 4096
    max_sessions_per_client: int = 64
    timeout: int = 1  # seconds before a block is resent, unless the client asks (RFC 2349)
    retries: int = 5  # resends of one block before the transfer is abandoned
    max_blksize: int = 65464  # larger requests are answered with this (RFC 2348)
    max_windowsize: int = 64  # larger requests are answered with this (RFC 7440)
    packet_cache_mb: int = 256  # ready-made DATA packets of often-sent files (tftp/cache.py)


@dataclass
class HttpSection:
    enabled: bool = True
    address: str = "0.0.0.0"
    port: int = 80
    threads: int = 32


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
    dns_servers: list[str] = field(default_factory=list)


@dataclass
class DnsSection:
    enabled: bool = False
    address: str = "0.0.0.0"
    port: int = 53
    domain: str = "domu.example"
    upstream: str = ""  # "host:port" to forward names outside the zone; empty: REFUSED


@dataclass
class ApiSection:
    token: str = ""


@dataclass
class Config:
    server: ServerSection = field(default_factory=ServerSection)
    boot: BootSection = field(default_factory=BootSection)
    tftp: TftpSection = field(default_factory=TftpSection)
    http: HttpSection = field(default_factory=HttpSection)
    dhcp: DhcpSection = field(default_factory=DhcpSection)
    dns: DnsSection = field(default_factory=DnsSection)
    api: ApiSection = field(default_factory=ApiSection)
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
        return self.server.database or str(self.data_dir / "registry.db")

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
            return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _apply(section: Any, values: dict[str, Any], where: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a table")
    fields = {f.name: f for f in dataclasses.fields(section)}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}")
        expected = type(getattr(section, key))
        if expected is int and isinstance(value, bool) or not isinstance(value, expected):
            raise ConfigError(f"{where}.{key}: expected {expected.__name__}, got {value!r}")
        setattr(section, key, value)


def validate(config: Config) -> None:
    for name in ("tftp", "http", "dhcp", "dns"):
        port = getattr(config, name).port
        if not 0 <= port <= 65535:
            raise ConfigError(f"[{name}] port {port} is out of range")
    if config.dhcp.mode not in ("full", "proxy"):
        raise ConfigError(f"[dhcp] mode must be 'full' or 'proxy', not {config.dhcp.mode!r}")
    if config.boot.ipxe_chain not in ("script", "pxelinux"):
        raise ConfigError(f"[boot] ipxe_chain must be 'script' or 'pxelinux', not {config.boot.ipxe_chain!r}")
    for key, low, high in (("timeout", 1, 255), ("retries", 0, 100), ("max_blksize", 8, 65464),
                           ("max_windowsize", 1, 65535), ("max_sessions", 1, 1_000_000),
                           ("max_sessions_per_client", 1, 1_000_000), ("packet_cache_mb", 0, 1 << 20)):
        if not low <= getattr(config.tftp, key) <= high:
            raise ConfigError(f"[tftp] {key} must be {low}..{high}, not {getattr(config.tftp, key)}")
    try:
        ipaddress.IPv4Network(config.dhcp.subnet)
        if config.server.address:
            ipaddress.IPv4Address(config.server.address)
    except ValueError as exc:
        raise ConfigError(f"bad address in configuration: {exc}") from None


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
            if key not in ("server", "boot", "tftp", "http", "dhcp", "dns", "api"):
                raise ConfigError(f"{file}: unknown section [{key}]")
            _apply(getattr(config, key), values, f"{file} [{key}]")
        config.base_dir = file.resolve().parent
        config.source = str(file)
    validate(config)
    return config
