"""The HTTP service: the Flask app served in-process by waitress, with boot files via sendfile.

Why waitress: it is pure Python (no compiler on the boot server), already a dependency, runs
inside ``pxeserver serve`` next to the UDP services without forking (gunicorn is a process
manager, its workers would each need their own registry connection and signal handling),
keeps slow clients off the worker threads (one event loop does all socket I/O and a fixed
thread pool runs the app, so 100 installers pulling initrds do not need 100 threads), and
refuses oversized bodies and headers before the app sees them. cheroot has a thread per
connection, which a PXE storm turns into hundreds of threads.

What is hand-written: waitress 3 copies ``wsgi.file_wrapper`` bodies through Python in
SO_SNDBUF-sized pieces (16 KB on Linux loopback): read, send, seek, per piece. Measured with
100 parallel 40 MB downloads that costs about three times the CPU of the whole transfer with
``os.sendfile``, and on a two-core server that CPU is what the clients wait for. So
:class:`SendfileChannel` sends file bodies with ``os.sendfile`` and leaves everything else
(headers, JSON, rendered kickstarts) to waitress. It overrides waitress's ``_flush_some``,
an internal method: the loop is kept the same as waitress 3.0's so the rest of the channel
(locking, high-watermark flow control, close handling) still holds.

Slow and idle clients are the other hand-written part. Waitress alone lets a handful of
sockets starve everyone (issue 9): its ``channel_timeout`` closes only connections silent for
that long, so a client sending one header byte every 20 s is never closed; it has no
per-address limit; and at ``connection_limit`` it stops accepting, so the listen backlog fills
and every new client waits, however few connections it holds. So :class:`BoundedServer` and
:class:`BoundedChannel` (subclasses, like the sendfile channel, because waitress has no hooks
for this) replace that policy:

- Deadlines, not inactivity timers: a request's headers must be complete within
  ``header_timeout`` of connect (or of its first byte on a kept-alive connection), its body
  within ``body_timeout`` of the headers, the next request must start within ``idle_timeout``
  of the last response, and a client that stops reading its response for ``SEND_TIMEOUT`` is
  dropped. Trickling bytes does not move a deadline. While the app works on a request there is
  no deadline (the app's own limits hold).
- The server never stops accepting. It accepts and refuses with a 503 what is over the caps,
  so refused clients learn at once and the backlog keeps moving: a client address holding
  ``max_connections_per_address`` gets no more; at ``max_connections`` in all, a newcomer gets
  in by closing the longest-waiting idle connection of the address that holds the most, when
  that address holds at least two more than the newcomer. One address cannot take all slots,
  many addresses end up with equal shares, and connections busy with a request or a download
  are never evicted.
- Headers are capped at ``MAX_HEADER_BYTES`` (431 beyond): at most that much memory per
  connection, and pipelined requests are read no faster than they are answered (waitress reads
  nothing more while a request is pending).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import resource
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass

from waitress import wasyncore
from waitress.buffers import ReadOnlyFileBasedBuffer
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer

from pxeserver.app import Context
from pxeserver.config import HttpSection
from pxeserver.web import MAX_BODY_BYTES, create_app

log = logging.getLogger(__name__)

# Largest piece handed to one send()/sendfile(): big enough that a fast loopback or LAN client
# costs few Python iterations, small enough that one client cannot hog the event loop.
MAX_SEND = 1 << 20
# A request line and headers larger than this get 431: no client of ours sends more than a
# few hundred bytes, and it bounds what a half-sent request holds in memory.
MAX_HEADER_BYTES = 16 * 1024
# A client that reads nothing of its response for this long is dropped.
SEND_TIMEOUT = 60
# How often deadlines are checked: the slack on every deadline.
CHECK_INTERVAL = 0.5
# Connections accepted per wake-up: enough that a flood of connects is refused as fast as it
# arrives, so a good client's connect does not wait behind it in the backlog.
ACCEPT_BATCH = 64
# How often the dropped and refused connections are summed up in the log.
REPORT_INTERVAL = 10.0
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n"
           b"Retry-After: 5\r\n\r\n")


def _sendfile_source(buffer: object) -> int | None:
    """The file descriptor behind a wsgi.file_wrapper body, if the kernel can send from it."""
    if not isinstance(buffer, ReadOnlyFileBasedBuffer):
        return None
    try:
        descriptor: int = buffer.file.fileno()
        return descriptor
    except (AttributeError, OSError, ValueError):  # BytesIO and friends: no descriptor
        return None


class SendfileChannel(HTTPChannel):
    """A waitress channel that sends ``wsgi.file_wrapper`` bodies with ``os.sendfile``."""

    sendbuf_len: int

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.sendbuf_len = max(self.sendbuf_len, MAX_SEND)

    def _flush_some(self, do_close: bool = True) -> bool:
        sent = 0
        while True:
            outbuf = self.outbufs[0]
            remaining = outbuf.__len__()  # as waitress: len() overflows on 32-bit builds
            source = _sendfile_source(outbuf)
            while remaining > 0:
                if source is None:
                    num_sent = self.send(outbuf.get(self.sendbuf_len), do_close=do_close)
                    if num_sent:
                        outbuf.skip(num_sent, True)
                else:
                    num_sent = self._sendfile(outbuf, source, min(remaining, MAX_SEND), do_close)
                if not num_sent:
                    return self._sent(sent)
                remaining -= num_sent
                sent += num_sent
                self.total_outbufs_len -= num_sent
            if len(self.outbufs) == 1:
                return self._sent(sent)  # outbufs[-1] is the writable one: keep it
            finished = self.outbufs.pop(0)
            try:
                finished.close()
            except Exception:
                log.exception("could not close a sent response body")

    def _sendfile(self, outbuf: ReadOnlyFileBasedBuffer, source: int, count: int,
                  do_close: bool) -> int:
        """Send from the file's current position; 0 when the socket is full or gone."""
        position = outbuf.file.tell()
        try:
            num_sent = os.sendfile(self.socket.fileno(), source, position, count)
        except BlockingIOError:
            return 0
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            # The client went away: as waitress's send() does. Other errors propagate to
            # waitress, which logs them and closes this channel.
            if do_close:
                self.handle_close()
            return 0
        if num_sent == 0:
            # End of file before the promised length: the file shrank while being sent. The
            # response cannot be completed; without this the channel would retry forever.
            log.warning("http: a file shrank while being sent to %s; closing", self.addr[0])
            self.will_close = True
            return 0
        outbuf.file.seek(position + num_sent)
        outbuf.remain -= num_sent
        return num_sent

    def _sent(self, sent: int) -> bool:
        if sent:
            self.last_activity = time.time()
        return bool(sent)


