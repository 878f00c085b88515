"""pxelinux configuration files: boot specs rendered as them, and read back from them.

The output is the common subset that pxelinux, iPXE's pxelinux support and the original
pypxeboot all parse: a ``default`` line naming one label, ``kernel``, and ``append`` carrying
``initrd=`` with only ``key=value`` words (pypxeboot splits each word once on '=').
"""

from __future__ import annotations

from dataclasses import dataclass

from pxeserver.policy import BootSpec, LocalBoot


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
    for line in text.splitlines()[:_MAX_LINES]:
        words = line.split(None, 1)
        if not words or words[0].startswith("#"):
            continue
        keyword, rest = words[0].lower(), (words[1].strip() if len(words) > 1 else "")
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
            kernel, _, append = default.partition(" ")
            return _entry("default", {"kernel": kernel, "append": append})
        chosen = order[0] if order else ""
    return _entry(chosen, entries[chosen]) if chosen else None


def _entry(label: str, fields: dict[str, str]) -> Entry | None:
    if "localboot" in fields:
        return Entry(label, localboot=True)
    if not fields.get("kernel"):
        return None
    initrd = fields.get("initrd", "")
    words = [] if fields.get("append", "") == "-" else fields.get("append", "").split()
    kept = []
    for word in words:
        if word.startswith("initrd="):
            initrd = initrd or word.removeprefix("initrd=").split(",")[0]
        else:
            kept.append(word)
    return Entry(label, kernel=fields["kernel"].split()[0], initrd=initrd, append=" ".join(kept))
