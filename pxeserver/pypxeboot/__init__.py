"""pypxeboot: the Xen bootloader that network-boots a paravirtual domU as PXE would.

xl runs it in dom0 when the domU's config says ``bootloader = "pypxeboot"``, as
``pypxeboot [--kernel=K] [--ramdisk=R] [--args=C] --output=FILE --output-format=simple0
--output-directory=DIR mac=00:16:3e:... [interface=xenbr0] DISK``. It asks DHCP for the guest
(with the guest's MAC), fetches ``pxelinux.cfg/`` configs in pxelinux's own lookup order
over TFTP, downloads the default entry's kernel and initrd (over TFTP, or over HTTP from the
same server when the config names them by ``http://`` URL, as lpxelinux reads them) into DIR and writes where they are
in the format xl asked for. A config that says ``localboot`` hands the same arguments to
pygrub, which boots the installed system from DISK.

It runs as root on input from the guest network, which is hostile (pygrub's CVE-2007-4993 is
the class: libxl splits a ``simple0`` result on NUL and maps, then unlinks as root, every
``kernel``/``ramdisk`` path in it). So: nothing it writes for xl holds a control character (a
config whose kernel, initrd or append holds one is refused, as are paths that are not plain
printable ASCII); the ``kernel``/``ramdisk`` items are only files it created itself (O_EXCL,
no symlink followed) inside ``--output-directory``, checked again just before the result is
written; DHCP replies count only from the pinned or first-answering server and TFTP packets
only from the next-server's address and the transfer's port, HTTP only from a URL naming that
address, with no redirect followed (see ``dhcp``, ``tftp`` and ``http``); and
every download is bounded in size, speed and time. Any breach exits 1 with one line on stderr
and removes what it wrote: no kernel, no ramdisk, no result.

Words (``key=value``, among xl's ``bootloader_args``): ``mac=`` (required), ``interface=BR``,
``server=IP`` (skip DHCP: boot from this TFTP server), ``dhcp_server=IP`` (take DHCP replies
only from this server), ``tftp_port=N`` (tests), ``pygrub=PATH``, and the bounds
``max_file_mb=`` (256), ``max_total_mb=`` (384, kernel and ramdisk together),
``min_rate_kbs=`` (16 KiB/s, averaged over each ``rate_window=`` of 30 s) and ``deadline=``
(600 s for the whole boot). The defaults fit a 150 MB installer initrd at 400 KB/s.
``cache_dir=DIR`` (default: none) keeps ``http://`` kernels and initrds in dom0 under the
SHA-256 the server announces, so the guests of one dom0 download each file once
(``cache.py``), ``cache_mb=`` (1024) caps it. The success line says how long DHCP, the
config, the kernel and the initrd took.
"""

from __future__ import annotations

import argparse
import glob
import io
import ipaddress
import logging
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import BinaryIO, NoReturn

from pxeserver import pxelinux
from pxeserver.mac import InvalidMac, MacAddress
from pxeserver.pypxeboot import http
from pxeserver.pypxeboot.cache import Cache, CacheUnusable
from pxeserver.pypxeboot.dhcp import DhcpFailed, Lease, obtain_lease
from pxeserver.pypxeboot.tftp import Bounds, ServerRefused, TransferFailed, download

PYGRUB_PLACES = ("/usr/lib/xen-*/bin/pygrub", "/usr/local/lib/xen/bin/pygrub", "/usr/lib/xen/bin/pygrub")
CONFIG_CAP = 64 * 1024  # bytes: a pxelinux config is a few lines
MAX_CMDLINE = 2048  # characters: x86 Linux's COMMAND_LINE_SIZE
# (lowest, highest, default) of each numeric word
NUMBER_WORDS = {
    "tftp_port": (1, 65535, 69),
    "max_file_mb": (1, 4096, 256),
    "max_total_mb": (1, 8192, 384),
    "min_rate_kbs": (1, 1_000_000, 16),
    "rate_window": (1, 600, 30),
    "deadline": (1, 86400, 600),
    "cache_mb": (1, 1_000_000, 1024),
}
_PLAIN_PATH = re.compile(r"[!-~]{1,255}")  # printable ASCII, no blanks: a TFTP path as configs write them
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SXP_SPECIAL = re.compile(r'[\s()"\\]')


