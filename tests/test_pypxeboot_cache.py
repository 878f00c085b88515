"""pypxeboot's dom0 cache (``cache_dir=``): what the server announces a SHA-256 for is
downloaded once per dom0, and nothing the network or a stray file offers is ever handed to a
guest that was announced another digest.

The HTTP servers are real (http.server on loopback, one thread per request) and count the
GETs they answer; pypxeboot runs as libxl runs it. The hostile cases: a server whose body is
not the digest it announces (the boot fails, nothing is kept, a good server then boots the
guest); a server that serves other bytes under their own true digest (kept under that digest
only: a guest announced the real kernel's digest gets the real kernel); a symlink, a file of
another owner and a hard link placed under an entry's name (not trusted, replaced); a cache
directory others may write (not used); eight boots at once (one download per file); a guest
waiting on a stalled download (it gives up at its deadline); and a download that fails while
another guest waits for it (that guest downloads the file itself).
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import free_port
from test_pypxeboot_hostile import (
    INITRD,
    KERNEL,
    MAC,
    HostileTftp,
    Outcome,
    assert_booted,
    assert_refused,
    config_for,
    run_as_libxl,
)
from test_serve import start_server

EVIL = b"evil" * (len(KERNEL) // 4)  # as long as the kernel


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FileServer(ThreadingHTTPServer):
    """Serves ``files``: path -> (the body sent, the SHA-256 announced or None); counts GETs."""

    daemon_threads = True

    def __init__(self, files: dict[str, tuple[bytes, str | None]]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files, self.gets, self.no_head = files, Counter[str](), False
        self.kernel_headers: list[tuple[str, str]] = []  # sent with /linux instead of its digest
        # path -> (the body the first GET gets instead, seconds it pauses halfway through)
        self.first_get: dict[str, tuple[bytes, float]] = {}
        self.lock = threading.Lock()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class _Handler(BaseHTTPRequestHandler):
    server: FileServer

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        if self.server.no_head:
            self.send_error(405)
            return
        self._answer(body=False)

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.gets[self.path] += 1
            first = self.server.gets[self.path] == 1
        self._answer(body=True, first=first)

    def _answer(self, body: bool, first: bool = False) -> None:
        if self.path not in self.server.files:
            self.send_error(404)
            return
        data, digest = self.server.files[self.path]
        pause = 0.0
        if body and first and self.path in self.server.first_get:
            data, pause = self.server.first_get[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        if self.path == "/linux" and self.server.kernel_headers:
            for name, value in self.server.kernel_headers:
                self.send_header(name, value)
        elif digest is not None:
            self.send_header("Repr-Digest", f"sha-256=:{base64.b64encode(bytes.fromhex(digest)).decode()}:")
        self.end_headers()
        if body:
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            time.sleep(pause)
            self.wfile.write(data[len(data) // 2:])


@contextmanager
def serving(kernel: bytes = KERNEL, kernel_digest: str | None = sha256(KERNEL)) -> Iterator[tuple[FileServer, int]]:
    """An HTTP server with /linux and /initrd, and a TFTP server with the config naming them."""
    server = FileServer({"/linux": (kernel, kernel_digest), "/initrd": (INITRD, sha256(INITRD))})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        files = config_for(server.url("/linux"), "quiet", initrd=server.url("/initrd"))
        with HostileTftp(files) as tftp:
            yield server, tftp.port
    finally:
        server.shutdown()
        server.server_close()


def boot(out: Path, tftp_port: int, cache: Path, *words: str) -> Outcome:
    return run_as_libxl(out, "server=127.0.0.1", f"tftp_port={tftp_port}", f"cache_dir={cache}", *words)


def kept(cache: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in cache.iterdir()}


def test_a_dom0_downloads_each_file_once_and_copies_it_after(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with serving() as (server, port):
        first = boot(tmp_path / "1", port, cache)
        second = boot(tmp_path / "2", port, cache)
    assert_booted(first, tmp_path / "1" / "d", KERNEL, INITRD)
    assert_booted(second, tmp_path / "2" / "d", KERNEL, INITRD)
    assert server.gets == {"/linux": 1, "/initrd": 1}  # the second boot read no body
    assert "; 0 from the dom0 cache)" in first.stderr and "; 2 from the dom0 cache)" in second.stderr
    assert kept(cache) == {sha256(KERNEL): KERNEL, sha256(INITRD): INITRD}  # no partial or lock file left
    assert cache.stat().st_mode & 0o777 == 0o700
    assert all(path.stat().st_mode & 0o777 == 0o600 for path in cache.iterdir())
    # the guest's files are its own copies: xl unlinks them, the cache keeps its own
    assert all(Path(path).stat().st_nlink == 1 for key, path in second.items if key in ("kernel", "ramdisk"))


def test_a_body_that_is_not_its_announced_digest_is_refused_and_not_kept(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with serving(kernel=EVIL, kernel_digest=sha256(KERNEL)) as (_, port):
        hostile = boot(tmp_path / "1", port, cache)
    assert_refused(hostile, "/linux: the body's SHA-256 is", f"not the {sha256(KERNEL)} the server announced")
    assert sha256(KERNEL) not in kept(cache) and all(not name.startswith(".") for name in kept(cache))
    with serving() as (server, port):  # a good server afterwards: the guest boots the real kernel
        good = boot(tmp_path / "2", port, cache)
    assert_booted(good, tmp_path / "2" / "d", KERNEL, INITRD)
    assert server.gets["/linux"] == 1 and kept(cache)[sha256(KERNEL)] == KERNEL


def test_other_bytes_under_their_own_digest_never_reach_a_guest_announced_another(tmp_path: Path) -> None:
    """A hostile server may serve anything under that thing's true digest: kept there, and
    only there; the next guest, announced the real kernel's digest, gets the real kernel."""
    cache = tmp_path / "cache"
    with serving(kernel=EVIL, kernel_digest=sha256(EVIL)) as (_, port):
        assert_booted(boot(tmp_path / "1", port, cache), tmp_path / "1" / "d", EVIL, INITRD)
    with serving() as (server, port):
        good = boot(tmp_path / "2", port, cache)
    assert_booted(good, tmp_path / "2" / "d", KERNEL, INITRD)
    assert server.gets == {"/linux": 1}  # the initrd came from the cache, the kernel from the server
    assert kept(cache)[sha256(EVIL)] == EVIL and kept(cache)[sha256(KERNEL)] == KERNEL


