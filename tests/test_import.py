"""`pxeserver import`, run as a user runs it: a subprocess, real installer files, real archives.

Debian's netboot kernel and initrd come from the debian-installer-12-netboot-amd64 package;
ISO images are built with xorriso and tarballs with tarfile; http:// sources are served by a
server this test runs on loopback. Red Hat trees use small made-up kernels: what is tested
there is the layout, the checksums and the profile, not the kernel.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import http.server
import io
import json
import os
import pty
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tarfile
import tempfile
import termios
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO

from pxeserver import app
from pxeserver.config import Config
from pxeserver.registry.sqlite import MIGRATIONS, SqliteStore
from pxeserver.web import create_app

PXESERVER = [sys.executable, "-m", "pxeserver"]
DEBIAN = Path("/usr/lib/debian-installer/images/12/amd64/text")
DEBIAN_FILES = DEBIAN / "debian-installer" / "amd64"

needs_debian = pytest.mark.skipif(not (DEBIAN_FILES / "linux").is_file(),
                                  reason="debian-installer-12-netboot-amd64 is not installed")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")

CENTOS5_TREEINFO = """[general]
family = CentOS
timestamp = 1396465394.51
totaldiscs = 1
version = 5.11
discnum = 1
packagedir = CentOS
arch = x86_64

[images-x86_64]
kernel = images/pxeboot/vmlinuz
initrd = images/pxeboot/initrd.img

[images-xen]
kernel = images/xen/vmlinuz
initrd = images/xen/initrd.img
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    (work / "tftproot" / "images").mkdir(parents=True)
    (work / "pxeserver.toml").write_text(
        f'[server]\naddress = "10.0.0.1"\nkickstarts = "{REPO / "kickstarts"}"\n'
        f'preseeds = "{REPO / "preseeds"}"\n')
    return work


def run(workdir: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*PXESERVER, *args], cwd=workdir, capture_output=True, text=True, timeout=120)
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def show(workdir: Path, name: str) -> dict:
    return json.loads(run(workdir, "profile", "show", name).stdout)