@dataclass(frozen=True)
class ClientLimits:
    """What one connection, one client address and all clients together may hold (seconds)."""

    header_timeout: float
    body_timeout: float
    idle_timeout: float
    max_connections: int
    max_connections_per_address: int

    @classmethod
    def from_config(cls, section: HttpSection) -> ClientLimits:
        return cls(section.header_timeout, section.body_timeout, section.idle_timeout,
                   section.max_connections, section.max_connections_per_address)


def client_key(host: str) -> str:
    """What the per-address cap counts: an IPv4 address, or an IPv6 /64 (one host's share)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class BoundedChannel(SendfileChannel):
    """A channel that gives its client deadlines, not inactivity timers (see the module doc).

    Times are ``time.monotonic()``. Waitress's own ``last_activity`` moves with every byte
    received, which is exactly what a trickling client exploits, so it is not used here.
    """

    server: BoundedServer

    def __init__(self, server: BoundedServer, sock: socket.socket, addr: tuple, adj: object,
                 map: dict | None = None) -> None:
        super().__init__(server, sock, addr, adj, map=map)
        now = time.monotonic()
        self.client = client_key(addr[0])
        # Connect, then the end of each response and every bit of progress sending it.
        self.waiting_since = now
        self._request_since = now  # the first byte of the request being read
        self._body_since = now  # the end of its headers
        self._answered = False  # a response went out: the next wait is a keep-alive wait
        self._serving = False  # the app is running a request of this channel
        server.track(self)

    def received(self, data: bytes) -> bool:
        pending = self.request
        in_body = pending is not None and pending.headers_finished
        result: bool = super().received(data)
        partial = self.request
        if partial is not None:
            now = time.monotonic()
            if partial is not pending:
                # The first request's clock started at connect; later ones at their first byte.
                self._request_since = now if self._answered else self.waiting_since
            if partial.headers_finished and not (partial is pending and in_body):
                self._body_since = now
        return result

    def service(self) -> None:
        self._serving = True
        try:
            super().service()
        finally:
            self._answered = True
            self.waiting_since = time.monotonic()
            self._serving = False

    def _sent(self, sent: int) -> bool:
        if sent:
            self.waiting_since = time.monotonic()
        return super()._sent(sent)

    def del_channel(self, map: dict | None = None) -> None:
        super().del_channel(map)
        self.server.untrack(self)

    @property
    def waiting(self) -> bool:
        """Waiting on the client, not on the app or a response: such a channel may be evicted."""
        return not (self._serving or self.requests or self.total_outbufs_len)

    def deadline(self, limits: ClientLimits) -> tuple[float, str] | None:
        """When this connection is closed unless the client moves on, and what it was waiting
        for; None while the app runs one of its requests."""
        if self._serving or self.requests:
            return None
        if self.total_outbufs_len:
            return self.waiting_since + SEND_TIMEOUT, "response not read"
        request = self.request
        if request is None:
            if self._answered:
                return self.waiting_since + limits.idle_timeout, "idle keep-alive"
            return self.waiting_since + limits.header_timeout, "headers not sent in time"
        if not request.headers_finished:
            since = max(self._request_since, self.waiting_since)
            return since + limits.header_timeout, "headers not sent in time"
        return max(self._body_since, self.waiting_since) + limits.body_timeout, "body not sent in time"


class BoundedServer(TcpWSGIServer):
    """A waitress server with deadlines, a per-address cap and a fair total cap (module doc)."""

    channel_class = BoundedChannel

    def __init__(self, application: object, limits: ClientLimits, **adjustments: object) -> None:
        self.limits = limits
        self.clients: dict[str, set[BoundedChannel]] = {}
        self.connections = 0
        self.dropped: Counter[str] = Counter()  # why connections were closed or refused
        now = time.monotonic()
        self._next_check = now
        self._next_report = now + REPORT_INTERVAL
        self._accept_paused_until = 0.0
        super().__init__(application, **adjustments)

    def track(self, channel: BoundedChannel) -> None:
        self.clients.setdefault(channel.client, set()).add(channel)
        self.connections += 1

    def untrack(self, channel: BoundedChannel) -> None:
        """Stop counting a channel; it no longer holds a slot (also when closed only later)."""
        held = self.clients.get(channel.client)
        if held is None or channel not in held:
            return
        held.remove(channel)
        self.connections -= 1
        if not held:
            del self.clients[channel.client]

    def readable(self) -> bool:
        # Replaces waitress's: no pause at a connection limit (the caps are applied at accept),
        # and deadlines instead of its inactivity timeout. Runs on every turn of the loop.
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + CHECK_INTERVAL
            self._enforce_deadlines(now)
            self._report(now)
        return self.accepting and now >= self._accept_paused_until

    def handle_accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                pair = self.accept()
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: wait a moment, do not spin
                self.dropped[f"accept failed: {exc.strerror}"] += 1
                self._accept_paused_until = time.monotonic() + CHECK_INTERVAL
                return
            if pair is None:
                return
            self._admit(*pair)

    def _admit(self, conn: socket.socket, addr: tuple) -> None:
        client = client_key(addr[0])
        held = len(self.clients.get(client, ()))
        if held >= self.limits.max_connections_per_address:
            self._refuse(conn, "refused: per-address cap")
            return
        if self.connections >= self.limits.max_connections and not self._evict_for(held):
            self._refuse(conn, "refused: connection cap")
            return
        try:
            self.set_socket_options(conn)
        except OSError:  # the client is already gone
            conn.close()
            return
        self.channel_class(self, conn, addr, self.adj, map=self._map)

    def _evict_for(self, held: int) -> bool:
        """Free a slot for a client holding ``held`` connections: close the longest-waiting
        connection of the address holding the most, if it holds at least two more (so two
        addresses never trade one slot back and forth). False if there is none to close."""
        for channels in sorted(self.clients.values(), key=len, reverse=True):
            if len(channels) < held + 2:
                return False
            waiting = [channel for channel in channels if channel.waiting]
            if waiting:
                self._drop(min(waiting, key=lambda channel: channel.waiting_since),
                           "evicted for another address")
                return True
        return False

    def _enforce_deadlines(self, now: float) -> None:
        dropped = False
        for channel in list(self.active_channels.values()):
            due = channel.deadline(self.limits)
            if due is not None and now >= due[0]:
                self._drop(channel, due[1])
                dropped = True
        if dropped:
            self.trigger.pull_trigger()  # close them on the next turn, not after a poll timeout

    def _drop(self, channel: BoundedChannel, reason: str) -> None:
        """Close a channel on the loop's next turn (it may have events pending on this one),
        and give its slot away now."""
        channel.will_close = True
        self.untrack(channel)
        self.dropped[reason] += 1

    def _refuse(self, conn: socket.socket, reason: str) -> None:
        self.dropped[reason] += 1
        try:
            conn.setblocking(False)
            conn.send(REFUSAL)
        except OSError:
            pass
        conn.close()

    def _report(self, now: float) -> None:
        if now < self._next_report:
            return
        self._next_report = now + REPORT_INTERVAL
        if self.dropped:
            log.warning("http: in the last %.0f s: %s (%d connections open)", REPORT_INTERVAL,
                        ", ".join(f"{count} {reason}" for reason, count in self.dropped.most_common()),
                        self.connections)
            self.dropped.clear()


def _raise_descriptor_limit(needed: int) -> None:
    """Let the connection cap, not the descriptor limit, turn clients away: each connection
    takes a socket and, while it downloads, an open file. Only the soft limit is raised."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        log.warning("http: the open-file limit (%d) is below the %d that max_connections needs; "
                    "raise LimitNOFILE or lower [http] max_connections", target, needed)


