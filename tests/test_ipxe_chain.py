"""`[boot] ipxe_chain`: iPXE clients get the iPXE script, or the firmware's pxelinux loader.

Straight through the responder (scapy builds the requests): the same iPXE client, BIOS and
UEFI, under each setting; a PXE ROM's answer never changes; a bad value is refused on load.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.dhcp import BOOTP, DHCP

from pxeserver import app
from pxeserver.config import Config, ConfigError, load
from pxeserver.dhcp.responder import Responder
from pxeserver.mac import MacAddress

MAC = "00:16:3e:00:00:01"


@pytest.fixture
def context(config: Config) -> Iterator[app.Context]:
    config.server.address, config.http.port = "10.0.0.1", 80
    context = app.build(config)
    context.provisioning.add_profile({"name": "deb", "kernel": "k/linux", "initrd": "k/initrd"})
    context.provisioning.add_host({"mac": MAC, "hostname": "h1", "profile": "deb", "ip": "10.0.0.10"})
    yield context
    context.close()


def boot_file(context: app.Context, *options: tuple[str, object]) -> bytes:
    request = bytes(BOOTP(op=1, xid=7, chaddr=MacAddress.parse(MAC).packed + bytes(10))
                    / DHCP(options=[("message-type", "discover"), *options, "end"]))
    reply = Responder(context).respond(request, ("0.0.0.0", 68), 67)
    assert reply is not None
    return BOOTP(reply.payload).file.rstrip(b"\0")


@pytest.mark.parametrize("arch, loader", [(b"\x00\x00", b"pxelinux.0"), (b"\x00\x07", b"syslinux.efi")])
def test_ipxe_gets_the_script_by_default_and_the_loader_when_chained_to_pxelinux(context, arch, loader):
    ipxe = (("pxe_client_architecture", arch), ("user_class", b"iPXE"))
    assert boot_file(context, *ipxe) == b"http://10.0.0.1/ipxe/00-16-3e-00-00-01"
    context.config.boot.ipxe_chain = "pxelinux"
    assert boot_file(context, *ipxe) == loader
    # A PXE ROM (no iPXE user class) gets the same loader under either setting.
    assert boot_file(context, ("pxe_client_architecture", arch)) == loader


def test_an_unknown_ipxe_chain_is_refused_naming_the_key(tmp_path: Path):
    file = tmp_path / "pxeserver.toml"
    file.write_text('[boot]\nipxe_chain = "grub"\n')
    with pytest.raises(ConfigError, match=r"\[boot\] ipxe_chain must be 'script' or 'pxelinux'"):
        load(file)
    file.write_text('[boot]\nipxe_chain = "pxelinux"\n')
    assert load(file).boot.ipxe_chain == "pxelinux"