def assert_nothing_imported(workdir: Path, name: str) -> None:
    """No file or directory under images/ (staging included) and no profile."""
    assert sorted(p.name for p in (workdir / "tftproot" / "images").iterdir()) == []
    shown = run(workdir, "profile", "show", name, ok=False)
    assert shown.returncode == 1 and f"no profile named '{name}'" in shown.stderr


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("pxeserver: error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return errors[0]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


class _SlowHandler(_QuietHandler):
    """Sends file bodies in 64 KiB pieces with a pause between them: a copy that takes long
    enough to be watched and interrupted."""

    pause = 0.02

    def copyfile(self, source, outputfile) -> None:  # type: ignore[no-untyped-def]
        while chunk := source.read(64 * 1024):
            outputfile.write(chunk)
            time.sleep(self.pause)


@contextmanager
def serving(directory: Path, handler: type = _QuietHandler) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def redhat_tree(root: Path, treeinfo: str | None, *, sizes: int = 256 * 1024) -> dict[str, bytes]:
    """A tree with made-up kernels in images/pxeboot/ and images/xen/, each file different."""
    contents = {}
    for path in ("images/pxeboot/vmlinuz", "images/pxeboot/initrd.img", "images/xen/vmlinuz",
                 "images/xen/initrd.img"):
        data = hashlib.sha256(path.encode()).digest() * (sizes // 32)
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
        contents[path] = data
    if treeinfo is not None:
        (root / ".treeinfo").write_text(treeinfo)
    return contents


def fedora_treeinfo(contents: dict[str, bytes], *, wrong: str = "") -> str:
    sums = "\n".join(f"{path} = sha256:{hashlib.sha256(data).hexdigest() if path != wrong else '0' * 64}"
                     for path, data in contents.items() if path.startswith("images/pxeboot/"))
    return ("[header]\ntype = productmd.treeinfo\nversion = 1.2\n\n[release]\nname = Fedora\n"
            "short = Fedora\nversion = 40\n\n[tree]\narch = x86_64\nplatforms = x86_64,xen\n\n"
            "[images-x86_64]\nkernel = images/pxeboot/vmlinuz\ninitrd = images/pxeboot/initrd.img\n\n"
            "[images-xen]\nkernel = images/pxeboot/vmlinuz\ninitrd = images/pxeboot/initrd.img\n\n"
            f"[checksums]\n{sums}\n")


# -- Debian, with the real installer files -----------------------------------------------------

@needs_debian
def test_debian_netboot_directory_becomes_a_profile_and_a_repeat_changes_nothing(workdir: Path) -> None:
    result = run(workdir, "import", "deb12", str(DEBIAN))
    lines = result.stderr.splitlines()
    assert lines[1] == "found Debian installer (debian-installer/amd64/): Debian version: 12 (bookworm)"
    assert "\r" not in result.stderr  # not a terminal: one line per step, no bar
    assert any(line.startswith("copying and hashing initrd.gz (") for line in lines)
    assert result.stdout.strip() == "added profile deb12: images/deb12/linux images/deb12/initrd.gz"
    shown = show(workdir, "deb12")
    files = shown.pop("files")
    assert shown == {"name": "deb12", "kernel": "images/deb12/linux", "initrd": "images/deb12/initrd.gz",
                     "append": "console=hvc0", "autoinstall": "debian-xen.cfg", "vars": {}}
    for role, original in (("kernel", DEBIAN_FILES / "linux"), ("initrd", DEBIAN_FILES / "initrd.gz")):
        published = workdir / "tftproot" / files[role]["path"]
        assert published.read_bytes() == original.read_bytes()
        assert oct(published.stat().st_mode & 0o777) == "0o644"
        assert (files[role]["size"], files[role]["recorded_size"]) == (original.stat().st_size,) * 2
        assert files[role]["recorded_sha256"] == sha256(original) and files[role]["matches"] is True
    before = {p.name: p.stat().st_ino for p in (workdir / "tftproot" / "images" / "deb12").iterdir()}

    again = run(workdir, "import", "deb12", str(DEBIAN))
    assert again.stdout.strip().startswith("unchanged profile deb12")
    assert "already holds these files: nothing copied" in again.stderr
    assert {p.name: p.stat().st_ino for p in (workdir / "tftproot" / "images" / "deb12").iterdir()} == before
    assert sorted(p.name for p in (workdir / "tftproot" / "images").iterdir()) == ["deb12"]

    with open(workdir / "tftproot" / "images" / "deb12" / "linux", "r+b") as kernel:
        kernel.seek(4096)
        kernel.write(b"X")  # someone changed the kernel after the import
    files = show(workdir, "deb12")["files"]
    assert (files["kernel"]["matches"], files["initrd"]["matches"]) == (False, True)

    other = run(workdir, "import", "deb12", str(DEBIAN), "--autoinstall", "ubuntu-xen.cfg", ok=False)
    assert "profile 'deb12' already exists with other settings" in one_error_line(other)


@dataclass(frozen=True)
class ArchiveKey:
    home: str  # a GNUPGHOME holding the secret key
    keyring: Path  # its public key, as [imports] debian_keyrings lists it

    def sign(self, release: Path, how: str) -> None:
        outputs = {"detached": ["--detach-sign", "--armor", "-o", str(release.parent / "Release.gpg")],
                   "inline": ["--clearsign", "-o", str(release.parent / "InRelease")]}
        subprocess.run(["gpg", "--batch", "--yes", "--homedir", self.home, *outputs[how], str(release)],
                       check=True, capture_output=True, timeout=60)


def _make_key(uid: str, keyring: Path) -> ArchiveKey:
    home = tempfile.mkdtemp(prefix="gpg", dir="/tmp")  # short: gpg-agent's socket path is limited
    subprocess.run(["gpg", "--batch", "--homedir", home, "--passphrase", "", "--quick-gen-key", uid,
                    "ed25519", "sign", "never"], check=True, capture_output=True, timeout=120)
    keyring.write_bytes(subprocess.run(["gpg", "--homedir", home, "--export"], check=True,
                                       capture_output=True, timeout=60).stdout)
    return ArchiveKey(home, keyring)


@pytest.fixture(scope="module")
def archive_keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ArchiveKey, ArchiveKey]]:
    """The test archive's signing key, and a stranger's key no keyring lists."""
    where = tmp_path_factory.mktemp("keys")
    keys = (_make_key("pxeserver test archive <archive@example.invalid>", where / "archive.gpg"),
            _make_key("stranger <stranger@example.invalid>", where / "stranger.gpg"))
    yield keys
    for key in keys:
        subprocess.run(["gpgconf", "--homedir", key.home, "--kill", "gpg-agent"], capture_output=True, timeout=30)
        shutil.rmtree(key.home, ignore_errors=True)