@pytest.mark.parametrize("plant", ["symlink", "other owner", "hard link", "group readable", "fifo"])
def test_a_planted_entry_is_not_trusted_and_is_replaced(tmp_path: Path, plant: str) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    elsewhere = tmp_path / "planted"
    elsewhere.write_bytes(EVIL)
    entry = cache / sha256(KERNEL)
    if plant == "symlink":
        entry.symlink_to(elsewhere)
    elif plant == "hard link":
        elsewhere.chmod(0o600)
        os.link(elsewhere, entry)
    elif plant == "fifo":
        os.mkfifo(entry, 0o600)
    else:
        entry.write_bytes(EVIL)
        entry.chmod(0o640 if plant == "group readable" else 0o600)
        if plant == "other owner":
            os.chown(entry, 65534, 65534)
    with serving() as (server, port):
        outcome = boot(tmp_path / "1", port, cache)
    assert_booted(outcome, tmp_path / "1" / "d", KERNEL, INITRD)
    assert server.gets == {"/linux": 1, "/initrd": 1}
    assert not entry.is_symlink() and entry.read_bytes() == KERNEL and entry.stat().st_nlink == 1
    assert elsewhere.read_bytes() == EVIL  # what the planted name pointed at is untouched


@pytest.mark.parametrize("layout", ["open to others", "symlink"])
def test_a_cache_directory_others_could_write_is_not_used(tmp_path: Path, layout: str) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    cache = tmp_path / "cache"
    if layout == "symlink":
        cache.symlink_to(real)
    else:
        cache.mkdir()
        cache.chmod(0o777)
    with serving() as (server, port):
        outcome = boot(tmp_path / "1", port, cache)
    assert_booted(outcome, tmp_path / "1" / "d", KERNEL, INITRD)
    assert f"pypxeboot: warning: cache_dir={cache}" in outcome.stderr and "booting without the cache" in outcome.stderr
    assert list(real.iterdir()) == [] and (layout == "symlink" or list(cache.iterdir()) == [])
    assert server.gets == {"/linux": 1, "/initrd": 1}


