"""What a requested TFTP name refers to: a boot config from the policy, or a file in the root.

``pxelinux.cfg/<name>`` is answered by the boot policy first (so servers sharing a registry
agree), then by an admin-provided file on disk. Everything else is a file under the TFTP root
that published.py allows (contained by its real path, regular, world-readable), the same
rule HTTP's /boot/ follows, and that the policy does not refuse as differing from the
registry's checksum (bootfiles.py).

A file is sent from memory when :class:`~pxeserver.tftp.cache.FileMemory` has room for it:
one snapshot per file version and mode, shared by every transfer, its DATA packets kept per
block size while there is room for those too (cache.py). Otherwise it is read block by block
with ``pread`` from an open descriptor, netascii converted on the way, so no request can make
the server hold more file data than ``[tftp] packet_cache_mb``. Not mmap: an admin copying a
new initrd over the old one truncates it, and touching a mapped page past the new end raises
SIGBUS, which would kill the whole server; a short ``pread`` only ends that one transfer early.
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from pathlib import Path

from pxeserver import pxelinux
from pxeserver.bootfiles import BootFileRefused
from pxeserver.policy import PXELINUX_DIR, BootPolicy
from pxeserver.published import NotPublished, open_published
from pxeserver.tftp.cache import FileMemory, Packets, Slices, Version, packets_charge, version_of
from pxeserver.tftp.packets import DATA, HEADER, ErrorCode, TftpError, netascii

NETASCII_LIMIT = 16 << 20  # sizing netascii means reading the whole file; nobody boots a kernel in it
SCAN_CHUNK = 1 << 20  # how much of a file is read at once to size its netascii form


class Source:
    """The bytes of one transfer (in memory, or a descriptor), where they came from, what it holds."""

    def __init__(self, name: str, size: int, from_policy: bool = False, data: bytes | None = None,
                 fd: int = -1, is_netascii: bool = False) -> None:
        self.name = name  # the normalised name, as recorded in events
        self.size = size  # in the transfer's mode, fixed when opened: a file that grows is sent as it was
        self.from_policy = from_policy  # a boot config the policy generated for this name
        self._data = data
        self._fd = fd
        self._is_netascii = is_netascii  # a descriptor's bytes are converted as they are read
        self._memory: FileMemory | None = None
        self._shared: Hashable | None = None  # the key of packet lists for this file version and mode
        self._held: list[Hashable] = []  # FileMemory entries this transfer holds until it closes

    @classmethod
    def of_bytes(cls, name: str, data: bytes, from_policy: bool = False) -> Source:
        return cls(name, len(data), from_policy, data=data)

    @classmethod
    def of_file(cls, name: str, fd: int, info: os.stat_result, mode: str, memory: FileMemory) -> Source:
        """The file on ``fd`` (now owned by the Source): from memory if it has room, else from disk."""
        is_netascii = mode == "netascii"
        source = cls(name, info.st_size, fd=fd, is_netascii=is_netascii)
        source._memory = memory
        version = version_of(info)
        shared = (version, mode) if version is not None else None  # None: changing, not shared
        data = memory.hold(shared) if shared is not None else None
        key: Hashable | None = shared
        if data is None:
            if is_netascii:
                source.size = _netascii_size(fd, info.st_size, memory, version)
            if memory.room_for(source.size):
                data = _read_exactly(fd, info.st_size)
                if is_netascii:
                    data = netascii(data)
                if shared is not None and version_of(os.fstat(fd)) != version:  # changed while read
                    shared = None
                key = shared if shared is not None else object()  # object(): this transfer's own
                if not memory.add(key, data, len(data), shared=shared is not None):
                    data = None
        if isinstance(data, bytes) and key is not None:
            source._held.append(key)
            source._data, source.size, source._shared = data, len(data), shared
            source.close_file()
        return source

    def packets(self, blksize: int, windowsize: int) -> Packets | Slices | Streamed | NetasciiStreamed:
        """Every DATA packet of this transfer: kept and shared when there is room, else built per send."""
        if self._data is None:
            if self._is_netascii:
                return NetasciiStreamed(self._fd, self.size, blksize, windowsize)
            return Streamed(self._fd, self.size, blksize)
        if self._shared is not None and self._memory is not None:
            key = (self._shared, blksize)
            packets = self._memory.hold(key)
            size = packets_charge(len(self._data), blksize)
            if packets is None and self._memory.room_for(size):
                packets = Packets(self._data, blksize)
                self._memory.add(key, packets, size, parent=self._shared)
            if packets is not None:
                assert isinstance(packets, Packets)
                self._held.append(key)
                return packets
        return Slices(self._data, blksize)

    def close_file(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        """The transfer is over: release what it held in memory, close the file."""
        if self._memory is not None:
            for key in self._held:
                self._memory.release(key)
        self._held.clear()
        self.close_file()


class Streamed:
    """The DATA packets of a file not held in memory, read block by block as they are sent.

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


