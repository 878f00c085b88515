"""pypxeboot against a hostile guest network, run as libxl runs it, its result read as libxl reads it.

Each test performs the attack for real: a hostile TFTP server (below) serving configs that try
to smuggle items into the ``simple0`` result, forged DATA from other ports and addresses during
a transfer, an endless kernel, a 200 MB config, a server that drips one block every 4 s; and a
rogue DHCP server on a bridge in network namespaces. After each, the result file is parsed the
way libxl does (split on NUL; every ``kernel``/``ramdisk`` item is mapped, then unlinked), and
the output directory is checked to hold nothing when the boot failed.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dhcp_support import CLIENT_IF, SERVER_IF, SERVER_IP, Link, can_make_namespaces, inside, run, veth_link
from test_chain import MAC, register, serving, workdir  # noqa: F401 (workdir: a fixture)

from pxeserver.dhcp import codec
from pxeserver.dhcp.codec import MessageType, Option
from pxeserver.pypxeboot.dhcp import only_exchange

PYPXEBOOT = [sys.executable, "-c", "from pxeserver.pypxeboot import main; main()"]
RRQ, DATA, ACK, ERROR, OACK = 1, 3, 4, 5, 6
KERNEL = bytes(range(256)) * 600  # 150 KiB: about a hundred 1468-byte blocks
INITRD = b"initrd" * 50_000


# -- a hostile TFTP server ------------------------------------------------------------------


@dataclass
class Served:
    """How the hostile server sends one file."""

    data: bytes = b""
    endless: bool = False  # full blocks forever (stopped only by the client)
    block_delay: float = 0.0  # seconds before each block
    tsize: int | None = None  # announced in the OACK (None: the real size, -1: not announced)
    inject: bool = False  # before each real block, forged DATA from another port and address
    error: bytes = b""  # answer with this error message instead
    window: int = 0  # RFC 7440: acknowledge this windowsize (0: ignore the option, lockstep)
    drop: frozenset[int] = frozenset()  # block numbers not sent the first time (windowed only)


@dataclass
class HostileTftp:
    """A TFTP server that answers RRQs for ``files`` as each Served says, one thread per
    transfer, and counts what it sent; every transfer ends within ``give_up`` seconds."""

    files: dict[str, Served]
    address: str = "127.0.0.1"
    forger_address: str = "127.0.0.2"
    give_up: float = 150.0
    namespace: str = ""  # where its sockets live ("": this one)
    sent: dict[str, int] = field(default_factory=dict)  # bytes of real DATA per name
    forged: int = 0
    errors: list[int] = field(default_factory=list)  # error codes the client sent us
    acks: int = 0  # ACKs of DATA received in windowed transfers

    def __post_init__(self) -> None:
        with self.where():
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind((self.address, 0))
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def where(self) -> AbstractContextManager[None]:
        return inside(self.namespace) if self.namespace else nullcontext()

    def __enter__(self) -> HostileTftp:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.sock.close()
        self.thread.join(10)

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stopping.is_set():
            try:
                packet, client = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            if struct.unpack("!H", packet[:2])[0] != RRQ:
                continue
            fields = packet[2:].split(b"\0")
            name, options = fields[0].decode(), dict(zip(fields[2:-1:2], fields[3:-1:2], strict=False))
            threading.Thread(target=self._transfer, args=(name, options, client), daemon=True).start()

    def _transfer(self, name: str, options: dict[bytes, bytes], client: tuple[str, int]) -> None:
        served = self.files.get(name)
        with self.where():
            sock, other_port, other_address = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3))
        with sock, other_port, other_address:
            sock.bind((self.address, 0))
            sock.settimeout(1.0)
            if served is None or served.error:
                message = served.error if served else b"File not found"
                sock.sendto(struct.pack("!HH", ERROR, 0 if served else 1) + message + b"\0", client)
                return
            if served.inject:
                other_port.bind((self.address, 0))
                other_address.bind((self.forger_address, sock.getsockname()[1]))  # the transfer's port number
            blksize = min(int(options.get(b"blksize", b"512")), 1468)
            if b"blksize" in options:
                announced = {"blksize": str(blksize)}
                size = len(served.data) if served.tsize is None else served.tsize
                if size >= 0 and b"tsize" in options:
                    announced["tsize"] = str(size)
                if served.window and b"windowsize" in options:
                    announced["windowsize"] = str(served.window)
                oack = struct.pack("!H", OACK) + b"".join(f"{k}\0{v}\0".encode() for k, v in announced.items())
                if not self._send_until_acked(sock, oack, 0, client):
                    return
                if "windowsize" in announced:
                    self._send_windowed(sock, name, served, blksize, client)
                    return
            self.sent[name] = 0
            ends = time.monotonic() + self.give_up
            block, offset = 1, 0
            while time.monotonic() < ends:
                chunk = (bytes([block & 0xFF]) * blksize) if served.endless else served.data[offset:offset + blksize]
                if served.block_delay:
                    time.sleep(served.block_delay)
                if served.inject:
                    forged = struct.pack("!HH", DATA, block & 0xFFFF) + b"\xee" * len(chunk)
                    other_port.sendto(forged, client)
                    other_address.sendto(forged, client)
                    self.forged += 2
                if not self._send_until_acked(sock, struct.pack("!HH", DATA, block & 0xFFFF) + chunk, block, client):
                    return
                self.sent[name] += len(chunk)
                if len(chunk) < blksize:
                    return
                block, offset = block + 1, offset + blksize

    def _send_windowed(self, sock: socket.socket, name: str, served: Served, blksize: int,
                       client: tuple[str, int]) -> None:
        """RFC 7440's sender: a window of blocks, then from the block after the one ACKed;
        the blocks in ``served.drop`` are left out the first time they are due."""
        blocks = [served.data[start:start + blksize] for start in range(0, len(served.data) + 1, blksize)]
        base, dropped, ends = 0, set(), time.monotonic() + self.give_up
        self.sent[name] = 0
        while base < len(blocks) and time.monotonic() < ends:
            for index in range(base, min(base + served.window, len(blocks))):
                if index + 1 in served.drop and index + 1 not in dropped:
                    dropped.add(index + 1)
                    continue
                sock.sendto(struct.pack("!HH", DATA, index + 1) + blocks[index], client)
                self.sent[name] += len(blocks[index])
            try:
                reply, source = sock.recvfrom(2048)
            except TimeoutError:
                continue  # send the window again
            opcode, number = struct.unpack("!HH", reply[:4])
            if opcode == ERROR:
                self.errors.append(number)
                return
            if source == client and opcode == ACK and number >= base:
                self.acks += 1
                base = number

    def _send_until_acked(self, sock: socket.socket, packet: bytes, block: int, client: tuple[str, int]) -> bool:
        for _ in range(5):
            sock.sendto(packet, client)
            try:
                while True:
                    reply, source = sock.recvfrom(2048)
                    opcode, number = struct.unpack("!HH", reply[:4])
                    if opcode == ERROR:
                        self.errors.append(number)
                        return False
                    if source == client and opcode == ACK and number == block & 0xFFFF:
                        return True
            except TimeoutError:
                continue
            except OSError:
                return False
        return False


def config_for(kernel_line: str, append: str, initrd: str = "images/initrd") -> dict[str, Served]:
    config = f"default x\nlabel x\n  kernel {kernel_line}\n  append initrd={initrd} {append}\n"
    return {f"pxelinux.cfg/01-{MAC.replace(':', '-')}": Served(config.encode("utf-8", "surrogateescape")),
            "images/linux": Served(KERNEL), "images/initrd": Served(INITRD)}


# -- pypxeboot, as libxl runs it and reads it -----------------------------------------------


@dataclass
class Outcome:
    returncode: int
    stderr: str
    items: list[tuple[str, str]]  # the result file as libxl splits it
    left: list[str]  # what is in the output directory afterwards
    max_rss_kb: int  # peak resident memory (VmHWM) as last sampled
    seconds: float


def libxl_items(result: bytes) -> list[tuple[str, str]]:
    """libxl's parse_bootloader_result: NUL-separated items, "kernel P", "ramdisk P", "args A"."""
    items = []
    for item in result.split(b"\0"):
        key, _, value = item.decode("utf-8", "replace").partition(" ")
        if item:
            items.append((key, value))
    return items


