"""RFC 2347/2348/2349/7440 options, block-number rollover and retransmission, on the wire."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tftpy
from tftp_support import (
    RawClient,
    ack,
    request,
    running,
)

from pxeserver.app import Context
from pxeserver.tftp import TftpService

SIZE = 5000


@pytest.fixture
def service(ctx: Context) -> Iterator[TftpService]:
    (ctx.config.tftp_root / "file").write_bytes(os.urandom(SIZE))
    with running(ctx) as tftp:
        yield tftp


def expected(ctx: Context) -> bytes:
    return (ctx.config.tftp_root / "file").read_bytes()


def test_pxelinux_request_gets_exactly_its_options_back(ctx: Context, client: RawClient) -> None:
    data, oack, _ = client.download("file", tsize=0, blksize=1408)
    assert oack == {"tsize": str(SIZE), "blksize": "1408"}
    assert data == expected(ctx)


def test_no_options_no_oack(ctx: Context, client: RawClient) -> None:
    reply, _ = client.ask(request("file"))
    assert reply[:4] == b"\x00\x03\x00\x01" and len(reply) == 4 + 512


def test_unknown_options_alone_get_no_oack(client: RawClient) -> None:
    reply, _ = client.ask(request("file", multicast="", foo="bar"))
    assert reply[:4] == b"\x00\x03\x00\x01"


def test_option_names_are_case_insensitive(ctx: Context, client: RawClient) -> None:
    data, oack, _ = client.download("file", BLKSIZE=1024, TSize=0)
    assert oack == {"blksize": "1024", "tsize": str(SIZE)}
    assert data == expected(ctx)


@pytest.mark.parametrize("asked, answered", [(8, 8), (1468, 1468), (65464, 65464), (65465, 65464), (100000, 65464)])
def test_blksize_range(ctx: Context, client: RawClient, asked: int, answered: int) -> None:
    data, oack, blocks = client.download("file", blksize=asked)
    assert oack == {"blksize": str(answered)}
    assert data == expected(ctx)
    assert len(blocks) == SIZE // answered + 1


def test_tsize_of_a_generated_boot_config(client: RawClient) -> None:
    data, oack, _ = client.download("pxelinux.cfg/default", tsize=0)
    assert oack == {"tsize": str(len(data))}


def test_windowsize(ctx: Context, client: RawClient) -> None:
    reply, tid = client.ask(request("file", windowsize=4))
    assert reply == b"\x00\x06windowsize\x004\x00"
    client.send(ack(0), tid)
    window = [client.recv()[0][:4] for _ in range(4)]
    assert window == [bytes([0, 3, 0, n]) for n in (1, 2, 3, 4)]
    assert client.silent_for(0.3)  # a window is all the server sends before an ACK
    client.send(ack(4), tid)
    assert client.recv()[0][:4] == b"\x00\x03\x00\x05"


def test_windowsize_partial_ack_resends_from_the_gap(ctx: Context, client: RawClient) -> None:
    reply, tid = client.ask(request("file", windowsize=4))
    client.send(ack(0), tid)
    for _ in range(4):
        client.recv()
    client.send(ack(2), tid)  # block 3 was lost
    assert [client.recv()[0][:4] for _ in range(4)] == [bytes([0, 3, 0, n]) for n in (3, 4, 5, 6)]


def test_windowsize_is_capped_and_full_transfer_works(ctx: Context, client: RawClient) -> None:
    data, oack, _ = client.download("file", windowsize=100000, blksize=100)
    assert oack == {"windowsize": str(ctx.config.tftp.max_windowsize), "blksize": "100"}
    assert data == expected(ctx)


def test_retransmit_only_on_timeout(client: RawClient) -> None:
    reply, tid = client.ask(request("file", timeout=1))
    assert reply == b"\x00\x06timeout\x001\x00"
    client.send(ack(0), tid)
    assert client.recv()[0][:4] == b"\x00\x03\x00\x01"
    client.send(ack(1), tid)
    assert client.recv()[0][:4] == b"\x00\x03\x00\x02"
    client.send(ack(1), tid)  # a duplicate ACK: no Sorcerer's Apprentice resend
    client.send(ack(1), tid)
    started = time.monotonic()
    client.sock.settimeout(3)
    again, _ = client.recv()  # only the timeout brings block 2 again
    waited = time.monotonic() - started
    assert again[:4] == b"\x00\x03\x00\x02"
    assert 0.8 <= waited <= 1.6, waited
    assert client.silent_for(0.5)  # one copy, not one per duplicate ACK


@pytest.mark.slow
def test_40_mb_at_512_byte_blocks_rolls_over(ctx: Context, service: TftpService, tmp_path: Path) -> None:
    payload = os.urandom(40 * 1024 * 1024)  # 81,921 blocks: numbers wrap past 65535 to 0
    (ctx.config.tftp_root / "initrd.img").write_bytes(payload)
    result = subprocess.run(["tftp", "-m", "binary", "127.0.0.1", str(service.port), "-c", "get", "initrd.img"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "initrd.img").read_bytes() == payload
    # and pypxeboot's tftpy client (no options: 512-byte blocks) gets the same bytes
    tftpy.TftpClient("127.0.0.1", service.port).download("initrd.img", str(tmp_path / "tftpy.img"))
    assert (tmp_path / "tftpy.img").read_bytes() == payload


@pytest.mark.parametrize("key, value", [("max_blksize", 4), ("max_windowsize", 0), ("timeout", 0), ("max_sessions", 0),
                                        ("max_timeout", 256), ("session_deadline", 0), ("max_sessions_per_subnet", 0)])
def test_tftp_limits_out_of_range_are_a_config_error(tmp_path: Path, key: str, value: int) -> None:
    from pxeserver import config

    file = tmp_path / "pxeserver.toml"
    file.write_text(f"[tftp]\n{key} = {value}\n")
    with pytest.raises(config.ConfigError, match=rf"\[tftp\] {key} must be"):
        config.load(file)
