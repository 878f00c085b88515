"""Shared fixtures: a registry and its boot policy on a temporary data directory.

The registry is SQLite unless the test runs against both stores: a module with
``pytestmark = pytest.mark.both_stores`` runs each test that uses ``config``, ``ctx`` or
``store_kind`` once per store, the PostgreSQL run on a new database in a throwaway cluster the
session starts (tests/pg_support.py). ``PXESERVER_TEST_STORES=sqlite,postgresql`` runs every
test against both.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pg_support
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


STORES = ("sqlite", "postgresql")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "both_stores: run the module's registry tests against "
                                       "SQLite and PostgreSQL")
    # Tests Ctrl-C their children (import, lab) as a terminal would. A run started as a shell's
    # background job has SIGINT ignored, and children inherit an ignored signal, so Python in
    # them would never raise KeyboardInterrupt; a handler here is reset to the default by exec.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store_kind" not in metafunc.fixturenames:
        return
    chosen = os.environ.get("PXESERVER_TEST_STORES", "")
    if chosen:
        kinds = [kind for kind in chosen.split(",") if kind in STORES]
    elif metafunc.definition.get_closest_marker("both_stores"):
        kinds = list(STORES)
    else:
        kinds = ["sqlite"]
    metafunc.parametrize("store_kind", kinds)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[pg_support.Cluster]:
    """One PostgreSQL server for the whole session; each test gets its own database."""
    if not pg_support.available():
        pytest.skip("PostgreSQL is not installed (Debian package postgresql)")
    cluster = pg_support.Cluster()
    yield cluster
    cluster.destroy()


@pytest.fixture
def database(store_kind: str, request: pytest.FixtureRequest) -> str:
    """``[server] database`` for a new empty registry of the kind under test: a PostgreSQL URL,
    or empty for the default SQLite file under the data directory."""
    if store_kind == "postgresql":
        return request.getfixturevalue("pg_cluster").new_database()
    return ""


def make_config(root: Path, database: str = "") -> Config:
    """Defaults pointed at a data dir and TFTP root under ``root``, services on loopback port 0."""
    cfg = Config(base_dir=root)
    cfg.server.address = "127.0.0.1"
    cfg.server.data_dir = str(root / "var")
    cfg.server.database = database
    cfg.server.tftp_root = str(root / "tftproot")
    cfg.server.kickstarts = str(REPO / "kickstarts")
    cfg.server.preseeds = str(REPO / "preseeds")
    for section in (cfg.tftp, cfg.http, cfg.dns):
        section.address = "127.0.0.1"
        section.port = 0
    (root / "tftproot" / "pxelinux.cfg").mkdir(parents=True)
    (root / "tftproot" / "images").mkdir()
    return cfg


@pytest.fixture
def config(tmp_path: Path, database: str) -> Config:
    return make_config(tmp_path, database)


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
