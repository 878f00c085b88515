"""What a machine boots, as the boot policy decides it and boot configs carry it.

A module of its own, importing nothing, so the pxelinux format (which renders these) stays a
low-level module that pypxeboot can load in dom0 without the server behind the policy.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NetBoot:
    """Boot a kernel and initrd (paths relative to the TFTP root) with this command line."""

    kernel: str
    initrd: str
    cmdline: str
    label: str = "install"


@dataclass(frozen=True)
class LocalBoot:
    """Boot from the local disk (pypxeboot hands over to pygrub)."""


BootSpec = NetBoot | LocalBoot
