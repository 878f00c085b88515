"""No packet stops the TFTP service; the read-only root stays contained.

Each bad input gets the right ERROR packet (or is dropped), and a real client is served
right after it: that second half is what shows the service survived.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tftp_support import (
    DATA,
    WRQ,
    RawClient,
    ack,
    error_of,
    request,
    running,
)

from pxeserver.app import Context
from pxeserver.tftp import TftpService


@pytest.fixture
def service(ctx: Context) -> Iterator[TftpService]:
    (ctx.config.tftp_root / "pxelinux.0").write_bytes(b"loader" * 1000)
    with running(ctx) as tftp:
        yield tftp


def still_serves(port: int) -> None:
    """A real client (curl) still gets a file from the service."""
    result = subprocess.run(["curl", "-sS", "--max-time", "10", f"tftp://127.0.0.1:{port}/pxelinux.0"],
                            capture_output=True, timeout=20)
    assert result.returncode == 0 and result.stdout == b"loader" * 1000, result.stderr


def error_for(client: RawClient, packet: bytes) -> tuple[int, str] | None:
    reply, _ = client.ask(packet)
    return error_of(reply)


@pytest.mark.parametrize("packet, code", [
    (b"\x00\x01pxelinux.0", 4),  # truncated: no NUL, no mode
    (b"\x00\x01pxelinux.0\x00octet", 4),  # truncated mode
    (b"\x00\x01\x00octet\x00", 4),  # empty file name
    (b"\x00\x01pxelinux.0\x00mail\x00", 4),  # RFC 1350's obsolete mail mode
    (b"\x00\x01pxelinux.0\x00\xff\xfe\x00", 4),  # binary mode string
    (b"\x00\x63whatever\x00", 4),  # unknown opcode
    (b"\x00\x01pxelinux.0\x00octet\x00blksize\x00abc\x00", 8),
    (b"\x00\x01pxelinux.0\x00octet\x00blksize\x007\x00", 8),
    (b"\x00\x01pxelinux.0\x00octet\x00blksize\x00-1\x00", 8),
    (b"\x00\x01pxelinux.0\x00octet\x00tsize\x00x\x00", 8),
    (b"\x00\x01pxelinux.0\x00octet\x00timeout\x000\x00", 8),
    (b"\x00\x01pxelinux.0\x00octet\x00timeout\x00256\x00", 8),
    (b"\x00\x01pxelinux.0\x00octet\x00windowsize\x000\x00", 8),
    (b"\x00\x01caf\xc3\xa9\x00octet\x00", 1),  # valid UTF-8, no such file
    (b"\x00\x01\xff\xfe\x80\x00octet\x00", 1),  # not UTF-8 at all
])
def test_malformed_requests_get_the_right_error(service: TftpService, client: RawClient, packet: bytes,
                                                code: int) -> None:
    error = error_for(client, packet)
    assert error is not None and error[0] == code, error
    still_serves(service.port)


@pytest.mark.parametrize("packet", [
    b"", b"\x00", b"\x00\x03\x00\x01data", b"\x00\x04\x00\x01", b"\x00\x05\x00\x00x\x00"])
def test_stray_and_tiny_packets_are_dropped(service: TftpService, client: RawClient, packet: bytes) -> None:
    client.send(packet)
    assert client.silent_for(0.3)
    still_serves(service.port)


def test_non_ascii_file_name_is_served(service: TftpService, ctx: Context, client: RawClient) -> None:
    (ctx.config.tftp_root / "café.cfg").write_bytes(b"menu")
    data, _, _ = client.download("café.cfg")
    assert data == b"menu"


def test_directory_and_unreadable_file(service: TftpService, ctx: Context, client: RawClient) -> None:
    assert error_for(client, request("images"))[0] == 1
    private = ctx.config.tftp_root / "private.key"
    private.write_bytes(b"secret")
    private.chmod(0o600)  # not world-readable: not published, even to a server running as root
    assert error_for(client, request("private.key"))[0] == 2
    still_serves(service.port)


def test_write_request_is_refused_and_nothing_is_written(service: TftpService, ctx: Context, client: RawClient) -> None:
    reply, tid = client.ask(request("upload.bin", opcode=WRQ))
    assert error_of(reply)[0] == 2
    client.send(b"\x00\x03\x00\x01" + b"x" * 100, tid)  # data pushed anyway
    assert not (ctx.config.tftp_root / "upload.bin").exists()
    assert not any(path.name == "upload.bin" for path in ctx.config.tftp_root.rglob("*"))
    still_serves(service.port)


@pytest.mark.parametrize("name, code", [
    ("../outside.txt", 2),
    ("images/../../outside.txt", 2),
    ("..\\outside.txt", 2),
    ("images\\..\\..\\outside.txt", 2),
    ("escape/outside.txt", 2),  # a symlinked directory leading out
    ("link-out.txt", 2),  # a symlinked file leading out
    ("/etc/passwd", 1),  # absolute names are taken relative to the root: no such file there
])
def test_names_that_lead_out_of_the_root_are_refused(
        service: TftpService, ctx: Context, client: RawClient, tmp_path: Path, name: str, code: int) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("must not leak")
    root = ctx.config.tftp_root
    (root / "escape").symlink_to(tmp_path, target_is_directory=True)
    (root / "link-out.txt").symlink_to(outside)
    reply, _ = client.ask(request(name))
    assert error_of(reply) is not None and error_of(reply)[0] == code, reply
    assert b"must not leak" not in reply


def test_symlink_inside_the_root_is_followed(service: TftpService, ctx: Context, client: RawClient) -> None:
    (ctx.config.tftp_root / "images" / "loader").symlink_to(ctx.config.tftp_root / "pxelinux.0")
    data, _, _ = client.download("images/loader")
    assert data == b"loader" * 1000


def test_wrong_tid_gets_error_5_and_the_transfer_goes_on(service: TftpService, ctx: Context, client: RawClient) -> None:
    payload = os.urandom(512 * 3 + 100)
    (ctx.config.tftp_root / "three").write_bytes(payload)
    reply, tid = client.ask(request("three"))
    assert reply[:4] == b"\x00\x03\x00\x01"
    intruder = RawClient(service.port)
    try:
        intruder.send(ack(1), tid)
        answer, sender = intruder.recv()
        assert error_of(answer)[0] == 5 and sender == tid
    finally:
        intruder.close()
    received = reply[4:]
    block = 1
    while len(reply) - 4 == 512:
        client.send(ack(block), tid)
        reply, _ = client.recv()
        block += 1
        assert reply[:4] == bytes([0, DATA, 0, block])
        received += reply[4:]
    client.send(ack(block), tid)
    assert received == payload


def test_garbage_inside_a_transfer_does_not_end_it(service: TftpService, ctx: Context, client: RawClient) -> None:
    (ctx.config.tftp_root / "two").write_bytes(b"a" * 512 + b"b")
    reply, tid = client.ask(request("two"))
    client.send(b"\x00", tid)  # truncated
    client.send(b"\x00\x04\x00", tid)  # truncated ACK
    assert client.silent_for(0.2)
    client.send(ack(1), tid)
    reply, _ = client.recv()
    assert reply == b"\x00\x03\x00\x02b"


def test_file_truncated_during_a_transfer_does_not_stop_the_service(ctx: Context) -> None:
    ctx.config.tftp.packet_cache_mb = 1  # a 3 MB file is read block by block, not held in memory
    (ctx.config.tftp_root / "pxelinux.0").write_bytes(b"loader" * 1000)
    big = ctx.config.tftp_root / "images" / "initrd"
    big.write_bytes(os.urandom(3 * 1024 * 1024))
    with running(ctx) as service:
        client = RawClient(service.port)
        reply, tid = client.ask(request("images/initrd", blksize=1468))
        client.send(ack(0), tid)
        client.recv()
        big.write_bytes(b"")  # an admin copies a new initrd over it, in place
        client.send(ack(1), tid)
        reply, _ = client.recv()
        assert reply[:4] == b"\x00\x03\x00\x02" and len(reply) == 4  # a short block ends that transfer
        still_serves(service.port)
        client.close()


def test_wildcard_bind_answers_from_the_address_the_client_asked(ctx: Context) -> None:
    """PXE ROMs drop a reply from another address than the one they sent the request to."""
    ctx.config.tftp.address = "0.0.0.0"
    (ctx.config.tftp_root / "pxelinux.0").write_bytes(b"loader")
    with running(ctx) as service:
        raw = RawClient(service.port)
        raw.send(request("pxelinux.0"), ("127.0.0.3", service.port))
        reply, sender = raw.recv()
        assert reply == b"\x00\x03\x00\x01loader" and sender[0] == "127.0.0.3"
        raw.close()
