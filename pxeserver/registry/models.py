"""Profiles, hosts and events, and the validation that turns untrusted input into them.

Everything that enters the registry (JSON from the API, flags from the CLI) goes through
``*.from_input`` here, so the stores and the services only ever see checked, canonical values.
"""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pxeserver.mac import InvalidMac, MacAddress


class ValidationError(ValueError):
    """Bad input; the message is shown to the user as it is."""


class NotFound(LookupError):
    """An unknown profile or host."""


class Conflict(Exception):
    """A duplicate, or a change that would leave the registry inconsistent."""


class Status(str, Enum):
    REGISTERED = "registered"
    NETBOOTING = "netbooting"
    INSTALLING = "installing"
    INSTALLED = "installed"


_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_TEMPLATE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_BRIDGE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
MAX_VARS_BYTES = 64 * 1024


def _string(data: dict[str, Any], key: str, *, required: bool = False, default: str = "") -> str:
    value = data.get(key)
    if value is None:
        if required:
            raise ValidationError(f"{key} is required")
        return default
    if not isinstance(value, str):
        raise ValidationError(f"{key} must be a string, not {type(value).__name__}")
    if any(ch in value for ch in "\r\n\0"):
        raise ValidationError(f"{key} must not contain a line break or NUL")
    return value


def parse_mac(value: object) -> MacAddress:
    try:
        return MacAddress.parse(value)
    except InvalidMac as exc:
        raise ValidationError(str(exc)) from None


def validate_hostname(value: str) -> str:
    """An RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens."""
    name = value.rstrip(".") if value.endswith(".") and len(value) > 1 else value
    if not name or len(name) > 253:
        raise ValidationError(f"invalid hostname {value!r}: must be 1 to 253 characters")
    for label in name.split("."):
        if not _LABEL.match(label):
            raise ValidationError(
                f"invalid hostname {value!r}: each dot-separated label must be 1 to 63 letters, "
                "digits or inner hyphens"
            )
    return name.lower()


def validate_ipv4(value: str) -> str:
    try:
        address = ipaddress.IPv4Address(value)
    except ValueError:
        raise ValidationError(f"invalid IPv4 address {value!r}") from None
    if address.is_unspecified or address.is_multicast or address == ipaddress.IPv4Address(
        "255.255.255.255"
    ):
        raise ValidationError(f"IPv4 address {value} cannot be given to a host")
    return str(address)


