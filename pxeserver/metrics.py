"""Prometheus metrics: what every service counts, in one registry per :class:`~pxeserver.app.Context`.

Counts only: no MAC, hostname or address is ever a label value, so a scrape says how much and
how fast, never who. Label values come from fixed sets in this module and the services (never
from packet contents), so a flood of odd packets cannot grow the exposition.

Each event is counted once, where it happens: a service holds the :class:`ProtocolMetrics` of
its protocol and counts a request, reply or drop on the line that decides it (into per-thread
:class:`Tallies`, cheap enough for DNS's per-query path); the boot policy counts lifecycle steps
where it records them; a TFTP transfer's own :class:`~pxeserver.tftp.session.Stats` are added
when it ends. What a service or the registry already knows is read at scrape time instead
(active sessions, hosts by status), so no copy is kept in step by hand.

Why a registry per Context and not prometheus_client's global one: the tests run several
servers in one process, and each Context's registry collector reads that Context's store.

Semantics shared by the protocols (label ``protocol``: tftp, http, dhcp, dns):

- ``pxeserver_requests_total{kind}``: requests decoded as such. A datagram that is not one
  (malformed, a stray, refused by a rate limit before it is read) counts only as a drop.
- ``pxeserver_replies_total{kind}``: answers sent. A refused request counts as a drop, not a reply.
- ``pxeserver_drops_total{reason}``: what was received and not served.
- ``pxeserver_errors_total``: failures of pxeserver itself (a bug answering one packet, a failed
  send, an HTTP 5xx).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pxeserver.registry.models import Status
from pxeserver.registry.store import Contact, Tally, Unavailable

if TYPE_CHECKING:
    from pxeserver.tftp.session import Session

TRANSFER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
REQUEST_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# An install takes minutes to hours: from a quick PV netinstall to a slow mirror.
INSTALL_BUCKETS = (60, 120, 300, 600, 900, 1200, 1800, 2700, 3600, 5400, 7200, 14400, 43200, 86400)

_DHCP_TYPES = {1: "discover", 2: "offer", 3: "request", 4: "decline", 5: "ack", 6: "nak",
               7: "release", 8: "inform"}
_DNS_RCODES = {0: "noerror", 1: "formerr", 2: "servfail", 3: "nxdomain", 4: "notimp", 5: "refused"}
QUEUES = ("timeline", "dhcp-status", "tftp-events")  # the bounded queues in front of the registry
_HTTP_PATHS = frozenset({"api", "ks", "preseed", "ipxe", "boot", "dom0"})


# (family, protocol, kind or reason) -> count; family is one of _FAMILIES' keys
Key = tuple[str, str, str]

_FAMILIES = {  # name, help, the second label (or none)
    "requests": ("pxeserver_requests", "Requests received, by protocol and kind", "kind"),
    "replies": ("pxeserver_replies", "Replies sent, by protocol and kind", "kind"),
    "drops": ("pxeserver_drops", "Messages received and not served, by reason", "reason"),
    "errors": ("pxeserver_errors", "Failures inside pxeserver while serving", ""),
    "sent": ("pxeserver_sent_bytes", "Bytes sent: TFTP file bytes the clients acknowledged, HTTP "
             "response bodies, DHCP and DNS reply datagrams", ""),
}


class Tallies:
    """Counts kept per thread and summed at scrape time: counting takes no lock.

    prometheus_client's Counter takes a lock per increment, a few microseconds with its call
    overhead, which is a quarter of the time DNS needs to answer a query. Here each counting
    thread adds to its own dict, and a scrape sums copies of them (``dict(shard)`` copies
    under the GIL, so it never sees a dict mid-resize). Shards are never dropped: a finished
    thread's counts stay counted, and the services' thread pools are fixed in size.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._shards: list[dict[Key, int]] = []
        self._lock = threading.Lock()

    def add(self, key: Key, amount: int = 1) -> None:
        try:
            shard: dict[Key, int] = self._local.shard
        except AttributeError:
            shard = self._local.shard = {}
            with self._lock:
                self._shards.append(shard)
        shard[key] = shard.get(key, 0) + amount

    def totals(self) -> dict[Key, int]:
        with self._lock:
            shards = list(self._shards)
        totals: dict[Key, int] = {}
        for shard in shards:
            for key, count in dict(shard).items():
                totals[key] = totals.get(key, 0) + count
        return totals


