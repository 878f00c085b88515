"""The TFTP service: one epoll event loop driving a :class:`Session` per transfer.

tftpy's own server loop is not used: it uses select(), which cannot watch more than 1024
sockets; it has no bound on sessions; and it catches only its own exception type, so one odd
packet stops it (see PROTOCOLS.md). Here one ``select.epoll`` watches every socket (used
directly: the loop reads one datagram per readiness event, and level-triggered epoll reports a
socket again while it holds more, so no read ends in a costly EAGAIN), every request is decoded
in a ``try`` that turns any failure into one ERROR packet, and every loop is bounded (packets
drained per wakeup, sessions scanned per tick), so a flood from one client cannot starve the
others.

Request floods are bounded in what they hold: sessions are capped in total, per client
address and per /24 (a guest can spoof any source address in its own network, and a flood
from one network then fills only that network's share); a transfer whose client
acknowledges nothing new for ``session_deadline`` seconds is dropped whatever timeout it
asked for (and a timeout above ``max_timeout`` is not granted); file data in memory is
bounded by ``packet_cache_mb`` (cache.py).

Under many transfers the loop lets packets gather before it looks again: while at least
:data:`BATCH_SESSIONS` transfers move (a client acknowledged a block in the last tick) and packets
arrive fast enough that :data:`BATCH_PACKETS` come within ``[tftp] batch_wait_us``, a wakeup
that found fewer sleeps as long as that many take to arrive (at most half of a moving
transfer's round, on average) before the next poll. Each wakeup costs a context switch, and
each packet a client sends to a sleeping server costs that client a wakeup too; in
bench/tftp.py's 300 x 1 MB case (a shared 2-core VM, so noisy) gathering took the server's CPU
time from about 1.5 s to 0.8-1.2 s, and the clients' by up to a third. Open transfers that
do not move (slow or hostile clients) never make the loop wait, and under fewer moving
transfers it answers every packet at once.

Each transfer gets a fresh port (its TID, RFC 1350; two sockets, see session.py) bound to the
address the request came in on. Quirk: PXE ROMs drop a reply whose source address differs
from the one they asked (pixiecore hits the same), so on a wildcard bind IP_PKTINFO tells
which address that was. Requests also go unanswered when the listening socket's buffer
overflows, as a rack powering on at once can make it: it is enlarged to 4 MiB.
"""

from __future__ import annotations

import logging
import os
import resource
import select
import socket
import threading
import time
from collections import Counter

from pxeserver.app import Context
from pxeserver.tftp.cache import FileMemory
from pxeserver.tftp.events import EventRecorder, Transfer
from pxeserver.tftp.files import Resolver
from pxeserver.tftp.packets import (
    RRQ,
    WRQ,
    ErrorCode,
    TftpError,
    encode_error,
    negotiate,
    opcode_of,
    parse_request,
)
from pxeserver.tftp.session import ACK_PACKETS, Session

log = logging.getLogger(__name__)

DRAIN_LIMIT = 64  # requests read from the listening socket per wakeup
MAX_EVENTS = 1024  # readiness events handled per wakeup
TICK = 0.05  # seconds between deadline scans: the resolution of retransmit timers
RECEIVE_SIZE = 1024  # requests, ACKs and ERRORs are small; larger datagrams are truncated
# What a transfer reads of its client's packets: opcode and block number, all it looks at (a
# longer ACK or an ERROR is cut short; no buffer is allocated larger and then shrunk).
ANSWER_SIZE = 4
BATCH_SESSIONS = 64  # transfers moving before the loop lets packets gather between wakeups
BATCH_PACKETS = 32  # a wakeup that found fewer than this waits before the next one
LISTENER_BUFFER = 4 << 20  # a burst of a thousand RRQs must not overflow the default buffer
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux's value; Python names it from 3.12
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux's value; Python 3.11's socket module lacks it


