"""The TFTP service with the real clients: tftp-hpa's tftp, curl, and tftpy as pypxeboot uses it."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tftpy
from tftp_support import running

from pxeserver.app import Context
from pxeserver.mac import MacAddress
from pxeserver.registry import Status
from pxeserver.tftp import TftpService
from pxeserver.tftp.events import BootFileClaims

MAC_AS_TYPED = "AA:00:86:E2:35:72"  # pypxeboot keeps the case the user typed
HOST_IP = "10.0.0.23"


@pytest.fixture
def service(ctx: Context) -> Iterator[TftpService]:
    with running(ctx) as tftp:
        yield tftp


@pytest.fixture
def root(ctx: Context) -> Path:
    return ctx.config.tftp_root


def add_host(ctx: Context, mac: str = MAC_AS_TYPED, ip: str | None = HOST_IP, **extra: object) -> None:
    images = ctx.config.tftp_root / "images" / "debian"
    images.mkdir(parents=True, exist_ok=True)
    (images / "linux").write_bytes(os.urandom(300_000))
    (images / "initrd.gz").write_bytes(os.urandom(900_000))
    if not ctx.store.list_profiles():
        ctx.provisioning.add_profile({"name": "debian", "kernel": "images/debian/linux",
                                      "initrd": "images/debian/initrd.gz", "append": "console=hvc0"})
    data = {"mac": mac, "hostname": "web1", "profile": "debian", **extra}
    if ip:
        data["ip"] = ip
    ctx.provisioning.add_host(data)


def pypxeboot_fetch(port: int, name: str, out: Path) -> bool:
    """Exactly pypxeboot's call: a TftpClient without options, one download per name."""
    try:
        tftpy.TftpClient("127.0.0.1", port).download(name, str(out))
        return True
    except tftpy.TftpException:
        return False


def pypxeboot_config(port: int, mac: str, ip: str, out: Path) -> str:
    """pypxeboot's lookup order: 01-<mac as typed>, the full hex IP, then default."""
    hex_ip = f"{int(ipaddress.IPv4Address(ip)):08X}"
    for name in (f"01-{mac.replace(':', '-')}", hex_ip, "default"):
        if pypxeboot_fetch(port, f"pxelinux.cfg/{name}", out):
            return name
    raise AssertionError("pypxeboot found no config at all")


def wait_for_event(ctx: Context, mac: str, text: str) -> list[str]:
    messages: list[str] = []
    for _ in range(50):
        messages = [event.message for event in ctx.timeline.events(MacAddress.parse(mac))]
        if any(text in message for message in messages):
            return messages
        time.sleep(0.1)
    raise AssertionError(f"no event containing {text!r} in {messages}")


def test_pypxeboot_gets_its_host_config_by_mixed_case_mac(ctx: Context, service: TftpService, tmp_path: Path) -> None:
    add_host(ctx)
    out = tmp_path / "config"
    assert pypxeboot_config(service.port, MAC_AS_TYPED, "192.0.2.99", out) == "01-AA-00-86-E2-35-72"
    text = out.read_text()
    assert "kernel images/debian/linux" in text
    assert "initrd=images/debian/initrd.gz" in text
    # and then the kernel and initrd it names, as pypxeboot downloads them
    assert pypxeboot_fetch(service.port, "images/debian/initrd.gz", tmp_path / "initrd")
    assert (tmp_path / "initrd").read_bytes() == (ctx.config.tftp_root / "images/debian/initrd.gz").read_bytes()


def test_transfers_are_on_the_host_timeline_and_it_moves_to_netbooting(
        ctx: Context, service: TftpService, tmp_path: Path) -> None:
    add_host(ctx)
    pypxeboot_config(service.port, MAC_AS_TYPED, HOST_IP, tmp_path / "config")
    messages = wait_for_event(ctx, MAC_AS_TYPED, "sent pxelinux.cfg/01-AA-00-86-E2-35-72")
    assert any("blksize 512" in message for message in messages)
    wait_for_event(ctx, MAC_AS_TYPED, "status registered -> netbooting")
    assert ctx.policy.host(MacAddress.parse(MAC_AS_TYPED)).status is Status.NETBOOTING


def test_pypxeboot_falls_back_to_the_full_hex_ip(ctx: Context, service: TftpService, tmp_path: Path) -> None:
    add_host(ctx)
    other_mac = "00:16:3E:00:00:99"  # not registered: the hex IP of the registered host answers
    assert pypxeboot_config(service.port, other_mac, HOST_IP, tmp_path / "config") == "0A000017"
    assert "kernel images/debian/linux" in (tmp_path / "config").read_text()
    # the transfer is tied to the host whose IP the name carries
    wait_for_event(ctx, MAC_AS_TYPED, "sent pxelinux.cfg/0A000017")