class BootFailed(RuntimeError):
    """Anything that stops the boot; the message is printed as pypxeboot's one error line."""


@dataclass(frozen=True)
class Request:
    mac: MacAddress
    server: str
    dhcp_server: str
    interface: str
    pygrub: str
    disk: str | None
    tftp_port: int
    max_file_mb: int
    max_total_mb: int
    min_rate_kbs: int
    rate_window: int
    deadline: int
    cache_mb: int
    cache_dir: str = ""  # empty: no cache


def parse_words(words: list[str]) -> Request:
    """The bootloader_args words (``key=value``) and the disk xl appends last. Words this
    version does not know are ignored (xm-era configs pass the whole vif spec); the values of
    the ones it knows are checked strictly."""
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
    for key in ("server", "dhcp_server"):
        if values.get(key):
            try:
                ipaddress.IPv4Address(values[key])
            except ValueError:
                raise BootFailed(f"{key}={values[key]!r} is not an IPv4 address") from None
    cache_dir = values.get("cache_dir", "")
    if cache_dir in ("off", "none"):
        cache_dir = ""
    if cache_dir and (not cache_dir.startswith("/") or control_character(cache_dir)):
        raise BootFailed(f"cache_dir={cache_dir!r} is not an absolute path (or 'off')")
    numbers = {}
    for key, (lowest, highest, default) in NUMBER_WORDS.items():
        value = values.get(key, str(default))
        if not re.fullmatch(r"[0-9]{1,9}", value) or not lowest <= int(value) <= highest:
            raise BootFailed(f"{key}={value!r} is not a whole number from {lowest} to {highest}")
        numbers[key] = int(value)
    return Request(mac, values.get("server", ""), values.get("dhcp_server", ""), values.get("interface", ""),
                   values.get("pygrub", ""), disk, **numbers, cache_dir=cache_dir)


def config_names(mac: MacAddress, lease_ip: str | None) -> list[str]:
    """pxelinux's lookup order: 01-<mac>, the hex IP and each shorter prefix, default."""
    names = [mac.pxelinux_name]
    if lease_ip:
        address = pxelinux.hex_ip(lease_ip)
        names += [address[:length] for length in range(8, 0, -1)]
    return names + ["default"]


def control_character(text: str) -> str | None:
    """The first control character in ``text`` (NUL, newline, escape...), or None."""
    found = _CONTROL.search(text)
    return found.group() if found else None


class Outputs:
    """The kernel and ramdisk written for xl: files pypxeboot created itself inside the output
    directory (mkstemp: O_EXCL, no symlink followed), each checked again, by inode, before xl
    is told about it, and all removed when the boot fails."""

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        self.files: dict[str, tuple[int, int]] = {}

    def create(self, kind: str) -> tuple[str, BinaryIO]:
        if _SXP_SPECIAL.search(self.directory) or control_character(self.directory):
            raise BootFailed(f"the output directory {self.directory!r} holds a blank, a control "
                             "character or one of ()\"\\, which xl's result formats cannot carry")
        fd, path = tempfile.mkstemp(prefix=f"boot_{kind}.", dir=self.directory)
        status = os.fstat(fd)
        self.files[path] = (status.st_dev, status.st_ino)
        return path, os.fdopen(fd, "wb")

    def checked(self, path: str) -> str:
        """``path`` if it is a file this run wrote, unchanged, directly in the directory."""
        try:
            status = os.lstat(path)
        except OSError:
            status = None
        if path not in self.files or os.path.dirname(path) != self.directory or status is None \
                or not stat.S_ISREG(status.st_mode) or (status.st_dev, status.st_ino) != self.files[path]:
            raise BootFailed(f"{path!r} is not a file pypxeboot wrote in {self.directory}: refused")
        return path

    def remove_all(self) -> None:
        for path, identity in self.files.items():
            try:
                status = os.lstat(path)
                if (status.st_dev, status.st_ino) == identity:
                    os.unlink(path)
            except OSError:
                pass
        self.files.clear()


