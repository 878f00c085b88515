"""The HTTP service with curl as the client: /boot/ files, iPXE scripts, start and stop."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from http_support import MAC, PROFILE, curl, running

from pxeserver.app import Context
from pxeserver.mac import MacAddress
from pxeserver.published import Published
from pxeserver.registry import BootFile, Status
from pxeserver.web import files
from pxeserver.web.server import HttpService


@pytest.fixture
def kernel(ctx: Context) -> bytes:
    data = os.urandom(300_000)
    directory = ctx.config.tftp_root / "images" / "centos5"
    directory.mkdir(parents=True)
    (directory / "vmlinuz").write_bytes(data)
    (directory / "initrd.img").write_bytes(b"initrd")
    return data


@pytest.fixture
def base(ctx: Context, kernel: bytes) -> Iterator[str]:
    with running(ctx):
        yield ctx.config.http_base_url


# -- /boot/ ---------------------------------------------------------------------------------

def test_port_zero_becomes_the_real_port_in_urls_and_boot_configs(ctx: Context, kernel: bytes) -> None:
    with running(ctx) as service:
        assert service.port and ctx.config.http.port == service.port
        assert service.endpoints() == [f"http://127.0.0.1:{service.port}"]
        ctx.provisioning.add_profile(PROFILE)
        ctx.provisioning.add_host({"mac": MAC, "hostname": "web1", "profile": "centos5"})
        written = (ctx.config.tftp_root / "pxelinux.cfg" / "01-00-16-3e-12-34-56").read_text()
        assert f"ks=http://127.0.0.1:{service.port}/ks/00-16-3e-12-34-56" in written


def test_whole_file_and_head(base: str, kernel: bytes) -> None:
    full = curl(f"{base}/boot/images/centos5/vmlinuz")
    assert full.status == 200 and full.body == kernel
    assert full.headers["accept-ranges"] == "bytes"
    head = curl(f"{base}/boot/images/centos5/vmlinuz", "-I")
    assert head.status == 200
    assert head.headers["content-length"] == str(len(kernel))
    assert head.headers["etag"] == full.headers["etag"]


def test_http_1_0_with_connection_close_as_lpxelinux_asks(base: str, kernel: bytes) -> None:
    reply = curl(f"{base}/boot/images/centos5/vmlinuz", "--http1.0", "-H", "Connection: close")
    assert reply.status == 200 and reply.body == kernel
    assert "chunked" not in reply.headers.get("transfer-encoding", "")


def test_range_requests(base: str, kernel: bytes) -> None:
    url = f"{base}/boot/images/centos5/vmlinuz"
    part = curl(url, "-r", "1000-1999")
    assert part.status == 206 and part.body == kernel[1000:2000]
    assert part.headers["content-range"] == f"bytes 1000-1999/{len(kernel)}"
    tail = curl(url, "-r", "-100")
    assert tail.status == 206 and tail.body == kernel[-100:]
    beyond = curl(url, "-r", f"{len(kernel)}-{len(kernel) + 10}")
    assert beyond.status == 416 and beyond.headers["content-range"] == f"bytes */{len(kernel)}"


def test_resumed_download_with_curl_continue(base: str, kernel: bytes, tmp_path: Path) -> None:
    partial = tmp_path / "vmlinuz"
    partial.write_bytes(kernel[:123_457])
    subprocess.run(["curl", "-sSf", "-C", "-", "-o", str(partial), f"{base}/boot/images/centos5/vmlinuz"],
                   check=True, timeout=30)
    assert partial.read_bytes() == kernel


def test_conditional_requests(base: str) -> None:
    url = f"{base}/boot/images/centos5/vmlinuz"
    first = curl(url)
    assert curl(url, "-H", f"If-None-Match: {first.headers['etag']}").status == 304
    assert curl(url, "-H", f"If-Modified-Since: {first.headers['last-modified']}").status == 304
    assert curl(url, "-H", 'If-None-Match: "something-else"').status == 200
    # If-Range with a stale validator: the whole file, not a piece of a file that changed.
    stale = curl(url, "-r", "0-9", "-H", 'If-Range: "stale"')
    assert stale.status == 200 and len(stale.body) == len(first.body)


def test_boot_serves_the_file_it_checked_even_when_the_name_is_swapped(
        ctx: Context, base: str, kernel: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race of issue 10: check a file, then serve the name again. Here the name is swapped
    for a symlink out of the root right after the check; what is served is still the file that
    was checked, whole and in ranges, and nothing of the outside file."""
    outside = ctx.config.tftp_root.parent / "secret"
    outside.write_bytes(b"secret\n" * 1000)
    name = ctx.config.tftp_root / "images" / "centos5" / "vmlinuz"
    checked = files.open_published

    def check_then_swap(root: Path, subpath: str) -> Published:
        published = checked(root, subpath)
        name.unlink()
        name.symlink_to(outside)  # what an attacker with write access to the root would do
        return published

    monkeypatch.setattr(files, "open_published", check_then_swap)
    for args, expected in (((), kernel), (("-r", "1000-1999"), kernel[1000:2000])):
        name.unlink(missing_ok=True)
        name.write_bytes(kernel)
        reply = curl(f"{base}/boot/images/centos5/vmlinuz", *args)
        assert reply.status in (200, 206) and reply.body == expected
        assert name.is_symlink()  # the swap did happen before the body was sent
    monkeypatch.undo()
    # and served by name now, the symlink out of the root is refused as ever
    assert curl(f"{base}/boot/images/centos5/vmlinuz").status == 404


