"""The lab's Xen dom0 image: Debian bookworm with Xen's tools, built once and cached.

Two cached stages, each in a directory named by the hash of what goes into it, outside the
clone (``$PXESERVER_LAB_CACHE``, else ``/var/cache/pxeserver-lab`` for root, else
``$XDG_CACHE_HOME/pxeserver-lab``):

- ``rootfs-<key>``: ``debootstrap --variant=minbase`` with :data:`DOM0_PACKAGES`, from the
  Debian mirror this machine's apt uses; keyed on the package list and this stage's code.
- ``dom0-<key>``: that tree plus the init script and Xen's console logging, made into an ext4
  image with ``mke2fs -d`` (no mount). Keyed on the rootfs key, the init script and this
  module.

pxeserver itself is not in the image: dom0 sets itself up as the README tells a site to, at
each boot: ``curl`` fetches pypxeboot from the lab's server (``GET /dom0/pypxeboot``) into
``/usr/local/bin/pypxeboot`` and checks its SHA-256 against what ``pxeserver build-pypxeboot
--print-sha256`` printed on the host. So a change to pxeserver never rebuilds the image.

Beside the image the stage keeps what runs outside it: Xen (gunzipped), the dom0 kernel and
initramfs, and for the guests a static busybox and the Xen front-end modules of that kernel.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import logging
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SUITE = "bookworm"
XEN_VERSION = "4.17"
DOM0_PACKAGES = (
    f"xen-utils-{XEN_VERSION}", "xen-utils-common", "linux-image-amd64", "initramfs-tools",
    "iproute2", "busybox-static", "udev", "kmod", "systemd-sysv", "python3", "curl", "procps",
)
XEN_HYPERVISOR = Path(f"/boot/xen-{XEN_VERSION}-amd64.gz")  # package xen-hypervisor-4.17-amd64
GUEST_MODULES = ("xen-netfront", "xen-blkfront")
IMAGE_SIZE = "3G"
STALE_AFTER = 2 * 86400  # seconds unused before another build removes a cached stage
DEBOOTSTRAP_TIMEOUT = 1800
HERE = Path(__file__).resolve().parent


class BuildFailed(RuntimeError):
    """A build step failed; the message names the step and ends with its output."""


@dataclass(frozen=True)
class Dom0Image:
    """A built dom0: its disk image and the files QEMU and the guests need from it."""

    directory: Path

    @property
    def disk(self) -> Path:
        return self.directory / "dom0.ext4"

    @property
    def xen(self) -> Path:
        return self.directory / "xen"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def busybox(self) -> Path:
        return self.directory / "busybox"

    def module(self, name: str) -> Path:
        return self.directory / f"{name}.ko"


def cache_dir() -> Path:
    if os.environ.get("PXESERVER_LAB_CACHE"):
        return Path(os.environ["PXESERVER_LAB_CACHE"])
    if os.geteuid() == 0:
        return Path("/var/cache/pxeserver-lab")
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "pxeserver-lab"


def run(args: list[str], step: str, timeout: float = 600) -> str:
    """``args``' output; a failure or timeout is a :class:`BuildFailed` naming ``step``."""
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BuildFailed(f"{step}: no result after {timeout:.0f} s") from None
    if result.returncode != 0:
        raise BuildFailed(f"{step} failed ({result.returncode}): {(result.stdout + result.stderr)[-2000:]}")
    return result.stdout


