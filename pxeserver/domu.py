"""The xl domU configuration that boots a registered host through pypxeboot."""

from __future__ import annotations

import re

from pxeserver.config import XenSection
from pxeserver.registry import Host

_NAME_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def render(host: Host, *, bridge: str | None = None, disk: str | None = None,
           memory: int | None = None, vcpus: int | None = None,
           bootloader: str = XenSection.bootloader, dhcp_server: str = "") -> str:
    """An xl config: PV guest, pypxeboot as bootloader, one vif with the host's MAC.

    ``bootloader`` is an absolute path: xl looks for a bare name only in its own directory.
    ``bootloader_args`` is a list (xl deprecates the string form); pypxeboot finds the MAC
    there, the bridge to send its DHCP on (dom0's default route may lead elsewhere) and, when
    pxeserver is the DHCP server, ``dhcp_server=`` so that a guest answering first is ignored.
    on_reboot restarts the guest, so after the installer's final reboot the bootloader
    runs again and, with netboot now off, hands over to the installed system.
    """
    name = _NAME_SAFE.sub("-", host.hostname.split(".", 1)[0])
    xen = host.xen
    bridge = bridge if bridge is not None else xen.bridge
    disk_spec = disk or xen.disk or f"format=raw,vdev=xvda,access=rw,target=/var/lib/xen/images/{name}.img"
    words = [f"mac={host.mac}", f"interface={bridge}"] + ([f"dhcp_server={dhcp_server}"] if dhcp_server else [])
    lines = [
        f"# {host.hostname}: boots through pypxeboot from pxeserver",
        f'name = "{name}"',
        'type = "pv"',
        f"memory = {memory if memory is not None else xen.memory}",
        f"vcpus = {vcpus if vcpus is not None else xen.vcpus}",
        f"vif = ['mac={host.mac},bridge={bridge}']",
        f"disk = ['{disk_spec}']",
        f'bootloader = "{bootloader}"',
        "bootloader_args = [" + ", ".join(f'"{word}"' for word in words) + "]",
        'on_poweroff = "destroy"',
        'on_reboot = "restart"',
        'on_crash = "restart"',
    ]
    return "\n".join(lines) + "\n"