class Fetcher:
    """Downloads from one server: TFTP relative to the boot file's directory (pxelinux's
    prefix), or HTTP for a kernel or initrd named by a URL on that same server."""

    def __init__(self, server: str, port: int, prefix: str, bounds: Bounds, request: Request,
                 cache: Cache | None) -> None:
        self.server, self.port, self.prefix = server, port, prefix
        self.bounds, self.request, self.cache = bounds, request, cache
        self.cache_hits = 0

    def path(self, name: str) -> str:
        return name if name.startswith("/") else self.prefix + name

    def text(self, name: str) -> str:
        """A config's text; raises ServerRefused when the server has none by that name."""
        path = self.path(name)
        buffer = io.BytesIO()
        download(self.server, self.port, path, buffer, CONFIG_CAP,
                 f"tftp://{self.server}/{path}: larger than {CONFIG_CAP // 1024} KiB, which no "
                 "pxelinux config is", self.bounds)
        return buffer.getvalue().decode("utf-8", "replace")

    def to_file(self, name: str, outputs: Outputs, kind: str) -> str:
        """Download a kernel or initrd: an ``http://`` URL (as lpxelinux reads them) over HTTP
        from this same server, any other name over TFTP."""
        url = name if http.is_url(name) else f"tftp://{self.server}/{self.path(name)}"
        left = self.bounds.max_total - self.bounds.written
        if self.bounds.max_file <= left:
            limit, too_big = self.bounds.max_file, (
                f"{url}: larger than the {self.request.max_file_mb} MiB cap on one file (max_file_mb=)")
        else:
            limit, too_big = left, (
                f"{url}: the kernel and ramdisk together pass the {self.request.max_total_mb} MiB cap "
                "(max_total_mb=)")
        target, file = outputs.create(kind)
        with file:
            if http.is_url(name):
                size = self._http(name, file, limit, too_big)
            else:
                size = download(self.server, self.port, self.path(name), file, limit, too_big, self.bounds)
            self.bounds.written += size
        return target

    def _http(self, url: str, file: BinaryIO, limit: int, too_big: str) -> int:
        """An HTTP download, through the dom0 cache when one is set (cache.py). The cache
        failing (a full disk, say) costs the boot only the cache: a warning, then a download."""
        if self.cache is not None:
            try:
                return self._through_cache(self.cache, url, file, limit, too_big)
            except OSError as exc:
                print(f"pypxeboot: warning: cache_dir={self.cache.path}: {one_line(str(exc))}: "
                      "booting without the cache", file=sys.stderr)
                self.cache.close()
                self.cache = None
                file.seek(0)
                file.truncate()
        return http.download(url, self.server, file, limit, too_big, self.bounds)

    def _through_cache(self, cache: Cache, url: str, file: BinaryIO, limit: int, too_big: str) -> int:
        """Copied from the cache when it holds the digest the server announces, else downloaded
        into it by one pypxeboot while the others booting the same file wait, then copied."""
        try:
            announced = http.head(url, self.server, self.bounds)
        except ServerRefused:  # a server that answers no HEAD: as without a cache
            announced = http.Announced(None, None)
        sha256, length = announced.sha256, announced.length
        if sha256 is None or length is None or length > min(limit, cache.max_bytes):
            return http.download(url, self.server, file, limit, too_big, self.bounds)
        while True:  # ends: each turn downloads, copies, or waits for a download that ended
            copied = cache.copy_to(sha256, file, limit, too_big)
            if copied is not None:
                self.cache_hits += 1
                return copied
            with cache.download_lock(sha256, self.bounds) as ours:
                if ours:
                    with cache.new_entry(sha256) as entry:
                        http.download(url, self.server, entry, limit, too_big, self.bounds, expect_sha256=sha256)
                    copied = cache.copy_to(sha256, file, limit, too_big)
                    if copied is None:
                        raise CacheUnusable(f"{sha256} vanished as it was kept")
                    return copied