def trust(workdir: Path, key: ArchiveKey) -> None:
    with open(workdir / "pxeserver.toml", "a") as config:
        config.write(f'[imports]\ndebian_keyrings = ["{key.keyring}"]\n')


def _debian_suite(root: Path, *, bad_kernel_sum: bool = False, stale_release: bool = False) -> Path:
    """dists/bookworm/ as a Debian mirror lays it out, with the real installer files; the
    Release file is returned for the caller to sign."""
    suite = root / "dists" / "bookworm"
    images = suite / "main" / "installer-amd64" / "current" / "images"
    netboot = images / "netboot" / "debian-installer" / "amd64"
    netboot.mkdir(parents=True)
    for name in ("linux", "initrd.gz"):
        (netboot / name).symlink_to(DEBIAN_FILES / name)
    kernel_sum = "0" * 64 if bad_kernel_sum else sha256(DEBIAN_FILES / "linux")
    sums = (f"{kernel_sum}  ./netboot/debian-installer/amd64/linux\n"
            f"{sha256(DEBIAN_FILES / 'initrd.gz')}  ./netboot/debian-installer/amd64/initrd.gz\n")
    (images / "SHA256SUMS").write_text(sums)
    listed = sums.encode() if not stale_release else sums.encode() + b"\n"
    (suite / "Release").write_text(
        "Origin: Debian\nLabel: Debian\nSuite: stable\nCodename: bookworm\nSHA256:\n"
        f" {hashlib.sha256(b'x').hexdigest()} 1 main/binary-amd64/Packages\n"
        f" {hashlib.sha256(listed).hexdigest()} {len(listed)} main/installer-amd64/current/images/SHA256SUMS\n")
    return suite / "Release"


@needs_debian
@pytest.mark.parametrize("how", ["detached", "inline"])
def test_debian_suite_over_http_is_verified_from_a_signed_release_down(
        tmp_path: Path, workdir: Path, archive_keys: tuple[ArchiveKey, ArchiveKey], how: str) -> None:
    archive, _ = archive_keys
    trust(workdir, archive)
    archive.sign(_debian_suite(tmp_path / "mirror"), how)
    with serving(tmp_path / "mirror") as url:
        result = run(workdir, "import", "bookworm", url + "dists/bookworm/")
    assert ("found Debian installer (main/installer-amd64/current/images/netboot/debian-installer/amd64/, "
            "Release signed by pxeserver test archive <archive@example.invalid>)") in result.stderr
    for name in ("linux", "initrd.gz"):
        assert f"{name}: {(DEBIAN_FILES / name).stat().st_size} bytes, sha256 {sha256(DEBIAN_FILES / name)}, " \
               "matches main/installer-amd64/current/images/SHA256SUMS" in result.stderr
        assert (workdir / "tftproot" / "images" / "bookworm" / name).read_bytes() == (DEBIAN_FILES / name).read_bytes()
    assert show(workdir, "bookworm")["files"]["initrd"]["source"] == url + "dists/bookworm/"


