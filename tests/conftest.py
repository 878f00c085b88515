"""Shared fixtures: a registry and its boot policy on a temporary data directory."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest

from pxeserver import app
from pxeserver.config import Config
from pxeserver.service import Service

# Support modules whose fixtures (dns, client, start_server) every test module may request.
pytest_plugins = ["dhcp_support", "dns_support", "tftp_support"]

REPO = Path(__file__).resolve().parent.parent
ServiceT = TypeVar("ServiceT", bound=Service)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free on loopback right now, for services that need a fixed one."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """Defaults pointed at a temporary data dir and TFTP root, services on loopback port 0."""
    cfg = Config(base_dir=tmp_path)
    cfg.server.address = "127.0.0.1"
    cfg.server.data_dir = str(tmp_path / "var")
    cfg.server.tftp_root = str(tmp_path / "tftproot")
    cfg.server.kickstarts = str(REPO / "kickstarts")
    cfg.server.preseeds = str(REPO / "preseeds")
    for section in (cfg.tftp, cfg.http, cfg.dns):
        section.address = "127.0.0.1"
        section.port = 0
    (tmp_path / "tftproot" / "pxelinux.cfg").mkdir(parents=True)
    (tmp_path / "tftproot" / "images").mkdir()
    return cfg


@pytest.fixture
def ctx(config: Config) -> Iterator[app.Context]:
    context = app.build(config)
    yield context
    context.close()


@contextmanager
def started(service: ServiceT) -> Iterator[ServiceT]:
    """A protocol service started for the block and stopped after it, even on failure."""
    service.start()
    try:
        yield service
    finally:
        service.stop()
