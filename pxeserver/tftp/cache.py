"""File data in memory: shared by every transfer, and bounded in bytes whatever clients ask for.

Most TFTP traffic is the same few files (pxelinux.0, ldlinux.c32, a kernel, an initrd) sent
to many clients at one block size, and a DATA packet depends only on the file's bytes, the
block size and the block number (on the wire modulo 65536, so rollover is the same for every
client). So a file is read whole into memory once per version and mode (a *snapshot*: one
copy, never mmap: see files.py), and its DATA packets are built once per block size from that
snapshot, on first use (a 40 MB initrd at blksize 512 costs no 80,000-packet stall up front).
Each lockstep step of every later transfer is then a list lookup and one write: no ``pread``,
no header packing, no slicing or concatenating. In bench/tftp.py's 300 x 1 MB workload that
(with session.py's ``os.write``) took about a third off the server's user CPU per block.

:class:`FileMemory` holds every snapshot and packet list, and charges each against one
capacity (``[tftp] packet_cache_mb``) for as long as anything holds it: the cache itself *or*
a running transfer. Eviction only drops entries nobody uses, and a new entry that does not
fit is not made, so no mix of block sizes, modes or never-acknowledged transfers can take
memory past the cap (each of 40 RRQs with a new blksize used to copy the whole file). Past
it, a transfer slices packets from a snapshot it shares (:class:`Slices`) or reads the file
block by block (files.py). A transfer holds what it uses, so a file that changes
mid-transfer never mixes old and new bytes in one transfer.

The key is the file *version*: device, inode, size, mtime and ctime. ctime matters because
``cp -p`` over a file keeps inode, size and mtime; it cannot be set back by any user. A file
changed less than :data:`RACY_SECONDS` ago is not shared (as git's "racy clean" rule: within
one timestamp tick a second write could leave the same version key); its snapshot is private
to its transfer, still charged, and dropped when the transfer ends.

Hand-written: ``functools.lru_cache`` bounds entries by count and cannot tell a value in use
from an idle one; this bounds them by bytes and never drops what a transfer holds.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Hashable

from pxeserver.tftp.packets import DATA, HEADER

RACY_SECONDS = 2  # coarser than any timestamp granularity a TFTP root is likely on (FAT: 2 s)
PACKET_OVERHEAD = 4 + 33 + 8  # header, a bytes object's own size, its slot in the list
ENTRY_OVERHEAD = 512  # an entry's key, bookkeeping and Python objects, charged on top of its data

Version = tuple[int, int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns


def version_of(info: os.stat_result) -> Version | None:
    """The key of what a file holds now, or None while it may still change unnoticed."""
    if time.time_ns() - info.st_ctime_ns < RACY_SECONDS * 1_000_000_000:
        return None
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


class Packets:
    """The DATA packets of one snapshot at one block size, each built on first use and kept."""

    __slots__ = ("_data", "_blksize", "built", "count")

    def __init__(self, data: bytes, blksize: int) -> None:
        self._data = data
        self._blksize = blksize
        self.count = len(data) // blksize + 1  # the last block is short, maybe empty
        # The packets built so far, by absolute block (0 unused), None until first use: a
        # session's lockstep fast path indexes this list itself and calls get() on a None.
        self.built: list[bytes | None] = [None] * (self.count + 1)

    def get(self, block: int) -> bytes:
        """The packet of absolute block number ``block`` (1 .. count)."""
        packet = self.built[block]
        if packet is None:
            offset = (block - 1) * self._blksize
            packet = HEADER.pack(DATA, block & 0xFFFF) + self._data[offset:offset + self._blksize]
            self.built[block] = packet
        return packet


def packets_charge(size: int, blksize: int) -> int:
    """The bytes a :class:`Packets` of a ``size``-byte snapshot holds once every packet is built."""
    return size + (size // blksize + 1) * PACKET_OVERHEAD


class Slices:
    """The DATA packets of a snapshot, built per send and not kept: no memory beyond the snapshot."""

    __slots__ = ("_data", "_blksize", "count")

    def __init__(self, data: bytes, blksize: int) -> None:
        self._data = data
        self._blksize = blksize
        self.count = len(data) // blksize + 1

    def get(self, block: int) -> bytes:
        offset = (block - 1) * self._blksize
        return HEADER.pack(DATA, block & 0xFFFF) + self._data[offset:offset + self._blksize]


class _Entry:
    __slots__ = ("value", "charge", "users", "parent")

    def __init__(self, value: object, charge: int, parent: Hashable | None) -> None:
        self.value = value
        self.charge = charge
        self.users = 1  # whoever added it holds it
        self.parent = parent  # an entry this one holds (packets hold their snapshot)


class FileMemory:
    """Snapshots and packet lists by key, least recently used first, bounded in total bytes.

    Every entry is charged until it is gone, in use or not, plus :data:`ENTRY_OVERHEAD` (so
    a flood of tiny files at many block sizes is bounded too). One entry may take at most
    half the capacity, so no single huge image flushes all the small boot files; larger files
    are read block by block instead (files.py). A private entry (a file that may still be
    changing) is charged the same but never shared, and goes as soon as its transfer ends.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.charged = 0  # the bytes of every entry held now; never above capacity
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()  # shared ones
        self._private: dict[Hashable, int] = {}  # their charges

    def __len__(self) -> int:
        """Entries kept for sharing."""
        return len(self._entries)

    def hold(self, key: Hashable) -> object | None:
        """The shared value under ``key``, now held until :meth:`release`; None when there is none."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        entry.users += 1
        self._entries.move_to_end(key)
        return entry.value

    def add(self, key: Hashable, value: object, size: int, shared: bool = True,
            parent: Hashable | None = None) -> bool:
        """Keep ``value`` (``size`` bytes), held by the caller, if it fits; False (nothing kept) if not.

        ``parent`` (a shared key the caller holds) stays held as long as this entry exists.
        """
        charge = size + ENTRY_OVERHEAD
        if key in self._entries or key in self._private or not self.room_for(size):
            return False
        self.charged += charge
        if not shared:
            self._private[key] = charge
            return True
        if parent is not None:
            self._entries[parent].users += 1
        self._entries[key] = _Entry(value, charge, parent)
        return True

    def release(self, key: Hashable) -> None:
        if key in self._private:
            self.charged -= self._private.pop(key)
        elif (entry := self._entries.get(key)) is not None:
            entry.users -= 1  # idle at 0: kept until evicted

    def room_for(self, size: int) -> bool:
        """Whether an entry of ``size`` bytes may be added now, evicting idle entries (least
        recently used first) to make room for it."""
        charge = size + ENTRY_OVERHEAD
        if charge > self.capacity // 2:
            return False
        while self.charged + charge > self.capacity:
            idle = next((key for key, entry in self._entries.items() if entry.users <= 0), None)
            if idle is None:
                return False
            self._drop(idle)  # dropping packets may leave their snapshot idle: the next round's
        return True

    def _drop(self, key: Hashable) -> None:
        entry = self._entries.pop(key)
        self.charged -= entry.charge
        if entry.parent is not None:
            self.release(entry.parent)
