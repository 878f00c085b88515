"""The DNS service: sockets and threads around the :class:`Resolver`.

Not dnslib's ``DNSServer``: that runs one thread per request with no limit, catches only
``DNSError`` in its handler, and reads TCP without a timeout, so a slow or hostile client holds
a thread forever. Here the bounds are:

- UDP: one thread, which waits in ``select`` and then drains up to ``UDP_BATCH`` datagrams
  without blocking. A pure-Python answer takes microseconds, so more threads would only fight
  over the GIL; the socket's receive buffer absorbs bursts.
- TCP (RFC 7766): one thread with a selector, at most ``MAX_TCP_CONNECTIONS`` connections and
  ``MAX_TCP_PER_CLIENT`` from one address (more are closed at once), so slow clients on one
  address cannot take every place. A connection is closed after ``TCP_IDLE_TIMEOUT`` seconds
  without a complete query, and a query whose first byte has arrived must be complete within
  ``TCP_QUERY_TIMEOUT`` seconds, so a byte now and then holds no place. Several queries may be
  pipelined on one connection, and a connection whose client does not read its answers stops
  being read once ``MAX_TCP_BACKLOG`` bytes wait to be sent.
- Forwarding: only for clients in ``[dns] forward_clients`` (by default the DHCP subnet and
  loopback; others get REFUSED), on a fixed pool of threads with a bounded number of queries
  in flight (:mod:`pxeserver.dns.forward`), so a slow upstream never stalls local answers.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from pxeserver.app import Context
from pxeserver.dns.forward import Forwarder
from pxeserver.dns.resolver import Forward, Resolver
from pxeserver.dns.zone import ZoneSettings
from pxeserver.metrics import dns_rcode
from pxeserver.registry.models import validate_hostname

log = logging.getLogger(__name__)

UDP_BATCH = 256  # datagrams handled per wake-up before looking at the stop signal again
UDP_RECEIVE_BUFFER = 4 * 1024 * 1024
# What a UDP socket reports for an ICMP error answering an earlier reply: the next datagram is
# fine. Any other receive error means the socket itself is broken.
ICMP_ERRORS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN,
                         errno.ENETDOWN, errno.EMSGSIZE})
MAX_DATAGRAM = 4096  # longer datagrams are cut here and then fail to parse: FORMERR
MAX_TCP_CONNECTIONS = 128
MAX_TCP_PER_CLIENT = 16
TCP_IDLE_TIMEOUT = 10.0  # seconds a connection may wait for its next query
TCP_QUERY_TIMEOUT = 2.0  # seconds from a query's first byte to its last
LOOPBACK = "127.0.0.0/8"
MAX_TCP_BACKLOG = 256 * 1024
BIND_ATTEMPTS = 20  # port 0: UDP picks a port, TCP must get the same one


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    address: str
    deadline: float
    received: bytearray = field(default_factory=bytearray)
    partial: bool = False  # part of a query has arrived: TCP_QUERY_TIMEOUT runs
    unsent: bytearray = field(default_factory=bytearray)


class DnsService:
    name = "dns"

    def __init__(self, context: Context) -> None:
        self._context = context
        self.address = context.config.dns.address
        self.port: int | None = None
        self._forwarder: Forwarder | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._per_client: dict[str, int] = {}  # open TCP connections by client address
        self._finished: queue.SimpleQueue[tuple[_Connection, bytes]] = queue.SimpleQueue()
        self._metrics = context.metrics.protocol("dns")

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        config = self._context.config
        try:
            domain = validate_hostname(config.dns.domain)
            if config.dns.upstream:
                self._forwarder = Forwarder(config.dns.upstream)
        except ValueError as exc:
            raise OSError(errno.EINVAL, f"[dns] domain or upstream: {exc}") from None
        settings = ZoneSettings(domain, config.advertised_address, config.dhcp.subnet)
        clients = config.dns.forward_clients or [config.dhcp.subnet, LOOPBACK]
        networks = [ipaddress.IPv4Network(n) for n in clients] if self._forwarder else []
        self._resolver = Resolver(self._context.policy, settings, networks)
        self._udp, self._tcp = self._bind(config.dns.port)
        self.port = self._udp.getsockname()[1]
        self._udp_wake = socket.socketpair()
        self._tcp_wake = socket.socketpair()
        for target, name in ((self._serve_udp, "dns-udp"), (self._serve_tcp, "dns-tcp")):
            thread = threading.Thread(
                target=self._context.supervisor.guard(target, self.name), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("dns: authoritative for %s on %s", domain, ", ".join(self.endpoints()))

    def stop(self) -> None:
        self._stopping.set()
        for wake in (self._udp_wake, self._tcp_wake):
            wake[1].send(b"\0")
        for thread in self._threads:
            thread.join(timeout=5)
        if self._forwarder is not None:
            self._forwarder.close()
        for sock in (self._udp, self._tcp, *self._udp_wake, *self._tcp_wake):
            sock.close()

    def endpoints(self) -> list[str]:
        return [f"dns://{self.address}:{self.port} (udp, tcp)"]

    def _bind(self, port: int) -> tuple[socket.socket, socket.socket]:
        """A UDP and a TCP socket on the same port; with port 0, retry until both get one."""
        for _ in range(BIND_ATTEMPTS):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
                udp.bind((self.address, port))
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((self.address, udp.getsockname()[1]))
                tcp.listen(MAX_TCP_CONNECTIONS)
            except OSError as exc:
                udp.close()
                tcp.close()
                if port == 0 and exc.errno == errno.EADDRINUSE:
                    continue
                raise OSError(exc.errno, f"dns: cannot listen on {self.address}:{port}: "
                                         f"{exc.strerror}") from None
            udp.setblocking(False)
            tcp.setblocking(False)
            return udp, tcp
        raise OSError(errno.EADDRINUSE, "dns: found no port free for both UDP and TCP")

    # -- UDP ------------------------------------------------------------------------------

    def _serve_udp(self) -> None:
        udp = self._udp
        receive, send, respond = udp.recvfrom, udp.sendto, self._resolver.respond
        with selectors.DefaultSelector() as selector:
            selector.register(udp, selectors.EVENT_READ)
            selector.register(self._udp_wake[0], selectors.EVENT_READ)
            while not self._stopping.is_set():
                selector.select()
                for _ in range(UDP_BATCH):
                    try:
                        query, client = receive(MAX_DATAGRAM)
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if exc.errno in ICMP_ERRORS:  # an ICMP error from an earlier reply
                            continue
                        raise  # the socket itself is broken: the supervisor ends serve
                    try:
                        reply = respond(query, False, client[0])
                    except Exception:  # a bug for one query must not stop the next client
                        log.exception("dns: no answer for a query from %s:%d", *client)
                        self._metrics.error()
                        continue
                    if reply is None:
                        self._metrics.drop("malformed")
                        continue
                    self._metrics.request("udp")
                    if isinstance(reply, Forward):
                        def deliver(answer: bytes, to: tuple[str, int] = client) -> None:
                            send(answer, to)

                        self._forward(reply, deliver)
                        continue
                    try:
                        send(reply, client)
                    except OSError:  # send buffer full or client gone: the client retries
                        self._metrics.error()
                    else:
                        self._metrics.reply(dns_rcode(reply), len(reply))

    def _forward(self, forward: Forward, deliver: Callable[[bytes], None]) -> None:
        assert self._forwarder is not None  # the resolver only forwards when one is configured

        def counted(answer: bytes) -> None:
            deliver(answer)
            self._metrics.reply(dns_rcode(answer), len(answer))

        self._forwarder.submit(forward, counted)

    # -- TCP ------------------------------------------------------------------------------

    def _serve_tcp(self) -> None:
        connections: dict[socket.socket, _Connection] = {}
        self._metrics.active(lambda: len(connections))
        with selectors.DefaultSelector() as selector:
            self._selector = selector
            selector.register(self._tcp, selectors.EVENT_READ)
            selector.register(self._tcp_wake[0], selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, events in selector.select(timeout=1.0):
                    sock = key.fileobj
                    if sock is self._tcp:
                        self._accept(connections)
                    elif sock is self._tcp_wake[0]:
                        self._drain_wake()
                    else:
                        self._service(connections[cast(socket.socket, sock)], events, connections)
                self._deliver_forwarded(connections)
                self._expire(connections)
            for connection in list(connections.values()):
                self._close(connection, connections)

    def _accept(self, connections: dict[socket.socket, _Connection]) -> None:
        for _ in range(MAX_TCP_CONNECTIONS):
            try:
                sock, (address, _port) = self._tcp.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # out of file descriptors, or the client gave up already
                log.debug("dns: accept failed: %s", exc)
                return
            held = self._per_client.get(address, 0)
            if len(connections) >= MAX_TCP_CONNECTIONS or held >= MAX_TCP_PER_CLIENT:
                self._metrics.drop("connection_limit")
                sock.close()  # full: the client falls back to UDP or retries later
                continue
            sock.setblocking(False)
            connection = _Connection(sock, address, time.monotonic() + TCP_IDLE_TIMEOUT)
            connections[sock] = connection
            self._per_client[address] = held + 1
            self._selector.register(sock, selectors.EVENT_READ)

    def _service(self, connection: _Connection, events: int,
                 connections: dict[socket.socket, _Connection]) -> None:
        try:
            if events & selectors.EVENT_READ:
                data = connection.sock.recv(65536)
                if not data:
                    self._close(connection, connections)
                    return
                connection.received += data
            self._answer_complete_queries(connection)  # also those paused by a full backlog
            if connection.received and not connection.partial:
                connection.partial = True
                connection.deadline = min(connection.deadline,
                                          time.monotonic() + TCP_QUERY_TIMEOUT)
            self._flush(connection)
        except OSError:
            self._close(connection, connections)

    def _answer_complete_queries(self, connection: _Connection) -> None:
        buffer = connection.received
        while len(buffer) >= 2 and len(connection.unsent) < MAX_TCP_BACKLOG:
            length = int.from_bytes(buffer[:2], "big")
            if len(buffer) < 2 + length:
                return
            query = bytes(buffer[2:2 + length])
            del buffer[:2 + length]
            try:
                reply = self._resolver.respond(query, True, connection.address)
            except Exception:  # a bug for one query must not stop the next client
                log.exception("dns: no answer for a TCP query")
                self._metrics.error()
                continue
            if reply is None:  # not a query at all (empty, or a response): hang up
                self._metrics.drop("malformed")
                raise ConnectionAbortedError("not a DNS query")
            self._metrics.request("tcp")
            # Only an answered query extends the connection's life, so neither a trickle of
            # bytes nor a stream of empty messages holds a place forever.
            connection.deadline = time.monotonic() + TCP_IDLE_TIMEOUT
            connection.partial = False
            if isinstance(reply, Forward):
                self._forward(reply, lambda answer: self._forwarded(connection, answer))
            else:
                connection.unsent += len(reply).to_bytes(2, "big") + reply
                self._metrics.reply(dns_rcode(reply), len(reply))

    def _forwarded(self, connection: _Connection, answer: bytes) -> None:
        """Called on a forwarding thread: hand the answer to the TCP thread."""
        self._finished.put((connection, answer))
        self._tcp_wake[1].send(b"\0")

    def _drain_wake(self) -> None:
        try:
            self._tcp_wake[0].recv(4096)
        except BlockingIOError:
            pass

    def _deliver_forwarded(self, connections: dict[socket.socket, _Connection]) -> None:
        while not self._finished.empty():
            connection, answer = self._finished.get_nowait()
            if connection.sock in connections:
                connection.unsent += len(answer).to_bytes(2, "big") + answer
                try:
                    self._flush(connection)
                except OSError:
                    self._close(connection, connections)

    def _flush(self, connection: _Connection) -> None:
        if connection.unsent:
            sent = connection.sock.send(connection.unsent)
            del connection.unsent[:sent]
        wanted = selectors.EVENT_WRITE if connection.unsent else 0
        if len(connection.unsent) < MAX_TCP_BACKLOG:
            wanted |= selectors.EVENT_READ  # never 0: a full backlog is unsent, so WRITE is set
        self._selector.modify(connection.sock, wanted)

    def _expire(self, connections: dict[socket.socket, _Connection]) -> None:
        now = time.monotonic()
        for connection in [c for c in connections.values() if c.deadline < now]:
            self._close(connection, connections)

    def _close(self, connection: _Connection,
               connections: dict[socket.socket, _Connection]) -> None:
        if connections.pop(connection.sock, None) is not None:
            left = self._per_client[connection.address] - 1
            if left:
                self._per_client[connection.address] = left
            else:
                del self._per_client[connection.address]
        try:
            self._selector.unregister(connection.sock)
        except (KeyError, ValueError):
            pass
        connection.sock.close()