@needs_debian
@pytest.mark.parametrize("broken, sign, message", [
    ({"bad_kernel_sum": True}, "archive",
     "main/installer-amd64/current/images/netboot/debian-installer/amd64/linux: sha256 is "),
    ({"stale_release": True}, "archive", "main/installer-amd64/current/images/SHA256SUMS: sha256 "),
    ({}, "none", "the suite's Release is not signed (no InRelease, no Release.gpg)"),
    ({}, "stranger", "the suite's Release.gpg signature does not verify"),
    ({}, "tampered", "the suite's Release.gpg signature does not verify"),
], ids=["kernel-sum", "stale-release", "unsigned", "stranger", "tampered"])
def test_debian_chain_broken_anywhere_is_refused_and_nothing_published(
        tmp_path: Path, workdir: Path, archive_keys: tuple[ArchiveKey, ArchiveKey],
        broken: dict, sign: str, message: str) -> None:
    archive, stranger = archive_keys
    trust(workdir, archive)
    release = _debian_suite(tmp_path / "mirror", **broken)
    if sign != "none":
        (stranger if sign == "stranger" else archive).sign(release, "detached")
    if sign == "tampered":  # a mirror that edited Release after it was signed
        release.write_text(release.read_text().replace("Suite: stable", "Suite: stab1e"))
    with serving(tmp_path / "mirror") as url:
        result = run(workdir, "import", "bookworm", url + "dists/bookworm/", ok=False)
    assert message in one_error_line(result)
    assert_nothing_imported(workdir, "bookworm")


@needs_debian
def test_netboot_tarball_with_internal_symlinks(tmp_path: Path, workdir: Path) -> None:
    archive = tmp_path / "netboot.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        tar.add(DEBIAN, arcname=".")  # keeps its symlinks (pxelinux.0 -> debian-installer/...)
    with tarfile.open(archive) as tar:
        assert any(m.issym() for m in tar.getmembers())
    result = run(workdir, "import", "tarball", str(archive))
    assert "found Debian installer (debian-installer/amd64/)" in result.stderr
    published = workdir / "tftproot" / "images" / "tarball" / "initrd.gz"
    assert published.read_bytes() == (DEBIAN_FILES / "initrd.gz").read_bytes()


@pytest.mark.parametrize("member, kind, target", [
    ("../escaped", tarfile.REGTYPE, ""),
    ("debian-installer/amd64/linux", tarfile.SYMTYPE, "../../../../etc/passwd"),
    ("debian-installer/amd64/linux", tarfile.SYMTYPE, "/etc/passwd"),
    ("debian-installer/amd64/linux", tarfile.LNKTYPE, "../../etc/passwd"),
])
def test_tarball_leading_outside_is_refused_whole(tmp_path: Path, workdir: Path, member: str, kind: bytes,
                                                  target: str) -> None:
    archive = tmp_path / "hostile.tar"
    with tarfile.open(archive, "w") as tar:
        initrd = tarfile.TarInfo("debian-installer/amd64/initrd.gz")
        initrd.size = 4
        tar.addfile(initrd, io.BytesIO(b"gzip"))
        evil = tarfile.TarInfo(member)
        evil.type, evil.linkname = kind, target
        evil.size = 4 if kind == tarfile.REGTYPE else 0
        tar.addfile(evil, io.BytesIO(b"evil") if kind == tarfile.REGTYPE else None)
    result = run(workdir, "import", "evil", str(archive), ok=False)
    assert f"is refused: member {member!r}" in one_error_line(result)
    assert_nothing_imported(workdir, "evil")
    assert not (workdir / "tftproot" / "escaped").exists() and not (workdir / "escaped").exists()