class TftpService:
    name = "tftp"

    def __init__(self, context: Context) -> None:
        self.context = context
        self.config = context.config.tftp
        self.port = self.config.port
        self.file_memory = FileMemory(self.config.packet_cache_mb << 20)
        self._resolver = Resolver(context.config.tftp_root, context.policy, self.file_memory)
        self._events: EventRecorder | None = None
        self._epoll: select.epoll | None = None
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._sessions: dict[int, Session] = {}  # by the fd of the socket connected to the client
        self._strangers: dict[int, Session] = {}  # by the fd of the session's unconnected socket
        self._by_peer: dict[tuple[str, int], Session] = {}
        self._per_client: Counter[str] = Counter()
        self._per_subnet: Counter[str] = Counter()  # by the first three octets: the client's /24
        self._metrics = context.metrics.tftp()
        self._metrics.active(lambda: len(self._sessions))

    # -- Service protocol -----------------------------------------------------------------

    def start(self) -> None:
        _raise_open_file_limit(3 * self.config.max_sessions + 256)
        listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            listener.bind((self.config.address, self.config.port))
        except OSError as exc:
            listener.close()
            where = f"{self.config.address}:{self.config.port}"
            raise OSError(exc.errno, f"tftp: cannot bind {where}: {exc.strerror}") from None
        _enlarge_receive_buffer(listener)
        if self.config.address == "0.0.0.0":
            listener.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._epoll = select.epoll()
        self._epoll.register(listener.fileno(), select.EPOLLIN)
        self._events = EventRecorder(self.context.policy)
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self.context.supervisor.guard(self._run, self.name), name="tftp", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for session in list(self._sessions.values()):
            self._end(session)
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
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
        assert self._epoll is not None and self._listener is not None
        poll, listener = self._epoll.poll, self._listener.fileno()
        sessions, strangers, read, write = self._sessions, self._strangers, os.read, os.write
        next_tick = time.monotonic() + TICK
        batch_wait, pause, packets, counted = self.config.batch_wait_us / 1e6, 0.0, 0, time.monotonic()
        while not self._stopping.is_set():
            events = poll(max(0.0, next_tick - time.monotonic()), MAX_EVENTS)
            now = time.monotonic()
            for fd, _ in events:
                session = sessions.get(fd)
                try:
                    if session is not None:  # the hot path: one ACK in, DATA out
                        packet = read(fd, ANSWER_SIZE)
                        if packet == session.awaited:
                            # Lockstep's next block, inlined (session.py): what on_packet does for
                            # this ACK, without its checks and calls (a tenth fewer instructions).
                            block = session.sent + 1
                            session.acked = session.sent
                            session.sent = block
                            session.retries = 0
                            session.progressed = now
                            session.deadline = now + session.timeout
                            session.awaited = ACK_PACKETS[block & 0xFFFF] if block < session.total_blocks else None
                            try:
                                write(fd, session.built[block] or session.packet(block))  # type: ignore[index]
                            except OSError:
                                pass  # UDP: the deadline resends it
                        else:
                            session.on_packet(packet, now)
                            if session.done:
                                self._end(session)
                    elif fd == listener:
                        self._drain_listener()
                    elif (session := strangers.get(fd)) is not None:
                        self._on_stranger(session)
                except BlockingIOError:  # a spurious wakeup
                    pass
                except ConnectionRefusedError:  # ICMP port unreachable: the client has gone away
                    self._end(session)  # type: ignore[arg-type]
                except Exception:  # the loop outlives any bug in handling one packet
                    log.exception("tftp: error handling a packet")
                    self._metrics.error()
                    if session is not None:
                        self._end(session)
            packets += len(events)
            if now >= next_tick:
                self._expire(now)
                moving = sum(1 for s in sessions.values() if s.progressed >= counted and s.acked)
                pause = batch_pause(moving, packets, now - counted, batch_wait)
                packets, counted, next_tick = 0, now, now + TICK
            if pause and len(events) < BATCH_PACKETS:
                time.sleep(pause)

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
                if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
                    local = socket.inet_ntoa(data[8:12])  # in_pktinfo.ipi_addr: where it was sent
            self._on_request(packet, peer, local)

    @staticmethod
    def _on_stranger(session: Session) -> None:
        try:
            packet, sender = session.strangers.recvfrom(RECEIVE_SIZE)
        except OSError:
            return
        session.on_stranger(packet, sender)

    def _expire(self, now: float) -> None:
        for session in [s for s in self._sessions.values() if s.deadline <= now]:
            session.on_timeout(now)
            if session.done:
                self._end(session)

    # -- requests -------------------------------------------------------------------------

    def _on_request(self, packet: bytes, peer: tuple[str, int], local: str) -> None:
        opcode = opcode_of(packet)
        if opcode not in (RRQ, WRQ):
            self._metrics.drop("stray" if opcode is not None and 3 <= opcode <= 6 else "malformed")
            if opcode is not None and opcode > 6:
                self._reply_from_listener(encode_error(ErrorCode.ILLEGAL_OPERATION, "unknown opcode"), peer)
            return  # DATA/ACK/ERROR/OACK here are strays; answering errors with errors can loop
        self._metrics.request("read" if opcode == RRQ else "write")
        if peer in self._by_peer:
            self._metrics.drop("duplicate")
            return  # the client resent its request; the running session is answering it
        client_ip = peer[0]
        if len(self._sessions) >= self.config.max_sessions:
            self._metrics.drop("busy")
            self._reply_from_listener(encode_error(ErrorCode.NOT_DEFINED, "server busy, try again"), peer)
            return
        if self._per_client[client_ip] >= self.config.max_sessions_per_client:
            self._metrics.drop("client_limit")
            refusal = encode_error(ErrorCode.NOT_DEFINED, "too many transfers from your address")
            self._reply_from_listener(refusal, peer)
            return
        subnet = _subnet(client_ip)
        if self._per_subnet[subnet] >= self.config.max_sessions_per_subnet:
            self._metrics.drop("subnet_limit")
            refusal = encode_error(ErrorCode.NOT_DEFINED, "too many transfers from your network")
            self._reply_from_listener(refusal, peer)
            return
        try:
            strangers = _transfer_socket(local, 0)
        except OSError as exc:  # out of file descriptors
            log.warning("tftp: cannot open a transfer socket: %s", exc)
            self._metrics.drop("busy")
            self._reply_from_listener(encode_error(ErrorCode.NOT_DEFINED, "server busy, try again"), peer)
            return
        try:
            session = self._open_session(packet, peer, strangers)
        except Exception as exc:
            if isinstance(exc, TftpError):
                reply = exc.packet
            else:
                log.exception("tftp: failed to start a transfer for %s", client_ip)
                self._metrics.error()
                reply = encode_error(ErrorCode.NOT_DEFINED, "internal error")
            self._metrics.reply("error")
            self._reply_and_close(strangers, reply, peer)
            return
        assert self._epoll is not None
        self._epoll.register(session.sock.fileno(), select.EPOLLIN)
        self._epoll.register(strangers.fileno(), select.EPOLLIN)
        self._sessions[session.sock.fileno()] = session
        self._strangers[strangers.fileno()] = session
        self._by_peer[peer] = session
        self._per_client[client_ip] += 1
        self._per_subnet[subnet] += 1
        self._metrics.reply("transfer")
        session.begin(time.monotonic())

    def _open_session(self, packet: bytes, peer: tuple[str, int], strangers: socket.socket) -> Session:
        request = parse_request(packet)
        if request.opcode == WRQ:
            raise TftpError(ErrorCode.ACCESS_VIOLATION, "this server is read-only")
        source = self._resolver.open(request.filename, peer[0], request.mode)
        sock = None
        try:
            limits = self.config.max_blksize, self.config.max_windowsize, self.config.max_timeout
            options = negotiate(request.options, source.size, *limits)
            sock = _transfer_socket(*strangers.getsockname())
            sock.connect(peer)
            return Session(sock, strangers, peer, source, options, self.config.timeout, self.config.retries,
                           self.config.session_deadline)
        except BaseException:
            if sock is not None:
                sock.close()
            source.close()
            raise

    def _end(self, session: Session) -> None:
        fd = session.sock.fileno()
        if self._sessions.pop(fd, None) is None:
            return
        assert self._epoll is not None
        self._epoll.unregister(fd)
        self._epoll.unregister(session.strangers.fileno())
        self._strangers.pop(session.strangers.fileno(), None)
        session.sock.close()
        session.strangers.close()
        self._by_peer.pop(session.peer, None)
        client_ip = session.peer[0]
        for counter, key in ((self._per_client, client_ip), (self._per_subnet, _subnet(client_ip))):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]
        self._metrics.ended(session)
        if session.completed and self._events is not None:
            stats = session.stats
            self._events.add(Transfer(client_ip, session.source.name, session.source.size, session.blksize,
                                      stats.finished - stats.started, session.source.from_policy,
                                      session.packets_sent, stats.retransmits, stats.wrong_tid))
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


