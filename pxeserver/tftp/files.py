"""What a requested TFTP name refers to: a boot config from the policy, or a file in the root.

``pxelinux.cfg/<name>`` is answered by the boot policy first (so servers sharing a registry
agree), then by an admin-provided file on disk. Everything else is a file under the TFTP root
that published.py allows (contained by its real path, regular, world-readable), the same
rule HTTP's /boot/ follows.

A file that has not changed for a while is sent from the shared packet cache (cache.py): read
whole once, its DATA packets built once per block size. Other small files are read whole per
transfer (one syscall); other large ones block by block with ``pread`` from an open
descriptor. Not mmap: an admin copying a new initrd over the old one truncates it, and
touching a mapped page past the new end raises SIGBUS, which would kill the whole server; a
short ``pread`` only ends that one transfer early.
"""

from __future__ import annotations

import os
from pathlib import Path

from pxeserver import pxelinux
from pxeserver.policy import PXELINUX_DIR, BootPolicy
from pxeserver.published import NotPublished, open_published
from pxeserver.tftp.cache import PacketCache, Packets, Version, version_of
from pxeserver.tftp.packets import DATA, HEADER, ErrorCode, TftpError, netascii

READ_WHOLE_LIMIT = 1 << 20  # smaller files are read into memory, larger ones block by block
NETASCII_LIMIT = 16 << 20  # netascii is converted in memory; nobody boots a kernel in it


class Source:
    """The bytes of one transfer (in memory, or a descriptor) and where they came from."""

    def __init__(self, name: str, data: bytes | int, size: int, from_policy: bool = False,
                 cache: PacketCache | None = None, version: Version | None = None) -> None:
        self.name = name  # the normalised name, as recorded in events
        self.size = size  # fixed when opened: a file that grows later is sent as it was
        self.from_policy = from_policy  # a boot config the policy generated for this name
        self._memory = data if isinstance(data, bytes) else None
        self._fd = data if isinstance(data, int) else -1
        self._cache = cache
        self._version = version  # set when this file version may be shared through the cache

    @classmethod
    def of_bytes(cls, name: str, data: bytes, from_policy: bool = False) -> Source:
        return cls(name, data, len(data), from_policy)

    def read_all(self) -> bytes:
        if self._memory is not None:
            return self._memory
        return _read_exactly(self._fd, self.size)

    def packets(self, blksize: int) -> Packets | Streamed:
        """Every DATA packet of this transfer: shared when cacheable, else its own."""
        if self._memory is not None:
            return Packets(self._memory, blksize)
        cache, version = self._cache, self._version
        if cache is not None and version is not None and cache.admits(self.size, blksize):
            packets = cache.get(version, blksize)
            if packets is None:
                packets = Packets(_read_exactly(self._fd, self.size), blksize)
                if _version_now(self._fd) == version:  # not changed while it was read
                    cache.add(version, blksize, packets)
            self.close()
            return packets
        if self.size <= READ_WHOLE_LIMIT:
            packets = Packets(_read_exactly(self._fd, self.size), blksize)
            self.close()
            return packets
        return Streamed(self._fd, self.size, blksize)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Streamed:
    """The DATA packets of a file too large to hold, read block by block as they are sent.

    Same interface as :class:`~pxeserver.tftp.cache.Packets`. The file is not snapshotted:
    one truncated mid-transfer gives a short block, which ends that transfer.
    """

    __slots__ = ("_fd", "_blksize", "count")

    def __init__(self, fd: int, size: int, blksize: int) -> None:
        self._fd = fd  # owned by the Source
        self._blksize = blksize
        self.count = size // blksize + 1

    def get(self, block: int) -> bytes:
        payload = os.pread(self._fd, self._blksize, (block - 1) * self._blksize)
        return HEADER.pack(DATA, block & 0xFFFF) + payload


def _read_exactly(fd: int, size: int) -> bytes:
    """Up to ``size`` bytes from the start: fewer only when the file was truncated meanwhile."""
    data = os.pread(fd, size, 0)
    while len(data) < size:  # pread may return less than asked, for huge files
        more = os.pread(fd, size - len(data), len(data))
        if not more:
            break
        data += more
    return data


def _version_now(fd: int) -> Version | None:
    return version_of(os.fstat(fd))


def normalise(filename: str) -> str:
    """The root-relative name a client means.

    Quirks: Windows-derived PXE clients send ``\\`` as separator; iPXE and GRUB often send a
    leading ``/`` meaning the TFTP root (as tftp-hpa's ``-s`` and dnsmasq treat it). A ``..``
    component is refused outright, whether or not it would stay inside the root.
    """
    parts = [part for part in filename.replace("\\", "/").split("/") if part not in ("", ".")]
    if ".." in parts:
        raise TftpError(ErrorCode.ACCESS_VIOLATION, "'..' is not allowed in file names")
    if not parts:
        raise TftpError(ErrorCode.FILE_NOT_FOUND, "empty file name")
    return "/".join(parts)


class Resolver:
    def __init__(self, root: Path, policy: BootPolicy, cache: PacketCache) -> None:
        self.root = root
        self.policy = policy
        self.cache = cache

    def open(self, filename: str, client_ip: str, mode: str) -> Source:
        name = normalise(filename)
        source = self._boot_config(name, client_ip) or self._file(name)
        if mode == "netascii":
            if source.size > NETASCII_LIMIT:
                source.close()
                raise TftpError(ErrorCode.NOT_DEFINED, "file too large for netascii; use octet mode")
            converted = netascii(source.read_all())
            source.close()
            source = Source.of_bytes(source.name, converted, source.from_policy)
        return source

    def _boot_config(self, name: str, client_ip: str) -> Source | None:
        config_name = name[len(PXELINUX_DIR):] if name.startswith(PXELINUX_DIR) else ""
        if not config_name or "/" in config_name:
            return None
        spec = self.policy.pxelinux_config(config_name, client_ip)
        if spec is None:
            return None
        return Source.of_bytes(name, pxelinux.render(spec).encode(), from_policy=True)

    def _file(self, name: str) -> Source:
        try:
            published = open_published(self.root, name)
        except NotPublished as exc:
            code = ErrorCode.FILE_NOT_FOUND if exc.missing else ErrorCode.ACCESS_VIOLATION
            raise TftpError(code, str(exc)) from None
        info = published.info
        return Source(name, published.fd, info.st_size, cache=self.cache, version=version_of(info))
