"""pypxeboot: the Xen bootloader that network-boots a paravirtual domU as PXE would.

xl runs it in dom0 when the domU's config says ``bootloader = "pypxeboot"``, as
``pypxeboot [--kernel=K] [--ramdisk=R] [--args=C] --output=FILE --output-format=simple0
--output-directory=DIR mac=00:16:3e:... [interface=xenbr0] DISK``. It asks DHCP for the guest
(with the guest's MAC), fetches ``pxelinux.cfg/`` configs in pxelinux's own lookup order
over TFTP (tftpy's client), downloads the default entry's kernel and initrd into DIR and
writes where they are in the format xl asked for. A config that says ``localboot`` hands the
same arguments to pygrub, which boots the installed system from DISK.

Compared with the original (2007-2010): it runs under today's xl (the libxl option protocol),
needs no patched udhcpc, accepts next-server from option 66 or the server id when siaddr is
empty, keeps append words without '=' and values holding '=', and exits non-zero with one line
on stderr when anything fails, so xl reports the failure instead of booting garbage.
Extra words: ``server=IP`` skips DHCP, ``tftp_port=N`` (tests), ``pygrub=PATH``.
"""

from __future__ import annotations

import argparse
import glob
import io
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

import tftpy

from pxeserver import pxelinux
from pxeserver.mac import InvalidMac, MacAddress
from pxeserver.policy import hex_ip
from pxeserver.pypxeboot.dhcp import DhcpFailed, Lease, obtain_lease

TFTP_OPTIONS = {"blksize": 1468}  # fits an Ethernet frame; 512-byte lockstep is 3x slower
TFTP_TIMEOUT, TFTP_RETRIES = 5, 3
PYGRUB_PLACES = ("/usr/lib/xen-*/bin/pygrub", "/usr/local/lib/xen/bin/pygrub", "/usr/lib/xen/bin/pygrub")


class BootFailed(RuntimeError):
    """Anything that stops the boot; the message is printed as pypxeboot's one error line."""


class NoAnswer(BootFailed):
    """The TFTP server did not answer at all: trying further config names would only wait."""


@dataclass(frozen=True)
class Request:
    mac: MacAddress
    server: str
    interface: str
    tftp_port: int
    pygrub: str
    disk: str | None


def parse_words(words: list[str]) -> Request:
    """The bootloader_args words (``key=value``) and the disk xl appends last."""
    values: dict[str, str] = {}
    disk = None
    for word in words:
        # xm-era configs passed the whole vif spec: "mac=00:16:3e:..,bridge=xenbr0".
        for part in filter(None, word.split(",")):
            key, sep, value = part.partition("=")
            if sep:
                values[key.strip().lower()] = value.strip()
            else:
                disk = part
    if "mac" not in values:
        raise BootFailed("no mac=<MAC> among the bootloader arguments (bootloader_args)")
    try:
        mac = MacAddress.parse(values["mac"])
    except InvalidMac as exc:
        raise BootFailed(str(exc)) from None
    port = values.get("tftp_port", "69")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise BootFailed(f"tftp_port={port} is not a port number")
    return Request(mac, values.get("server", ""), values.get("interface", ""), int(port),
                   values.get("pygrub", ""), disk)


def config_names(mac: MacAddress, lease_ip: str | None) -> list[str]:
    """pxelinux's lookup order: 01-<mac>, the hex IP and each shorter prefix, default."""
    names = [mac.pxelinux_name]
    if lease_ip:
        address = hex_ip(lease_ip)
        names += [address[:length] for length in range(8, 0, -1)]
    return names + ["default"]


