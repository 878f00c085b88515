"""The read side the dashboard shows: hosts at a glance, one host in full, profiles, activity.

The web layer asks this, never the registry: it turns the store's rows into what a page
shows (status counts, stalled hosts, durations between boot steps) and renders a host's boot
config, autoinstall file and xl config without side effects, secrets masked as the API masks
them (``masked_vars`` with ``[api] secret_vars``; the install token never appears).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

from jinja2 import TemplateError

from pxeserver import domu, pxelinux
from pxeserver.autoinstall import AutoinstallRenderer
from pxeserver.bootfiles import file_status
from pxeserver.config import Config
from pxeserver.mac import MacAddress
from pxeserver.policy import BootPolicy
from pxeserver.registry import Event, Host, HostSummary, Profile, Status, Store
from pxeserver.registry.models import MASK, masked_vars
from pxeserver.timeline import Timeline

LIVE = (Status.NETBOOTING, Status.INSTALLING)  # states a host can stall in
STATUS_ORDER = {status: index for index, status in enumerate(Status)}
SORT_KEYS = ("hostname", "mac", "ip", "profile", "status", "last")
# What policy.advance and provisioning.install_done record, counted by the activity chart.
BOOT_MESSAGE = f"-> {Status.NETBOOTING.value}"
INSTALL_MESSAGE = "install complete"


@dataclass(frozen=True)
class HostRow:
    """One line of the hosts table."""

    mac: str
    hostname: str
    ip: str
    profile: str
    netboot: bool
    status: str
    last_time: float | None
    last_source: str
    last_message: str
    stalled: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class HostQuery:
    """Filter, sort and page of the hosts table, from the page's query string."""

    text: str = ""  # substring of hostname, MAC, IP or profile
    status: str = ""  # a Status value, "stalled", or empty for all
    sort: str = "hostname"
    descending: bool = False
    page: int = 1

    @classmethod
    def from_args(cls, args: Any) -> HostQuery:
        sort = args.get("sort", "hostname")
        status = args.get("status", "")
        try:
            page = max(1, int(args.get("page", "1")))
        except ValueError:
            page = 1
        return cls(
            text=args.get("q", "").strip().lower()[:100],
            status=status if status in {*(s.value for s in Status), "stalled"} else "",
            sort=sort if sort in SORT_KEYS else "hostname",
            descending=args.get("order") == "desc",
            page=page,
        )


@dataclass(frozen=True)
class HostsPage:
    rows: list[HostRow]
    total: int  # hosts matching the filter
    page: int
    pages: int
    counts: dict[str, int]  # every host by status, and "stalled", "all"


@dataclass(frozen=True)
class TimelineStep:
    event: Event
    since_previous: float | None  # seconds since the step before
    since_start: float  # seconds since the first step shown


@dataclass(frozen=True)
class HostDetail:
    host: dict[str, Any]  # as the API shows it (secrets masked)
    row: HostRow
    steps: list[TimelineStep]
    boot_config: str
    autoinstall: str  # the rendered file with secrets masked, or why there is none
    autoinstall_name: str
    xl_config: str


@dataclass(frozen=True)
class ProfileFile:
    role: str  # kernel or initrd
    path: str
    size: int | None  # None: not published under the TFTP root
    checksum: str  # what is known about its checksum


@dataclass(frozen=True)
class ProfileSummary:
    profile: dict[str, Any]  # as the API shows it (secrets masked)
    files: list[ProfileFile]
    hosts: list[str]  # hostnames using it
    autoinstall_kind: str


def _ip_key(ip: str | None) -> tuple[int, ...]:
    """Numeric order of stored (validated) dotted quads; hosts without an IP first."""
    return tuple(map(int, ip.split("."))) if ip else ()