class TallyCollector:
    """The shared per-protocol counters, from the tallies, in Prometheus's shape."""

    def __init__(self, tallies: Tallies, protocols: Callable[[], list[str]]) -> None:
        self._tallies = tallies
        self._protocols = protocols

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(name, text, labels=["protocol", *filter(None, [label])])
                for name, text, label in _FAMILIES.values()]

    def collect(self) -> Iterator[Metric]:
        totals = self._tallies.totals()
        for protocol in self._protocols():  # errors and bytes from 0, so rate() works at once
            for family in ("errors", "sent"):
                totals.setdefault((family, protocol, ""), 0)
        for family, (name, text, label) in _FAMILIES.items():
            metric = CounterMetricFamily(name, text, labels=["protocol", *filter(None, [label])])
            for (which, protocol, kind), count in sorted(totals.items()):
                if which == family:
                    metric.add_metric([protocol, *filter(None, [kind])], count)
            yield metric


class ProtocolMetrics:
    """What one protocol's service counts: each method is the one line at the event."""

    def __init__(self, metrics: Metrics, protocol: str) -> None:
        self.protocol = protocol
        self._metrics = metrics
        self._add = metrics.tallies.add

    def request(self, kind: str) -> None:
        self._add(("requests", self.protocol, kind))

    def reply(self, kind: str, size: int = 0) -> None:
        """An answer sent, and its bytes on the wire (datagram protocols)."""
        self._add(("replies", self.protocol, kind))
        if size:
            self._add(("sent", self.protocol, ""), size)

    def drop(self, reason: str) -> None:
        self._add(("drops", self.protocol, reason))

    def error(self) -> None:
        self._add(("errors", self.protocol, ""))

    def sent(self, size: int) -> None:
        self._add(("sent", self.protocol, ""), size)

    def active(self, count: Callable[[], int]) -> None:
        """Report ``count()`` as this protocol's active sessions at every scrape (pull)."""
        self._metrics.active.labels(self.protocol).set_function(count)