def test_ubuntu_images_directory_with_sha256sums(tmp_path: Path, workdir: Path) -> None:
    """Ubuntu 20.04's legacy installer images/ directory: netboot/ubuntu-installer/ and a
    SHA256SUMS beside netboot/."""
    netboot = tmp_path / "images" / "netboot" / "ubuntu-installer" / "amd64"
    netboot.mkdir(parents=True)
    sums = ""
    for name in ("linux", "initrd.gz"):
        data = hashlib.sha256(name.encode()).digest() * 4096
        (netboot / name).write_bytes(data)
        sums += f"{hashlib.sha256(data).hexdigest()}  ./netboot/ubuntu-installer/amd64/{name}\n"
    (tmp_path / "images" / "SHA256SUMS").write_text(sums)
    with serving(tmp_path / "images") as url:
        result = run(workdir, "import", "focal", url)
    assert "found Ubuntu installer (netboot/ubuntu-installer/amd64/)" in result.stderr
    assert result.stderr.count("matches SHA256SUMS") == 2
    shown = show(workdir, "focal")
    assert (shown["autoinstall"], shown["append"]) == ("ubuntu-xen.cfg", "console=hvc0")


# -- Red Hat trees: ISO, directory, http:// -----------------------------------------------------

def test_fedora_iso_built_with_xorriso_is_verified_by_its_treeinfo(tmp_path: Path, workdir: Path) -> None:
    tree = tmp_path / "tree"
    contents = redhat_tree(tree, None, sizes=2 << 20)
    (tree / ".treeinfo").write_text(fedora_treeinfo(contents))
    iso = tmp_path / "Fedora-Server-netinst.iso"
    subprocess.run(["xorriso", "-as", "mkisofs", "-R", "-J", "-V", "Fedora-S-40", "-o", str(iso), str(tree)],
                   check=True, capture_output=True, timeout=120)
    result = run(workdir, "import", "f40", str(iso))
    assert "found Fedora/RHEL/CentOS installer (.treeinfo [images-xen]): Fedora 40" in result.stderr
    assert result.stderr.count("matches .treeinfo") == 2
    shown = show(workdir, "f40")
    assert (shown["kernel"], shown["initrd"], shown["append"], shown["autoinstall"]) == (
        "images/f40/vmlinuz", "images/f40/initrd.img", "console=hvc0", "fedora-xen-pvh.ks")
    assert (workdir / "tftproot" / "images" / "f40" / "vmlinuz").read_bytes() == contents["images/pxeboot/vmlinuz"]

    truncated = tmp_path / "truncated.iso"
    truncated.write_bytes(iso.read_bytes()[: iso.stat().st_size // 2])
    result = run(workdir, "import", "f40cut", str(truncated), ok=False)
    line = one_error_line(result)
    assert "truncated" in line or "not a readable ISO 9660 image" in line
    assert sorted(p.name for p in (workdir / "tftproot" / "images").iterdir()) == ["f40"]


def test_treeinfo_checksum_mismatch_is_refused(tmp_path: Path, workdir: Path) -> None:
    contents = redhat_tree(tmp_path / "tree", None)
    (tmp_path / "tree" / ".treeinfo").write_text(fedora_treeinfo(contents, wrong="images/pxeboot/initrd.img"))
    line = one_error_line(run(workdir, "import", "f40", str(tmp_path / "tree"), ok=False))
    actual = hashlib.sha256(contents["images/pxeboot/initrd.img"]).hexdigest()
    assert f"images/pxeboot/initrd.img: sha256 is {actual}, but .treeinfo says {'0' * 64}" in line
    assert_nothing_imported(workdir, "f40")


@pytest.mark.parametrize("treeinfo", [CENTOS5_TREEINFO, None], ids=["treeinfo", "no-treeinfo"])
def test_centos5_tree_over_http_gets_the_xen_kernel_and_xvc0(tmp_path: Path, workdir: Path,
                                                             treeinfo: str | None) -> None:
    contents = redhat_tree(tmp_path / "centos", treeinfo)
    with serving(tmp_path / "centos") as url:
        result = run(workdir, "import", "centos5", url)
    assert "found CentOS/RHEL 5 Xen PV installer" in result.stderr
    assert ("CentOS 5.11" in result.stderr) == (treeinfo is not None)
    shown = show(workdir, "centos5")
    assert (shown["append"], shown["autoinstall"]) == ("console=xvc0", "centos5-xen-pv.ks")
    images = workdir / "tftproot" / "images" / "centos5"
    assert (images / "vmlinuz").read_bytes() == contents["images/xen/vmlinuz"]  # not the non-Xen pxeboot one
    assert (images / "initrd.img").read_bytes() == contents["images/xen/initrd.img"]


def test_unknown_layout_and_wrong_arch_are_one_line(tmp_path: Path, workdir: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "README").write_text("not an installer")
    line = one_error_line(run(workdir, "import", "junk", str(tmp_path / "junk"), ok=False))
    assert f"no installer for x86_64 found in {tmp_path / 'junk'}: looked for .treeinfo, images/xen/vmlinuz" in line
    assert "debian-installer/amd64/linux" in line
    redhat_tree(tmp_path / "i386", CENTOS5_TREEINFO.replace("arch = x86_64", "arch = i386"))
    line = one_error_line(run(workdir, "import", "c5", str(tmp_path / "i386"), ok=False))
    assert ".treeinfo says this tree is for i386, not x86_64 (see --arch)" in line
    (tmp_path / "file.bin").write_bytes(b"not an image " * 10000)
    line = one_error_line(run(workdir, "import", "x", str(tmp_path / "file.bin"), ok=False))
    assert "is neither an ISO 9660 image nor a tar archive" in line
    assert_nothing_imported(workdir, "junk")


# -- a full disk, Ctrl-C -------------------------------------------------------------------------

@contextmanager
def tmpfs(mountpoint: Path, options: str) -> Iterator[Path]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mountpoint)], check=True, timeout=30)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True, timeout=30)


