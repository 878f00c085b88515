"""Golden captures: the DHCP exchanges of real clients, replayed through our parser and responder.

tests/data/dhcp-<scenario>.pcap were recorded once from the firmware lab (tests/test_firmware.py
with $PXESERVER_RECORD_DHCP=1, tcpdump in the server's namespace): iPXE's BIOS and EFI ROMs
(user class "iPXE", arch 0 and 7), OVMF's own PXE (arch 7, no user class), syslinux.efi's own
DHCP (no PXE options at all), Debian's installer (vendor class "d-i"), busybox udhcpc in
the lifecycle test's tiny initrd and pypxeboot's client, each talking to `pxeserver serve`. Here, without a network:
- our codec reads every packet of them, requests and the replies those clients accepted, as
  scapy (an independent implementation) reads them;
- our responder, with the registry and settings the lab had, answers each recorded request
  as tests/data/dhcp-<scenario>.golden.json says. After an intended change of the answers,
  regenerate those files with $PXESERVER_REGENERATE_GOLDEN=1 and review their diff.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.dhcp import BOOTP, DHCP, DHCPRevOptions
from scapy.layers.inet import IP, UDP
from scapy.utils import rdpcap

from pxeserver import app
from pxeserver.config import Config
from pxeserver.dhcp import codec
from pxeserver.dhcp.codec import MessageType
from pxeserver.dhcp.responder import Responder

DATA = Path(__file__).parent / "data"
CAPTURES = sorted(DATA.glob("dhcp-*.pcap"))
REGENERATE = bool(os.environ.get("PXESERVER_REGENERATE_GOLDEN"))
# What the lab (tests/firmware_support.py, tests/test_firmware.py) had when it recorded them.
SERVER_IP, SUBNET, MAC, GUEST_IP = "10.77.12.1", "10.77.12.0/24", "52:54:00:12:00:01", "10.77.12.50"
IPXE_CHAIN = {"bios-pxelinux": "pxelinux"}


def scenario(capture: Path) -> str:
    return capture.stem.removeprefix("dhcp-")


def dhcp_packets(capture: Path) -> list[tuple[bytes, BOOTP, str]]:
    """Every DHCP datagram in the capture: its UDP payload, scapy's reading of it, its sender."""
    packets = [p for p in rdpcap(str(capture)) if UDP in p and {p[UDP].sport, p[UDP].dport} & {67, 68}]
    return [(bytes(p[UDP].payload), p[BOOTP], p[IP].src) for p in packets]


def scapy_options(bootp: BOOTP) -> dict[int, bytes]:
    """The options as scapy decodes them, re-encoded one by one: code to value bytes."""
    options = {}
    for option in bootp[DHCP].options:
        if not isinstance(option, tuple):
            continue  # "end" and "pad"
        name = option[0]
        code = DHCPRevOptions[name][0] if name in DHCPRevOptions else int(name)
        raw = bytes(DHCP(options=[option]))  # code, length, value
        options[code] = raw[2:2 + raw[1]]
    return options


@pytest.mark.skipif(not CAPTURES, reason="no golden captures in tests/data")
@pytest.mark.parametrize("capture", CAPTURES, ids=scenario)
def test_our_codec_reads_every_recorded_packet_as_scapy_does(capture: Path) -> None:
    packets = dhcp_packets(capture)
    assert packets, f"{capture.name} holds no DHCP packets"
    for payload, bootp, _ in packets:
        packet = codec.parse(payload)
        assert (packet.op, packet.xid, packet.flags) == (bootp.op, bootp.xid, int(bootp.flags))
        assert (packet.ciaddr, packet.yiaddr, packet.siaddr, packet.giaddr) == (
            bootp.ciaddr, bootp.yiaddr, bootp.siaddr, bootp.giaddr)
        assert packet.mac is not None and packet.mac.packed == bytes(bootp.chaddr)[:6]
        assert packet.file == bytes(bootp.file).rstrip(b"\0")
        expected = scapy_options(bootp)
        assert packet.message_type == expected[53][0]
        for code, value in expected.items():
            assert packet.options.get(code) == value, (capture.name, code)


@pytest.fixture
def lab_context(config: Config) -> Iterator[app.Context]:
    config.server.address, config.http.port = SERVER_IP, 80
    config.dhcp.enabled, config.dhcp.subnet, config.dhcp.router = True, SUBNET, SERVER_IP
    config.dns.enabled, config.dns.domain = True, "lab.example"
    context = app.build(config)
    context.provisioning.add_profile({"name": "debian12", "kernel": "images/debian12/linux",
                                      "initrd": "images/debian12/initrd.gz", "append": "console=ttyS0",
                                      "autoinstall": "debian-xen.cfg"})
    context.provisioning.add_host({"mac": MAC, "hostname": "web1", "profile": "debian12", "ip": GUEST_IP})
    yield context
    context.close()


def describe(payload: bytes) -> dict[str, object]:
    """A reply as scapy reads it, in a form a reviewer can read in the golden file's diff."""
    bootp = BOOTP(payload)
    return {
        "op": bootp.op, "xid": f"{bootp.xid:#010x}", "flags": int(bootp.flags),
        "yiaddr": bootp.yiaddr, "siaddr": bootp.siaddr, "giaddr": bootp.giaddr,
        "file": bytes(bootp.file).rstrip(b"\0").decode(),
        "options": {str(code): value.hex() for code, value in sorted(scapy_options(bootp).items())},
    }


@pytest.mark.skipif(not CAPTURES, reason="no golden captures in tests/data")
@pytest.mark.parametrize("capture", CAPTURES, ids=scenario)
def test_our_responder_answers_the_recorded_requests_as_the_golden_file_says(
        capture: Path, lab_context: app.Context) -> None:
    lab_context.config.boot.ipxe_chain = IPXE_CHAIN.get(scenario(capture), "script")
    responder = Responder(lab_context)
    answers = []
    for payload, bootp, source in dhcp_packets(capture):
        if bootp.op != codec.BOOTREQUEST:
            continue
        reply = responder.respond(payload, (source, 68), 67)
        request = codec.parse(payload)
        answers.append({
            "request": f"{MessageType(request.message_type).name} xid {request.xid:#010x}",
            "reply": None if reply is None else {"to": list(reply.address), **describe(reply.payload)},
        })
    assert answers, f"{capture.name} holds no requests"
    golden = capture.with_suffix(".golden.json")
    if REGENERATE:
        golden.write_text(json.dumps(answers, indent=1) + "\n")
    assert answers == json.loads(golden.read_text())