def run_as_libxl(out: Path, *words: str, timeout: float = 60, fmt: str = "simple0",
                 netns: str = "") -> Outcome:
    """pypxeboot with libxl's arguments, and its peak memory, sampled every 10 ms."""
    directory = out / "d"
    directory.mkdir(parents=True)
    result = out / "result"
    result.touch()  # libxl creates the file first
    stderr = out / "stderr"
    prefix = ["ip", "netns", "exec", netns] if netns else []  # ip execs: the pid stays pypxeboot's
    started = time.monotonic()
    with open(stderr, "wb") as errors:
        flags = [word for word in words if word.startswith("--")]  # libxl's own come first
        words = tuple(word for word in words if not word.startswith("--"))
        process = subprocess.Popen([*prefix, *PYPXEBOOT, *flags, f"--output={result}", f"--output-format={fmt}",
                                    f"--output-directory={directory}", f"mac={MAC}", *words, "/dev/null"],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
        peak = 0
        ends = started + timeout
        while process.poll() is None and time.monotonic() < ends:
            peak = max(peak, high_water_kb(process.pid))
            time.sleep(0.01)
        if process.poll() is None:
            process.kill()
            process.wait(10)
    return Outcome(process.returncode, stderr.read_text(errors="replace"), libxl_items(result.read_bytes()),
                   sorted(p.name for p in directory.iterdir()), peak, time.monotonic() - started)


def high_water_kb(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM: its own, since exec; wait4's
    ru_maxrss would count the test process it was forked from)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return next((int(line.split()[1]) for line in status if line.startswith("VmHWM:")), 0)
    except (OSError, ValueError):
        return 0


def assert_refused(outcome: Outcome, *expected: str) -> None:
    """Exit 1, one line on stderr saying why, nothing for libxl, nothing left behind."""
    lines = outcome.stderr.splitlines()
    assert outcome.returncode == 1 and len(lines) == 1 and lines[0].startswith("pypxeboot: error: "), outcome
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert outcome.items == [] and outcome.left == [], outcome


def assert_booted(outcome: Outcome, directory: Path, kernel: bytes, initrd: bytes) -> dict[str, str]:
    """What libxl would map: exactly one kernel and one ramdisk, files pypxeboot wrote in D."""
    assert outcome.returncode == 0, outcome
    keys = [key for key, _ in outcome.items]
    assert sorted(keys) == ["args", "kernel", "ramdisk"], outcome.items
    fields = dict(outcome.items)
    for key, expected in (("kernel", kernel), ("ramdisk", initrd)):
        path = Path(fields[key])
        assert path.parent == directory and path.is_file() and not path.is_symlink()
        assert path.read_bytes() == expected
    return fields


# -- (a) configs that try to put their own items into the result ----------------------------


@pytest.mark.parametrize("kernel_line, append, refused_for", [
    ("images/linux", "console=hvc0\0kernel /etc/shadow\0ramdisk /etc/passwd",
     "append line holds a control character ('\\x00')"),
    ("images/linux\0/etc/shadow", "console=hvc0",
     "the kernel path 'images/linux\\x00/etc/shadow' is not a plain TFTP path"),
    ("images/linux", "quiet\rkernel /etc/shadow", "control character ('\\r')"),
    ("images/linux", "quiet\x0bkernel /etc/shadow", "control character ('\\x0b')"),
    ("images/linux", "quiet\x1b[2J", "control character ('\\x1b')"),
    ("images/linux", "quiet\u0085kernel /etc/shadow", "control character ('\\x85')"),
    ("images/l\u00efnux", "quiet", "is not a plain TFTP path"),
])
def test_a_config_smuggling_items_into_the_result_is_refused(tmp_path: Path, kernel_line: str, append: str,
                                                           refused_for: str) -> None:
    with HostileTftp(config_for(kernel_line, append)) as server:
        outcome = run_as_libxl(tmp_path, "server=127.0.0.1", f"tftp_port={server.port}")
    assert_refused(outcome, "pxelinux.cfg/01-00-16-3e-12-34-56", refused_for)
    assert "images/linux" not in server.sent  # refused before anything was downloaded


def test_an_initrd_path_with_a_nul_is_refused(tmp_path: Path) -> None:
    files = config_for("images/linux", "quiet", initrd="images/initrd\0ramdisk")
    with HostileTftp(files) as server:
        assert_refused(run_as_libxl(tmp_path, "server=127.0.0.1", f"tftp_port={server.port}"),
                       "the initrd path 'images/initrd\\x00ramdisk' is not a plain TFTP path")


def test_quotes_and_newlines_cannot_inject_into_the_other_formats(tmp_path: Path) -> None:
    files = config_for("images/linux", 'ks="http://x/ks" quiet')
    with HostileTftp(files) as server:
        simple0 = run_as_libxl(tmp_path / "a", "server=127.0.0.1", f"tftp_port={server.port}")
        sxp = run_as_libxl(tmp_path / "b", "server=127.0.0.1", f"tftp_port={server.port}", fmt="sxp")
        newline = run_as_libxl(tmp_path / "c", "server=127.0.0.1", f"tftp_port={server.port}", fmt="simple")
    fields = assert_booted(simple0, tmp_path / "a" / "d", KERNEL, INITRD)
    assert fields["args"] == 'ks="http://x/ks" quiet'  # simple0 carries a quote safely
    assert_refused(sxp, "quote or backslash")
    assert newline.returncode == 0  # "simple": one item per line, and no line holds another
    lines = (tmp_path / "c" / "result").read_text().splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["kernel", "ramdisk", "args"]


def test_xl_s_own_args_with_a_newline_are_refused_too(tmp_path: Path) -> None:
    with HostileTftp(config_for("images/linux", "quiet")) as server:
        outcome = run_as_libxl(tmp_path, "server=127.0.0.1", f"tftp_port={server.port}", "--args=a\nkernel /etc/shadow")
    assert_refused(outcome, "the kernel command line holds a control character ('\\n')")


def test_a_server_s_error_text_cannot_add_lines_to_xl_s_log(tmp_path: Path) -> None:
    files = config_for("images/linux", "quiet")
    files["images/linux"] = Served(error=b"gone\nlibxl: everything is fine\x1b[2J")
    with HostileTftp(files) as server:
        outcome = run_as_libxl(tmp_path, "server=127.0.0.1", f"tftp_port={server.port}")
    assert_refused(outcome, "the server answered: gone\\x0alibxl: everything is fine\\x1b[2J")


# -- (c) DATA injected from another port and another address --------------------------------


def test_forged_data_from_other_ports_and_addresses_is_ignored(tmp_path: Path) -> None:
    files = config_for("images/linux", "quiet")
    files["images/linux"] = Served(KERNEL, inject=True)
    files["images/initrd"] = Served(INITRD, inject=True)
    with HostileTftp(files) as server:
        outcome = run_as_libxl(tmp_path, "server=127.0.0.1", f"tftp_port={server.port}")
    assert_booted(outcome, tmp_path / "d", KERNEL, INITRD)
    blocks = -(-len(KERNEL) // 1468) + -(-len(INITRD) // 1468)
    assert server.forged == 2 * blocks  # each block was forged twice before the real one came


# -- windows (RFC 7440): one ACK per window, lost blocks fetched again -----------------------


def test_a_windowed_transfer_is_acknowledged_once_per_window(tmp_path: Path) -> None:
    files = config_for("images/linux", "quiet")
    files["images/linux"] = Served(KERNEL, window=16)
    files["images/initrd"] = Served(INITRD, window=16)
    with HostileTftp(files) as server:
        outcome = run_as_libxl(tmp_path, "server=127.0.0.1", f"tftp_port={server.port}")
    assert_booted(outcome, tmp_path / "d", KERNEL, INITRD)
    blocks = len(KERNEL) // 1468 + 1 + len(INITRD) // 1468 + 1
    assert server.acks <= blocks // 16 + 2  # one per full window and one for each file's last


def test_blocks_lost_from_a_window_are_fetched_again(tmp_path: Path) -> None:
    """Blocks 5 and 40 and the last one go missing once: the client ACKs the block before
    each gap, the server sends from there, and the file arrives whole."""
    files = config_for("images/linux", "quiet")
    files["images/linux"] = Served(KERNEL, window=16, drop=frozenset({5, 40, len(KERNEL) // 1468 + 1}))
    with HostileTftp(files) as server:
        outcome = run_as_libxl(tmp_path, "server=127.0.0.1", f"tftp_port={server.port}")
    assert_booted(outcome, tmp_path / "d", KERNEL, INITRD)
    assert outcome.seconds < 30


def test_a_window_larger_than_asked_is_refused(tmp_path: Path) -> None:
    files = config_for("images/linux", "quiet")
    files["images/linux"] = Served(KERNEL, window=64)
    with HostileTftp(files) as server:
        outcome = run_as_libxl(tmp_path, "server=127.0.0.1", f"tftp_port={server.port}")
    assert_refused(outcome, "the server's option acknowledgement is not what we asked")


# -- (d), (e) an endless kernel, a 200 MB config --------------------------------------------


def test_an_endless_kernel_stops_at_the_cap(tmp_path: Path) -> None:
    files = config_for("images/linux", "quiet")
    files["images/linux"] = Served(endless=True, tsize=-1)
    with HostileTftp(files) as server:
        outcome = run_as_libxl(tmp_path, "server=127.0.0.1", f"tftp_port={server.port}", "max_file_mb=4")
    assert_refused(outcome, "tftp://127.0.0.1/images/linux: larger than the 4 MiB cap on one file (max_file_mb=)")
    assert (4 << 20) - 1468 <= server.sent["images/linux"] <= 4 << 20  # it stopped at the cap
    assert server.errors == [3]  # and told the server so
    assert outcome.max_rss_kb < 50_000


def test_the_total_cap_counts_the_kernel_and_the_ramdisk_together(tmp_path: Path) -> None:
    files = config_for("images/linux", "quiet")
    files["images/linux"] = Served(b"k" * (3 << 20))
    files["images/initrd"] = Served(endless=True, tsize=-1)
    with HostileTftp(files) as server:
        outcome = run_as_libxl(tmp_path, "server=127.0.0.1", f"tftp_port={server.port}", "max_total_mb=5")
    assert_refused(outcome, "the kernel and ramdisk together pass the 5 MiB cap (max_total_mb=)")
    assert (2 << 20) - 1468 <= server.sent["images/initrd"] <= 2 << 20


def test_an_announced_size_over_the_cap_stops_before_any_data(tmp_path: Path) -> None:
    files = config_for("images/linux", "quiet")
    files["images/linux"] = Served(endless=True, tsize=300 << 20)
    with HostileTftp(files) as server:
        outcome = run_as_libxl(tmp_path, "server=127.0.0.1", f"tftp_port={server.port}")
    assert_refused(outcome, "larger than the 256 MiB cap on one file (max_file_mb=)")
    assert "images/linux" not in server.sent and server.errors == [3]


@pytest.mark.slow
def test_an_endless_kernel_stops_at_the_default_cap_with_disk_and_memory_bounded(tmp_path: Path) -> None:
    files = config_for("images/linux", "quiet")
    files["images/linux"] = Served(endless=True, tsize=-1)
    with HostileTftp(files, give_up=280) as server:
        outcome = run_as_libxl(tmp_path, "server=127.0.0.1", f"tftp_port={server.port}", timeout=280)
    assert_refused(outcome, "larger than the 256 MiB cap on one file")
    assert (256 << 20) - 1468 <= server.sent["images/linux"] <= 256 << 20
    assert outcome.max_rss_kb < 50_000  # written to disk block by block, never held
    print(f"endless kernel: stopped at {server.sent['images/linux']} bytes after {outcome.seconds:.1f} s, "
          f"peak RSS {outcome.max_rss_kb} KiB")


@pytest.mark.parametrize("tsize", [-1, 200_000_000])
def test_a_200_mb_config_is_capped_without_using_memory(tmp_path: Path, tsize: int) -> None:
    files = config_for("images/linux", "quiet")
    name = next(iter(files))
    files[name] = Served(endless=True, tsize=tsize)  # 200 MB of it, were it read to the end
    with HostileTftp(files) as server:
        outcome = run_as_libxl(tmp_path, "server=127.0.0.1", f"tftp_port={server.port}")
    assert_refused(outcome, f"tftp://127.0.0.1/{name}: larger than 64 KiB")
    assert server.sent.get(name, 0) <= 64 * 1024
    assert outcome.max_rss_kb < 50_000
    print(f"200 MB config (tsize {tsize}): {server.sent.get(name, 0)} bytes read, peak RSS {outcome.max_rss_kb} KiB")


# -- (f) a server that drips ---------------------------------------------------------------


def test_a_dripping_server_is_dropped_by_the_speed_floor(tmp_path: Path) -> None:
    files = config_for("images/linux", "quiet")
    files["images/linux"] = Served(KERNEL, block_delay=1.0)  # 1.4 KiB/s
    with HostileTftp(files) as server:
        outcome = run_as_libxl(tmp_path, "server=127.0.0.1", f"tftp_port={server.port}",
                               "min_rate_kbs=4", "rate_window=3")
    assert_refused(outcome, "tftp://127.0.0.1/images/linux: slower than 4 KiB/s over 3 s (min_rate_kbs=, rate_window=)")
    assert outcome.seconds < 10


def test_a_dripping_server_is_dropped_at_the_deadline(tmp_path: Path) -> None:
    files = config_for("images/linux", "quiet")
    files["images/linux"] = Served(KERNEL, block_delay=0.5)  # 2.9 KiB/s: above the floor
    with HostileTftp(files) as server:
        outcome = run_as_libxl(tmp_path, "server=127.0.0.1", f"tftp_port={server.port}",
                               "min_rate_kbs=1", "deadline=4")
    assert_refused(outcome, "the boot's deadline passed (deadline=)")
    assert 3.5 < outcome.seconds < 8


@pytest.mark.slow
def test_a_server_dripping_a_block_every_4_s_is_abandoned_within_two_minutes_by_default(tmp_path: Path) -> None:
    files = config_for("images/linux", "quiet")
    files["images/linux"] = Served(KERNEL, block_delay=4.0)
    with HostileTftp(files) as server:
        outcome = run_as_libxl(tmp_path, "server=127.0.0.1", f"tftp_port={server.port}", timeout=150)
    assert_refused(outcome, "slower than 16 KiB/s over 30 s")
    assert outcome.seconds < 120
    print(f"drip (one block per 4 s): abandoned after {outcome.seconds:.1f} s")


@pytest.mark.parametrize("word, message", [
    ("max_file_mb=0", "max_file_mb='0' is not a whole number from 1 to 4096"),
    ("deadline=1e3", "deadline='1e3' is not a whole number from 1 to 86400"),
    ("min_rate_kbs=\u0661", "min_rate_kbs='\u0661' is not a whole number"),
    ("dhcp_server=10.0.0.256", "dhcp_server='10.0.0.256' is not an IPv4 address"),
    ("server=evil.example", "server='evil.example' is not an IPv4 address"),
])
def test_bad_words_are_one_line_errors(tmp_path: Path, word: str, message: str) -> None:
    assert_refused(run_as_libxl(tmp_path, "server=127.0.0.1", "tftp_port=9", word), message)


# -- (b) a rogue DHCP server on the bridge -------------------------------------------------

ROGUE_IP = "10.77.0.3"
DOM0_IP = "10.77.0.2"
BRIDGE = "xenbr0"


@dataclass
class Lan:
    """dom0 with a bridge (where pypxeboot runs), the good server and a rogue guest, each in
    its own namespace, joined at dom0's bridge as domUs are at xenbr0."""

    dom0: str
    good: str
    rogue: str


@contextmanager
def bridged_lan(tag: str) -> Iterator[Lan]:
    lan = Lan(*(f"{tag}-{os.getpid()}-{role}" for role in "dgr"))
    try:
        for namespace in (lan.dom0, lan.good, lan.rogue):
            run("ip", "netns", "add", namespace)
            run("ip", "-n", namespace, "link", "set", "lo", "up")
        run("ip", "-n", lan.dom0, "link", "add", "name", BRIDGE, "type", "bridge")
        for namespace, interface, port, address in ((lan.good, SERVER_IF, "vif1", SERVER_IP),
                                                    (lan.rogue, "eth0", "vif2", ROGUE_IP)):
            run("ip", "link", "add", "name", interface, "netns", namespace, "type", "veth",
                "peer", "name", port, "netns", lan.dom0)
            run("ip", "-n", lan.dom0, "link", "set", "dev", port, "master", BRIDGE)
            run("ip", "-n", lan.dom0, "link", "set", "dev", port, "up")
            run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", interface)
            run("ip", "-n", namespace, "link", "set", "dev", interface, "up")
        run("ip", "-n", lan.dom0, "addr", "add", f"{DOM0_IP}/24", "dev", BRIDGE)
        run("ip", "-n", lan.dom0, "link", "set", "dev", BRIDGE, "up")
        yield lan
    finally:
        for namespace in (lan.dom0, lan.good, lan.rogue):
            run("ip", "netns", "del", namespace, check=False)


@dataclass
class RogueDhcp:
    """A guest answering pypxeboot's broadcasts with its own server id and next-server.

    ``answer`` says what it sends for each exchange it sees (OFFER and/or ACK, repeated every
    2 ms for 3 s); ``on_good_offer`` runs when it sees the good server's OFFER go by."""

    namespace: str
    answer: set[int]
    on_good_offer: Callable[[], None] = lambda: None
    sent: int = 0

    def __enter__(self) -> RogueDhcp:
        self.stopping = threading.Event()
        with inside(self.namespace):
            self.server_side = self._socket(67)
            self.client_side = self._socket(68)  # to watch the good server's replies go by
        self.threads = [threading.Thread(target=self._answer, daemon=True),
                        threading.Thread(target=self._watch, daemon=True)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(10)
        self.server_side.close()
        self.client_side.close()

    @staticmethod
    def _socket(port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
        sock.bind(("0.0.0.0", port))
        sock.settimeout(0.2)
        return sock

    def _reply(self, request: codec.Packet, kind: int) -> bytes:
        reply = codec.Packet(op=codec.BOOTREPLY, xid=request.xid, chaddr=request.chaddr, flags=codec.BROADCAST_FLAG,
                             yiaddr="10.77.0.99", siaddr=ROGUE_IP)
        reply.options = {Option.MESSAGE_TYPE: bytes((kind,)), Option.SERVER_ID: codec.ip_bytes(ROGUE_IP),
                         Option.SUBNET_MASK: codec.ip_bytes("255.255.255.0"),
                         Option.LEASE_TIME: struct.pack("!I", 3600)}
        return codec.encode(reply)

    def _answer(self) -> None:
        flood_until, replies = 0.0, []
        while not self.stopping.is_set():
            if time.monotonic() < flood_until:
                for reply in replies:
                    self.server_side.sendto(reply, ("255.255.255.255", 68))
                    self.sent += 1
                self.server_side.settimeout(0.002)
            else:
                self.server_side.settimeout(0.2)
            try:
                data = self.server_side.recv(4096)
            except TimeoutError:
                continue
            request = codec.parse(data)
            if request.message_type in (MessageType.DISCOVER, MessageType.REQUEST):
                replies = [self._reply(request, kind) for kind in sorted(self.answer)]
                flood_until = time.monotonic() + 3

    def _watch(self) -> None:
        while not self.stopping.is_set():
            try:
                data, (source, _) = self.client_side.recvfrom(4096)
            except TimeoutError:
                continue
            if source == SERVER_IP and codec.parse(data).message_type == MessageType.OFFER:
                self.on_good_offer()
                return


def processes_in(namespace: str) -> list[int]:
    """The processes in a namespace: the good server, held and let go to order the race."""
    return [int(pid) for pid in run("ip", "netns", "pids", namespace).stdout.split()]


def signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        os.kill(pid, signum)


needs_namespaces = pytest.mark.skipif(not can_make_namespaces(), reason="needs root for network namespaces")


def test_the_kernel_queues_only_this_exchange_s_dhcp_replies() -> None:
    """pypxeboot's DHCP socket filter (SO_ATTACH_FILTER) on a real socket: 200 replies with
    other xids (a storm's other guests, or a flood) and garbage shorter than a DHCP header are
    dropped by the kernel; the one reply with this exchange's xid is the first thing read."""
    xid = 0x5EED1234
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        only_exchange(listener, xid)
        listener.bind(("127.0.0.1", 0))
        mac = bytes.fromhex("00163e000001")

        def reply(of: int) -> bytes:
            return codec.encode(codec.Packet(op=codec.BOOTREPLY, xid=of, chaddr=mac,
                                             options={Option.MESSAGE_TYPE: bytes((MessageType.OFFER,))}))

        for other in range(200):
            sender.sendto(reply(xid ^ (other + 1)), listener.getsockname())
        sender.sendto(b"\x02\x01\x06", listener.getsockname())  # too short to hold an xid
        sender.sendto(reply(xid), listener.getsockname())
        listener.settimeout(5)
        assert codec.parse(listener.recv(4096)).xid == xid
        listener.settimeout(0.3)
        with pytest.raises(TimeoutError):
            listener.recv(4096)


@pytest.mark.netns
@needs_namespaces
def test_the_deadline_covers_dhcp_too(tmp_path: Path) -> None:
    """No DHCP server answers on the link: pypxeboot gives up at its deadline, not after its
    usual four attempts."""
    with veth_link("pdl") as link:
        outcome = run_as_libxl(tmp_path, f"interface={CLIENT_IF}", "deadline=2", netns=link.client_ns)
    assert_refused(outcome, "the boot's deadline passed during DHCP (deadline=)")
    assert outcome.seconds < 5


@pytest.mark.slow
@pytest.mark.netns
@needs_namespaces
@pytest.mark.parametrize("pinned", [True, False])
def test_a_rogue_dhcp_server_that_answers_first(workdir: Path, pinned: bool) -> None:  # noqa: F811
    """The rogue answers while the good server is held (SIGSTOP), so it is first for sure;
    with ``dhcp_server=`` pypxeboot waits for the good one; without, the first wins (which
    is why domu-config writes the word)."""
    register(workdir)
    rogue_files = config_for("images/linux", "quiet")
    rogue_files["images/linux"] = Served(b"ROGUE KERNEL")
    with bridged_lan(f"rg{int(pinned)}") as lan, serving(Link(lan.good, lan.dom0), workdir):
        rogue_tftp = HostileTftp(rogue_files, address=ROGUE_IP, namespace=lan.rogue)
        with rogue_tftp, RogueDhcp(lan.rogue, {MessageType.OFFER, MessageType.ACK}) as rogue:
            good = processes_in(lan.good)
            signal_all(good, signal.SIGSTOP)
            threading.Timer(1.5, signal_all, (good, signal.SIGCONT)).start()
            words = [f"interface={BRIDGE}", f"tftp_port={rogue_tftp.port}"] if not pinned else \
                [f"interface={BRIDGE}", f"dhcp_server={SERVER_IP}"]
            outcome = run_as_libxl(workdir / "run", *words, netns=lan.dom0)
            time.sleep(1.6)  # the good server runs again before it is stopped
        assert rogue.sent > 0
    if pinned:
        assert_booted(outcome, workdir / "run" / "d", (workdir / "tftproot/images/debian12/linux").read_bytes(),
                      (workdir / "tftproot/images/debian12/initrd.gz").read_bytes())
        assert f"from tftp://{SERVER_IP}/pxelinux.cfg/01-" in outcome.stderr
    else:
        assert outcome.returncode == 0 and Path(dict(outcome.items)["kernel"]).read_bytes() == b"ROGUE KERNEL"


@pytest.mark.slow
@pytest.mark.netns
@needs_namespaces
def test_after_the_first_offer_only_that_server_s_ack_counts(workdir: Path) -> None:  # noqa: F811
    """The good server offers first; the rogue then floods ACKs naming itself, while the good
    server is held for a second, so the rogue's ACKs arrive first: they are ignored."""
    register(workdir)
    with bridged_lan("ack") as lan, serving(Link(lan.good, lan.dom0), workdir):
        good = processes_in(lan.good)

        def hold_the_good_server() -> None:
            signal_all(good, signal.SIGSTOP)
            threading.Timer(1.0, signal_all, (good, signal.SIGCONT)).start()

        with RogueDhcp(lan.rogue, {MessageType.ACK}, on_good_offer=hold_the_good_server) as rogue:
            outcome = run_as_libxl(workdir / "run", f"interface={BRIDGE}", netns=lan.dom0)
            time.sleep(1.1)
        assert rogue.sent > 10
    assert_booted(outcome, workdir / "run" / "d", (workdir / "tftproot/images/debian12/linux").read_bytes(),
                  (workdir / "tftproot/images/debian12/initrd.gz").read_bytes())
    assert f"from tftp://{SERVER_IP}/pxelinux.cfg/01-" in outcome.stderr
