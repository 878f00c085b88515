"""pypxeboot: its config reader, its argument handling and its output, against our TFTP."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from conftest import free_port, started

from pxeserver import pxelinux
from pxeserver.bootspec import LocalBoot, NetBoot
from pxeserver.mac import MacAddress
from pxeserver.pypxeboot import BootFailed, config_names, parse_words
from pxeserver.tftp import TftpService
from pxeserver.web.server import HttpService

MAC = "00:16:3e:12:34:56"


def test_rendered_configs_read_back_whole() -> None:
    spec = NetBoot("images/d/linux", "images/d/initrd.gz", "url=http://h/preseed/x auto=true console=hvc0")
    entry = pxelinux.parse(pxelinux.render(spec, comment="c"))
    assert (entry.kernel, entry.initrd, entry.append) == (spec.kernel, spec.initrd, spec.cmdline)
    assert pxelinux.parse(pxelinux.render(LocalBoot())).localboot


@pytest.mark.parametrize("text, expected", [
    ("DEFAULT menu.c32\nLABEL a\n KERNEL k1\nLABEL b\n MENU DEFAULT\n LINUX k2\n INITRD i2\n APPEND quiet x=a=b\n",
     ("b", "k2", "i2", "quiet x=a=b")),
    ("default vmlinuz ro root=/dev/xvda1\n", ("default", "vmlinuz", "", "ro root=/dev/xvda1")),
    ("label x\n kernel k\n append initrd=i1,i2 console=hvc0\n", ("x", "k", "i1", "console=hvc0")),
    ("default x\nlabel x\n kernel k\n append -\n", ("x", "k", "", "")),
    ("ontimeout y\nlabel x\n kernel kx\nlabel y\n kernel ky\n", ("y", "ky", "", "")),
])
def test_configs_in_the_wild(text: str, expected: tuple[str, str, str, str]) -> None:
    entry = pxelinux.parse(text)
    assert (entry.label, entry.kernel, entry.initrd, entry.append) == expected


@pytest.mark.parametrize("text", ["", "# nothing\n", "label x\n  append a=b\n", "\0" * 100])
def test_configs_with_nothing_to_boot(text: str) -> None:
    assert pxelinux.parse(text) is None


def test_words_from_xm_and_xl_configs() -> None:
    old_style = parse_words(["mac=00:16:3E:12:34:56,bridge=xenbr0,", "/dev/vg/web1"])
    assert old_style.mac == MacAddress.parse(MAC) and old_style.disk == "/dev/vg/web1"
    new_style = parse_words([f"mac={MAC}", "interface=xenbr1", "server=10.0.0.1"])
    assert (new_style.interface, new_style.server, new_style.disk) == ("xenbr1", "10.0.0.1", None)
    with pytest.raises(BootFailed, match="no mac="):
        parse_words(["/dev/vg/web1"])
    with pytest.raises(BootFailed, match="invalid MAC"):
        parse_words(["mac=00:16:3e:12:34"])


def test_lookup_order_is_pxelinux_s() -> None:
    assert config_names(MacAddress.parse(MAC), "10.0.0.5") == [
        "01-00-16-3e-12-34-56", "0A000005", "0A00000", "0A0000", "0A000", "0A00", "0A0", "0A", "0", "default"]


@pytest.fixture
def tftp(ctx):
    root = ctx.config.tftp_root
    (root / "images" / "d").mkdir()
    (root / "images" / "d" / "linux").write_bytes(bytes(range(256)) * 2000)
    (root / "images" / "d" / "initrd.gz").write_bytes(b"initrd" * 100_000)
    (Path(ctx.config.preseeds_dir)).mkdir(exist_ok=True)
    ctx.provisioning.add_profile({"name": "d", "kernel": "images/d/linux", "initrd": "images/d/initrd.gz",
                                  "append": "console=hvc0", "autoinstall": "debian-xen.cfg"})
    service = TftpService(ctx)
    service.start()
    yield ctx, service.port
    service.stop()


def run_pypxeboot(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-c", "from pxeserver.pypxeboot import main; main()", *args],
                          capture_output=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("output_format", ["simple0", "simple", "sxp"])
def test_netboot_writes_what_xl_reads(tftp, tmp_path: Path, output_format: str) -> None:
    ctx, port = tftp
    ctx.provisioning.add_host({"mac": MAC, "hostname": "web1", "profile": "d"})
    out = tmp_path / "out"
    out.mkdir()
    result = run_pypxeboot(f"--output={out / 'result'}", f"--output-format={output_format}",
                           f"--output-directory={out}", "--args=xen_extra=1", "mac=00:16:3E:12:34:56",
                           "server=127.0.0.1", f"tftp_port={port}", "/dev/null")
    assert result.returncode == 0, result.stderr
    text = (out / "result").read_bytes().decode()
    if output_format == "simple0":
        assert text.endswith("\0\0")
        fields = dict(item.split(" ", 1) for item in text.rstrip("\0").split("\0"))
    elif output_format == "simple":
        fields = dict(line.split(" ", 1) for line in text.splitlines())
    else:
        fields = dict(part.split(" ", 1) for part in text.removeprefix("linux (").rstrip(")").split(")("))
        fields["args"] = fields["args"].strip('"')
    root = ctx.config.tftp_root
    assert Path(fields["kernel"]).read_bytes() == (root / "images/d/linux").read_bytes()
    assert Path(fields["ramdisk"]).read_bytes() == (root / "images/d/initrd.gz").read_bytes()
    assert Path(fields["kernel"]).parent == out
    assert "url=http://127.0.0.1" in fields["args"] and fields["args"].endswith("console=hvc0 xen_extra=1")


def test_original_usage_prints_sxp(tftp) -> None:
    ctx, port = tftp
    ctx.provisioning.add_host({"mac": MAC, "hostname": "web1", "profile": "d"})
    result = run_pypxeboot("mac=00:16:3e:12:34:56,", "server=127.0.0.1", f"tftp_port={port}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"linux (kernel /")


def test_failures_are_one_line_and_nonzero(tftp) -> None:
    ctx, port = tftp
    ctx.config.boot.default_profile = ""
    unknown = run_pypxeboot("mac=00:16:3e:00:00:99", "server=127.0.0.1", f"tftp_port={port}", "/nonexistent")
    assert unknown.returncode == 1
    lines = unknown.stderr.decode().strip().splitlines()
    assert lines[-1] == "pypxeboot: error: the config says localboot but the disk /nonexistent does not exist"
    ctx.provisioning.add_profile({"name": "broken", "kernel": "images/none/linux", "initrd": "images/none/i"})
    ctx.provisioning.add_host({"mac": MAC, "hostname": "web1", "profile": "broken"})
    missing = run_pypxeboot("mac=" + MAC, "server=127.0.0.1", f"tftp_port={port}", "/dev/null")
    assert missing.returncode == 1 and "images/none/linux" in missing.stderr.decode().splitlines()[-1]


@pytest.mark.slow
def test_a_silent_tftp_server_fails_fast_instead_of_waiting_per_name() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        started = time.monotonic()
        result = run_pypxeboot(f"mac={MAC}", "server=127.0.0.1", f"tftp_port={silent.getsockname()[1]}")
    assert result.returncode == 1
    assert "no answer from the TFTP server" in result.stderr.decode()
    assert time.monotonic() - started < 40, "it tried every config name in turn"


def test_importing_pypxeboot_loads_only_its_low_level_modules() -> None:
    """dom0 runs pypxeboot without the server's stack: no Flask, no registry, no policy."""
    probe = ("import pxeserver.pypxeboot, sys; print(' '.join(sorted(m for m in sys.modules if m.startswith("
             "('pxeserver', 'flask', 'werkzeug', 'waitress', 'jinja2', 'sqlite3', 'click', 'dnslib')))))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.split() == [
        "pxeserver", "pxeserver.bootspec", "pxeserver.dhcp", "pxeserver.dhcp.codec", "pxeserver.mac",
        "pxeserver.pxelinux", "pxeserver.pypxeboot", "pxeserver.pypxeboot.cache", "pxeserver.pypxeboot.dhcp",
        "pxeserver.pypxeboot.http", "pxeserver.pypxeboot.tftp"]


