"""Forwarding names outside our zones to one configured upstream server.

Hand-written rather than dnslib's ``DNSRecord.send``: that one takes the first datagram from
anywhere as the answer and never retries a truncated answer over TCP. Here each query goes out
from a fresh connected socket (random source port; the kernel drops datagrams from any other
address) with a fresh random ID, a reply must carry that ID, and a truncated UDP reply is asked
again over TCP. Work runs on a fixed pool of threads with a bounded number of queries in flight;
beyond that a client gets SERVFAIL at once instead of queueing without limit.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from dnslib import RCODE

from pxeserver.dns.resolver import Forward, error_reply, fit_udp

log = logging.getLogger(__name__)

WORKERS = 16
MAX_IN_FLIGHT = 64  # beyond this a client waits longer than it would wait for us anyway
TIMEOUT = 2.0  # seconds for one upstream answer, UDP and TCP retry each
MAX_STRAY_DATAGRAMS = 16  # replies with a wrong ID we skip before giving up


def parse_upstream(text: str) -> tuple[str, int]:
    """'192.0.2.53:53' or '192.0.2.53' (port 53) -> (address, port).

    An IPv4 address, not a name: resolving a name would need the system resolver on every
    query, and that resolver may well be this server.
    """
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "53")
    try:
        address = str(ipaddress.IPv4Address(host))
    except ValueError:
        address = ""
    if not address or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"[dns] upstream must be an IPv4 address and port, not {text!r}")
    return address, int(port)


class Forwarder:
    def __init__(self, upstream: str) -> None:
        self.upstream = parse_upstream(upstream)
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="dns-forward")
        self._slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)
        self._answering = True  # log when the upstream stops or starts answering, not per query

    def submit(self, forward: Forward, deliver: Callable[[bytes], None]) -> None:
        """Ask the upstream in the background and hand the client's reply to ``deliver``."""
        if not self._slots.acquire(blocking=False):
            deliver(error_reply(forward.query, RCODE.SERVFAIL))
            return
        try:
            self._pool.submit(self._run, forward, deliver)
        except RuntimeError:  # shutting down
            self._slots.release()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, forward: Forward, deliver: Callable[[bytes], None]) -> None:
        try:
            deliver(fit_udp(self.ask(forward.query), forward.limit))
        except OSError as exc:  # the client's socket went away meanwhile
            log.debug("dns: could not deliver a forwarded answer: %s", exc)
        finally:
            self._slots.release()

    def ask(self, query: bytes) -> bytes:
        """The upstream's reply with the client's ID, or SERVFAIL when none comes in time."""
        ident = secrets.token_bytes(2)
        outgoing = ident + query[2:]
        problem = "no answer in time"
        try:
            reply = self._ask_udp(outgoing)
            if reply is not None and reply[2] & 0x02:  # TC: the whole answer needs TCP
                reply = self._ask_tcp(outgoing)
        except OSError as exc:
            reply, problem = None, str(exc)
        if (reply is not None) != self._answering:
            self._answering = reply is not None
            if reply is None:
                log.warning("dns: upstream %s:%d fails (%s): answering SERVFAIL", *self.upstream,
                            problem)
            else:
                log.warning("dns: upstream %s:%d answers again", *self.upstream)
        if reply is None:
            return error_reply(query, RCODE.SERVFAIL)
        return query[:2] + reply[2:]

    def _ask_udp(self, outgoing: bytes) -> bytes | None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(self.upstream)
            sock.send(outgoing)
            deadline = time.monotonic() + TIMEOUT
            for _ in range(MAX_STRAY_DATAGRAMS):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                sock.settimeout(remaining)
                try:
                    reply = sock.recv(65535)
                except TimeoutError:
                    return None
                if len(reply) >= 12 and reply[:2] == outgoing[:2] and reply[2] & 0x80:
                    return reply
        return None

    def _ask_tcp(self, outgoing: bytes) -> bytes | None:
        with socket.create_connection(self.upstream, timeout=TIMEOUT) as sock:
            sock.sendall(len(outgoing).to_bytes(2, "big") + outgoing)
            length = int.from_bytes(_read_exactly(sock, 2), "big")
            reply = _read_exactly(sock, length)
        return reply if len(reply) >= 12 and reply[:2] == outgoing[:2] else None


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:  # each recv either returns bytes, times out, or ends the loop
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("upstream closed the TCP connection early")
        data += chunk
    return bytes(data)
