"""The shared file memory: a changed file is never sent stale or mixed, and memory stays bounded.

Files younger than the cache's racy window are not shared, so these tests age a file by
waiting that long: what a real boot file served all day looks like.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Iterator

import pytest
from tftp_support import (
    RawClient,
    ack,
    request,
    running,
)

from pxeserver.app import Context
from pxeserver.tftp import TftpService
from pxeserver.tftp.cache import ENTRY_OVERHEAD, RACY_SECONDS, FileMemory, Packets, Slices


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
    assert len(service.file_memory) == 2  # the file's snapshot and its packets at blksize 1468
    mtime = path.stat().st_mtime_ns
    path.write_bytes(new)  # same inode, same size, and (like cp -p) the same mtime
    os.utime(path, ns=(mtime, mtime))
    assert curl(service.port, "pxelinux.0") == new
    age()
    assert curl(service.port, "pxelinux.0") == new  # now shared again: a second snapshot
    assert curl(service.port, "pxelinux.0") == new
    assert len(service.file_memory) == 4


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
    assert len(service.file_memory) == 2


@pytest.mark.slow
def test_the_cache_stays_within_its_configured_size(ctx: Context) -> None:
    ctx.config.tftp.packet_cache_mb = 1  # room for two of these files at blksize 1468, not three
    files = {f"file{index}": os.urandom(200_000) for index in range(3)}
    for name, payload in files.items():
        (ctx.config.tftp_root / name).write_bytes(payload)
    age()
    with running(ctx) as service:
        for name, payload in files.items():
            assert curl(service.port, name) == payload
        assert len(service.file_memory) < 6  # not every snapshot and packet list stayed
        assert service.file_memory.charged <= 1 << 20
        assert curl(service.port, "file0") == files["file0"]  # evicted, read again
        assert service.file_memory.charged <= 1 << 20


def test_least_recently_used_idle_entry_goes_first_and_none_takes_over_half() -> None:
    size = 1000
    memory = FileMemory(3 * (size + ENTRY_OVERHEAD))
    for key in "abc":
        assert memory.add(key, key, size)
        memory.release(key)  # idle, still kept for the next transfer
    assert memory.hold("a") == "a"  # now the most recently used, and in use
    memory.release("a")
    assert memory.add("d", "d", size)
    assert memory.hold("b") is None  # the least recently used went
    assert all(memory.hold(key) == key for key in "acd")
    assert memory.charged == memory.capacity
    half = memory.capacity // 2 - ENTRY_OVERHEAD
    assert not memory.room_for(half + 1) and not memory.add("huge", "huge", half + 1)


def test_entries_in_use_are_never_evicted_and_what_does_not_fit_is_not_made() -> None:
    size = 1000
    memory = FileMemory(3 * (size + ENTRY_OVERHEAD))
    assert memory.add("snapshot", "bytes", size)
    assert memory.add("packets", "list", size, parent="snapshot")
    memory.release("snapshot")  # the transfer lets go; its packets still hold the snapshot
    assert memory.add("other", "x", size)  # held by a transfer
    assert not memory.add("more", "y", size)  # full of entries in use: refused, not over the cap
    assert memory.charged == memory.capacity
    memory.release("packets")  # now idle: packets go first, then the snapshot they held
    assert memory.add("more", "y", size) and memory.add("more2", "z", size)
    assert memory.hold("packets") is None and memory.hold("snapshot") is None
    assert memory.charged == memory.capacity


def test_a_private_entry_is_charged_until_its_transfer_ends() -> None:
    memory = FileMemory(3 * (1000 + ENTRY_OVERHEAD))
    private = object()
    assert memory.add(private, b"bytes", 1000, shared=False)
    assert memory.charged == 1000 + ENTRY_OVERHEAD and len(memory) == 0 and memory.hold(private) is None
    memory.release(private)
    assert memory.charged == 0


def test_packets_are_the_file_in_blocks_with_16_bit_numbers() -> None:
    data = os.urandom(3 * 512)
    packets = Packets(data, 512)
    assert packets.count == 4  # a full last block is followed by an empty one
    assert b"".join(packets.get(block)[4:] for block in range(1, 5)) == data
    assert packets.get(4) == b"\x00\x03\x00\x04"
    assert Packets(bytes(70_000 * 8), 8).get(65_537)[:4] == b"\x00\x03\x00\x01"
    slices = Slices(data, 512)
    assert slices.count == 4 and all(slices.get(block) == packets.get(block) for block in range(1, 5))


@pytest.mark.slow
def test_cached_lockstep_transfer_answers_only_the_ack_in_flight(ctx: Context, service: TftpService,
                                                                 client: RawClient,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The lockstep fast path (a cached file): stale, duplicate, truncated and longer ACKs are
    handled as before, a timeout resends once, and the transfer's log line counts every packet."""
    caplog.set_level(logging.INFO, logger="pxeserver.tftp.events")
    payload = os.urandom(10 * 512 + 100)  # 11 blocks
    (ctx.config.tftp_root / "kernel").write_bytes(payload)
    age()
    assert curl(service.port, "kernel", 512) == payload  # its packets are now cached at blksize 512
    reply, tid = client.ask(request("kernel", timeout=1))
    assert reply == b"\x00\x06timeout\x001\x00"
    client.send(ack(0), tid)
    received = bytearray()
    for block in range(1, 12):
        reply, _ = client.recv()
        assert reply[:4] == bytes([0, 3, 0, block])
        received += reply[4:]
        if block in (3, 4):  # one block each of the two ways it was sent (general, fast path)
            client.send(ack(block - 1), tid)  # stale: the block before the one in flight
            client.send(b"\x00\x04\x00", tid)  # truncated
            assert client.silent_for(0.3)  # neither makes the server send anything
            client.sock.settimeout(3)
        if block == 3:
            started = time.monotonic()
            again, _ = client.recv()  # only the timeout brings block 3 again, once
            assert again == reply and 0.3 <= time.monotonic() - started <= 1.6
        if block == 5:
            client.send(ack(block) + b"trailing", tid)  # a longer ACK still acknowledges block 5
            continue
        client.send(ack(block), tid)
    assert bytes(received) == payload
    assert client.silent_for(0.3)  # the last ACK ends the transfer: nothing more comes
    deadline = time.monotonic() + 5
    while caplog.text.count("tftp: sent kernel") < 2 and time.monotonic() < deadline:  # curl's, then ours
        time.sleep(0.05)
    lines = [line for line in caplog.text.splitlines() if "tftp: sent kernel" in line]
    assert len(lines) == 2 and lines[-1].endswith(f"({len(payload)} bytes, blksize 512, "
                              f"{lines[-1].split(', ')[2]}, 13 packets, 1 resent, 0 wrong TID)"), lines
    assert service.active_sessions == 0


@pytest.mark.slow
def test_cached_lockstep_transfer_ends_on_the_clients_error(ctx: Context, service: TftpService,
                                                           client: RawClient) -> None:
    payload = os.urandom(10 * 512)
    (ctx.config.tftp_root / "kernel").write_bytes(payload)
    age()
    assert curl(service.port, "kernel", 512) == payload
    reply, tid = client.ask(request("kernel"))
    client.send(ack(1), tid)
    assert client.recv()[0][:4] == b"\x00\x03\x00\x02"
    client.send(b"\x00\x05\x00\x00stop\x00", tid)  # the client gives up while block 2 is in flight
    assert client.silent_for(0.3)
    assert service.active_sessions == 0
    assert curl(service.port, "kernel", 512) == payload  # and the next client is served
