"""Wires one configuration into the shared pieces every entry point needs."""

from __future__ import annotations

from dataclasses import dataclass, field

from pxeserver.bootconfig import BootConfigWriter
from pxeserver.config import Config
from pxeserver.metrics import Metrics
from pxeserver.policy import BootPolicy
from pxeserver.provisioning import Provisioning
from pxeserver.registry import Store, open_store
from pxeserver.service import Supervisor
from pxeserver.timeline import Timeline


@dataclass
class Context:
    config: Config
    store: Store
    timeline: Timeline
    policy: BootPolicy
    writer: BootConfigWriter
    provisioning: Provisioning
    metrics: Metrics
    supervisor: Supervisor = field(default_factory=Supervisor)  # the services' loops report to it

    def close(self) -> None:
        self.timeline.close()
        self.store.close()


def build(config: Config) -> Context:
    store = open_store(config.database)
    metrics = Metrics()
    timeline = Timeline(store, config.server.events_per_host, metrics.queue_drop("timeline"))
    policy = BootPolicy(store, config, timeline, metrics)
    metrics.watch_registry(policy.tally, policy.registry_contact)
    metrics.watch_boot_files(policy.boot_files.mismatched)
    writer = BootConfigWriter(config.tftp_root, policy)
    store.watch(writer.apply)  # other nodes' changes (a shared PostgreSQL registry)
    return Context(config, store, timeline, policy, writer, Provisioning(store, policy, writer), metrics)