def test_a_server_announcing_no_digest_is_downloaded_as_without_a_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with serving(kernel_digest=None) as (server, port):
        for run in ("1", "2"):
            assert_booted(boot(tmp_path / run, port, cache), tmp_path / run / "d", KERNEL, INITRD)
    assert server.gets == {"/linux": 2, "/initrd": 1}
    assert set(kept(cache)) == {sha256(INITRD)}


@pytest.mark.parametrize("headers", [
    [("Repr-Digest", "sha-256=:not base64 at all!:")],
    [("Repr-Digest", f"sha-256=:{base64.b64encode(b'short').decode()}:")],  # 5 bytes, not 32
    [("X-Checksum-SHA256", "zz" * 32)],
    [("Repr-Digest", f"sha-256=:{base64.b64encode(bytes.fromhex(sha256(KERNEL))).decode()}:"),
     ("X-Checksum-SHA256", sha256(INITRD))],  # two digests that disagree
], ids=["garbage", "short", "bad-hex", "disagreeing"])
def test_a_malformed_or_contradictory_digest_is_downloaded_as_without_a_cache(
        tmp_path: Path, headers: list[tuple[str, str]]) -> None:
    """A hostile server's odd digest headers make pypxeboot download the file plainly, every
    boot, and keep nothing under any digest; the boot itself still works."""
    cache = tmp_path / "cache"
    with serving() as (server, port):
        server.kernel_headers = headers
        for run in ("1", "2"):
            assert_booted(boot(tmp_path / run, port, cache), tmp_path / run / "d", KERNEL, INITRD)
    assert server.gets == {"/linux": 2, "/initrd": 1}
    assert set(kept(cache)) == {sha256(INITRD)}


def test_a_digest_header_longer_than_any_header_line_fails_the_boot_and_keeps_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with serving() as (server, port):
        server.kernel_headers = [("Repr-Digest", "sha-256=:" + "A" * 100_000 + ":")]
        assert_refused(boot(tmp_path / "1", port, cache), "/linux: LineTooLong")
        assert server.gets["/linux"] == 0 and kept(cache) == {}
        server.kernel_headers = []  # the server behaves again: the next boot works, through the cache
        assert_booted(boot(tmp_path / "2", port, cache), tmp_path / "2" / "d", KERNEL, INITRD)
    assert set(kept(cache)) == {sha256(KERNEL), sha256(INITRD)}


def test_a_server_without_head_is_downloaded_as_without_a_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with serving() as (server, port):
        server.no_head = True
        outcome = boot(tmp_path / "1", port, cache)
    assert_booted(outcome, tmp_path / "1" / "d", KERNEL, INITRD)
    assert server.gets == {"/linux": 1, "/initrd": 1} and kept(cache) == {}


def test_a_full_cache_disk_costs_only_the_cache(tmp_path: Path) -> None:
    """A 64 KiB tmpfs as cache_dir: keeping the 150 KB kernel fails (ENOSPC); the boot warns
    once, downloads as without a cache, and leaves no partial file."""
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(cache)], check=True, timeout=30)
    try:
        with serving() as (server, port):
            outcome = boot(tmp_path / "1", port, cache)
        left = kept(cache)
    finally:
        subprocess.run(["umount", str(cache)], check=True, timeout=30)
    assert_booted(outcome, tmp_path / "1" / "d", KERNEL, INITRD)
    assert outcome.stderr.count("pypxeboot: warning: cache_dir=") == 1 and "No space left" in outcome.stderr
    assert left == {} and server.gets == {"/linux": 2, "/initrd": 1}  # the kernel again, then no cache


