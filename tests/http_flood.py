"""A slow-HTTP attacker for tests (slowloris): many sockets from given loopback addresses.

Each socket connects, then trickles a request header one byte at a time (one every
``--byte-interval`` seconds, a header too long to ever end) or, for ``--idle-share`` of them,
sends nothing. Whatever the server closes is reconnected after ``--reconnect-delay``, so the
pressure holds for ``--duration`` seconds; no new connects in the last ``--quiet`` seconds,
so what is open at the end is what the server holds. It runs as its own process so that its
work does not share the server's GIL in the test, and prints one JSON document:
``connections``: per connect, its source, times (seconds since start) and how it ended;
``open_at_end``: per source, the sockets still open. Only loopback addresses are accepted.
"""

from __future__ import annotations

import argparse
import heapq
import ipaddress
import json
import random
import resource
import selectors
import socket
import sys
import time
from dataclasses import asdict, dataclass, field

HEADER = b"GET /api/hosts HTTP/1.1\r\nHost: pxe\r\nX-Padding: " + b"a" * 100_000


@dataclass
class Connection:
    source: str
    idle: bool
    connect_at: float
    established_at: float | None = None
    closed_at: float | None = None
    ended: str = ""  # "refused 503", "closed", "reset", "connect failed"; empty: still open
    sent: int = 0
    reply: str = ""
    sock: socket.socket | None = field(default=None, repr=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sources", required=True, help="comma-separated loopback addresses")
    parser.add_argument("--per-source", type=int, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--byte-interval", type=float, default=1.5)
    parser.add_argument("--first-byte-after", type=float, default=1.0,
                        help="no byte before this long after connect (a refusal comes first)")
    parser.add_argument("--idle-share", type=float, default=0.25)
    parser.add_argument("--reconnect-delay", type=float, default=2.0)
    parser.add_argument("--quiet", type=float, default=0.0)
    args = parser.parse_args()
    sources = args.sources.split(",")
    if not all(ipaddress.ip_address(source).is_loopback for source in sources):
        sys.exit("http_flood: loopback sources only")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = len(sources) * args.per_source + 100
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    print(json.dumps(Flood(args, sources).run()))


class Flood:
    def __init__(self, args: argparse.Namespace, sources: list[str]) -> None:
        self.args = args
        self.sources = sources
        self.selector = selectors.DefaultSelector()
        self.connections: list[Connection] = []
        self.timers: list[tuple[float, int, str, Connection]] = []  # (due, seq, what, of)
        self.seq = 0
        self.start = time.monotonic()
        self.random = random.Random(1)  # the byte schedule's jitter, the same every run

    def now(self) -> float:
        return time.monotonic() - self.start

    def later(self, due: float, what: str, of: Connection) -> None:
        self.seq += 1
        heapq.heappush(self.timers, (due, self.seq, what, of))

    def run(self) -> dict:
        for index in range(self.args.per_source):
            for source in self.sources:
                self.connect(source, idle=index % 100 < self.args.idle_share * 100)
        end = self.args.duration
        while (now := self.now()) < end:
            while self.timers and self.timers[0][0] <= now:
                _, _, what, of = heapq.heappop(self.timers)
                if what == "byte":
                    self.send_byte(of)
                elif now < end - self.args.quiet:  # a replacement of the same kind
                    self.connect(of.source, of.idle)
            wait = min(self.timers[0][0] - now if self.timers else 0.05, 0.05, end - now)
            for key, _ in self.selector.select(max(wait, 0)):
                self.ready(key.data)
        open_at_end = {source: 0 for source in self.sources}
        for conn in self.connections:
            if conn.sock is not None:
                open_at_end[conn.source] += conn.established_at is not None
                conn.sock.close()
                conn.sock = None
        return {"connections": [{k: v for k, v in asdict(c).items() if k != "sock"}
                                for c in self.connections],
                "open_at_end": open_at_end}

    def connect(self, source: str, idle: bool) -> None:
        conn = Connection(source, idle, self.now())
        self.connections.append(conn)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.bind((source, 0))
            sock.connect_ex(("127.0.0.1", self.args.port))
        except OSError as exc:  # out of ports or descriptors: recorded, retried later
            sock.close()
            self.end(conn, f"connect failed: {exc.strerror}")
            return
        conn.sock = sock
        self.selector.register(sock, selectors.EVENT_WRITE, conn)

    def ready(self, conn: Connection) -> None:
        assert conn.sock is not None
        if conn.established_at is None:
            error = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                self.end(conn, "connect failed")
                return
            conn.established_at = self.now()
            self.selector.modify(conn.sock, selectors.EVENT_READ, conn)
            if not conn.idle:
                self.later(conn.established_at + self.args.first_byte_after
                           + self.random.random() * self.args.byte_interval, "byte", conn)
            return
        try:
            data = conn.sock.recv(4096)
        except ConnectionResetError:
            self.end(conn, "reset")
            return
        except BlockingIOError:
            return
        if not data:
            self.end(conn, "refused 503" if conn.reply.startswith("HTTP/1.1 503") else "closed")
        else:
            conn.reply += data.decode("latin-1")[:200]

    def send_byte(self, conn: Connection) -> None:
        if conn.sock is None:
            return  # closed meanwhile
        try:
            conn.sent += conn.sock.send(HEADER[conn.sent:conn.sent + 1])
        except (BrokenPipeError, ConnectionResetError):
            self.end(conn, "reset")
            return
        except BlockingIOError:
            pass
        self.later(self.now() + self.args.byte_interval, "byte", conn)

    def end(self, conn: Connection, how: str) -> None:
        conn.closed_at = self.now()
        conn.ended = how
        if conn.sock is not None:
            self.selector.unregister(conn.sock)
            conn.sock.close()
            conn.sock = None
        self.later(conn.closed_at + self.args.reconnect_delay, "connect", conn)


if __name__ == "__main__":
    main()
