"""The DHCP codec against scapy as an independent oracle, and fuzzed with hypothesis."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from scapy.layers.dhcp import BOOTP, DHCP

from pxeserver import app
from pxeserver.config import Config
from pxeserver.dhcp import codec
from pxeserver.dhcp.codec import MalformedPacket, MessageType, Option, Packet
from pxeserver.dhcp.responder import Responder

MAC = bytes.fromhex("00163e123456")


def scapy_discover(**fields: object) -> bytes:
    return bytes(BOOTP(op=1, xid=0xDEADBEEF, chaddr=MAC + bytes(10), flags=0x8000, **fields)
                 / DHCP(options=[("message-type", "discover"), ("requested_addr", "10.0.0.7"),
                                 ("vendor_class_id", b"PXEClient:Arch:00007"),
                                 ("param_req_list", [1, 3, 6, 66, 67]), "end"]))


def test_parse_reads_what_scapy_wrote():
    packet = codec.parse(scapy_discover(ciaddr="10.0.0.9", giaddr="10.0.0.254", secs=4))
    assert packet.op == codec.BOOTREQUEST and packet.xid == 0xDEADBEEF
    assert packet.mac is not None and str(packet.mac) == "00:16:3e:12:34:56"
    assert packet.broadcast and packet.secs == 4
    assert packet.ciaddr == "10.0.0.9" and packet.giaddr == "10.0.0.254"
    assert packet.message_type == MessageType.DISCOVER
    assert packet.ip_option(Option.REQUESTED_IP) == "10.0.0.7"
    assert packet.options[Option.VENDOR_CLASS] == b"PXEClient:Arch:00007"
    assert packet.options[Option.PARAMETER_LIST] == bytes([1, 3, 6, 66, 67])


def test_scapy_reads_what_encode_wrote():
    long_value = bytes(range(256)) * 2  # RFC 3396: split into instances of at most 255
    wire = codec.encode(Packet(
        op=codec.BOOTREPLY, xid=7, chaddr=MAC, yiaddr="10.0.0.5", siaddr="10.0.0.1",
        file=b"pxelinux.0",
        options={Option.SERVER_ID: codec.ip_bytes("10.0.0.1"),
                 Option.MESSAGE_TYPE: bytes((MessageType.OFFER,)),
                 Option.LEASE_TIME: struct.pack("!I", 3600), Option.HOSTNAME: b"web1",
                 Option.VENDOR_SPECIFIC: long_value}))
    assert len(wire) >= codec.MIN_REPLY_SIZE
    reply = BOOTP(wire)
    assert reply.op == 2 and reply.xid == 7 and reply.yiaddr == "10.0.0.5"
    assert reply.siaddr == "10.0.0.1" and reply.file.rstrip(b"\0") == b"pxelinux.0"
    assert reply.chaddr[:6] == MAC
    options = [o for o in reply[DHCP].options if isinstance(o, tuple)]
    assert options[0] == ("message-type", 2)  # message type first, as some clients expect
    named = dict(o[:2] for o in options)
    assert named["server_id"] == "10.0.0.1" and named["lease_time"] == 3600
    assert named["hostname"] == b"web1"
    vendor = b"".join(o[1] for o in options if o[0] == "vendor_specific")
    assert vendor == long_value
    assert codec.parse(wire).options[Option.VENDOR_SPECIFIC] == long_value


def test_option_overload_moves_options_into_file_and_sname():
    wire = bytearray(scapy_discover())
    file_options = bytes([Option.HOSTNAME, 3]) + b"abc" + bytes([Option.END])
    sname_options = bytes([Option.DOMAIN_NAME, 2]) + b"xy" + bytes([Option.END])
    wire[108 : 108 + len(file_options)] = file_options
    wire[44 : 44 + len(sname_options)] = sname_options
    end = wire.index(bytes([Option.END]), codec.HEADER_SIZE)
    wire[end:end] = bytes([Option.OVERLOAD, 1, 3])
    packet = codec.parse(bytes(wire))
    assert packet.options[Option.HOSTNAME] == b"abc"
    assert packet.options[Option.DOMAIN_NAME] == b"xy"
    assert packet.file == b"" and packet.sname == b""
    assert Option.OVERLOAD not in packet.options


@pytest.mark.parametrize("mangle, reason", [
    (lambda w: w[:239], "shorter"),
    (lambda w: w[:236] + b"\0\0\0\0" + w[240:], "magic cookie"),
    (lambda w: w[:2] + bytes([17]) + w[3:], "hlen 17"),
    (lambda w: w[:240] + bytes([Option.HOSTNAME, 40]) + b"short", "runs past the end"),
    (lambda w: w[:240] + bytes([Option.HOSTNAME]), "no length byte"),
    (lambda w: w[:240] + bytes([Option.OVERLOAD, 1, 9, Option.END]), "overload"),
])
def test_malformed_packets_are_refused_with_a_reason(mangle, reason):
    with pytest.raises(MalformedPacket, match=reason):
        codec.parse(mangle(scapy_discover()))


HEADER = st.builds(
    lambda op, htype, hlen, xid, chaddr: struct.pack("!BBBBI", op, htype, hlen, 0, xid)
    + bytes(20) + chaddr + bytes(192) + struct.pack("!I", codec.MAGIC_COOKIE),
    st.sampled_from([1, 2, 0, 255]), st.sampled_from([1, 6, 0]), st.integers(0, 255),
    st.integers(0, 2**32 - 1), st.binary(min_size=16, max_size=16),
)
OPTION = st.one_of(
    st.builds(lambda c, v: bytes([c, len(v)]) + v, st.integers(0, 255), st.binary(max_size=20)),
    st.builds(lambda c, v: bytes([53, 1, c]), st.integers(0, 10), st.none()),
    st.builds(lambda v: bytes([52, 1, v]), st.integers(0, 4)),
    st.binary(max_size=6),  # stray bytes: truncated options, bad lengths
)
PACKETS = st.one_of(
    st.binary(max_size=600),
    st.builds(lambda h, opts: h + b"".join(opts), HEADER, st.lists(OPTION, max_size=30)),
)


@pytest.fixture(scope="module")
def responder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Responder]:
    """A full-mode responder that serves unknown MACs, so fuzzed packets reach every path."""
    tmp = tmp_path_factory.mktemp("fuzz")
    config = Config(base_dir=tmp)
    config.server.address, config.server.data_dir = "10.0.0.1", str(tmp / "var")
    config.dhcp.subnet, config.dhcp.serve_unknown = "10.0.0.0/24", True
    config.dhcp.pool_start, config.dhcp.pool_end = "10.0.0.100", "10.0.0.120"
    context = app.build(config)
    yield Responder(context)
    context.close()


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(PACKETS)
def test_fuzzed_packets_never_raise_and_stay_fast(responder: Responder, data: bytes):
    # CPU time of this thread, not wall time: other processes on a shared machine must not
    # fail the bound, a parser that loops on a crafted packet must.
    started = time.thread_time()
    try:
        packet = codec.parse(data)
    except MalformedPacket:
        packet = None
    assert time.thread_time() - started < 0.01
    if packet is not None:
        assert len(packet.chaddr) <= 16
    started = time.perf_counter()
    responder.respond(data, ("10.0.0.50", 68), 67)  # any other exception fails the test
    assert time.perf_counter() - started < 1.0  # registry writes included
