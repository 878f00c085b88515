"""The install lifecycle end to end over HTTP with curl, and a table of bad inputs.

registered -> netbooting (iPXE script served) -> installing (kickstart served) -> installed
(the kickstart's own %post callback line, run by sh) -> boots locally; a reused or wrong
token changes nothing; netboot on again starts a new install with a new token.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from http_support import MAC, PROFILE, Reply, curl, post_json, running

from pxeserver.app import Context

pytestmark = pytest.mark.both_stores  # registry behaviour: SQLite and PostgreSQL

DASHED = MAC.replace(":", "-")


@pytest.fixture
def base(ctx: Context) -> Iterator[str]:
    images = ctx.config.tftp_root / "images" / "centos5"
    images.mkdir(parents=True)
    (images / "vmlinuz").write_bytes(b"kernel")
    (images / "initrd.img").write_bytes(b"initrd")
    with running(ctx):
        yield ctx.config.http_base_url


def host_state(base: str) -> dict:
    reply = curl(f"{base}/api/hosts/{MAC}")
    assert reply.status == 200
    return json.loads(reply.body)


def callback_command(kickstart: str) -> str:
    """The line of the served kickstart's %post that tells pxeserver the install is done."""
    post = kickstart.split("\n%post\n", 1)[1]
    return next(line for line in post.splitlines() if "/installed?token=" in line)


def run_callback(command: str) -> None:
    """Run it as the installer would: the kickstart's own shell line."""
    subprocess.run(["sh", "-c", command], check=True, timeout=30, capture_output=True)


def pxelinux_file(ctx: Context) -> str:
    return (ctx.config.tftp_root / "pxelinux.cfg" / f"01-{DASHED}").read_text()


def register(base: str) -> None:
    """The host, registered at 127.0.0.1: curl and the kickstart's own callback line run here."""
    assert post_json(f"{base}/api/profiles", json.dumps(PROFILE)).status == 201
    added = post_json(f"{base}/api/hosts", json.dumps(
        {"mac": "00-16-3E-12-34-56", "hostname": "web1", "profile": "centos5", "ip": "127.0.0.1"}))
    assert added.status == 201, added.text


def test_install_lifecycle_end_to_end(ctx: Context, base: str) -> None:
    register(base)
    assert host_state(base)["status"] == "registered"
    assert "kernel images/centos5/vmlinuz" in pxelinux_file(ctx)

    script = curl(f"{base}/ipxe/{DASHED}")
    assert f"kernel {base}/boot/images/centos5/vmlinuz" in script.text
    assert host_state(base)["status"] == "netbooting"

    kickstart = curl(f"{base}/ks/{MAC.upper()}")
    assert kickstart.status == 200 and "kernel-xen" in kickstart.text
    assert host_state(base)["status"] == "installing"
    first_callback = callback_command(kickstart.text)

    run_callback(first_callback)
    state = host_state(base)
    assert state["status"] == "installed" and state["netboot"] is False
    assert "localboot 0" in pxelinux_file(ctx) and "vmlinuz" not in pxelinux_file(ctx)
    assert curl(f"{base}/ipxe/{DASHED}").text == "#!ipxe\nexit\n"

    # The same callback again (a replayed or re-run %post): refused, nothing changes.
    url = first_callback.split("'")[-2]
    assert curl(url, "-X", "POST").status == 403
    assert host_state(base)["status"] == "installed"

    # Reinstall: netboot on again means a new install with a new token.
    patched = post_json(f"{base}/api/hosts/{MAC}", '{"netboot": true}', method="PATCH")
    assert patched.status == 200 and json.loads(patched.body)["status"] == "registered"
    assert "kernel images/centos5/vmlinuz" in pxelinux_file(ctx)
    second_callback = callback_command(curl(f"{base}/ks/{DASHED}").text)
    assert second_callback != first_callback
    assert curl(url, "-X", "POST").status == 403
    assert host_state(base)["status"] == "installing"
    run_callback(second_callback)
    assert host_state(base)["status"] == "installed"

    events = json.loads(curl(f"{base}/api/hosts/{MAC}/events").body)
    sources = [event["source"] for event in events]
    assert {"api", "http", "callback"} <= set(sources)
    assert [e["time"] for e in events] == sorted(e["time"] for e in events)
    messages = " / ".join(event["message"] for event in events)
    assert "served kickstart centos5-xen-pv.ks" in messages and "served iPXE script" in messages
    assert "refused install-complete call" in messages