def apt_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt uses for the suite (deb822 or one-line sources)."""
    files = sorted(sources.glob("sources.list.d/*.sources")) + [sources / "sources.list"] + \
        sorted(sources.glob("sources.list.d/*.list"))
    for file in files:
        if not file.is_file():
            continue
        text = file.read_text(errors="replace")
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:(.*)$", stanza, re.M)
            if uris and suites and SUITE in suites.group(1).split():
                return uris.group(1)
        for line in text.splitlines():
            words = line.split()
            if len(words) >= 3 and words[0] == "deb" and not words[1].startswith("[") and words[2] == SUITE:
                return words[1]
    return "http://deb.debian.org/debian"


def _digest(*parts: bytes) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(hashlib.sha256(part).digest())
    return hasher.hexdigest()[:16]


def _debootstrap(target: Path, mirror: str) -> None:
    run(["debootstrap", "--variant=minbase", f"--include={','.join(DOM0_PACKAGES)}", SUITE,
         str(target), mirror], "debootstrap", timeout=DEBOOTSTRAP_TIMEOUT)
    (target / "etc/hostname").write_text("dom0\n")
    shutil.rmtree(target / "var/cache/apt/archives", ignore_errors=True)


def _use(cache: Path, final: Path, prefix: str) -> Path:
    """Mark ``final`` as used now and remove this stage's other entries unused for long
    (other checkouts share the cache, so recent ones stay)."""
    os.utime(final)
    for other in cache.glob(f"{prefix}-*"):
        if other != final and time.time() - other.stat().st_mtime > STALE_AFTER:
            shutil.rmtree(other, ignore_errors=True)
    return final


def rootfs(cache: Path) -> Path:
    """Stage 1: the debootstrapped tree, built unless cached."""
    mirror = apt_mirror()
    key = _digest(" ".join(DOM0_PACKAGES).encode(), SUITE.encode(), inspect.getsource(_debootstrap).encode())
    final = cache / f"rootfs-{key}"
    if final.is_dir():
        return _use(cache, final, "rootfs")
    log.info("lab: debootstrap %s with %d packages from %s (a few minutes)", SUITE, len(DOM0_PACKAGES), mirror)
    staging = Path(tempfile.mkdtemp(prefix="rootfs-", dir=cache))
    try:
        _debootstrap(staging, mirror)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _use(cache, final, "rootfs")


def _configure(tree: Path) -> None:
    shutil.copy(HERE / "dom0-init.sh", tree / "sbin/lab-init")
    (tree / "sbin/lab-init").chmod(0o755)
    defaults = tree / "etc/default/xen"
    text = defaults.read_text() if defaults.exists() else ""
    defaults.write_text(text + '\nXENCONSOLED_ARGS="--log=guest --log-dir=/var/log/xen/console"\n')
    (tree / "etc/fstab").write_text("LABEL=dom0 / ext4 rw 0 1\n")


def _export(tree: Path, target: Path) -> None:
    """What runs outside the image: Xen, the dom0 kernel and initramfs, the guests' parts."""
    with gzip.open(XEN_HYPERVISOR) as packed, open(target / "xen", "wb") as out:
        shutil.copyfileobj(packed, out)
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise BuildFailed("no kernel in the dom0 tree")
    version = kernels[-1].name.removeprefix("vmlinuz-")
    shutil.copy(kernels[-1], target / "vmlinuz")
    shutil.copy(tree / f"boot/initrd.img-{version}", target / "initrd.img")
    shutil.copy(tree / "bin/busybox", target / "busybox")
    modules = tree / f"lib/modules/{version}"
    for name in GUEST_MODULES:
        found = list(modules.rglob(f"{name}.ko*"))
        if not found:
            raise BuildFailed(f"module {name} not in {modules}")
        module = found[0]
        data = module.read_bytes()
        if module.suffix == ".xz":
            data = lzma.decompress(data)
        (target / f"{name}.ko").write_bytes(data)


def dom0_image(cache: Path | None = None) -> Dom0Image:
    """Stage 2: the bootable dom0, unless cached."""
    if not XEN_HYPERVISOR.exists():
        raise BuildFailed(f"{XEN_HYPERVISOR} is missing: install xen-hypervisor-{XEN_VERSION}-amd64")
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    base = rootfs(cache)
    key = _digest(base.name.encode(), (HERE / "dom0-init.sh").read_bytes(), Path(__file__).read_bytes())
    final = cache / f"dom0-{key}"
    if (final / "dom0.ext4").is_file():
        return Dom0Image(_use(cache, final, "dom0"))
    log.info("lab: building the dom0 image %s", final.name)
    staging = Path(tempfile.mkdtemp(prefix="dom0-", dir=cache))
    tree = staging / "tree"
    try:
        run(["cp", "-a", str(base), str(tree)], "copy rootfs")
        _configure(tree)
        _export(tree, staging)
        run(["mke2fs", "-q", "-t", "ext4", "-L", "dom0", "-d", str(tree), str(staging / "dom0.ext4"),
             IMAGE_SIZE], "mke2fs dom0", timeout=900)
        shutil.rmtree(tree)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Dom0Image(_use(cache, final, "dom0"))