def test_the_cap_keeps_the_most_recently_used(tmp_path: Path) -> None:
    """cache_mb=1: a 900 KB kernel and the 300 KB initrd pass 1 MiB, so the kernel (used
    before the initrd) goes once the initrd is kept."""
    big = os.urandom(900_000)
    cache = tmp_path / "cache"
    with serving(kernel=big, kernel_digest=sha256(big)) as (server, port):
        outcome = boot(tmp_path / "1", port, cache, "cache_mb=1")
    assert_booted(outcome, tmp_path / "1" / "d", big, INITRD)
    assert set(kept(cache)) == {sha256(INITRD)}  # kernel + initrd pass 1 MiB: the least recent went


def test_concurrent_boots_on_one_dom0_download_each_file_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    outcomes: dict[int, Outcome] = {}
    with serving() as (server, port):
        threads = [threading.Thread(target=lambda i=i: outcomes.__setitem__(i, boot(tmp_path / str(i), port, cache)))
                   for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    for index in range(8):
        assert_booted(outcomes[index], tmp_path / str(index) / "d", KERNEL, INITRD)
    assert server.gets == {"/linux": 1, "/initrd": 1}
    assert sum(int(o.stderr.rsplit("; ", 1)[1].split()[0]) for o in outcomes.values()) == 14  # 7 guests x 2 files


def boot_later(outcomes: dict[int, Outcome], index: int, out: Path, port: int, cache: Path,
               *words: str) -> threading.Thread:
    thread = threading.Thread(target=lambda: outcomes.__setitem__(index, boot(out, port, cache, *words)))
    thread.start()
    return thread


def wait_for_get(server: FileServer, path: str) -> None:
    ends = time.monotonic() + 30
    while not server.gets[path]:
        assert time.monotonic() < ends, f"nobody fetched {path}"
        time.sleep(0.01)


def test_a_guest_waiting_on_a_stalled_download_gives_up_at_its_deadline(tmp_path: Path) -> None:
    """Guest 1's initrd download stalls for 8 s halfway. Guest 2, booting meanwhile with a
    3 s deadline, copies the kernel guest 1 kept, waits for the initrd's lock and fails at its
    deadline with one line saying so; guest 1 then completes, the file fetched once."""
    cache = tmp_path / "cache"
    outcomes: dict[int, Outcome] = {}
    with serving() as (server, port):
        server.first_get["/initrd"] = (INITRD, 8.0)
        first = boot_later(outcomes, 1, tmp_path / "1", port, cache)
        wait_for_get(server, "/initrd")
        waiter = boot(tmp_path / "2", port, cache, "deadline=3")
        first.join(60)
    assert_refused(waiter, "waited for another pypxeboot's download of sha-256", "deadline=")
    assert 2.5 < waiter.seconds < 8, waiter.seconds
    assert_booted(outcomes[1], tmp_path / "1" / "d", KERNEL, INITRD)
    assert server.gets == {"/linux": 1, "/initrd": 1}


def test_when_the_downloading_guest_fails_a_waiting_one_downloads_the_file_itself(tmp_path: Path) -> None:
    """Guest 1 gets a body that is not the announced digest, slowly; guest 2, waiting on its
    lock meanwhile, finds nothing kept when guest 1 fails, downloads the file itself (the
    server's second GET, the true body) and boots. Guest 1 boots nothing."""
    cache = tmp_path / "cache"
    outcomes: dict[int, Outcome] = {}
    evil_initrd = b"evil" * (len(INITRD) // 4)
    with serving() as (server, port):
        server.first_get["/initrd"] = (evil_initrd, 1.0)
        first = boot_later(outcomes, 1, tmp_path / "1", port, cache)
        wait_for_get(server, "/initrd")
        second = boot(tmp_path / "2", port, cache)
        first.join(60)
    assert_refused(outcomes[1], "SHA-256", "not kept")
    assert_booted(second, tmp_path / "2" / "d", KERNEL, INITRD)
    assert server.gets == {"/linux": 1, "/initrd": 2}
    assert kept(cache) == {sha256(KERNEL): KERNEL, sha256(INITRD): INITRD}


def test_pxeserver_announces_digests_and_a_dom0_boots_from_its_cache(tmp_path: Path) -> None:
    ports = {"tftp": free_port(socket.SOCK_DGRAM), "http": free_port()}
    images = tmp_path / "tftproot" / "images" / "d"
    images.mkdir(parents=True)
    kernel, initrd = os.urandom(1 << 20), os.urandom(3 << 20)
    (images / "linux").write_bytes(kernel)
    (images / "initrd.gz").write_bytes(initrd)
    process, _ = start_server(tmp_path, **ports, extra='[boot]\nkernel_transport = "http"\n')
    try:
        for command in (["profile", "add", "d", "--kernel", "images/d/linux", "--initrd", "images/d/initrd.gz",
                         "--append", "console=hvc0"],
                        ["host", "add", "--mac", MAC, "--hostname", "web1", "--profile", "d"]):
            done = subprocess.run([sys.executable, "-m", "pxeserver", *command], cwd=tmp_path, capture_output=True,
                                  text=True, timeout=60)
            assert done.returncode == 0, done.stderr
        url = f"http://127.0.0.1:{ports['http']}/boot/images/d/initrd.gz"
        expected = f"sha-256=:{base64.b64encode(hashlib.sha256(initrd).digest()).decode()}:"
        for method in (["-I"], ["-o", "/dev/null", "-D", "-"]):  # HEAD, GET
            headers = subprocess.run(["curl", "-sS", *method, url], capture_output=True, text=True, timeout=30).stdout
            assert headers.startswith("HTTP/1.1 200") and f"repr-digest: {expected.lower()}" in headers.lower()
            assert f"x-checksum-sha256: {sha256(initrd)}" in headers.lower()
        cache = tmp_path / "cache"
        words = ("server=127.0.0.1", f"tftp_port={ports['tftp']}", f"cache_dir={cache}")
        first, second = (run_as_libxl(tmp_path / run, *words) for run in ("1", "2"))
    finally:
        process.terminate()
        process.wait(20)
    assert_booted(first, tmp_path / "1" / "d", kernel, initrd)
    assert_booted(second, tmp_path / "2" / "d", kernel, initrd)
    assert "; 2 from the dom0 cache)" in second.stderr
    assert kept(cache) == {sha256(kernel): kernel, sha256(initrd): initrd}


def test_announce_digests_off_sends_none(tmp_path: Path) -> None:
    ports = {"tftp": free_port(socket.SOCK_DGRAM), "http": free_port()}
    (tmp_path / "tftproot" / "images").mkdir(parents=True)
    (tmp_path / "tftproot" / "images" / "linux").write_bytes(KERNEL)
    process, _ = start_server(tmp_path, **ports, extra="announce_digests = false\n")  # in [http]
    try:
        done = subprocess.run(["curl", "-sS", "-D", "-", "-o", "/dev/null",
                               f"http://127.0.0.1:{ports['http']}/boot/images/linux"],
                              capture_output=True, text=True, timeout=30)
    finally:
        process.terminate()
        process.wait(20)
    assert done.stdout.startswith("HTTP/1.1 200") and f"content-length: {len(KERNEL)}" in done.stdout.lower()
    assert "repr-digest" not in done.stdout.lower() and "x-checksum" not in done.stdout.lower()