def validate_profile_name(value: str) -> str:
    if not _PROFILE_NAME.match(value):
        raise ValidationError(
            f"invalid profile name {value!r}: use up to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def validate_template_name(value: str) -> str:
    """A file name inside kickstarts/ or preseeds/, never a path (no '/', no '..')."""
    if not _TEMPLATE_NAME.match(value) or ".." in value:
        raise ValidationError(
            f"invalid autoinstall template {value!r}: give a file name from kickstarts/ or "
            "preseeds/, not a path"
        )
    return value


def validate_boot_path(key: str, value: str) -> str:
    """A path relative to the TFTP root, without '..', that pxelinux and pypxeboot can use."""
    if not value:
        raise ValidationError(f"{key} is required")
    if value.startswith("/") or "\\" in value or any(
        part in ("..", "") for part in value.split("/")
    ):
        raise ValidationError(
            f"invalid {key} {value!r}: give a path relative to the TFTP root, without '..'"
        )
    if any(ch.isspace() for ch in value) or "=" in value or not value.isprintable():
        raise ValidationError(f"invalid {key} {value!r}: no spaces, '=' or control characters")
    return value


def validate_append(value: str) -> str:
    """Extra kernel arguments that every client can parse.

    The original pypxeboot splits each append word once on '=' and keeps only words that have
    one: a word without '=' would be dropped and a second '=' would corrupt the value, so both
    are refused here rather than failing silently at boot time.
    """
    words = value.split()
    for word in words:
        if not word.isprintable():
            raise ValidationError("append must not contain control characters")
        if word.count("=") != 1 or word.startswith("="):
            raise ValidationError(
                f"append word {word!r} must be exactly one key=value pair: the original "
                "pypxeboot drops words without '=' and breaks on a second '=' "
                "(write a flag such as 'quiet' as 'quiet=1')"
            )
        if word.split("=", 1)[0] in ("initrd", "ks", "inst.ks", "url", "auto", "priority"):
            raise ValidationError(
                f"append must not set {word.split('=', 1)[0]!r}: pxeserver sets it for each host"
            )
    return " ".join(words)


def validate_vars(value: object, key: str = "vars") -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationError(f"{key} must be an object")
    for name in value:
        if not _VAR_NAME.match(name):
            raise ValidationError(
                f"invalid variable name {name!r} in {key}: use letters, digits and '_'"
            )
    _check_var_values(value, key)
    if len(json.dumps(value)) > MAX_VARS_BYTES:
        raise ValidationError(f"{key} is larger than {MAX_VARS_BYTES} bytes")
    return dict(value)


def _check_var_values(value: object, where: str, depth: int = 0) -> None:
    """Template variables end up inside kickstart and preseed lines: a line break in a value
    could start a new section (``%post``), so values are refused here, not at render time."""
    if depth > 16:
        raise ValidationError(f"{where} is nested too deeply")
    if isinstance(value, str):
        if any(ch in value for ch in "\r\n\0"):
            raise ValidationError(f"{where} must not contain a line break or NUL")
    elif isinstance(value, dict):
        for name, item in value.items():
            _check_var_values(item, f"{where}.{name}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_var_values(item, f"{where}[{index}]", depth + 1)


def _only_keys(data: object, allowed: set[str], what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValidationError(f"a {what} must be a JSON object")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValidationError(f"unknown {what} field(s): {', '.join(unknown)}")
    return data


@dataclass(frozen=True)
class Profile:
    name: str
    kernel: str
    initrd: str
    append: str = ""
    autoinstall: str = ""
    vars: dict[str, Any] = field(default_factory=dict)

    FIELDS = frozenset({"name", "kernel", "initrd", "append", "autoinstall", "vars"})

    @classmethod
    def from_input(cls, data: object, *, name: str | None = None) -> Profile:
        data = _only_keys(data, set(cls.FIELDS), "profile")
        if name is not None:
            data = {**data, "name": data.get("name", name)}
            if data["name"] != name:
                raise ValidationError("the name in the body differs from the name in the URL")
        autoinstall = _string(data, "autoinstall")
        return cls(
            name=validate_profile_name(_string(data, "name", required=True)),
            kernel=validate_boot_path("kernel", _string(data, "kernel", required=True)),
            initrd=validate_boot_path("initrd", _string(data, "initrd", required=True)),
            append=validate_append(_string(data, "append")),
            autoinstall=validate_template_name(autoinstall) if autoinstall else "",
            vars=validate_vars(data.get("vars")),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kernel": self.kernel,
            "initrd": self.initrd,
            "append": self.append,
            "autoinstall": self.autoinstall,
            "vars": self.vars,
        }


@dataclass(frozen=True)
class XenSettings:
    memory: int = 1024
    vcpus: int = 1
    bridge: str = "xenbr0"
    disk: str = ""

    @classmethod
    def from_input(cls, data: object, base: XenSettings | None = None) -> XenSettings:
        data = _only_keys(data if data is not None else {}, {"memory", "vcpus", "bridge", "disk"}, "xen")
        current = base or cls()
        memory, vcpus = data.get("memory", current.memory), data.get("vcpus", current.vcpus)
        for key, value, low, high in (("memory", memory, 32, 16 * 1024 * 1024), ("vcpus", vcpus, 1, 512)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValidationError(f"xen.{key} must be a whole number from {low} to {high}")
        bridge = _string(data, "bridge", default=current.bridge)
        if not _BRIDGE.match(bridge):
            raise ValidationError(f"invalid xen.bridge {bridge!r}: an interface name")
        disk = _string(data, "disk", default=current.disk)
        if "'" in disk or '"' in disk or "]" in disk:
            raise ValidationError("xen.disk must not contain quotes or ']'")
        return cls(memory=memory, vcpus=vcpus, bridge=bridge, disk=disk)

    def to_dict(self) -> dict[str, Any]:
        return {"memory": self.memory, "vcpus": self.vcpus, "bridge": self.bridge, "disk": self.disk}


@dataclass(frozen=True)
class Host:
    mac: MacAddress
    hostname: str
    profile: str
    ip: str | None = None
    netboot: bool = True
    status: Status = Status.REGISTERED
    vars: dict[str, Any] = field(default_factory=dict)
    xen: XenSettings = field(default_factory=XenSettings)
    # Secret of the current install; only the install-complete callback may present it.
    install_token: str = ""

    CREATE_FIELDS = frozenset({"mac", "hostname", "ip", "profile", "netboot", "vars", "xen"})

    @classmethod
    def from_input(cls, data: object, *, mac: MacAddress) -> Host:
        data = _only_keys(data, set(cls.CREATE_FIELDS), "host")
        netboot = data.get("netboot", True)
        if not isinstance(netboot, bool):
            raise ValidationError("netboot must be true or false")
        ip = data.get("ip")
        if ip is not None and not isinstance(ip, str):
            raise ValidationError("ip must be a string")
        return cls(
            mac=mac,
            hostname=validate_hostname(_string(data, "hostname", required=True)),
            profile=validate_profile_name(_string(data, "profile", required=True)),
            ip=validate_ipv4(ip) if ip else None,
            netboot=netboot,
            vars=validate_vars(data.get("vars")),
            xen=XenSettings.from_input(data.get("xen")),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "mac": str(self.mac),
            "hostname": self.hostname,
            "ip": self.ip,
            "profile": self.profile,
            "netboot": self.netboot,
            "status": self.status.value,
            "vars": self.vars,
            "xen": self.xen.to_dict(),
        }


@dataclass(frozen=True)
class HostChanges:
    """The fields one PATCH names, each validated; the store writes these and nothing else.

    ``netboot`` is not a plain field: turning it on starts a new install (status back to
    registered, a new install token), so the store sets it only by compare-and-set.
    """

    fields: dict[str, Any] = field(default_factory=dict)  # new hostname, ip, profile, vars
    xen: dict[str, Any] = field(default_factory=dict)  # xen settings merged into the stored ones
    netboot: bool | None = None
    # The secret of the install this change starts if it turns netboot on.
    install_token: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)

    NAMES = frozenset({"hostname", "ip", "profile", "netboot", "vars", "xen"})
    PLAIN = frozenset({"hostname", "ip", "profile", "vars"})  # written as given

    def __post_init__(self) -> None:
        if not set(self.fields) <= self.PLAIN:  # the store puts these names into its SQL
            raise ValueError(f"not plain host fields: {sorted(set(self.fields) - self.PLAIN)}")

    @classmethod
    def from_input(cls, data: object) -> HostChanges:
        data = _only_keys(data, set(cls.NAMES), "host")
        fields: dict[str, Any] = {}
        if "hostname" in data:
            fields["hostname"] = validate_hostname(_string(data, "hostname", required=True))
        if "profile" in data:
            fields["profile"] = validate_profile_name(_string(data, "profile", required=True))
        if "ip" in data:
            ip = data["ip"]
            if ip is not None and not isinstance(ip, str):
                raise ValidationError("ip must be a string or null")
            fields["ip"] = validate_ipv4(ip) if ip else None
        if "vars" in data:
            fields["vars"] = validate_vars(data["vars"])
        netboot = data.get("netboot")
        if "netboot" in data and not isinstance(netboot, bool):
            raise ValidationError("netboot must be true or false")
        xen: dict[str, Any] = {}
        if "xen" in data:
            given = _only_keys(data["xen"], {"memory", "vcpus", "bridge", "disk"}, "xen")
            xen = {key: value for key, value in XenSettings.from_input(given).to_dict().items()
                   if key in given}
        return cls(fields=fields, xen=xen, netboot=netboot)

    @property
    def names(self) -> list[str]:
        """The host fields this change names, as the API spells them."""
        named = [*self.fields, *(["xen"] if self.xen else []),
                 *(["netboot"] if self.netboot is not None else [])]
        return sorted(named)


@dataclass(frozen=True)
class Event:
    mac: MacAddress
    time: float
    source: str  # "dhcp", "tftp", "http", "api", "callback"
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"mac": str(self.mac), "time": self.time, "source": self.source, "message": self.message}
