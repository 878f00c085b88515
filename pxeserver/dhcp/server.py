"""The DHCP service: sockets bound to the provisioning interface, one bounded receive loop.

Plain UDP sockets from the standard library: SO_BINDTODEVICE keeps the server on the
configured bridge (and needs root), SO_BROADCAST lets it answer clients that have no address
yet. One thread serves all sockets; each packet costs a parse and two or three registry
reads, so a thread pool would only add contention on the SQLite connection.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import threading
import time

from pxeserver.app import Context
from pxeserver.dhcp.responder import PXE_PORT, Responder
from pxeserver.mac import MacAddress
from pxeserver.metrics import dhcp_reply_type
from pxeserver.offpath import OffPathWorker
from pxeserver.policy import BootPolicy
from pxeserver.registry import Status

log = logging.getLogger(__name__)

MAX_DATAGRAM = 4096  # DHCP messages are at most 576 bytes unless option 57 says more
BURST_PER_CALL = 256  # datagrams drained per wake-up before the stop flag is checked again
POLL_SECONDS = 0.25


class RateLimiter:
    """At most ``burst`` packets per MAC, refilled at ``rate`` per second.

    A real client sends a handful of packets per boot; a looping firmware or a flood with
    one spoofed MAC must not starve everyone else. The table is bounded: when full, MACs
    whose bucket is full again are forgotten, and if none are, the table starts over.
    """

    def __init__(self, rate: float = 10.0, burst: float = 30.0, max_clients: int = 65536) -> None:
        self.rate, self.burst, self.max_clients = rate, burst, max_clients
        self._buckets: dict[MacAddress, tuple[float, float]] = {}

    def allow(self, mac: MacAddress, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(mac, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[mac] = (tokens, now)
            return False
        if mac not in self._buckets and len(self._buckets) >= self.max_clients:
            self._forget_idle(now)
        self._buckets[mac] = (tokens - 1.0, now)
        return True

    def _forget_idle(self, now: float) -> None:
        refill = self.burst / self.rate
        self._buckets = {m: b for m, b in self._buckets.items() if now - b[1] < refill}
        if len(self._buckets) >= self.max_clients:
            self._buckets.clear()


class StatusWriter:
    """Moves hosts to NETBOOTING off the reply path, after their ACK has gone out.

    The status change is a durable registry write (an fsync); made inline it cut the
    handshake rate to a third when many hosts boot at once. Marking is idempotent, so a
    duplicate from a retransmitted REQUEST is harmless and a dropped one (queue full) is
    repeated by the host's next ACK.
    """

    def __init__(self, policy: BootPolicy, capacity: int = 10_000) -> None:
        self.policy = policy
        self.worker = OffPathWorker("dhcp-status", self._mark, capacity,
                                    policy.metrics.queue_drop("dhcp-status"))

    def mark_netbooting(self, mac: MacAddress) -> None:
        if not self.worker.submit(mac):
            log.warning("dhcp: status queue full, %s stays 'registered' until its next ACK", mac)

    def _mark(self, mac: MacAddress) -> None:
        self.policy.advance(mac, Status.NETBOOTING)


class DhcpService:
    name = "dhcp"

    def __init__(self, context: Context) -> None:
        self.context = context
        self.section = context.config.dhcp
        self.status = StatusWriter(context.policy)
        self.responder = Responder(context, self.status.mark_netbooting)
        self.limiter = RateLimiter()
        self.metrics = context.metrics.protocol("dhcp")
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Why the receive loop ended on its own; None while it runs or after a clean stop.

    def start(self) -> None:
        ports = [self.section.port] + ([PXE_PORT] if self.section.mode == "proxy" else [])
        try:
            for port in ports:
                self._sockets.append(self._open(port))
        except OSError:
            self._close()
            raise
        if self.section.address not in ("0.0.0.0", ""):
            log.warning("dhcp: bound to %s, so broadcasts from unconfigured clients never "
                        "arrive; use address 0.0.0.0 with interface %r",
                        self.section.address, self.section.interface)
        self._stop.clear()
        self.status.worker.start()
        self._thread = threading.Thread(
            target=self.context.supervisor.guard(self._serve, self.name), name="dhcp", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.status.worker.stop()
        self._close()

    def endpoints(self) -> list[str]:
        where = f"%{self.section.interface}" if self.section.interface else ""
        return [f"dhcp://{host}:{port}{where} ({self.section.mode} mode)"
                for host, port in (s.getsockname() for s in self._sockets)]

    def _open(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        interface = self.section.interface
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            if interface:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            sock.bind((self.section.address or "0.0.0.0", port))
        except OSError as exc:
            sock.close()
            error = OSError(_bind_error(exc, interface, port))  # str() without "[Errno n]"
            error.errno = exc.errno
            raise error from None
        sock.setblocking(False)
        return sock

    def _serve(self) -> None:
        """Drain every ready socket in bounded bursts; nothing a client sends ends the loop."""
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select(self._sockets, [], [], POLL_SECONDS)
            except (OSError, ValueError):  # a socket closed under us: fatal unless stopping
                if self._stop.is_set():
                    return
                raise
            for sock in ready:
                local_port = sock.getsockname()[1]
                for _ in range(BURST_PER_CALL):
                    try:
                        data, source = sock.recvfrom(MAX_DATAGRAM)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as exc:
                        log.warning("dhcp: receive failed: %s", exc)
                        break
                    self._handle(sock, data, source, local_port)

    def _handle(self, sock: socket.socket, data: bytes, source: tuple[str, int],
                local_port: int) -> None:
        # chaddr sits at bytes 28..34; the limiter runs before any registry read.
        if len(data) >= 34 and not self.limiter.allow(MacAddress(data[28:34])):
            self.metrics.drop("rate_limited")
            return
        try:
            reply = self.responder.respond(data, source, local_port)
        except Exception:  # a bug must cost one reply, never the service
            log.exception("dhcp: failed to answer a packet from %s", source[0])
            self.metrics.error()
            return
        if reply is None:
            return
        try:
            sock.sendto(reply.payload, reply.address)
        except OSError as exc:
            log.warning("dhcp: cannot send reply to %s:%d: %s", *reply.address, exc)
            self.metrics.error()
            return
        self.metrics.reply(dhcp_reply_type(reply.payload), len(reply.payload))

    def _close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []


def _bind_error(exc: OSError, interface: str, port: int) -> str:
    """One line that says what to do, instead of a bare errno."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (f"dhcp: binding UDP port {port} on interface {interface!r} needs root "
                "(CAP_NET_BIND_SERVICE and CAP_NET_RAW): run pxeserver serve as root")
    if exc.errno == errno.ENODEV:
        return f"dhcp: no network interface named {interface!r} (set [dhcp] interface)"
    if exc.errno == errno.EADDRINUSE:
        return (f"dhcp: UDP port {port} is already in use; is another DHCP server "
                "(dnsmasq, isc-dhcp-server) running?")
    return f"dhcp: cannot listen on UDP port {port} on {interface!r}: {exc.strerror}"