BARE_PYTHON = "/usr/bin/python3"  # the system's own: no venv, nothing of pxeserver's stack


@pytest.mark.skipif(not Path(BARE_PYTHON).exists(), reason="needs the system python3")
@pytest.mark.parametrize("transport", ["tftp", "http"])
def test_the_built_zipapp_netboots_on_a_python_with_nothing_installed(tftp, tmp_path: Path, transport: str) -> None:
    ctx, port = tftp
    ctx.provisioning.add_host({"mac": MAC, "hostname": "web1", "profile": "d"})
    web = contextlib.nullcontext()
    if transport == "http":  # the configs name http://127.0.0.1:<port>/boot/... URLs
        ctx.config.boot.kernel_transport, ctx.config.http.port = "http", free_port()
        web = started(HttpService(ctx))
    built = subprocess.run([sys.executable, "-m", "pxeserver", "build-pypxeboot", "-o", str(tmp_path / "pypxeboot")],
                           capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    bare = subprocess.run([BARE_PYTHON, "-I", "-S", "-c", "import tftpy"], capture_output=True, timeout=30)
    assert bare.returncode != 0  # -I -S: no site-packages at all, so only the zipapp's own tftpy can load
    out = tmp_path / "out"
    out.mkdir()
    with web:
        # run as xl runs it: the file itself, through its #! line (/usr/bin/python3 -IS)
        result = subprocess.run([str(tmp_path / "pypxeboot"), f"--output={out / 'result'}",
                                 "--output-format=simple0", f"--output-directory={out}", f"mac={MAC}",
                                 "server=127.0.0.1", f"tftp_port={port}", "/dev/null"],
                                capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    fields = dict(item.split(" ", 1) for item in (out / "result").read_text().rstrip("\0").split("\0"))
    root = ctx.config.tftp_root
    assert Path(fields["kernel"]).read_bytes() == (root / "images/d/linux").read_bytes()
    assert Path(fields["ramdisk"]).read_bytes() == (root / "images/d/initrd.gz").read_bytes()
    assert (tmp_path / "pypxeboot").read_bytes().startswith(b"#!/usr/bin/python3 -IS\n")
    # only tftpy's packet layer is vendored, under an __init__ that imports nothing of its own
    names = zipfile.ZipFile(tmp_path / "pypxeboot").namelist()
    assert sorted(name for name in names if name.startswith("tftpy/")) == [
        "tftpy/TftpPacketFactory.py", "tftpy/TftpPacketTypes.py", "tftpy/TftpShared.py", "tftpy/__init__.py"]
