"""Boot specs rendered as pxelinux configuration files.

The output is the common subset that pxelinux, iPXE's pxelinux support and the original
pypxeboot all parse: a ``default`` line naming one label, ``kernel``, and ``append`` carrying
``initrd=`` with only ``key=value`` words (pypxeboot splits each word once on '=').
"""

from __future__ import annotations

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
