"""Thousands of concurrent TFTP sessions (no select() ceiling) and the configurable caps."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from tftp_support import Job, RawClient, ack, drive, error_of, request, running, sources

from pxeserver.app import Context
from pxeserver.tftp import server as tftp_server
from pxeserver.tftp.server import BATCH_PACKETS, BATCH_SESSIONS, batch_pause


def open_sessions(port: int, count: int, name: str) -> list[tuple[socket.socket, tuple[str, int]]]:
    """Start ``count`` transfers from distinct addresses and read each one's first DATA."""
    started = []
    for source in sources(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((source, 0))
        sock.settimeout(10)
        sock.sendto(request(name), ("127.0.0.1", port))
        started.append(sock)
    opened = []
    for sock in started:
        reply, tid = sock.recvfrom(1024)
        assert reply[:4] == b"\x00\x03\x00\x01", error_of(reply)
        opened.append((sock, tid))
    return opened


@pytest.mark.slow
def test_2000_concurrent_sessions(ctx: Context) -> None:
    payload = os.urandom(512 + 100)
    (ctx.config.tftp_root / "two-blocks").write_bytes(payload)
    with running(ctx) as service:
        opened = open_sessions(service.port, 2000, "two-blocks")
        assert service.active_sessions == 2000  # all open at once, none acknowledged yet
        for sock, tid in opened:
            sock.sendto(ack(1), tid)
        for sock, tid in opened:
            reply, _ = sock.recvfrom(1024)
            while reply[:4] == b"\x00\x03\x00\x01":  # a resend that crossed our ACK on a loaded machine
                reply, _ = sock.recvfrom(1024)
            assert reply == b"\x00\x03\x00\x02" + payload[512:]
            sock.sendto(ack(2), tid)
            sock.close()


@pytest.mark.slow
def test_2000_concurrent_clients_all_succeed(ctx: Context) -> None:
    payload = os.urandom(16 * 1024)
    (ctx.config.tftp_root / "pxelinux.0").write_bytes(payload)
    jobs = [Job("pxelinux.0", {"blksize": "1468", "tsize": "0"}, source) for source in sources(2000)]
    with running(ctx) as service:
        outcomes = drive(service.port, jobs, keep=True, deadline=60)
    failed = [outcome for outcome in outcomes if not outcome.ok]
    assert not failed, f"{len(failed)} failed, first: {failed[0].error}"
    assert all(outcome.data == payload for outcome in outcomes)


def test_cap_on_sessions_in_total(ctx: Context) -> None:
    ctx.config.tftp.max_sessions = 3
    (ctx.config.tftp_root / "file").write_bytes(b"x" * 2000)
    with running(ctx) as service:
        opened = open_sessions(service.port, 3, "file")
        late = RawClient(service.port, source="127.2.0.1")
        reply, _ = late.ask(request("file"))
        assert error_of(reply) == (0, "server busy, try again")
        sock, tid = opened[0]
        sock.sendto(b"\x00\x05\x00\x00cancel\x00", tid)  # the client gives up: room again
        for _ in range(100):
            if service.active_sessions < 3:
                break
            time.sleep(0.01)
        data, _, _ = late.download("file")
        assert data == b"x" * 2000


def test_cap_per_client_address(ctx: Context) -> None:
    ctx.config.tftp.max_sessions_per_client = 2
    (ctx.config.tftp_root / "file").write_bytes(b"y" * 2000)
    with running(ctx) as service:
        first, second, third = (RawClient(service.port) for _ in range(3))
        for raw in (first, second):
            assert raw.ask(request("file"))[0][:4] == b"\x00\x03\x00\x01"
        assert error_of(third.ask(request("file"))[0]) == (0, "too many transfers from your address")
        other = RawClient(service.port, source="127.0.0.2")  # another machine is still served
        assert other.download("file")[0] == b"y" * 2000


def test_abandoned_transfer_is_given_up_after_its_retries(ctx: Context) -> None:
    ctx.config.tftp.retries = 1
    (ctx.config.tftp_root / "file").write_bytes(b"z" * 2000)
    with running(ctx) as service:
        silent = RawClient(service.port)
        reply, _ = silent.ask(request("file", timeout=1))  # then never acknowledges
        assert service.active_sessions == 1
        time.sleep(2.6)  # one resend after 1 s, given up 1 s later
        assert service.active_sessions == 0
        assert RawClient(service.port).download("file")[0] == b"z" * 2000


def recorded_pauses(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every sleep the TFTP event loop takes from now on (it sleeps only to let packets gather)."""
    pauses: list[float] = []
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        if threading.current_thread().name == "tftp":  # time.sleep is the same for every thread
            pauses.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(tftp_server.time, "sleep", sleep)
    return pauses


def test_batch_pause_waits_only_while_many_transfers_move_fast() -> None:
    tick = 0.05
    many = BATCH_SESSIONS
    assert batch_pause(many - 1, 10_000, tick, 0.001) == 0.0  # too few transfers move
    assert batch_pause(many, 0, tick, 0.001) == 0.0
    assert batch_pause(many, 5_000, tick, 0.001) == pytest.approx(BATCH_PACKETS * tick / 5_000)  # 0.32 ms
    assert batch_pause(300, 1_000, tick, 0.001) == 0.0  # a batch would take 1.6 ms to gather: no wait
    assert batch_pause(300, 5_000, tick, 0.0) == 0.0  # batch_wait_us = 0: never


@pytest.mark.slow
def test_many_moving_transfers_gather_and_all_arrive_intact(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx.config.tftp.batch_wait_us = 10_000  # the most allowed
    payload = os.urandom(256 * 1024)
    (ctx.config.tftp_root / "kernel").write_bytes(payload)
    time.sleep(2.2)  # old enough to be cached: the lockstep fast path serves it
    jobs = [Job("kernel", {"blksize": "1468"}, source) for source in sources(200)]
    with running(ctx) as service:
        pauses = recorded_pauses(monkeypatch)
        outcomes = drive(service.port, jobs, keep=True, deadline=60)
    failed = [outcome for outcome in outcomes if not outcome.ok]
    assert not failed, f"{len(failed)} failed, first: {failed[0].error}"
    assert all(outcome.data == payload for outcome in outcomes)
    assert pauses, "200 moving transfers never let packets gather"
    assert all(0 < pause <= 0.01 for pause in pauses)
    print(f"200 x 256 KB: {len(pauses)} pauses, longest {max(pauses) * 1000:.2f} ms")


@pytest.mark.slow
def test_open_transfers_that_do_not_move_never_make_a_good_client_wait(
        ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack: 100 transfers opened and never acknowledged (as slow or hostile clients hold
    them) must not make the loop sleep between a good client's blocks."""
    ctx.config.tftp.batch_wait_us = 10_000
    payload = os.urandom(1024 * 1024)
    (ctx.config.tftp_root / "initrd").write_bytes(payload)
    with running(ctx) as service:
        idle = open_sessions(service.port, 100, "initrd")
        assert service.active_sessions == 100
        pauses = recorded_pauses(monkeypatch)
        started = time.monotonic()
        data, _, _ = RawClient(service.port, source="127.3.0.1").download("initrd", blksize=1468)
        seconds = time.monotonic() - started
        assert data == payload
        for _ in range(100):  # the server reads the good client's last ACK after it returned
            if service.active_sessions == 100:
                break
            time.sleep(0.01)
        assert service.active_sessions == 100  # the idle ones are still open, still not moving
    assert pauses == []
    assert seconds < 5  # 715 blocks: 10 ms of waiting each would take over 7 s
    for sock, _ in idle:
        sock.close()