class TftpMetrics(ProtocolMetrics):
    """TFTP adds what each transfer's :class:`~pxeserver.tftp.session.Stats` counted."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__(metrics, "tftp")
        registry = metrics.registry
        self._duration = Histogram("pxeserver_tftp_transfer_duration_seconds",
                                   "Completed TFTP transfers, from the request to the last ACK",
                                   buckets=TRANSFER_BUCKETS, registry=registry)
        self._timeouts = Counter("pxeserver_tftp_timeouts",
                                 "TFTP retransmit timers that expired (a lost block or ACK, or a gone client)",
                                 registry=registry)
        self._resent = Counter("pxeserver_tftp_retransmitted_blocks", "TFTP DATA blocks sent again",
                               registry=registry)
        self._wrong_tid = Counter("pxeserver_tftp_wrong_tid_packets",
                                  "Packets to a transfer's port from another address or port (answered ERROR 5)",
                                  registry=registry)
        self._outcomes = Counter("pxeserver_tftp_transfers", "Ended TFTP transfers by outcome",
                                 ["outcome"], registry=registry)
        for outcome in ("completed", "abandoned"):
            self._outcomes.labels(outcome)

    def ended(self, session: Session) -> None:
        """Account a finished or abandoned transfer; called once, when it is closed."""
        stats = session.stats
        delivered = min(session.acked * session.blksize, session.source.size)
        self.sent(delivered)
        self._timeouts.inc(stats.timeouts)
        self._resent.inc(stats.retransmits)
        self._wrong_tid.inc(stats.wrong_tid)
        if session.completed:
            self._outcomes.labels("completed").inc()
            self._duration.observe(stats.finished - stats.started)
        else:
            self._outcomes.labels("abandoned").inc()


class RegistryCollector:
    """Whether the registry database answers, and hosts by status, profiles and leases, read
    from the registry when Prometheus scrapes. While the database is away and this node has
    no last known counts, only the first two are exposed: the scrape itself still works."""

    def __init__(self, size: Callable[[], Tally], contact: Callable[[], Contact]) -> None:
        self._size = size
        self._contact = contact

    def describe(self) -> list[Metric]:
        return []  # no registry read when the collector is registered

    def collect(self) -> Iterator[Metric]:
        contact = self._contact()
        yield GaugeMetricFamily("pxeserver_registry_up", "1 while the registry database answers this "
                                "node, 0 while it serves its last known state", value=int(contact.up))
        yield GaugeMetricFamily("pxeserver_registry_last_contact_timestamp_seconds",
                                "When the registry database last answered this node (Unix time)",
                                value=contact.last)
        try:
            size = self._size()
        except Unavailable:
            return
        hosts = GaugeMetricFamily("pxeserver_hosts", "Registered hosts by install status", labels=["status"])
        for status in Status:
            hosts.add_metric([status.value], size.hosts.get(status, 0))
        yield hosts
        yield GaugeMetricFamily("pxeserver_profiles", "Boot profiles in the registry", value=size.profiles)
        yield GaugeMetricFamily("pxeserver_dhcp_leases", "Unexpired dynamic DHCP leases", value=size.leases)


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.tallies = Tallies()
        self._protocols: dict[str, ProtocolMetrics] = {}
        self._lock = threading.Lock()
        registry.register(TallyCollector(self.tallies, lambda: sorted(self._protocols)))
        self.active = Gauge("pxeserver_active_sessions",
                            "TFTP transfers, HTTP connections and DNS TCP connections open now",
                            ["protocol"], registry=registry)
        self.http_duration = Histogram("pxeserver_http_request_duration_seconds",
                                       "HTTP requests, until the response is handed to the server "
                                       "(a /boot/ body is then sent by the kernel)", ["path"],
                                       buckets=REQUEST_BUCKETS, registry=registry)
        self.lifecycle = Counter("pxeserver_lifecycle_steps",
                                 "Hosts that entered an install status in this server process",
                                 ["status"], registry=registry)
        for status in Status:
            self.lifecycle.labels(status.value)
        self._queue_drops = Counter("pxeserver_queue_drops",
                                    "Timeline events and host status changes lost: their queue to the "
                                    "registry was full, or the registry refused them", ["queue"],
                                    registry=registry)
        for queue in QUEUES:
            self._queue_drops.labels(queue)
        self.install_duration = Histogram("pxeserver_install_duration_seconds",
                                          "Installs, from registered (or netboot turned on) to installed",
                                          buckets=INSTALL_BUCKETS, registry=registry)
        # Label: a path an import recorded (a fixed set the registry holds, never a request's).
        self._boot_file_refusals = Counter("pxeserver_boot_file_refusals",
                                           "Requests for a recorded kernel or initrd refused because this "
                                           "node's copy differs from the registry's checksum", ["file"],
                                           registry=registry)
        self._boot_files_mismatched = Gauge("pxeserver_boot_files_mismatched",
                                            "Recorded kernels and initrds whose copy on this node differs "
                                            "from the registry's checksum", registry=registry)

    def protocol(self, name: str) -> ProtocolMetrics:
        return self._get(name, lambda: ProtocolMetrics(self, name))

    def tftp(self) -> TftpMetrics:
        metrics = self._get("tftp", lambda: TftpMetrics(self))
        assert isinstance(metrics, TftpMetrics)
        return metrics

    def _get(self, name: str, make: Callable[[], ProtocolMetrics]) -> ProtocolMetrics:
        with self._lock:
            if name not in self._protocols:
                self._protocols[name] = make()
            return self._protocols[name]

    def step(self, status: Status, install_seconds: float | None = None) -> None:
        """A host entered ``status``; an install that ended says how long it took."""
        self.lifecycle.labels(status.value).inc()
        if install_seconds is not None:
            self.install_duration.observe(install_seconds)

    def queue_drop(self, queue: str) -> Callable[[int], None]:
        """What a queue in front of the registry calls with the number of items it lost."""
        assert queue in QUEUES, queue
        return self._queue_drops.labels(queue).inc

    def watch_registry(self, size: Callable[[], Tally], contact: Callable[[], Contact]) -> None:
        self.registry.register(RegistryCollector(size, contact))

    def boot_file_refused(self, path: str) -> None:
        self._boot_file_refusals.labels(path).inc()

    def watch_boot_files(self, mismatched: Callable[[], int]) -> None:
        """Report ``mismatched()`` as the count of bad boot-file copies at every scrape (pull)."""
        self._boot_files_mismatched.set_function(mismatched)


# -- label values, from fixed sets ----------------------------------------------------------

def dhcp_type(code: int | None) -> str:
    return _DHCP_TYPES.get(code or 0, "other")


def dhcp_reply_type(payload: bytes) -> str:
    """The message type of a reply built by dhcp.codec.encode, which puts option 53 first."""
    if len(payload) > 242 and payload[240] == 53 and payload[241] == 1:
        return dhcp_type(payload[242])
    return "other"


def dns_rcode(message: bytes) -> str:
    return _DNS_RCODES.get(message[3] & 0x0F, "other") if len(message) >= 4 else "other"


def http_path(path: str) -> str:
    """``/ks/00-16-3e-...`` is ``ks``: the first path segment when it is one pxeserver serves."""
    first = path.lstrip("/").split("/", 1)[0]
    return first if first in _HTTP_PATHS else "other"
