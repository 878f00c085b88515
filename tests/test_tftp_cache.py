"""The shared packet cache: a changed file is never sent stale or mixed, and the cache stays bounded.

Files younger than the cache's racy window are not shared, so these tests age a file by
waiting that long: what a real boot file served all day looks like.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pxeserver.app import Context
from pxeserver.tftp import TftpService
from pxeserver.tftp.cache import RACY_SECONDS, PacketCache, Packets, charge
from tftp_support import client  # noqa: F401 (a fixture)
from tftp_support import RawClient, ack, request, running


@pytest.fixture
def service(ctx: Context) -> Iterator[TftpService]:
    with running(ctx) as tftp:
        yield tftp


def age() -> None:
    """Wait until files written before now may be shared."""
    time.sleep(RACY_SECONDS + 0.2)


def curl(port: int, name: str, blksize: int = 1468) -> bytes:
    result = subprocess.run(["curl", "-sS", "--max-time", "60", "--tftp-blksize", str(blksize),
                             f"tftp://127.0.0.1:{port}/{name}"], capture_output=True, timeout=90)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_file_replaced_in_place_is_sent_new_even_with_its_old_mtime(ctx: Context, service: TftpService) -> None:
    path = ctx.config.tftp_root / "pxelinux.0"
    old, new = os.urandom(200_000), os.urandom(200_000)
    path.write_bytes(old)
    age()
    assert curl(service.port, "pxelinux.0") == old
    assert curl(service.port, "pxelinux.0") == old
    assert len(service.packet_cache) == 1
    mtime = path.stat().st_mtime_ns
    path.write_bytes(new)  # same inode, same size, and (like cp -p) the same mtime
    os.utime(path, ns=(mtime, mtime))
    assert curl(service.port, "pxelinux.0") == new
    age()
    assert curl(service.port, "pxelinux.0") == new  # now shared again: a second cache entry
    assert curl(service.port, "pxelinux.0") == new
    assert len(service.packet_cache) == 2


@pytest.mark.slow
def test_a_running_transfer_keeps_the_bytes_it_started_with(ctx: Context, service: TftpService,
                                                           client: RawClient) -> None:
    path = ctx.config.tftp_root / "initrd"
    old, new = os.urandom(10 * 512 + 100), os.urandom(10 * 512 + 100)
    path.write_bytes(old)
    age()
    assert curl(service.port, "initrd", 512) == old  # now cached at blksize 512
    reply, tid = client.ask(request("initrd"))
    received = reply[4:]
    path.write_bytes(new)  # an admin copies a new initrd over it mid-transfer
    block = 1
    while len(reply) == 516:
        client.send(ack(block), tid)
        reply, _ = client.recv()
        received += reply[4:]
        block += 1
    client.send(ack(block), tid)
    assert received == old  # all old, never a mix
    assert curl(service.port, "initrd", 512) == new  # and the next transfer gets the new file


@pytest.mark.slow
def test_blocks_past_65535_roll_over_in_cached_packets(ctx: Context, service: TftpService) -> None:
    payload = os.urandom(75_000 * 8)  # 75,001 blocks of 8 bytes: numbers wrap to 0
    (ctx.config.tftp_root / "wraps").write_bytes(payload)
    age()
    assert curl(service.port, "wraps", 8) == payload
    assert len(service.packet_cache) == 1


@pytest.mark.slow
def test_the_cache_stays_within_its_configured_size(ctx: Context) -> None:
    ctx.config.tftp.packet_cache_mb = 1  # room for two of these files at blksize 1468
    files = {f"file{index}": os.urandom(200_000) for index in range(3)}
    for name, payload in files.items():
        (ctx.config.tftp_root / name).write_bytes(payload)
    age()
    with running(ctx) as service:
        for name, payload in files.items():
            assert curl(service.port, name) == payload
        assert len(service.packet_cache) == 2
        assert service.packet_cache.charged <= 1 << 20
        assert curl(service.port, "file0") == files["file0"]  # evicted, read again


def test_least_recently_used_goes_first_and_no_entry_takes_over_half() -> None:
    size, blksize = 10_000, 512
    cache = PacketCache(3 * charge(size, blksize) + 100)
    versions = [(1, inode, size, 0, 0) for inode in range(4)]
    for version in versions[:3]:
        cache.add(version, blksize, Packets(os.urandom(size), blksize))
    assert cache.get(versions[0], blksize) is not None  # now the most recently used
    cache.add(versions[3], blksize, Packets(os.urandom(size), blksize))
    assert cache.get(versions[1], blksize) is None
    assert all(cache.get(version, blksize) is not None for version in (versions[0], versions[2], versions[3]))
    assert cache.charged <= cache.capacity
    huge = 2 * size
    assert not cache.admits(huge, blksize)
    cache.add((1, 9, huge, 0, 0), blksize, Packets(os.urandom(huge), blksize))
    assert cache.get((1, 9, huge, 0, 0), blksize) is None and len(cache) == 3


def test_packets_are_the_file_in_blocks_with_16_bit_numbers() -> None:
    data = os.urandom(3 * 512)
    packets = Packets(data, 512)
    assert packets.count == 4  # a full last block is followed by an empty one
    assert b"".join(packets.get(block)[4:] for block in range(1, 5)) == data
    assert packets.get(4) == b"\x00\x03\x00\x04"
    assert Packets(bytes(70_000 * 8), 8).get(65_537)[:4] == b"\x00\x03\x00\x01"
