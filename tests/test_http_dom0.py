"""GET /dom0/pypxeboot: a dom0 installs pypxeboot with one curl and checks it against the CLI."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from http_support import curl, running

from pxeserver import dom0
from pxeserver.app import Context
from pxeserver.web import dom0 as web_dom0

BARE_PYTHON = "/usr/bin/python3"  # the dom0's own: nothing of pxeserver's stack


@pytest.fixture
def base(ctx: Context) -> Iterator[str]:
    with running(ctx):
        yield ctx.config.http_base_url


@pytest.mark.skipif(not Path(BARE_PYTHON).exists(), reason="needs the system python3")
def test_curl_fetches_the_zipapp_that_runs_bare_and_matches_the_cli_checksum(base: str, tmp_path: Path) -> None:
    fetched = tmp_path / "fetched"
    reply = curl(f"{base}/dom0/pypxeboot")
    data = reply.body
    fetched.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/octet-stream"
    assert reply.headers["content-disposition"] == "attachment; filename=pypxeboot"
    assert reply.headers["x-checksum-sha256"] == digest
    assert reply.headers["etag"] == f'"{digest}"'
    assert int(reply.headers["content-length"]) == len(data)
    assert data.startswith(b"#!/usr/bin/python3 -IS\n")

    fetched.chmod(0o755)
    ran = subprocess.run([str(fetched), "--help"], capture_output=True, text=True,
                         timeout=60, stdin=subprocess.DEVNULL)
    assert ran.returncode == 0, ran.stderr
    assert "usage: pypxeboot" in ran.stdout

    built = tmp_path / "built"
    cli = subprocess.run([sys.executable, "-m", "pxeserver", "build-pypxeboot", "-o", str(built), "--print-sha256"],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout == f"{digest}  {built}\n"  # sha256sum's format: `sha256sum -c` reads it
    assert built.read_bytes() == data
    check = subprocess.run(["sha256sum", "-c", "-"], input=cli.stdout, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_fetch_with_the_current_etag_gets_304_and_no_body(base: str) -> None:
    first = curl(f"{base}/dom0/pypxeboot")
    again = curl(f"{base}/dom0/pypxeboot", "-H", f"If-None-Match: {first.headers['etag']}")
    assert (again.status, again.body) == (304, b"")
    stale = curl(f"{base}/dom0/pypxeboot", "-H", 'If-None-Match: "0000"')
    assert stale.status == 200 and stale.body == first.body


def test_many_dom0s_at_once_share_one_build(base: str, monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[int] = []

    def counted_build() -> dom0.Archive:
        builds.append(1)
        return dom0.pypxeboot_archive()

    web_dom0._built.cache_clear()
    monkeypatch.setattr(web_dom0, "pypxeboot_archive", counted_build)
    replies: list[bytes] = []

    def fetch() -> None:
        replies.append(curl(f"{base}/dom0/pypxeboot").body)

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(builds) == 1
    assert len(replies) == 8 and len(set(replies)) == 1
    assert hashlib.sha256(replies[0]).hexdigest() == curl(f"{base}/dom0/pypxeboot").headers["x-checksum-sha256"]
    web_dom0._built.cache_clear()  # the next test builds with the real function again


def test_serve_pypxeboot_false_leaves_the_route_out(ctx: Context) -> None:
    ctx.config.http.serve_pypxeboot = False
    with running(ctx):
        assert curl(f"{ctx.config.http_base_url}/dom0/pypxeboot").status == 404