def open_cache(request: Request) -> Cache | None:
    """The dom0 cache named by cache_dir=, or None (not set, or not usable: then a warning
    line, and the boot downloads without it)."""
    if not request.cache_dir:
        return None
    try:
        return Cache(request.cache_dir, request.cache_mb << 20)
    except CacheUnusable as exc:
        print(f"pypxeboot: warning: {one_line(str(exc))}: booting without the cache", file=sys.stderr)
        return None


def check_entry(entry: pxelinux.Entry, config: str) -> None:
    """Refuse what the network may not put into xl's result or into a TFTP request."""
    for field, value in (("kernel", entry.kernel), ("initrd", entry.initrd)):
        if value and not _PLAIN_PATH.fullmatch(value):
            raise BootFailed(f"{config}: the {field} path {value!r} is not a plain TFTP path "
                             "(printable ASCII, no blanks, at most 255 characters): refused")
    char = control_character(entry.append)
    if char:
        raise BootFailed(f"{config}: the append line holds a control character ({char!r}): refused")


def format_result(kind: str, kernel: str, ramdisk: str, args: str) -> bytes:
    """The three formats pygrub writes, which libxl and xm read: no item holds a NUL or
    newline, and sxp's quoted args hold no quote or backslash."""
    char = control_character(args)
    if char:
        raise BootFailed(f"the kernel command line holds a control character ({char!r}): refused")
    if len(args) > MAX_CMDLINE:
        raise BootFailed(f"the kernel command line is longer than {MAX_CMDLINE} characters")
    items = [("kernel", kernel)] + [(key, value) for key, value in (("ramdisk", ramdisk), ("args", args)) if value]
    if kind == "simple0":
        return b"".join(f"{key} {value}\0".encode() for key, value in items) + b"\0"
    if kind == "simple":
        return b"".join(f"{key} {value}\n".encode() for key, value in items)
    if '"' in args or "\\" in args:
        raise BootFailed("the kernel command line holds a quote or backslash, which the sxp output "
                         "cannot carry (ask for --output-format=simple0)")
    return ("linux " + "".join(f'({key} "{value}")' if key == "args" else f"({key} {value})"
                               for key, value in items)).encode()


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


def boot(request: Request, options: argparse.Namespace, outputs: Outputs, bounds: Bounds,
         started: float) -> bytes:
    """Everything up to the result xl reads; returns it (or execs pygrub for localboot)."""
    phases: list[tuple[str, float]] = []  # (phase, when it ended): the success line shows them

    def ended(phase: str) -> None:
        phases.append((phase, time.monotonic()))

    if request.server:
        lease = Lease(ip="", next_server=request.server, boot_file="")
    else:
        lease = obtain_lease(request.mac, request.interface, request.dhcp_server, bounds.deadline)
    ended("DHCP")
    prefix = lease.boot_file.rpartition("/")[0] + "/" if "/" in lease.boot_file else ""
    fetcher = Fetcher(lease.next_server, request.tftp_port, prefix, bounds, request, None)
    for name in config_names(request.mac, lease.ip or None):
        try:
            text = fetcher.text(f"pxelinux.cfg/{name}")
            break
        except ServerRefused:
            continue  # no such name on the server: pxelinux asks the next one
    else:
        raise BootFailed(f"no pxelinux.cfg/ file for {request.mac} on {lease.next_server}")
    config = f"tftp://{lease.next_server}/{fetcher.path(f'pxelinux.cfg/{name}')}"
    entry = pxelinux.parse(text)
    if entry is None:
        raise BootFailed(f"{config} names nothing to boot")
    check_entry(entry, config)
    for path in (entry.kernel, entry.initrd):
        if http.is_url(path):
            http.split_url(path, lease.next_server)  # another host: refused before any download
    said = f"pypxeboot: {request.mac} boots {entry.label!r} from {config}"
    if entry.localboot:
        print(said, file=sys.stderr)
        hand_to_pygrub(request, options)
    ended("config")
    fetcher.cache = open_cache(request)
    try:
        kernel = fetcher.to_file(entry.kernel, outputs, "kernel")
        ended("kernel")
        ramdisk = fetcher.to_file(entry.initrd, outputs, "ramdisk") if entry.initrd else ""
        ended("initrd")
    finally:
        if fetcher.cache is not None:
            fetcher.cache.close()
    times = ", ".join(f"{phase} {end - start:.2f} s" for (phase, end), start
                      in zip(phases, [started] + [end for _, end in phases[:-1]], strict=True))
    said += f" ({times}" + (f"; {fetcher.cache_hits} from the dom0 cache)" if fetcher.cache else ")")
    args = " ".join(filter(None, [entry.append, options.args or ""]))
    result = format_result(options.output_format or ("simple0" if options.output else "sxp"),
                           outputs.checked(kernel), ramdisk and outputs.checked(ramdisk), args)
    print(said, file=sys.stderr)  # only once it worked: a failure is one line, the error
    return result