def batch_pause(moving: int, packets: int, seconds: float, limit: float) -> float:
    """How long the loop sleeps after a wakeup with few packets: as long as
    :data:`BATCH_PACKETS` take to come at the rate of the last ``seconds`` (``packets`` came
    then, while ``moving`` transfers acknowledged something); 0 when that is longer than
    ``limit``, or fewer than :data:`BATCH_SESSIONS` transfers move."""
    if moving < BATCH_SESSIONS or packets <= 0:
        return 0.0
    gather = BATCH_PACKETS * seconds / packets
    return gather if gather <= limit else 0.0


def _subnet(ip: str) -> str:
    """The /24 an IPv4 address is in, as its first three octets."""
    return ip.rsplit(".", 1)[0]


def _transfer_socket(address: str, port: int) -> socket.socket:
    """One of a transfer's two sockets on one port: port 0 picks a new one, else share it.

    The first socket binds *before* it sets SO_REUSEADDR, so the kernel picks a port no
    other socket holds (two sockets that both set it first could be handed the same ephemeral
    port, and two transfers would share a TID); the second sets it, then binds that port.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if port == 0:
            sock.bind((address, 0))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    return sock


def _raise_open_file_limit(wanted: int) -> None:
    """Two sockets per session, and the file of one read from disk: a soft limit of 1024
    descriptors would cap sessions near 300."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _enlarge_receive_buffer(sock: socket.socket) -> None:
    try:  # as root, past net.core.rmem_max
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, LISTENER_BUFFER)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LISTENER_BUFFER)