@needs_root
@needs_debian
@pytest.mark.parametrize("options, message", [
    ("size=16m", "not enough space in"),  # seen before copying: the sizes are known
    ("size=64m,nr_inodes=4", "no space left in"),  # ENOSPC half-way: no inode for initrd.gz
])
def test_full_disk_leaves_nothing(workdir: Path, options: str, message: str) -> None:
    with tmpfs(workdir / "tftproot", options):
        (workdir / "tftproot" / "images").mkdir()
        line = one_error_line(run(workdir, "import", "deb12", str(DEBIAN), ok=False))
        assert message in line
        assert_nothing_imported(workdir, "deb12")
        assert subprocess.run(["df", "--output=used", str(workdir / "tftproot")], capture_output=True,
                              text=True, check=True).stdout.split()[1] == "0"


@needs_debian
def test_ctrl_c_mid_copy_leaves_nothing(tmp_path: Path, workdir: Path) -> None:
    with serving(DEBIAN, _SlowHandler) as url:
        process = subprocess.Popen([*PXESERVER, "import", "deb12", url], cwd=workdir,
                                   stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            images = workdir / "tftproot" / "images"
            deadline = time.monotonic() + 60
            partial: list[Path] = []
            while time.monotonic() < deadline and not partial:
                partial = [p for p in images.glob(".import-deb12-*/initrd.gz") if p.stat().st_size > 0]
                time.sleep(0.05)
            assert partial, "the copy never started"
            assert oct(partial[0].stat().st_mode & 0o777) == "0o600"  # never served while written
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=30)
        finally:
            process.kill()
            process.wait(timeout=10)
    assert process.returncode == 130, err
    assert "pxeserver: import of deb12 interrupted: nothing was published" in err and "Traceback" not in err
    assert_nothing_imported(workdir, "deb12")