class HttpService:
    """``pxeserver serve``'s HTTP side: the JSON API, autoinstall files, iPXE, /boot/."""

    name = "http"

    def __init__(self, context: Context) -> None:
        self.context = context
        self.port: int | None = None
        self._server: BoundedServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        section = self.context.config.http
        _raise_descriptor_limit(2 * section.max_connections + 256)
        try:
            self._server = BoundedServer(
                create_app(self.context),
                ClientLimits.from_config(section),
                host=section.address,
                port=section.port,
                threads=section.threads,
                ident="pxeserver",
                # poll(), not select(): select cannot watch descriptors above 1024.
                asyncore_use_poll=True,
                # Refused before the app reads it, with 413; the app enforces the same limit.
                max_request_body_size=MAX_BODY_BYTES,
                max_request_header_size=MAX_HEADER_BYTES,
            )
        except OSError as exc:
            raise OSError(
                exc.errno, f"http: cannot listen on {section.address}:{section.port}: {exc.strerror}"
            ) from None
        self.context.metrics.protocol("http").active(lambda: len(self._server.active_channels) if self._server else 0)
        self.port = int(self._server.effective_port)  # waitress reports it as a string
        # Port 0 means "any free port": boot configs and callback URLs must carry the real one.
        section.port = self.port
        self._thread = threading.Thread(
            target=self.context.supervisor.guard(self._server.run, self.name), name="http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        # Close every socket from inside the event loop (the loop owns them); with its socket
        # map empty, waitress's loop returns.
        try:
            server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
        except OSError as exc:  # the trigger's pipe is gone, so is the loop: close from here
            log.warning("http: stopping without the event loop's trigger: %s", exc)
            wasyncore.close_all(server._map, ignore_all=True)
        thread.join(timeout=5)
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
        self._server = self._thread = None

    def endpoints(self) -> list[str]:
        section = self.context.config.http
        return [f"http://{section.address}:{self.port if self.port is not None else section.port}"]
