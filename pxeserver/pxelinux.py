"""pxelinux configuration files: boot specs rendered as them, and read back from them.

A low-level module (pypxeboot loads it in dom0): it imports nothing from the server.

The output is the common subset that pxelinux, iPXE's pxelinux support and the original
pypxeboot all parse: a ``default`` line naming one label, ``kernel``, and ``append`` carrying
``initrd=`` with only ``key=value`` words (pypxeboot splits each word once on '=').
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from pxeserver.bootspec import BootSpec, LocalBoot


def hex_ip(ip: str) -> str:
    """pxelinux's name for an IPv4 address: eight upper-case hex digits."""
    return f"{int(ipaddress.IPv4Address(ip)):08X}"


def render(spec: BootSpec, *, comment: str = "") -> str:
    header = f"# {comment}\n" if comment else ""
    if isinstance(spec, LocalBoot):
        return f"{header}default local\n\nlabel local\n  localboot 0\n"
    append = " ".join(filter(None, [f"initrd={spec.initrd}", spec.cmdline]))
    return (
        f"{header}default {spec.label}\n\n"
        f"label {spec.label}\n  kernel {spec.kernel}\n  append {append}\n"
    )


@dataclass(frozen=True)
class Entry:
    """The entry a pxelinux config boots by default, as a boot loader reads it."""

    label: str
    kernel: str = ""
    initrd: str = ""
    append: str = ""
    localboot: bool = False


_MAX_LINES = 10_000  # a config is a few lines; a huge file is not one
# Only spaces and tabs separate words: any other control character stays inside the value it
# is in, so a reader that must refuse them (pypxeboot) sees it instead of a silent space.
_BLANKS = re.compile(r"[ \t]+")


def parse(text: str) -> Entry | None:
    """The default entry of a pxelinux config, or None when it names nothing bootable.

    Reads what PXE configs in the wild use: ``default`` (a label, or pxelinux's older
    "kernel and arguments" form), ``ontimeout``, ``label``, ``menu default``, ``kernel`` or
    ``linux``, ``initrd``, ``append`` (``initrd=`` inside it, first of a comma list;
    ``append -`` for none) and ``localboot``. Unlike the original pypxeboot, append words
    are kept whole: ``quiet`` and ``a=b=c`` survive.
    """
    default = ontimeout = menu_default = ""
    entries: dict[str, dict[str, str]] = {}
    order: list[str] = []
    current: dict[str, str] | None = None
    for line in text.split("\n", _MAX_LINES)[:_MAX_LINES]:
        words = _BLANKS.split(line.strip(" \t\r"), 1)
        if not words[0] or words[0].startswith("#"):
            continue
        keyword, rest = words[0].lower(), (words[1] if len(words) > 1 else "")
        if keyword == "default":
            default = rest
        elif keyword == "ontimeout":
            ontimeout = rest
        elif keyword == "label":
            current = entries.setdefault(rest, {})
            order.append(rest)
        elif keyword == "menu" and rest.lower() == "default" and current is not None:
            menu_default = order[-1]
        elif current is not None and keyword in ("kernel", "linux", "initrd", "append", "localboot"):
            current["kernel" if keyword == "linux" else keyword] = rest
    chosen = next((name for name in (menu_default, default, ontimeout) if name in entries), "")
    if not chosen:
        if default:  # "default vmlinuz args...": a kernel, not a label
            kernel, append = (_BLANKS.split(default, 1) + [""])[:2]
            return _entry("default", {"kernel": kernel, "append": append})
        chosen = order[0] if order else ""
    return _entry(chosen, entries[chosen]) if chosen else None


def _entry(label: str, fields: dict[str, str]) -> Entry | None:
    if "localboot" in fields:
        return Entry(label, localboot=True)
    if not fields.get("kernel"):
        return None
    initrd = fields.get("initrd", "")
    append = fields.get("append", "")
    words = [] if append in ("", "-") else _BLANKS.split(append)
    kept = []
    for word in words:
        if word.startswith("initrd="):
            initrd = initrd or word.removeprefix("initrd=").split(",")[0]
        else:
            kept.append(word)
    return Entry(label, kernel=_BLANKS.split(fields["kernel"])[0], initrd=initrd, append=" ".join(kept))