def write_result(path: str, result: bytes) -> None:
    """The result file xl reads (libxl creates it first): never through a symlink, and empty
    again if the write fails part way."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(result)
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        os.ftruncate(fd, 0)
        raise
    finally:
        os.close(fd)


def _terminated(signum: int, frame: object) -> NoReturn:
    raise BootFailed(f"stopped by signal {signal.Signals(signum).name}")


def one_line(message: str) -> str:
    """An error message as one printable line: the network chose parts of it."""
    return _CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", message)[:500]


def main(argv: list[str] | None = None) -> None:
    started = time.monotonic()
    parser = argparse.ArgumentParser(prog="pypxeboot", allow_abbrev=False,
                                     description="Network-boot a Xen PV domU (run by xl as its bootloader).")
    parser.add_argument("--kernel", help="kernel= from the domU config (unused when netbooting)")
    parser.add_argument("--ramdisk", help="ramdisk= from the domU config (unused when netbooting)")
    parser.add_argument("--args", help="extra= from the domU config: appended to the command line")
    parser.add_argument("--output", help="file to write the result to (default: stdout)")
    parser.add_argument("--output-format", choices=("simple0", "simple", "sxp"))
    parser.add_argument("--output-directory", help="where the kernel and initrd are written")
    parser.add_argument("words", nargs="*", help="mac=MAC [interface=BR] [server=IP] [dhcp_server=IP] "
                        "[max_file_mb=N] [max_total_mb=N] [min_rate_kbs=N] [rate_window=S] [deadline=S] DISK")
    options = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    # tftpy's packet decoders log what peers send (an ERR's text, at error level): the
    # network would write its own lines into xl's log. The one error line says what matters.
    logging.getLogger("tftpy").setLevel(logging.CRITICAL)
    outputs = Outputs(options.output_directory or tempfile.gettempdir())
    try:
        request = parse_words(options.words)
        bounds = Bounds(max_file=request.max_file_mb << 20, max_total=request.max_total_mb << 20,
                        min_rate=request.min_rate_kbs << 10, rate_window=request.rate_window,
                        deadline=started + request.deadline)
        result = boot(request, options, outputs, bounds, started)
        if options.output:
            write_result(options.output, result)
        else:
            sys.stdout.buffer.write(result + b"\n")
    except (BootFailed, DhcpFailed, TransferFailed, OSError) as exc:
        outputs.remove_all()
        print(f"pypxeboot: error: {one_line(str(exc))}", file=sys.stderr)
        sys.exit(1)
    except BaseException:
        outputs.remove_all()
        raise
