"""The TFTP service: one epoll event loop driving a :class:`Session` per transfer.

tftpy's own server loop is not used: it uses select(), which cannot watch more than 1024
sockets; it has no bound on sessions; and it catches only its own exception type, so one odd
packet stops it (see PROTOCOLS.md). Here ``selectors`` picks epoll, every request is decoded
in a ``try`` that turns any failure into one ERROR packet, sessions are capped in total and
per client address, and every loop is bounded (packets drained per wakeup, sessions scanned
per tick), so a flood from one client cannot starve the others.

Each transfer gets a fresh socket (its TID, RFC 1350) bound to the address the request came
in on. Quirk: PXE ROMs drop a reply whose source address differs from the one they asked
(pixiecore hits the same), so on a wildcard bind IP_PKTINFO tells which address that was.
"""

from __future__ import annotations

import logging
import resource
import selectors
import socket
import threading
import time
from collections import Counter

from pxeserver.app import Context
from pxeserver.tftp.events import EventRecorder, Transfer
from pxeserver.tftp.files import Resolver
from pxeserver.tftp.packets import RRQ, WRQ, ErrorCode, TftpError, encode_error, negotiate, opcode_of, parse_request
from pxeserver.tftp.session import Session

log = logging.getLogger(__name__)

DRAIN_LIMIT = 64  # datagrams read from one socket per wakeup
TICK = 0.05  # seconds between deadline scans: the resolution of retransmit timers
RECEIVE_SIZE = 2048  # requests, ACKs and ERRORs are small; larger datagrams are truncated
LISTENER_BUFFER = 4 << 20  # a burst of a thousand RRQs must not overflow the default buffer


