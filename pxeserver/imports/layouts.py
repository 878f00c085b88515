"""Which installer a source holds: where its kernel and initrd are, which checksums vouch
for them, and which template and Xen console its profile needs.

Recognised, in this order:

- a ``.treeinfo`` (Fedora, RHEL, CentOS): its ``[images-xen]`` section, else
  ``[images-<arch>]``; a kernel under ``images/xen/`` is the CentOS/RHEL 5 PV installer
  (console ``xvc0``, the 2.6.18 kernel-xen's name), anything else a current one (``hvc0``);
- without one, ``images/xen/vmlinuz`` and ``images/pxeboot/vmlinuz`` with ``initrd.img``;
- Debian or Ubuntu netboot: ``debian-installer/<arch>/linux`` and ``initrd.gz`` at the root
  (a netboot directory or tarball), under ``netboot/`` (an installer ``images/`` directory
  with its SHA256SUMS), or under ``main/installer-<arch>/current/images/netboot/`` (a suite
  directory ``dists/<suite>/``, whose Release file vouches for SHA256SUMS).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

from pxeserver.imports.sources import Source
from pxeserver.imports.verify import (
    Checksums,
    read_treeinfo,
    release_chain,
    signed_release,
    sums_file,
    treeinfo_checksums,
)

# --arch as Red Hat spells it, to Debian's spelling.
DEBIAN_ARCH = {"x86_64": "amd64", "i386": "i386", "i686": "i386", "aarch64": "arm64"}
ARCHES = tuple(DEBIAN_ARCH)


class UnknownLayout(Exception):
    """No installer layout recognised; the message says what was looked for."""


@dataclass(frozen=True)
class Family:
    name: str
    template: str
    console: str


DEBIAN = Family("Debian", "debian-xen.cfg", "hvc0")
UBUNTU = Family("Ubuntu", "ubuntu-xen.cfg", "hvc0")
REDHAT = Family("Fedora/RHEL/CentOS", "fedora-xen-pvh.ks", "hvc0")
RHEL5 = Family("CentOS/RHEL 5 Xen PV", "centos5-xen-pv.ks", "xvc0")


@dataclass
class Layout:
    family: Family
    kernel: str  # paths relative to the source root
    initrd: str
    found_by: str  # e.g. ".treeinfo [images-xen]"
    checksums: Checksums = field(default_factory=Checksums)
    release: str = ""  # what the source says it is, e.g. "CentOS 5.11"

    @property
    def files(self) -> dict[str, str]:
        return {"kernel": self.kernel, "initrd": self.initrd}


def _both(source: Source, kernel: str, initrd: str) -> bool:
    return source.size(kernel) is not None and source.size(initrd) is not None


def _redhat(kernel: str) -> Family:
    return RHEL5 if kernel.startswith("images/xen/") else REDHAT


def _from_treeinfo(source: Source, arch: str) -> Layout | None:
    text = source.read_text(".treeinfo")
    if text is None:
        return None
    treeinfo = read_treeinfo(text)
    tree_arch = treeinfo.get("tree", "arch", fallback=None) or treeinfo.get("general", "arch", fallback=None)
    if tree_arch and tree_arch != arch and not (arch == "i386" and tree_arch in ("i686", "i386")):
        raise UnknownLayout(f".treeinfo says this tree is for {tree_arch}, not {arch} (see --arch)")
    name = treeinfo.get("release", "name", fallback=None) or treeinfo.get("general", "family", fallback="")
    version = treeinfo.get("release", "version", fallback=None) or treeinfo.get("general", "version", fallback="")
    for section in ("images-xen", f"images-{arch}"):
        kernel = treeinfo.get(section, "kernel", fallback=None)
        initrd = treeinfo.get(section, "initrd", fallback=None)
        if kernel and initrd and _both(source, kernel, initrd):
            layout = Layout(_redhat(kernel), kernel, initrd, f".treeinfo [{section}]",
                            release=f"{name} {version}".strip())
            treeinfo_checksums(treeinfo, layout.checksums)
            return layout
    return None


def _debian_like(source: Source, arch: str, keyrings: list[str]) -> Layout | None:
    debian_arch = DEBIAN_ARCH[arch]
    prefixes = ("", "netboot/", f"main/installer-{debian_arch}/current/images/netboot/",
                f"main/installer-{debian_arch}/current/legacy-images/netboot/")
    for family, directory in ((DEBIAN, "debian-installer"), (UBUNTU, "ubuntu-installer")):
        for prefix in prefixes:
            kernel = f"{prefix}{directory}/{debian_arch}/linux"
            initrd = f"{prefix}{directory}/{debian_arch}/initrd.gz"
            if not _both(source, kernel, initrd):
                continue
            layout = Layout(family, kernel, initrd, posixpath.dirname(kernel) + "/")
            sums = posixpath.join(prefix.removesuffix("netboot/"), "SHA256SUMS")
            if prefix.startswith("main/"):  # a suite directory: a signed Release vouches for SHA256SUMS
                release, signer = signed_release(source, keyrings)
                layout.found_by += f", Release signed by {signer}"
                release_chain(source, release, sums, layout.checksums)
            else:
                sums_file(source, sums, layout.checksums)
            version = (source.read_text(f"{prefix}version.info") or "").strip()
            layout.release = " ".join(version.splitlines()[0].split()) if version else ""
            return layout
    return None


def detect(source: Source, arch: str, keyrings: list[str]) -> Layout:
    """The installer in ``source`` for ``arch``; UnknownLayout naming what was looked for."""
    if arch not in DEBIAN_ARCH:
        raise UnknownLayout(f"unknown --arch {arch!r}: one of {', '.join(ARCHES)}")
    layout = _from_treeinfo(source, arch)
    if layout is None:
        for kernel, initrd in (("images/xen/vmlinuz", "images/xen/initrd.img"),
                               ("images/pxeboot/vmlinuz", "images/pxeboot/initrd.img")):
            if _both(source, kernel, initrd):
                layout = Layout(_redhat(kernel), kernel, initrd, posixpath.dirname(kernel) + "/")
                break
    if layout is None:
        layout = _debian_like(source, arch, keyrings)
    if layout is None:
        debian_arch = DEBIAN_ARCH[arch]
        raise UnknownLayout(
            f"no installer for {arch} found in {source.description}: looked for .treeinfo, "
            "images/xen/vmlinuz, images/pxeboot/vmlinuz (with initrd.img), "
            f"debian-installer/{debian_arch}/linux and ubuntu-installer/{debian_arch}/linux "
            f"(with initrd.gz; also under netboot/ and main/installer-{debian_arch}/current/images/netboot/)")
    return layout