def _open_copies(path: Path) -> int:
    """How many descriptors of this process are open on ``path``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except FileNotFoundError:  # closed meanwhile (listdir's own descriptor, among others)
            pass
    return count


def test_boot_closes_every_descriptor_it_opens(ctx: Context, base: str, kernel: bytes) -> None:
    """Each answer, whole, partial, unchanged (304), unsatisfiable (416) or HEAD, closes the
    file it opened (the server runs in this process, so its descriptors are visible here)."""
    url = f"{base}/boot/images/centos5/vmlinuz"
    served = ctx.config.tftp_root / "images" / "centos5" / "vmlinuz"
    etag = curl(url).headers["etag"]
    for _ in range(5):
        assert curl(url).status == 200
        assert curl(url, "-r", "5-9").status == 206
        assert curl(url, "-H", f"If-None-Match: {etag}").status == 304
        assert curl(url, "-r", f"{len(kernel)}-").status == 416
        assert curl(url, "-I").status == 200
    deadline = time.monotonic() + 5
    while _open_copies(served) and time.monotonic() < deadline:
        time.sleep(0.05)  # the last response's file is closed by the server's loop
    assert _open_copies(served) == 0


def test_a_copy_that_differs_from_the_recorded_checksum_is_refused(ctx: Context, base: str,
                                                                    kernel: bytes) -> None:
    """One node, SQLite: an import recorded the kernel's checksum; a copy that no longer matches
    is refused (whole, ranged and HEAD, its descriptor closed) while the unrecorded initrd is
    served, and a matching copy moved into place is served again."""
    served = ctx.config.tftp_root / "images" / "centos5" / "vmlinuz"
    ctx.provisioning.add_imported_profile(PROFILE, [BootFile(PROFILE["kernel"], len(kernel),
                                                             hashlib.sha256(kernel).hexdigest(), "test")])
    url = f"{base}/boot/images/centos5/vmlinuz"
    assert curl(url).body == kernel
    served.write_bytes(kernel[:-1] + bytes([kernel[-1] ^ 1]))
    for args in ((), ("-r", "0-9"), ("-I",)):
        reply = curl(url, *args)
        assert reply.status == 503 and reply.headers["retry-after"] == "60", args
    assert "differs from the registry's checksum" in curl(url).text
    assert curl(f"{base}/boot/images/centos5/initrd.img").body == b"initrd"
    assert _open_copies(served) == 0
    fixed = served.with_name("vmlinuz.new")
    fixed.write_bytes(kernel)
    fixed.rename(served)
    assert curl(url).body == kernel


@pytest.mark.slow
def test_parallel_large_downloads_are_intact(ctx: Context, tmp_path: Path) -> None:
    """The sendfile path under load: 20 clients at once, each gets every byte of 16 MB."""
    data = os.urandom(16 * 1024 * 1024)
    (ctx.config.tftp_root / "images" / "big.img").write_bytes(data)
    with running(ctx):
        url = f"{ctx.config.http_base_url}/boot/images/big.img"
        outputs = [tmp_path / f"out{i}" for i in range(20)]
        clients = [subprocess.Popen(["curl", "-sSf", "-o", str(out), url]) for out in outputs]
        assert [client.wait(timeout=120) for client in clients] == [0] * 20
    expected = hashlib.sha256(data).hexdigest()
    assert {hashlib.sha256(out.read_bytes()).hexdigest() for out in outputs} == {expected}


@pytest.mark.parametrize("path", [
    "/boot/../etc/passwd",
    "/boot/images/../../../etc/passwd",
    "/boot/%2e%2e/%2e%2e/etc/passwd",
    "/boot/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    "/boot/images/..%2f..%2f..%2fetc/passwd",
    "/boot//etc/passwd",
    "/boot/images/centos5/vmlinuz%00.txt",
    "/boot/images/",
    "/boot/images",
    "/boot/escape/passwd",
    "/boot/passwd-link",
    "/boot/no-such-file",
    "/boot/" + "a" * 5000,
])
def test_nothing_outside_the_root_and_no_listings(ctx: Context, base: str, path: str) -> None:
    outside = ctx.config.tftp_root.parent / "secret"
    outside.mkdir()
    (outside / "passwd").write_text("secret\n")
    (ctx.config.tftp_root / "escape").symlink_to(outside)
    (ctx.config.tftp_root / "passwd-link").symlink_to(outside / "passwd")
    reply = curl(base + path, "-L")  # follow redirects, as lpxelinux does ('//' gets one)
    assert reply.status == 404
    assert b"secret" not in reply.body and b"vmlinuz" not in reply.body
    # and the service still answers the next client
    assert curl(f"{base}/boot/images/centos5/initrd.img").body == b"initrd"


def test_a_private_file_is_not_published_over_http_as_over_tftp(ctx: Context, base: str) -> None:
    private = ctx.config.tftp_root / "images" / "centos5" / "root-password.txt"
    private.write_text("secret\n")
    private.chmod(0o600)  # TFTP refuses it (not world-readable); /boot/ must agree
    reply = curl(f"{base}/boot/images/centos5/root-password.txt")
    assert reply.status == 404 and b"secret" not in reply.body


def test_symlink_inside_the_root_is_served(ctx: Context, base: str, kernel: bytes) -> None:
    (ctx.config.tftp_root / "images" / "current").symlink_to(ctx.config.tftp_root / "images" / "centos5")
    assert curl(f"{base}/boot/images/current/vmlinuz").body == kernel


def test_boot_download_by_a_known_host_is_on_its_timeline(ctx: Context, base: str) -> None:
    ctx.provisioning.add_profile(PROFILE)
    ctx.provisioning.add_host({"mac": MAC, "hostname": "web1", "profile": "centos5", "ip": "127.0.0.1"})
    assert curl(f"{base}/boot/images/centos5/initrd.img").status == 200
    events = ctx.timeline.events(MacAddress.parse(MAC))
    assert any(e.source == "http" and "images/centos5/initrd.img" in e.message for e in events)


# -- /ipxe/ ---------------------------------------------------------------------------------

def test_ipxe_script_for_a_netboot_host_fetches_from_boot(ctx: Context, base: str, kernel: bytes) -> None:
    ctx.provisioning.add_profile(PROFILE)
    ctx.provisioning.add_host({"mac": MAC, "hostname": "web1", "profile": "centos5"})
    reply = curl(f"{base}/ipxe/00-16-3E-12-34-56")
    assert reply.status == 200
    lines = reply.text.splitlines()
    assert lines[0] == "#!ipxe" and lines[-1] == "boot"
    kernel_line = next(line.split() for line in lines if line.startswith("kernel "))
    initrd_line = next(line.split() for line in lines if line.startswith("initrd "))
    assert kernel_line[1] == f"{base}/boot/images/centos5/vmlinuz"
    assert "initrd=initrd.img" in kernel_line and "console=xvc0" in kernel_line
    assert f"ks={base}/ks/00-16-3e-12-34-56" in kernel_line
    assert initrd_line[1:] == ["--name", "initrd.img", f"{base}/boot/images/centos5/initrd.img"]
    # what the script points at is really there
    assert curl(kernel_line[1]).body == kernel
    assert curl(initrd_line[-1]).body == b"initrd"
    host = ctx.policy.host(MacAddress.parse(MAC))
    assert host is not None and host.status is Status.NETBOOTING


def test_ipxe_script_for_a_local_boot_or_unknown_host_exits(ctx: Context, base: str) -> None:
    ctx.provisioning.add_profile(PROFILE)
    ctx.provisioning.add_host({"mac": MAC, "hostname": "web1", "profile": "centos5", "netboot": False})
    assert curl(f"{base}/ipxe/{MAC}").text == "#!ipxe\nexit\n"
    assert curl(f"{base}/ipxe/00:16:3e:00:00:99").text == "#!ipxe\nexit\n"


@pytest.mark.parametrize("mac", ["zz", "00:16:3e:12:34", "00:16:3e:12:34:56:78", "00:16-3e:12:34:56",
                                 "%00", "0" * 300])
def test_ipxe_malformed_mac_is_400(base: str, mac: str) -> None:
    reply = curl(f"{base}/ipxe/{mac}")
    assert reply.status == 400 and b"invalid MAC" in reply.body


# -- the service ----------------------------------------------------------------------------

def test_garbage_and_half_requests_do_not_stop_the_service(base: str) -> None:
    port = int(base.rsplit(":", 1)[1])
    for junk in (b"\x00\xff" * 100 + b"\r\n\r\n", b"GET /boot/x HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n",
                 b"GET " + b"A" * 300_000 + b" HTTP/1.1\r\n\r\n", b"GET /boot/images/centos5/initrd.img"):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(junk)
            raw.shutdown(socket.SHUT_WR)
            reply = raw.recv(200)
            assert reply == b"" or reply.startswith(b"HTTP/1.")  # an error status or a close
    assert curl(f"{base}/boot/images/centos5/initrd.img").body == b"initrd"


def test_stop_closes_the_port_and_a_busy_port_is_a_clear_error(ctx: Context) -> None:
    service = HttpService(ctx)
    service.start()
    port = service.port
    assert port is not None
    second = HttpService(ctx)
    ctx.config.http.port = port
    with pytest.raises(OSError, match=f"http: cannot listen on 127.0.0.1:{port}"):
        second.start()
    service.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
