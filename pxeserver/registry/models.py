"""Profiles, hosts and events, and the validation that turns untrusted input into them.

Everything that enters the registry (JSON from the API, flags from the CLI) goes through
``*.from_input`` here, so the stores and the services only ever see checked, canonical values.
"""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
from collections.abc import Collection
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pxeserver.mac import InvalidMac, MacAddress


class ValidationError(ValueError):
    """Bad input; the message is shown to the user as it is."""


class NotFound(LookupError):
    """An unknown profile or host."""


class Conflict(Exception):
    """A duplicate, or a change that would leave the registry inconsistent."""


class Status(StrEnum):
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
# Template variables never shown by the API or the CLI (besides those the user lists in
# [api] secret_vars); templates still get their values. Matched anywhere in the name.
SECRET_VAR = re.compile(r"password|passwd|passphrase|secret|token|key|credential", re.IGNORECASE)
MASK = "********"
_ABSENT = object()


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


def validate_vars(value: object, key: str = "vars", keep: dict[str, Any] | None = None) -> dict[str, Any]:
    """Checked template variables; a value sent back as the mask means "keep ``keep``'s"."""
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
    checked: dict[str, Any] = _unmasked(value, keep if keep is not None else _ABSENT, key)
    if len(json.dumps(checked)) > MAX_VARS_BYTES:
        raise ValidationError(f"{key} is larger than {MAX_VARS_BYTES} bytes")
    return dict(checked)


def _unmasked(new: Any, old: Any, where: str) -> Any:
    """A client that read masked vars and writes them back keeps the secrets it never saw."""
    if new == MASK:
        if old is _ABSENT:
            raise ValidationError(f"{where} is the mask {MASK!r} of a value that does not exist; "
                                  "send the real value")
        return old
    if isinstance(new, dict):
        base = old if isinstance(old, dict) else {}
        return {k: _unmasked(v, base.get(k, _ABSENT), f"{where}.{k}") for k, v in new.items()}
    if isinstance(new, list):
        earlier = old if isinstance(old, list) else []
        return [_unmasked(v, earlier[i] if i < len(earlier) else _ABSENT, f"{where}[{i}]")
                for i, v in enumerate(new)]
    return new


def is_secret_var(name: str, secret_vars: Collection[str] = ()) -> bool:
    return name in secret_vars or SECRET_VAR.search(name) is not None


def masked_vars(value: Any, secret_vars: Collection[str] = ()) -> Any:
    """``value`` with every secret variable's value, at any depth, replaced by the mask."""
    if isinstance(value, dict):
        return {k: MASK if is_secret_var(k, secret_vars) else masked_vars(v, secret_vars)
                for k, v in value.items()}
    if isinstance(value, list):
        return [masked_vars(v, secret_vars) for v in value]
    return value


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
    def from_input(cls, data: object, *, name: str | None = None,
                   current: Profile | None = None) -> Profile:
        """A profile from input; ``current`` is the one it replaces (its secrets are kept
        where the input sends the mask back)."""
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
            vars=validate_vars(data.get("vars"), keep=current.vars if current else None),
        )

    def to_dict(self, secret_vars: Collection[str] = ()) -> dict[str, Any]:
        """The profile as the API and the CLI show it: secret variables masked."""
        return {
            "name": self.name,
            "kernel": self.kernel,
            "initrd": self.initrd,
            "append": self.append,
            "autoinstall": self.autoinstall,
            "vars": masked_vars(self.vars, secret_vars),
        }


_VDEV = re.compile(r"^(xvd|hd|sd)[a-z]{1,3}[0-9]{0,2}$")
_DISK_PATH = re.compile(r"^/[A-Za-z0-9_.+@/-]*$")
_DISK_FORMATS = frozenset({"raw", "qcow", "qcow2", "vhd", "qed"})
_DISK_ACCESS = {"r": "ro", "ro": "ro", "w": "rw", "rw": "rw"}
# xm's "prefix:target": the prefixes that only name a format. Any other prefix makes xl run
# /etc/xen/scripts/block-<prefix> as root in dom0, so it is refused.
_DISK_LEGACY_PREFIXES = {"phy": "raw", "file": "raw", "raw": "raw", "qcow": "qcow",
                         "qcow2": "qcow2", "vhd": "vhd", "qed": "qed"}
_DISK_POSITIONS = ("target", "format", "vdev", "access")