class TftpService:
    name = "tftp"

    def __init__(self, context: Context) -> None:
        self.context = context
        self.config = context.config.tftp
        self.port = self.config.port
        self._resolver = Resolver(context.config.tftp_root, context.policy)
        self._events: EventRecorder | None = None
        self._selector: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._sessions: dict[int, Session] = {}  # by socket fd
        self._by_peer: dict[tuple[str, int], Session] = {}
        self._per_client: Counter[str] = Counter()

    # -- Service protocol -----------------------------------------------------------------

    def start(self) -> None:
        _raise_open_file_limit(self.config.max_sessions + 256)
        listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            listener.bind((self.config.address, self.config.port))
        except OSError as exc:
            listener.close()
            raise OSError(exc.errno, f"tftp: cannot bind {self.config.address}:{self.config.port}: {exc.strerror}") from None
        _enlarge_receive_buffer(listener)
        if self.config.address == "0.0.0.0":
            listener.setsockopt(socket.IPPROTO_IP, socket.IP_PKTINFO, 1)
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, None)
        self._events = EventRecorder(self.context.policy)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="tftp", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for session in list(self._sessions.values()):
            self._end(session)
        if self._selector is not None:
            self._selector.close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._events is not None:
            self._events.close()
            self._events = None

    def endpoints(self) -> list[str]:
        return [f"tftp://{self.config.address}:{self.port}"]

    @property
    def active_sessions(self) -> int:
        return len(self._sessions)

    # -- the event loop -------------------------------------------------------------------

    def _run(self) -> None:
        assert self._selector is not None
        select = self._selector.select
        next_tick = time.monotonic() + TICK
        while not self._stopping.is_set():
            for key, _ in select(max(0.0, next_tick - time.monotonic())):
                try:
                    if key.data is None:
                        self._drain_listener()
                    else:
                        self._drain_session(key.data)
                except Exception:  # the loop outlives any bug in handling one packet
                    log.exception("tftp: error handling a packet")
            now = time.monotonic()
            if now >= next_tick:
                self._expire(now)
                next_tick = now + TICK

    def _drain_listener(self) -> None:
        assert self._listener is not None
        bound = self.config.address
        for _ in range(DRAIN_LIMIT):
            try:
                packet, ancillary, _flags, peer = self._listener.recvmsg(RECEIVE_SIZE, 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. a queued ICMP error; the next datagram is fine
                log.debug("tftp: receive error on listener: %s", exc)
                continue
            local = bound
            for level, kind, data in ancillary:
                if level == socket.IPPROTO_IP and kind == socket.IP_PKTINFO and len(data) >= 12:
                    local = socket.inet_ntoa(data[8:12])  # in_pktinfo.ipi_addr: where it was sent
            self._on_request(packet, peer, local)

    def _drain_session(self, session: Session) -> None:
        recvfrom = session.sock.recvfrom
        now = time.monotonic()
        for _ in range(DRAIN_LIMIT):
            try:
                packet, sender = recvfrom(RECEIVE_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            session.on_packet(packet, sender, now)
            if session.done:
                self._end(session)
                return

    def _expire(self, now: float) -> None:
        for session in [s for s in self._sessions.values() if s.deadline <= now]:
            session.on_timeout(now)
            if session.done:
                self._end(session)

    # -- requests -------------------------------------------------------------------------

    def _on_request(self, packet: bytes, peer: tuple[str, int], local: str) -> None:
        opcode = opcode_of(packet)
        if opcode not in (RRQ, WRQ):
            if opcode is not None and opcode > 6:
                self._reply_from_listener(encode_error(ErrorCode.ILLEGAL_OPERATION, "unknown opcode"), peer)
            return  # DATA/ACK/ERROR/OACK here are strays; answering errors with errors can loop
        if peer in self._by_peer:
            return  # the client resent its request; the running session is answering it
        client_ip = peer[0]
        if len(self._sessions) >= self.config.max_sessions:
            self._reply_from_listener(encode_error(ErrorCode.NOT_DEFINED, "server busy, try again"), peer)
            return
        if self._per_client[client_ip] >= self.config.max_sessions_per_client:
            self._reply_from_listener(encode_error(ErrorCode.NOT_DEFINED, "too many transfers from your address"), peer)
            return
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        except OSError as exc:  # out of file descriptors
            log.warning("tftp: cannot open a transfer socket: %s", exc)
            self._reply_from_listener(encode_error(ErrorCode.NOT_DEFINED, "server busy, try again"), peer)
            return
        try:
            sock.setblocking(False)
            sock.bind((local, 0))
            session = self._open_session(sock, packet, peer)
        except TftpError as exc:
            self._reply_and_close(sock, exc.packet, peer)
            return
        except Exception:
            log.exception("tftp: failed to start a transfer for %s", client_ip)
            self._reply_and_close(sock, encode_error(ErrorCode.NOT_DEFINED, "internal error"), peer)
            return
        assert self._selector is not None
        self._selector.register(sock, selectors.EVENT_READ, session)
        self._sessions[sock.fileno()] = session
        self._by_peer[peer] = session
        self._per_client[client_ip] += 1
        session.begin(time.monotonic())

    def _open_session(self, sock: socket.socket, packet: bytes, peer: tuple[str, int]) -> Session:
        request = parse_request(packet)
        if request.opcode == WRQ:
            raise TftpError(ErrorCode.ACCESS_VIOLATION, "this server is read-only")
        source = self._resolver.open(request.filename, peer[0], request.mode)
        try:
            options = negotiate(request.options, source.size, self.config.max_blksize, self.config.max_windowsize)
        except TftpError:
            source.close()
            raise
        return Session(sock, peer, source, options, self.config.timeout, self.config.retries)

    def _end(self, session: Session) -> None:
        fd = session.sock.fileno()
        if self._sessions.pop(fd, None) is None:
            return
        assert self._selector is not None
        self._selector.unregister(session.sock)
        session.sock.close()
        self._by_peer.pop(session.peer, None)
        client_ip = session.peer[0]
        self._per_client[client_ip] -= 1
        if self._per_client[client_ip] <= 0:
            del self._per_client[client_ip]
        if session.completed and self._events is not None:
            self._events.add(Transfer(client_ip, session.source.name, session.source.size,
                                      session.blksize, session.stats.finished - session.stats.started,
                                      session.source.from_policy))
        session.source.close()

    def _reply_from_listener(self, packet: bytes, peer: tuple[str, int]) -> None:
        assert self._listener is not None
        try:
            self._listener.sendto(packet, peer)
        except OSError:
            pass

    @staticmethod
    def _reply_and_close(sock: socket.socket, packet: bytes, peer: tuple[str, int]) -> None:
        try:
            sock.sendto(packet, peer)
        except OSError:
            pass
        sock.close()


def _raise_open_file_limit(wanted: int) -> None:
    """One socket per session: a soft limit of 1024 descriptors would cap sessions below 2000."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _enlarge_receive_buffer(sock: socket.socket) -> None:
    try:  # as root, past net.core.rmem_max
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUFFORCE, LISTENER_BUFFER)
    except (OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LISTENER_BUFFER)