def test_unknown_machine_gets_default(ctx: Context, service: TftpService, tmp_path: Path) -> None:
    assert pypxeboot_config(service.port, "00:16:3e:01:02:03", "192.0.2.7", tmp_path / "config") == "default"
    assert "localboot" in (tmp_path / "config").read_text()


def test_netboot_off_gets_a_local_boot_config(ctx: Context, service: TftpService, tmp_path: Path) -> None:
    add_host(ctx, netboot=False)
    assert pypxeboot_config(service.port, MAC_AS_TYPED, HOST_IP, tmp_path / "config") == "01-AA-00-86-E2-35-72"
    assert "localboot 0" in (tmp_path / "config").read_text()


def test_pxelinux_hex_ip_prefix_for_the_asking_client(ctx: Context, service: TftpService, tmp_path: Path) -> None:
    add_host(ctx, ip="127.0.0.1")  # pxelinux asks from its own address: loopback here
    out = tmp_path / "config"
    for name in ("7F000001", "7F00", "7"):
        assert curl(service.port, f"pxelinux.cfg/{name}", out).returncode == 0, name
        assert "kernel images/debian/linux" in out.read_text()
    assert curl(service.port, "pxelinux.cfg/C0A8", out).returncode != 0  # not this client's prefix


def test_admin_file_under_pxelinux_cfg_is_the_fallback(ctx: Context, service: TftpService, root: Path,
                                                        tmp_path: Path) -> None:
    (root / "pxelinux.cfg" / "01-00-16-3e-99-99-99").write_text("default hand-written\n")
    out = tmp_path / "config"
    assert pypxeboot_fetch(service.port, "pxelinux.cfg/01-00-16-3e-99-99-99", out)
    assert out.read_text() == "default hand-written\n"


def curl(port: int, name: str, out: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args, "-o", str(out),
                           f"tftp://127.0.0.1:{port}/{name}"], capture_output=True, timeout=30)


@pytest.mark.parametrize("blksize", ["512", "1468", "8192", "65464"])
def test_curl_with_block_sizes(service: TftpService, root: Path, tmp_path: Path, blksize: str) -> None:
    payload = os.urandom(3 * 65464 + 17)
    (root / "images" / "blob").write_bytes(payload)
    result = curl(service.port, "images/blob", tmp_path / "out", "--tftp-blksize", blksize)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out").read_bytes() == payload


def test_curl_exact_multiple_of_block_size(service: TftpService, root: Path, tmp_path: Path) -> None:
    payload = os.urandom(1468 * 20)  # ends with an empty DATA block
    (root / "exact").write_bytes(payload)
    assert curl(service.port, "exact", tmp_path / "out", "--tftp-blksize", "1468").returncode == 0
    assert (tmp_path / "out").read_bytes() == payload


def tftp_hpa(port: int, cwd: Path, *commands: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tftp", "127.0.0.1", str(port), "-c", *commands], cwd=cwd,
                          capture_output=True, text=True, timeout=30)