class NetasciiStreamed:
    """The netascii DATA packets of a file not held in memory, converted block by block.

    A block's start in the file depends on every CR and LF before it, so each block sent
    records where the next one starts: the file offset, and the second byte of a CR NUL or
    CR LF pair the block boundary split. Only the last window's starts are kept (a transfer
    never goes back further than the window after the oldest unacknowledged block).
    """

    __slots__ = ("_fd", "_blksize", "_window", "_starts", "count")

    def __init__(self, fd: int, size: int, blksize: int, windowsize: int) -> None:
        self._fd = fd  # owned by the Source
        self._blksize = blksize
        self._window = windowsize
        self._starts: dict[int, tuple[int, bytes]] = {1: (0, b"")}
        self.count = size // blksize + 1  # size: the converted size

    def get(self, block: int) -> bytes:
        known = block
        while known not in self._starts:  # blocks go out in order, so this loop runs at most once
            known -= 1
        for earlier in range(known, block):
            self._convert(earlier)
        return HEADER.pack(DATA, block & 0xFFFF) + self._convert(block)

    def _convert(self, block: int) -> bytes:
        offset, carry = self._starts[block]
        wanted = self._blksize - len(carry)
        converted = netascii(os.pread(self._fd, wanted, offset))  # each byte gives one or two
        payload = carry + converted[:wanted]
        # Every CR in netascii starts a pair; a CR as the payload's last byte leaves its partner
        # for the next block. The bytes read are the payload's pairs counted once each.
        split = payload.endswith(b"\r") and len(converted) > wanted
        consumed = wanted - converted[:wanted].count(b"\r") + split
        self._starts[block + 1] = (offset + consumed, converted[wanted:wanted + 1] if split else b"")
        self._starts.pop(block - self._window - 1, None)
        return payload


def _netascii_size(fd: int, size: int, memory: FileMemory, version: Version | None) -> int:
    """The file's size in netascii: one more byte for every CR and every LF.

    Counting reads the whole file, so the result is remembered per file version: a flood of
    netascii requests for a file too large to hold reads it once, not once per request.
    """
    key = (version, "netascii size")
    known = memory.hold(key) if version is not None else None
    if isinstance(known, int):
        memory.release(key)  # remembered, not in use
        return known
    total = 0
    for offset in range(0, size, SCAN_CHUNK):
        chunk = os.pread(fd, SCAN_CHUNK, offset)
        total += len(chunk) + chunk.count(b"\r") + chunk.count(b"\n")
    if version is not None and memory.add(key, total, 0):
        memory.release(key)
    return total


def _read_exactly(fd: int, size: int) -> bytes:
    """Up to ``size`` bytes from the start: fewer only when the file was truncated meanwhile."""
    data = os.pread(fd, size, 0)
    while len(data) < size:  # pread may return less than asked, for huge files
        more = os.pread(fd, size - len(data), len(data))
        if not more:
            break
        data += more
    return data


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
    def __init__(self, root: Path, policy: BootPolicy, memory: FileMemory) -> None:
        self.root = root
        self.policy = policy
        self.memory = memory

    def open(self, filename: str, client_ip: str, mode: str) -> Source:
        name = normalise(filename)
        return self._boot_config(name, client_ip, mode) or self._file(name, mode)

    def _boot_config(self, name: str, client_ip: str, mode: str) -> Source | None:
        config_name = name[len(PXELINUX_DIR):] if name.startswith(PXELINUX_DIR) else ""
        if not config_name or "/" in config_name:
            return None
        spec = self.policy.pxelinux_config(config_name, client_ip)
        if spec is None:
            return None
        text = pxelinux.render(spec).encode()  # a few hundred bytes, made per request
        return Source.of_bytes(name, netascii(text) if mode == "netascii" else text, from_policy=True)

    def _file(self, name: str, mode: str) -> Source:
        try:
            published = open_published(self.root, name)
        except NotPublished as exc:
            code = ErrorCode.FILE_NOT_FOUND if exc.missing else ErrorCode.ACCESS_VIOLATION
            raise TftpError(code, str(exc)) from None
        try:
            self.policy.check_boot_file(name, published, "tftp")
        except BootFileRefused as exc:
            os.close(published.fd)
            raise TftpError(ErrorCode.ACCESS_VIOLATION, str(exc)) from None
        if mode == "netascii" and published.info.st_size > NETASCII_LIMIT:
            os.close(published.fd)
            raise TftpError(ErrorCode.NOT_DEFINED, "file too large for netascii; use octet mode")
        return Source.of_file(name, published.fd, published.info, mode, self.memory)