def snapshot(ctx: Context, base: str) -> tuple[bytes, bytes, str]:
    return curl(f"{base}/api/hosts").body, curl(f"{base}/api/profiles").body, pxelinux_file(ctx)


OTHER = "00:16:3e:65:43:21"


@pytest.mark.parametrize("method, path, body, expected", [
    # traversal
    ("GET", "/boot/../../../etc/passwd", None, {404}),
    ("GET", "/boot/%2e%2e/%2e%2e/%2e%2e/etc/passwd", None, {404}),
    ("GET", "/ks/..%2f..%2fetc%2fpasswd", None, {404}),
    ("GET", "/preseed/../kickstarts/centos5-xen-pv.ks", None, {404}),
    # template injection through every host field the API accepts
    ("POST", "/api/hosts", {"mac": OTHER, "hostname": "{{7*7}}", "profile": "centos5"}, {400}),
    ("POST", "/api/hosts", {"mac": "{{7*7}}", "hostname": "web2", "profile": "centos5"}, {400}),
    ("POST", "/api/hosts", {"mac": OTHER, "hostname": "web2", "profile": "{{7*7}}"}, {400}),
    ("POST", "/api/hosts", {"mac": OTHER, "hostname": "web2", "profile": "centos5", "ip": "{{7*7}}"}, {400}),
    ("POST", "/api/hosts", {"mac": OTHER, "hostname": "web2", "profile": "centos5",
                            "vars": {"{{x}}": 1}}, {400}),
    ("POST", "/api/hosts", {"mac": OTHER, "hostname": "web2", "profile": "centos5",
                            "xen": {"bridge": "{{7*7}}"}}, {400}),
    ("PATCH", f"/api/hosts/{MAC}", {"hostname": "web1\n%post"}, {400}),
    ("PATCH", f"/api/hosts/{MAC}", {"hostname": "{% raw %}"}, {400}),
    # malformed MACs on every per-host endpoint
    ("GET", "/ks/00:16:3e:12:34", None, {400}),
    ("GET", "/preseed/zz:16:3e:12:34:56", None, {400}),
    ("GET", "/ipxe/00:16:3e:12:34:56:78", None, {400}),
    ("GET", f"/api/hosts/{'9' * 100}", None, {400}),
    ("POST", "/api/hosts/00.16.3e.12.34.56/installed?token=x", None, {400}),
    ("PATCH", "/api/hosts/00163e12345/", {"netboot": False}, {400, 404}),
    # wrong tokens
    ("POST", f"/api/hosts/{MAC}/installed?token=wrong", None, {403}),
    ("POST", f"/api/hosts/{MAC}/installed", None, {403}),
    ("POST", f"/api/hosts/{MAC}/installed?token=", None, {403}),
    ("POST", f"/api/hosts/{MAC}/installed", {"token": "wrong"}, {403}),
    ("POST", f"/api/hosts/{MAC}/installed", {"token": ["a", "list"]}, {403}),
    ("POST", f"/api/hosts/{OTHER}/installed?token=wrong", None, {404}),
    # oversized bodies
    ("POST", "/api/hosts", {"mac": OTHER, "hostname": "web2", "profile": "centos5",
                            "vars": {"blob": "x" * 300_000}}, {413}),
    ("POST", f"/api/hosts/{MAC}/installed?token=wrong", {"pad": "x" * 2_000_000}, {413}),
    ("PATCH", f"/api/hosts/{MAC}", {"vars": {"v": "y" * 70_000}}, {400}),
])
def test_bad_input_gets_the_right_status_and_changes_nothing(
        ctx: Context, base: str, tmp_path: Path, method: str, path: str, body: object,
        expected: set[int]) -> None:
    register(base)
    curl(f"{base}/ks/{MAC}")  # an install in progress, with a live token to protect
    before = snapshot(ctx, base)
    args = ["-X", method]
    if body is not None:
        (tmp_path / "body.json").write_text(json.dumps(body))
        args += ["-H", "Content-Type: application/json", "--data-binary", f"@{tmp_path / 'body.json'}"]
    reply: Reply = curl(base + path, *args)
    assert reply.status in expected, reply.text
    assert b"Traceback" not in reply.body
    assert snapshot(ctx, base) == before
    assert host_state(base)["status"] == "installing"
