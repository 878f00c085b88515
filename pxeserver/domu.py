"""The xl domU configuration that boots a registered host through pypxeboot."""

from __future__ import annotations

import re

from pxeserver.registry import Host, XenSettings

_NAME_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def render(host: Host, xen: XenSettings | None = None) -> str:
    """An xl config: PV guest, pypxeboot as bootloader, one vif with the host's MAC.

    ``bootloader_args`` is a list (xl deprecates the string form); pypxeboot finds the MAC
    there, and the bridge to send its DHCP on (dom0's default route may lead elsewhere).
    on_reboot restarts the guest, so after the installer's final reboot the bootloader
    runs again and, with netboot now off, hands over to the installed system.

    Every value is checked again (XenSettings.from_input, XenDisk.parse) and the disk written
    from its parsed form, so nothing stored by an older release reaches xl unchecked.
    """
    name = _NAME_SAFE.sub("-", host.hostname.split(".", 1)[0])
    xen = XenSettings.from_input({}, xen or host.xen)
    bridge = xen.bridge
    disk_spec = xen.disk_or(f"/var/lib/xen/images/{name}.img").spec
    lines = [
        f"# {host.hostname}: boots through pypxeboot from pxeserver",
        f'name = "{name}"',
        'type = "pv"',
        f"memory = {xen.memory}",
        f"vcpus = {xen.vcpus}",
        f"vif = ['mac={host.mac},bridge={bridge}']",
        f"disk = ['{disk_spec}']",
        'bootloader = "pypxeboot"',
        f'bootloader_args = ["mac={host.mac}", "interface={bridge}"]',
        'on_poweroff = "destroy"',
        'on_reboot = "restart"',
        'on_crash = "restart"',
    ]
    return "\n".join(lines) + "\n"