class Overview:
    def __init__(self, store: Store, policy: BootPolicy, timeline: Timeline, config: Config) -> None:
        self.store = store
        self.policy = policy
        self.timeline = timeline
        self.config = config
        self.renderer = AutoinstallRenderer(config)

    # -- hosts ----------------------------------------------------------------------------

    def stalled(self, summary: HostSummary, now: float) -> bool:
        last = summary.last_event
        return (summary.status in LIVE and summary.netboot
                and now - (last.time if last else 0) > self.config.dashboard.stalled_after)

    def row(self, summary: HostSummary, now: float) -> HostRow:
        last = summary.last_event
        return HostRow(
            mac=str(summary.mac), hostname=summary.hostname, ip=summary.ip or "",
            profile=summary.profile, netboot=summary.netboot, status=summary.status.value,
            last_time=last.time if last else None, last_source=last.source if last else "",
            last_message=last.message if last else "", stalled=self.stalled(summary, now),
        )

    def _summaries(self) -> list[HostSummary]:
        self.timeline.flush()  # steps recorded just before show up
        return self.store.host_summaries()

    def hosts_page(self, query: HostQuery) -> HostsPage:
        """One page of the table; rows are built for that page only (10,000 hosts are
        filtered and sorted as the store's light summaries)."""
        now, summaries = time.time(), self._summaries()
        stalled = {id(s) for s in summaries if self.stalled(s, now)} if query.status == "stalled" else set()
        text, status = query.text, query.status
        chosen = [
            s for s in summaries
            if (not text or text in s.hostname or text in s.mac.packed.hex(":")
                or text in (s.ip or "") or text in s.profile.lower())
            and (not status or s.status.value == status
                 or (status == "stalled" and id(s) in stalled))
        ]
        key = {
            "hostname": lambda s: s.hostname, "mac": lambda s: s.mac,
            "ip": lambda s: _ip_key(s.ip), "profile": lambda s: (s.profile, s.hostname),
            "status": lambda s: (STATUS_ORDER[s.status], s.hostname),
            "last": lambda s: s.last_event.time if s.last_event else 0.0,
        }[query.sort]
        chosen.sort(key=key, reverse=query.descending)
        size = self.config.dashboard.page_size
        pages = max(1, -(-len(chosen) // size))
        page = min(query.page, pages)
        rows = [self.row(s, now) for s in chosen[(page - 1) * size: page * size]]
        return HostsPage(rows, len(chosen), page, pages, self.status_counts())

    def status_counts(self) -> dict[str, int]:
        """As the hosts page counts, in one query: for live updates at 10,000 hosts."""
        counts = self.store.status_counts(time.time() - self.config.dashboard.stalled_after)
        return counts | {"all": sum(v for k, v in counts.items() if k != "stalled")}

    def live_rows(self, events: list[Event]) -> dict[str, HostRow]:
        """The current rows of the hosts these just-stored events are of (those still
        registered), each with its newest event among them, for a live update."""
        now, newest, found = time.time(), {event.mac: event for event in events}, {}
        for mac, event in newest.items():
            host = self.policy.host(mac)
            if host is not None:
                summary = HostSummary(host.mac, host.hostname, host.ip, host.profile,
                                      host.netboot, host.status, event)
                found[str(mac)] = self.row(summary, now)
        return found

    # -- one host -------------------------------------------------------------------------

    def host_detail(self, mac: MacAddress) -> HostDetail:
        host = self.store.get_host(mac)
        events = self.timeline.events(mac)
        steps, previous = [], None
        for event in events:
            steps.append(TimelineStep(event, None if previous is None else event.time - previous,
                                      event.time - events[0].time))
            previous = event.time
        summary = HostSummary(host.mac, host.hostname, host.ip, host.profile, host.netboot,
                              host.status, events[-1] if events else None)
        name, text = self._masked_autoinstall(host)
        return HostDetail(
            host=host.to_dict(self.config.api.secret_vars),
            row=self.row(summary, time.time()),
            steps=steps,
            boot_config=pxelinux.render(self.policy.host_spec(host),
                                        comment=f"{host.hostname} ({host.mac}), written by pxeserver"),
            autoinstall=text,
            autoinstall_name=name,
            xl_config=domu.render_for(self.config, host),
        )

    def _masked_autoinstall(self, host: Host) -> tuple[str, str]:
        """The host's kickstart or preseed as its installer would get it, with every secret
        variable and the install token replaced by the mask; (template name, text)."""
        profile = self.policy.profile(host.profile)
        if profile is None:
            return "", f"profile {host.profile!r} does not exist"
        kind = self.policy.autoinstall_kind(profile.autoinstall)
        if kind is None:
            return profile.autoinstall, "this profile has no kickstart or preseed template"
        secret = self.config.api.secret_vars
        shown_host = replace(host, vars=masked_vars(host.vars, secret),
                             install_token=MASK if host.install_token else "")
        shown_profile = replace(profile, vars=masked_vars(profile.vars, secret))
        try:
            return profile.autoinstall, self.renderer.render(kind, shown_host, shown_profile)
        except (TemplateError, OSError) as exc:
            return profile.autoinstall, f"the template failed to render: {type(exc).__name__}: {exc}"

    # -- profiles -------------------------------------------------------------------------

    def profiles(self) -> list[ProfileSummary]:
        users: dict[str, list[str]] = {}
        for summary in self.store.host_summaries():
            users.setdefault(summary.profile, []).append(summary.hostname)
        return [self._profile_summary(p, sorted(users.get(p.name, [])))
                for p in self.store.list_profiles()]

    def profile(self, name: str) -> ProfileSummary:
        profile = self.store.get_profile(name)
        users = [s.hostname for s in self.store.host_summaries() if s.profile == name]
        return self._profile_summary(profile, sorted(users))

    def _profile_summary(self, profile: Profile, hosts: list[str]) -> ProfileSummary:
        kind = self.policy.autoinstall_kind(profile.autoinstall)
        return ProfileSummary(
            profile=profile.to_dict(self.config.api.secret_vars),
            files=[self._file("kernel", profile.kernel), self._file("initrd", profile.initrd)],
            hosts=hosts,
            autoinstall_kind=kind.value if kind else "",
        )

    def _file(self, role: str, path: str) -> ProfileFile:
        """A profile's file as TFTP and /boot/ would publish it (size None: they would not),
        and whether it still matches the checksum its import recorded."""
        status = file_status(self.config.tftp_root, path, self.store)
        if not status["served"]:
            return ProfileFile(role, path, None, "missing")
        checksum = {None: "no checksum recorded", True: "matches its import",
                    False: "CHANGED since its import"}[status["matches"]]
        return ProfileFile(role, path, status["size"], checksum)

    # -- activity -------------------------------------------------------------------------

    def recent_events(self, limit: int = 200) -> list[Event]:
        self.timeline.flush()
        return self.store.recent_events(0.0, limit)

    def chart(self, hours: int = 24, bucket: int = 600, now: float | None = None) -> dict[str, Any]:
        """Boots (moves to netbooting) and completed installs per ``bucket`` seconds over the
        last ``hours``, as uPlot's columns: times, boots, installs."""
        now = time.time() if now is None else now
        start = (now - hours * 3600) // bucket * bucket
        count = int((now - start) // bucket) + 1
        times = [start + i * bucket for i in range(count)]
        boots, installs = [0.0] * count, [0.0] * count
        for event in self.store.recent_events(start, limit=100_000):
            index = int((event.time - start) // bucket)
            if not 0 <= index < count:
                continue
            if event.source == "policy" and event.message.endswith(BOOT_MESSAGE):
                boots[index] += 1
            elif event.source == "callback" and event.message.startswith(INSTALL_MESSAGE):
                installs[index] += 1
        return {"times": times, "boots": boots, "installs": installs, "bucket": bucket}

    def profile_names(self) -> list[str]:
        return [p.name for p in self.store.list_profiles()]
