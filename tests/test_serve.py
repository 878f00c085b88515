"""`pxeserver serve` as a user runs it: start-up banner, clean signals, durable writes."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

from pxeserver.mac import MacAddress
from pxeserver.registry import SqliteStore


def start_server(tmp_path: Path, extra: str = "", server: str = "",
                 **ports: int) -> tuple[subprocess.Popen[str], list[str]]:
    """`pxeserver serve` on loopback with these ports; ``server``: more of its [server] section,
    ``extra``: more sections of its config file."""
    (tmp_path / "pxeserver.toml").write_text(
        f'[server]\naddress = "127.0.0.1"\n{server}'
        f'[tftp]\naddress = "127.0.0.1"\nport = {ports["tftp"]}\n'
        f'[http]\naddress = "127.0.0.1"\nport = {ports["http"]}\n' + extra
    )
    process = subprocess.Popen([sys.executable, "-m", "pxeserver", "serve"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    banner: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        banner.append(line.rstrip())
        if line.startswith("pxeserver: next:"):
            return process, banner
    process.kill()
    raise AssertionError(f"server did not start: {banner} {process.stderr.read()}")


def post(url: str, body: dict) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def ports() -> dict[str, int]:
    return {"tftp": free_port(socket.SOCK_DGRAM), "http": free_port()}  # TFTP is UDP only


def test_banner_says_where_each_service_listens_and_sigterm_exits_cleanly(tmp_path, ports) -> None:
    process, banner = start_server(tmp_path, **ports)
    text = "\n".join(banner)
    assert f"tftp listening on tftp://127.0.0.1:{ports['tftp']}" in text
    assert f"http listening on http://127.0.0.1:{ports['http']}" in text
    assert f"dashboard at http://127.0.0.1:{ports['http']}/" in text
    assert f"registry SQLite {tmp_path / 'var' / 'registry.db'}" in text
    command = re.search(r"next: (.+?) profile add", text).group(1)
    listed = subprocess.run([*shlex.split(command), "profile", "list"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and listed.stdout.startswith("NAME"), "the suggested command must run"
    assert "WARNING" not in text, "loopback-only API needs no token warning"
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/api/hosts", timeout=10) as response:
        assert json.load(response) == []
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0
    assert "Traceback" not in process.stderr.read()


def test_banner_names_a_postgresql_registry_without_its_password(tmp_path, ports, pg_cluster) -> None:
    url = pg_cluster.new_database().replace("pxeserver@", "pxeserver:s3cret@")
    process, banner = start_server(tmp_path, server=f'database = "{url}"\n', **ports)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0
    text = "\n".join(banner) + process.stderr.read()
    assert f"registry PostgreSQL 127.0.0.1:{pg_cluster.port}/" in text
    assert "s3cret" not in text


def test_sigint_exits_cleanly_too(tmp_path, ports) -> None:
    process, _ = start_server(tmp_path, **ports)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=20) == 0
    assert "Traceback" not in process.stderr.read()


def test_kill_9_during_bulk_registration_keeps_every_acknowledged_host(tmp_path, ports) -> None:
    process, _ = start_server(tmp_path, **ports)
    base = f"http://127.0.0.1:{ports['http']}/api"
    assert post(f"{base}/profiles", {"name": "deb", "kernel": "k", "initrd": "i"}) == 201
    acknowledged: list[str] = []

    def register() -> None:
        for i in range(5000):
            mac = f"00:16:3e:00:{i >> 8:02x}:{i & 0xFF:02x}"
            try:
                if post(f"{base}/hosts", {"mac": mac, "hostname": f"h{i}", "profile": "deb"}) == 201:
                    acknowledged.append(mac)
            except (urllib.error.URLError, ConnectionError):
                return

    writers = [threading.Thread(target=register)]
    writers[0].start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 150 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)  # while registrations are in flight
    writers[0].join(timeout=30)
    process.wait(timeout=10)
    assert len(acknowledged) >= 100
    store = SqliteStore(tmp_path / "var" / "registry.db")
    stored = {str(m) for m in store.macs()}
    assert set(acknowledged) <= stored
    restarted, _ = start_server(tmp_path, **ports)
    try:
        with urllib.request.urlopen(f"{base}/hosts", timeout=10) as response:
            listed = {h["mac"] for h in json.load(response)}
        assert set(acknowledged) <= listed
        for mac in acknowledged[:5]:
            path = tmp_path / "tftproot" / "pxelinux.cfg" / MacAddress.parse(mac).pxelinux_name
            assert path.read_text().startswith("#")
    finally:
        restarted.terminate()
        restarted.wait(timeout=20)


def test_a_bad_service_setting_is_one_line_and_exit_1(tmp_path, ports) -> None:
    (tmp_path / "pxeserver.toml").write_text(
        f'[tftp]\naddress = "127.0.0.1"\nport = {ports["tftp"]}\n'
        f'[http]\naddress = "127.0.0.1"\nport = {ports["http"]}\n'
        '[dhcp]\nenabled = true\ninterface = "lo"\npool_start = "10.0.0.50"\npool_end = "10.0.0.10"\n'
    )
    result = subprocess.run([sys.executable, "-m", "pxeserver", "serve"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == ("pxeserver: error: pxeserver.toml: [dhcp] pool_end must be at least "
                             "pool_start 10.0.0.50, not 10.0.0.10\n")