def test_a_killed_import_is_cleaned_up_by_the_next(tmp_path: Path, workdir: Path) -> None:
    redhat_tree(tmp_path / "centos", CENTOS5_TREEINFO)
    images = workdir / "tftproot" / "images"
    abandoned = images / ".import-centos5-999999999-0000"
    abandoned.mkdir()
    (abandoned / "vmlinuz").write_bytes(b"half")
    running = [images / f".import-centos5-x-{os.getpid()}-0000",  # profile centos5-x, alive
               images / f".import-centos5-{os.getpid()}-0000"]  # centos5 itself, this process: alive
    for staging in running:
        staging.mkdir()
    run(workdir, "import", "centos5", str(tmp_path / "centos"))
    assert sorted(p.name for p in images.iterdir()) == sorted(["centos5", *(p.name for p in running)])


def test_progress_bar_on_a_terminal(tmp_path: Path, workdir: Path) -> None:
    redhat_tree(tmp_path / "centos", CENTOS5_TREEINFO, sizes=4 << 20)
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        done = subprocess.run([*PXESERVER, "import", "centos5", str(tmp_path / "centos")], cwd=workdir,
                              stderr=terminal, stdout=subprocess.PIPE, text=True, timeout=120)
        os.close(terminal)
        output = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(controller)
    assert done.returncode == 0
    text = output.decode()
    assert "\r" in text and "initrd.img: 100%|" in text and "4.00M/4.00M" in text


# -- the registry and the API ---------------------------------------------------------------

def test_a_version_1_registry_is_migrated_and_keeps_its_profiles(tmp_path: Path) -> None:
    database = tmp_path / "registry.db"
    with sqlite3.connect(database) as conn:
        conn.executescript(MIGRATIONS[0] + ";INSERT INTO profiles (name, kernel, initrd) VALUES ('old', 'k', 'i');"
                           "PRAGMA user_version = 1;")
    store = SqliteStore(database)
    try:
        assert store.get_profile("old").kernel == "k" and store.boot_files(["k"]) == {}
        assert sqlite3.connect(database).execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    finally:
        store.close()


def test_api_import_shows_progress_and_needs_the_token(tmp_path: Path, config: Config) -> None:
    config.api.token = "s3cret"
    contents = redhat_tree(tmp_path / "centos", CENTOS5_TREEINFO, sizes=4 << 20)
    context = app.build(config)
    client = create_app(context).test_client()
    admin = {"Authorization": "Bearer s3cret"}
    try:
        with serving(tmp_path / "centos", _SlowHandler) as url:
            body = {"name": "centos5", "source": url}
            assert client.post("/api/imports", json=body).status_code == 401
            assert client.get("/api/imports").status_code == 401
            refused = client.post("/api/imports", json={"name": "x", "source": str(tmp_path / "centos")}, headers=admin)
            assert refused.status_code == 400 and "[imports] api_local_roots" in refused.get_json()["error"]
            for bad in ({"name": "../x", "source": url}, {"name": "x", "source": url, "arch": "sparc"},
                        {"name": "x"}, {"name": "x", "source": url, "extra": 1}, ["x"]):
                assert client.post("/api/imports", json=bad, headers=admin).status_code == 400, bad
            started = client.post("/api/imports", json=body, headers=admin)
            assert started.status_code == 202, started.get_json()
            location = started.headers["Location"]
            assert client.post("/api/imports", json=body, headers=admin).status_code == 409
            seen_partial = False
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                job = client.get(location, headers=admin).get_json()
                copying = job["copying"]
                if copying and 0 < copying["bytes"] < copying["total"]:
                    seen_partial = True
                if job["state"] != "running":
                    break
                time.sleep(0.05)
        assert job["state"] == "done", job
        assert seen_partial
        assert any(step["message"].startswith("found CentOS/RHEL 5 Xen PV installer") for step in job["steps"])
        assert job["result"]["profile"]["append"] == "console=xvc0"
        assert client.get("/api/profiles/centos5/files").status_code == 401
        files = client.get("/api/profiles/centos5/files", headers=admin).get_json()
        kernel, initrd = files["kernel"], files["initrd"]
        assert (kernel["size"], kernel["matches"], initrd["matches"]) == (4 << 20, True, True)
        served = client.get("/boot/images/centos5/vmlinuz")  # what pypxeboot and iPXE fetch
        assert served.status_code == 200 and served.data == contents["images/xen/vmlinuz"]
        late = client.post("/api/profiles", headers=admin, json={"name": "late", "kernel": "images/late/k",
                                                                 "initrd": "images/centos5/initrd.img"})
        assert late.status_code == 201
        assert late.headers.get_all("Warning") == [
            '199 pxeserver "kernel images/late/k is not served from the TFTP root: file not found"']
        failed = client.post("/api/imports", json={"name": "none", "source": url}, headers=admin)
        job_url = failed.headers["Location"]
        for _ in range(200):
            job = client.get(job_url, headers=admin).get_json()
            if job["state"] != "running":
                break
            time.sleep(0.05)
        assert job["state"] == "failed" and job["error"].startswith("cannot reach")  # the server is gone
    finally:
        context.close()