class Fetcher:
    """TFTP downloads from one server, relative to the boot file's directory (pxelinux's prefix)."""

    def __init__(self, server: str, port: int, prefix: str) -> None:
        self.client = tftpy.TftpClient(server, port, options=dict(TFTP_OPTIONS))
        self.server, self.prefix = server, prefix

    def fetch(self, name: str, output: io.BufferedIOBase | io.BytesIO) -> None:
        path = name if name.startswith("/") else self.prefix + name
        try:
            self.client.download(path, output, timeout=TFTP_TIMEOUT, retries=TFTP_RETRIES)
        except tftpy.TftpTimeout:
            raise NoAnswer(f"tftp://{self.server}/{path}: no answer from the TFTP server") from None
        except (tftpy.TftpException, OSError) as exc:
            raise BootFailed(f"tftp://{self.server}/{path}: {exc}") from None

    def text(self, name: str) -> str | None:
        buffer = io.BytesIO()
        try:
            self.fetch(name, buffer)
        except NoAnswer:
            raise
        except BootFailed:
            return None
        return buffer.getvalue().decode("utf-8", "replace")

    def to_file(self, name: str, directory: str, kind: str) -> str:
        fd, path = tempfile.mkstemp(prefix=f"boot_{kind}.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as file:
                self.fetch(name, file)
        except BaseException:
            os.unlink(path)
            raise
        return path


def format_result(kind: str, kernel: str, ramdisk: str, args: str) -> bytes:
    """The three formats pygrub writes, which libxl and xm read."""
    if kind == "simple0":
        return f"kernel {kernel}\0ramdisk {ramdisk}\0args {args}\0\0".encode()
    if kind == "simple":
        return f"kernel {kernel}\nramdisk {ramdisk}\nargs {args}\n".encode()
    return f'linux (kernel {kernel})(ramdisk {ramdisk})(args "{args}")'.encode()


def find_pygrub(configured: str) -> str:
    candidates = [configured] if configured else [shutil.which("pygrub") or ""]
    candidates += sorted(glob.glob(PYGRUB_PLACES[0]), reverse=True) + list(PYGRUB_PLACES[1:])
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BootFailed("the config says localboot but pygrub was not found (give pygrub=PATH)")


def hand_to_pygrub(request: Request, options: argparse.Namespace) -> None:
    """Boot the installed system: pygrub with the options xl gave us, and the disk."""
    if request.disk is None:
        raise BootFailed("the config says localboot but xl passed no disk")
    if not os.path.exists(request.disk):
        raise BootFailed(f"the config says localboot but the disk {request.disk} does not exist")
    argv = [find_pygrub(request.pygrub)]
    if not sys.stdin.isatty():
        argv.append("-q")  # no terminal to draw pygrub's menu on: take the default entry
    for flag in ("kernel", "ramdisk", "args", "output", "output_format", "output_directory"):
        value = getattr(options, flag)
        if value is not None:
            argv.append(f"--{flag.replace('_', '-')}={value}")
    argv.append(request.disk)
    sys.stderr.flush()
    os.execv(argv[0], argv)


def boot(request: Request, options: argparse.Namespace) -> bytes:
    """Everything up to the result xl reads; returns it (or execs pygrub for localboot)."""
    if request.server:
        lease = Lease(ip="", next_server=request.server, boot_file="", hostname="")
    else:
        lease = obtain_lease(request.mac, request.interface)
        if not lease.next_server:
            raise BootFailed(f"the DHCP server gave {lease.ip} but no next-server (siaddr)")
    prefix = lease.boot_file.rpartition("/")[0] + "/" if "/" in lease.boot_file else ""
    fetcher = Fetcher(lease.next_server, request.tftp_port, prefix)
    for name in config_names(request.mac, lease.ip or None):
        text = fetcher.text(f"pxelinux.cfg/{name}")
        if text is not None:
            break
    else:
        raise BootFailed(f"no pxelinux.cfg/ file for {request.mac} on {lease.next_server}")
    entry = pxelinux.parse(text)
    if entry is None:
        raise BootFailed(f"pxelinux.cfg/{name} names nothing to boot")
    print(f"pypxeboot: {request.mac} boots {entry.label!r} from {lease.next_server} "
          f"(pxelinux.cfg/{name})", file=sys.stderr)
    if entry.localboot:
        hand_to_pygrub(request, options)
    directory = options.output_directory or tempfile.gettempdir()
    kernel = fetcher.to_file(entry.kernel, directory, "kernel")
    ramdisk = fetcher.to_file(entry.initrd, directory, "ramdisk") if entry.initrd else ""
    args = " ".join(filter(None, [entry.append, options.args or ""]))
    return format_result(options.output_format or ("simple0" if options.output else "sxp"),
                         kernel, ramdisk, args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pypxeboot", allow_abbrev=False,
                                     description="Network-boot a Xen PV domU (run by xl as its bootloader).")
    parser.add_argument("--kernel", help="kernel= from the domU config (unused when netbooting)")
    parser.add_argument("--ramdisk", help="ramdisk= from the domU config (unused when netbooting)")
    parser.add_argument("--args", help="extra= from the domU config: appended to the command line")
    parser.add_argument("--output", help="file to write the result to (default: stdout)")
    parser.add_argument("--output-format", choices=("simple0", "simple", "sxp"))
    parser.add_argument("--output-directory", help="where the kernel and initrd are written")
    parser.add_argument("words", nargs="*", help="mac=MAC [interface=BR] [server=IP] ... DISK")
    options = parser.parse_args(argv)
    logging.getLogger("tftpy").setLevel(logging.CRITICAL)  # failures become our one line
    try:
        result = boot(parse_words(options.words), options)
        if options.output:
            with open(options.output, "wb") as output:
                output.write(result)
        else:
            sys.stdout.buffer.write(result + b"\n")
    except (BootFailed, DhcpFailed, OSError) as exc:
        print(f"pypxeboot: error: {exc}", file=sys.stderr)
        sys.exit(1)
