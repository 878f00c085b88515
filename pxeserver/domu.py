"""The xl domU configuration that boots a registered host through pypxeboot."""

from __future__ import annotations

import re

from pxeserver.config import Config, XenSection
from pxeserver.registry import Host, XenSettings

_NAME_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def render_for(config: Config, host: Host, xen: XenSettings | None = None) -> str:
    """The xl config as this server's settings make it: what ``domu-config`` writes and the
    dashboard shows (the bootloader path, the DHCP pin in full mode, the dom0 cache)."""
    pinned = config.advertised_address if config.dhcp.enabled and config.dhcp.mode == "full" else ""
    return render(host, xen, bootloader=config.xen.bootloader, dhcp_server=pinned,
                  cache_dir=config.xen.pypxeboot_cache_dir)


def render(host: Host, xen: XenSettings | None = None, *, bootloader: str = XenSection.bootloader,
           dhcp_server: str = "", cache_dir: str = "") -> str:
    """An xl config: PV guest, pypxeboot as bootloader, one vif with the host's MAC.

    ``bootloader`` is an absolute path: xl looks for a bare name only in its own directory.
    ``bootloader_args`` is a list (xl deprecates the string form); pypxeboot finds the MAC
    there, the bridge to send its DHCP on (dom0's default route may lead elsewhere) and, when
    pxeserver is the DHCP server, ``dhcp_server=`` so that a guest answering first is ignored;
    ``cache_dir=`` when set (``[xen] pypxeboot_cache_dir``): the dom0's boot-file cache.
    on_reboot restarts the guest, so after the installer's final reboot the bootloader
    runs again and, with netboot now off, hands over to the installed system.

    Every value is checked again (XenSettings.from_input, XenDisk.parse) and the disk written
    from its parsed form, so nothing stored by an older release reaches xl unchecked.
    """
    name = _NAME_SAFE.sub("-", host.hostname.split(".", 1)[0])
    xen = XenSettings.from_input({}, xen or host.xen)
    bridge = xen.bridge
    disk_spec = xen.disk_or(f"/var/lib/xen/images/{name}.img").spec
    words = [f"mac={host.mac}", f"interface={bridge}"] + ([f"dhcp_server={dhcp_server}"] if dhcp_server else [])
    words += [f"cache_dir={cache_dir}"] if cache_dir else []
    lines = [
        f"# {host.hostname}: boots through pypxeboot from pxeserver",
        f'name = "{name}"',
        'type = "pv"',
        f"memory = {xen.memory}",
        f"vcpus = {xen.vcpus}",
        f"vif = ['mac={host.mac},bridge={bridge}']",
        f"disk = ['{disk_spec}']",
        f'bootloader = "{bootloader}"',
        "bootloader_args = [" + ", ".join(f'"{word}"' for word in words) + "]",
        'on_poweroff = "destroy"',
        'on_reboot = "restart"',
        'on_crash = "restart"',
    ]
    return "\n".join(lines) + "\n"