def test_api_imports_a_local_tree_only_under_its_roots(tmp_path: Path, config: Config) -> None:
    redhat_tree(tmp_path / "mirror" / "centos", CENTOS5_TREEINFO)
    redhat_tree(tmp_path / "elsewhere", CENTOS5_TREEINFO)
    config.imports.api_local_roots = [str(tmp_path / "mirror")]
    context = app.build(config)
    client = create_app(context).test_client()
    try:
        (tmp_path / "mirror" / "link").symlink_to(tmp_path / "elsewhere")
        for outside in (tmp_path / "elsewhere", tmp_path / "mirror" / "link", tmp_path / "mirror" / ".." / "elsewhere"):
            assert client.post("/api/imports", json={"name": "c5", "source": str(outside)}).status_code == 400
        started = client.post("/api/imports", json={"name": "c5", "source": str(tmp_path / "mirror" / "centos")})
        assert started.status_code == 202
        for _ in range(600):
            job = client.get(started.headers["Location"]).get_json()
            if job["state"] != "running":
                break
            time.sleep(0.05)
        assert job["state"] == "done", job
        assert [j["id"] for j in client.get("/api/imports").get_json()] == [job["id"]]
        assert context.store.get_profile("c5").append == "console=xvc0"
    finally:
        context.close()


class _LyingHandler(_QuietHandler):
    """A hostile mirror: HEAD tells the true size of images/xen/initrd.img, GET then sends an
    endless body (``mode = "endless"``) or half of it under the full Content-Length."""

    mode = "endless"

    def do_GET(self) -> None:
        if not self.path.endswith("/images/xen/initrd.img"):
            return super().do_GET()
        self.send_response(200)
        if self.mode == "endless":
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(100_000):  # 6 GB at most, far past what the import reads
                try:
                    self.wfile.write(b"\0" * 65536)
                except OSError:
                    return
        else:
            size = os.path.getsize(self.translate_path(self.path))
            self.send_header("Content-Length", str(size))
            self.end_headers()
            self.wfile.write(b"\0" * (size // 2))
        self.close_connection = True


@pytest.mark.parametrize("mode, message", [("endless", "is longer than its"),
                                           ("short", "is truncated: 131072 of 262144 bytes")])
def test_a_lying_http_server_is_refused(tmp_path: Path, workdir: Path, mode: str, message: str) -> None:
    redhat_tree(tmp_path / "centos", CENTOS5_TREEINFO)
    handler = type("Lying", (_LyingHandler,), {"mode": mode})
    with serving(tmp_path, handler) as url:
        started = time.monotonic()
        line = one_error_line(run(workdir, "import", "centos5", url + "centos/", ok=False))
        assert time.monotonic() - started < 60
        assert message in line and "images/xen/initrd.img" in line
        assert_nothing_imported(workdir, "centos5")
        run(workdir, "import", "good", str(tmp_path / "centos"))  # the same tree, read directly, is fine
