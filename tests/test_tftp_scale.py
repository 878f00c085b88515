"""Thousands of concurrent TFTP sessions (no select() ceiling) and the configurable caps."""

from __future__ import annotations

import os
import socket
import time

import pytest
from tftp_support import Job, RawClient, ack, drive, error_of, request, running, sources

from pxeserver.app import Context


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