@dataclass(frozen=True)
class XenDisk:
    """One plain domU disk, the only kind an API client may describe (xl-disk-configuration(5)).

    Parsed from xl's positional (``/dev/vg/x,raw,xvda,rw``), deprecated xm
    (``phy:/dev/vg/x,xvda,w``) or keyed (``format=raw,vdev=xvda,access=rw,target=/path``)
    syntax into these four fields; every other key (``script=`` runs a program as root in
    dom0, ``backend=`` moves the disk to another domain) and every flag is refused.
    """

    target: str
    format: str = "raw"
    vdev: str = "xvda"
    access: str = "rw"

    @classmethod
    def parse(cls, spec: str) -> XenDisk:
        if not spec.isprintable() or any(ch in spec for ch in "'\"[]"):
            raise ValidationError("invalid xen.disk: no quotes, brackets or control characters")
        given: dict[str, str] = {}
        legacy = False
        parts = [p.strip() for p in spec.split(",")]
        for index, part in enumerate(parts):
            key, sep, value = part.partition("=")
            if sep:
                key, value = key.strip(), value.strip()
                if key == "target" and index != len(parts) - 1:
                    raise ValidationError(
                        "invalid xen.disk: target= must come last (xl reads the rest as the path)")
                if key == "devtype":
                    if value != "disk":
                        raise ValidationError("invalid xen.disk: only devtype=disk is allowed")
                    continue
                if key not in _DISK_POSITIONS:
                    raise ValidationError(
                        f"invalid xen.disk: key {key!r} is not allowed; give only target, format, "
                        "vdev and access (an operator who needs more writes the xl config by hand)")
            else:
                free = [k for k in _DISK_POSITIONS if k not in given and not (legacy and k == "format")]
                if not free:
                    raise ValidationError(f"invalid xen.disk: unexpected {part!r}")
                key, value = free[0], part
                if not value:  # "target,,xvda": an empty positional keeps the default
                    given[key] = ""
                    continue
            if key in given and (given[key] or sep):
                raise ValidationError(f"invalid xen.disk: {key} is given twice")
            if key == "target" and ":" in value:
                prefix, _, value = value.partition(":")
                if prefix not in _DISK_LEGACY_PREFIXES:
                    raise ValidationError(
                        f"invalid xen.disk: the prefix {prefix + ':'!r} would run a block script "
                        "in dom0; give a plain path")
                if "format" in given and given["format"]:
                    raise ValidationError("invalid xen.disk: format is given twice")
                given["format"], legacy = _DISK_LEGACY_PREFIXES[prefix], not sep
            given[key] = value
        return cls._checked(given)

    @classmethod
    def _checked(cls, given: dict[str, str]) -> XenDisk:
        target = given.get("target", "")
        parts = target.split("/")
        if not target or not _DISK_PATH.match(target) or any(p in (".", "..") for p in parts[1:]):
            raise ValidationError(
                f"invalid xen.disk target {target!r}: an absolute path of letters, digits and "
                "'_.+@/-', without '.' or '..' components")
        target = "/" + "/".join(p for p in parts if p)
        disk_format = given.get("format") or "raw"
        if disk_format not in _DISK_FORMATS:
            raise ValidationError(
                f"invalid xen.disk format {disk_format!r}: one of {', '.join(sorted(_DISK_FORMATS))}")
        vdev = given.get("vdev") or "xvda"
        if not _VDEV.match(vdev):
            raise ValidationError(f"invalid xen.disk vdev {vdev!r}: a name such as xvda")
        access = given.get("access") or "rw"
        if access not in _DISK_ACCESS:
            raise ValidationError(f"invalid xen.disk access {access!r}: r, ro, w or rw")
        return cls(target=target, format=disk_format, vdev=vdev, access=_DISK_ACCESS[access])

    @property
    def spec(self) -> str:
        """The keyed xl form; target last, as xl takes the rest of the string as the target."""
        return f"format={self.format},vdev={self.vdev},access={self.access},target={self.target}"

    def under(self, roots: list[str]) -> bool:
        """Whether the target lies strictly inside one of these directories."""
        return any(self.target.startswith(root.rstrip("/") + "/") for root in roots)


@dataclass(frozen=True)
class XenSettings:
    """The domU's xl settings; ``disk`` is empty (the default image) or a canonical XenDisk spec."""

    memory: int = 1024
    vcpus: int = 1
    bridge: str = "xenbr0"
    disk: str = ""

    FIELDS = frozenset({"memory", "vcpus", "bridge", "disk"})

    @classmethod
    def from_input(cls, data: object, base: XenSettings | None = None) -> XenSettings:
        """Every field checked, the given ones and those kept from ``base`` alike, so values
        stored by an older release cannot pass into a domU config unchecked."""
        data = _only_keys(data if data is not None else {}, set(cls.FIELDS), "xen")
        current = base or cls()
        memory, vcpus = data.get("memory", current.memory), data.get("vcpus", current.vcpus)
        for key, value, low, high in (("memory", memory, 32, 16 * 1024 * 1024), ("vcpus", vcpus, 1, 512)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValidationError(f"xen.{key} must be a whole number from {low} to {high}")
        bridge = _string(data, "bridge", default=current.bridge)
        if not _BRIDGE.match(bridge) or bridge in (".", ".."):
            raise ValidationError(
                f"invalid xen.bridge {bridge!r}: an interface name of up to 15 letters, digits, "
                "'_', '.' or '-'")
        disk = _string(data, "disk", default=current.disk)
        return cls(memory=memory, vcpus=vcpus, bridge=bridge,
                   disk=XenDisk.parse(disk).spec if disk else "")

    def disk_or(self, default_target: str) -> XenDisk:
        return XenDisk.parse(self.disk) if self.disk else XenDisk(target=default_target)

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

    def to_dict(self, secret_vars: Collection[str] = ()) -> dict[str, Any]:
        """The host as the API and the CLI show it: secret variables masked, no install token."""
        return {
            "mac": str(self.mac),
            "hostname": self.hostname,
            "ip": self.ip,
            "profile": self.profile,
            "netboot": self.netboot,
            "status": self.status.value,
            "vars": masked_vars(self.vars, secret_vars),
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
    def from_input(cls, data: object, stored_vars: dict[str, Any] | None = None) -> HostChanges:
        """``stored_vars``: the host's variables now, kept where ``data`` sends back the mask."""
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
            fields["vars"] = validate_vars(data["vars"], keep=stored_vars)
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
class BootFile:
    """A file under the TFTP root as an import recorded it: what it must still be."""

    path: str  # relative to the TFTP root
    size: int
    sha256: str
    source: str  # where it was imported from, for the admin reading `profile show`

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256, "source": self.source}


@dataclass(frozen=True)
class Event:
    mac: MacAddress
    time: float
    source: str  # "dhcp", "tftp", "http", "api", "callback"
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"mac": str(self.mac), "time": self.time, "source": self.source, "message": self.message}