def test_tftp_hpa_binary_and_netascii(service: TftpService, root: Path, tmp_path: Path) -> None:
    payload = os.urandom(200_000)
    (root / "pxelinux.0").write_bytes(payload)
    (root / "notes.txt").write_bytes(b"line one\nline two\r\n")
    result = subprocess.run(["tftp", "-m", "binary", "127.0.0.1", str(service.port), "-c", "get", "pxelinux.0"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and (tmp_path / "pxelinux.0").read_bytes() == payload
    # netascii is tftp-hpa's default mode; the text must survive the round trip
    assert tftp_hpa(service.port, tmp_path, "get", "notes.txt").returncode == 0
    assert (tmp_path / "notes.txt").read_bytes() == b"line one\nline two\r\n"


def test_tftp_hpa_reports_missing_file_and_refuses_upload(service: TftpService, root: Path, tmp_path: Path) -> None:
    result = tftp_hpa(service.port, tmp_path, "get", "no-such-file")
    assert "Error code 1" in result.stdout + result.stderr
    (tmp_path / "upload").write_text("data")
    result = tftp_hpa(service.port, tmp_path, "put", "upload")
    assert "Error code 2" in result.stdout + result.stderr
    assert not (root / "upload").exists()


def test_each_transfer_is_logged_once(service: TftpService, root: Path, tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="pxeserver.tftp")
    (root / "pxelinux.0").write_bytes(b"x" * 1000)
    assert curl(service.port, "pxelinux.0", tmp_path / "out", "--tftp-blksize", "1468").returncode == 0
    for _ in range(50):
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tftp: sent pxelinux.0")]
        if lines:
            break
        time.sleep(0.1)
    assert len(lines) == 1 and "to 127.0.0.1 (1000 bytes, blksize 1468" in lines[0], lines


def timeline(ctx: Context, mac: str) -> list[str]:
    return [event.message for event in ctx.timeline.events(MacAddress.parse(mac))]


def test_pypxeboot_kernel_and_initrd_from_dom0_go_to_the_host_whose_config_it_fetched(
        ctx: Context, service: TftpService, tmp_path: Path) -> None:
    """pypxeboot downloads from dom0's address (127.0.0.1 here), which no host has."""
    add_host(ctx, ip=None)
    assert pypxeboot_config(service.port, MAC_AS_TYPED, "192.0.2.99", tmp_path / "config") == "01-AA-00-86-E2-35-72"
    for name in ("images/debian/linux", "images/debian/initrd.gz"):
        assert pypxeboot_fetch(service.port, name, tmp_path / "file")
    messages = wait_for_event(ctx, MAC_AS_TYPED, "sent images/debian/initrd.gz")
    kernel = [m for m in messages if m.startswith("sent images/debian/linux ")]
    assert kernel == ["sent images/debian/linux (300000 bytes, blksize 512) "
                      "to 127.0.0.1, which fetched this host's boot config"]


def test_two_domus_booting_through_one_dom0_get_one_kernel_and_one_initrd_each(
        ctx: Context, service: TftpService, tmp_path: Path) -> None:
    other = "00:16:3e:00:00:02"
    add_host(ctx, ip=None)
    add_host(ctx, mac=other, ip=None, hostname="web2")
    add_host(ctx, mac="00:16:3e:00:00:03", ip=None, hostname="web3")  # boots nothing now
    for mac in (MAC_AS_TYPED, other):
        pypxeboot_config(service.port, mac, "192.0.2.99", tmp_path / "config")
    for name in ("images/debian/linux", "images/debian/linux", "images/debian/initrd.gz",
                 "images/debian/initrd.gz", "images/debian/initrd.gz"):  # the last: no one's
        assert pypxeboot_fetch(service.port, name, tmp_path / "file")
    wait_for_event(ctx, other, "sent images/debian/initrd.gz")
    for mac in (MAC_AS_TYPED, other):
        files = sorted(m.split()[1] for m in timeline(ctx, mac) if m.startswith("sent images/"))
        assert files == ["images/debian/initrd.gz", "images/debian/linux"], (mac, timeline(ctx, mac))
    assert not [m for m in timeline(ctx, "00:16:3e:00:00:03") if m.startswith("sent ")]


def test_a_download_without_a_config_fetch_before_it_is_no_hosts(
        ctx: Context, service: TftpService, tmp_path: Path) -> None:
    add_host(ctx, ip=None)
    (ctx.config.tftp_root / "pxelinux.0").write_bytes(b"x" * 100)
    assert pypxeboot_fetch(service.port, "images/debian/linux", tmp_path / "file")  # before the config
    pypxeboot_config(service.port, MAC_AS_TYPED, "192.0.2.99", tmp_path / "config")
    assert pypxeboot_fetch(service.port, "pxelinux.0", tmp_path / "file")  # not named in its config
    assert pypxeboot_fetch(service.port, "images/debian/linux", tmp_path / "file")
    # Events are recorded in order: once the last download is there, the others were judged.
    wait_for_event(ctx, MAC_AS_TYPED, "sent images/debian/linux")
    size = len((tmp_path / "config").read_bytes())
    assert [m.split(" to ")[0] for m in timeline(ctx, MAC_AS_TYPED) if m.startswith("sent ")] == [
        f"sent pxelinux.cfg/01-AA-00-86-E2-35-72 ({size} bytes, blksize 512)",
        "sent images/debian/linux (300000 bytes, blksize 512)"], timeline(ctx, MAC_AS_TYPED)


def test_a_claim_ends_with_its_window() -> None:
    claims = BootFileClaims(window=60.0)
    mac = MacAddress.parse(MAC_AS_TYPED)
    claims.claim("10.0.0.2", mac, {"images/k", "images/i"}, now=1000.0)
    assert claims.owner("10.0.0.3", "images/k", started=1001.0, now=1002.0) is None  # another address
    assert claims.owner("10.0.0.2", "images/k", started=1061.0, now=1070.0) is None  # too late
    assert claims.owner("10.0.0.2", "images/k", started=1059.0, now=1300.0) == mac  # a long transfer
    assert claims.owner("10.0.0.2", "images/k", started=1301.0, now=1302.0) is None  # had it already
    assert claims.owner("10.0.0.2", "images/i", started=1359.0, now=1400.0) == mac  # window from the last
