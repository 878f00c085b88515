"""Ready-made DATA packets, shared by every transfer of the same file version and block size.

Most TFTP traffic is the same few files (pxelinux.0, ldlinux.c32, a kernel, an initrd) sent
to many clients at one block size, and a DATA packet depends only on the file's bytes, the
block size and the block number (on the wire modulo 65536, so rollover is the same for every
client). Built once and kept in a :class:`PacketCache`, each lockstep step of every later
transfer is a list lookup and one write: no ``pread``, no header packing, no slicing or
concatenating, and no fresh 1 MB buffer per transfer of a small file. In bench/tftp.py's
300 x 1 MB workload that (with session.py's ``os.write``) took about a third off the
server's user CPU per block.

A cached file is read whole into memory once (one snapshot, never mmap: see files.py) and
its packets are built from that snapshot on first use, so a 40 MB initrd at blksize 512 costs
no 80,000-packet stall up front. A transfer holds its own :class:`Packets`, so a file that
changes mid-transfer never mixes old and new bytes in one transfer; eviction only drops the
cache's reference. The key is the file *version*: device, inode, size, mtime and ctime.
ctime matters because ``cp -p`` over a file keeps inode, size and mtime; it cannot be set back
by any user. A file changed less than :data:`RACY_SECONDS` ago is not shared at all (as git's
"racy clean" rule): within one timestamp tick a second write could leave the same version key.

Hand-written: ``functools.lru_cache`` bounds entries by count, this bounds them by bytes.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict

from pxeserver.tftp.packets import DATA, HEADER

RACY_SECONDS = 2  # coarser than any timestamp granularity a TFTP root is likely on (FAT: 2 s)
PACKET_OVERHEAD = 4 + 33 + 8  # header, a bytes object's own size, its slot in the list

Version = tuple[int, int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns


def version_of(info: os.stat_result) -> Version | None:
    """The key of what a file holds now, or None while it may still change unnoticed."""
    if time.time_ns() - info.st_ctime_ns < RACY_SECONDS * 1_000_000_000:
        return None
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


class Packets:
    """The DATA packets of one snapshot of a file at one block size, each built on first use."""

    __slots__ = ("_data", "_blksize", "_built", "count", "charge")

    def __init__(self, data: bytes, blksize: int) -> None:
        self._data = data
        self._blksize = blksize
        self.count = len(data) // blksize + 1  # the last block is short, maybe empty
        self._built: list[bytes | None] = [None] * (self.count + 1)  # by absolute block; 0 unused
        self.charge = charge(len(data), blksize)

    def get(self, block: int) -> bytes:
        """The packet of absolute block number ``block`` (1 .. count)."""
        packet = self._built[block]
        if packet is None:
            offset = (block - 1) * self._blksize
            packet = HEADER.pack(DATA, block & 0xFFFF) + self._data[offset:offset + self._blksize]
            self._built[block] = packet
        return packet


def charge(size: int, blksize: int) -> int:
    """The bytes a fully built :class:`Packets` holds: the snapshot plus every packet."""
    return size + (size + (size // blksize + 1) * PACKET_OVERHEAD)


class PacketCache:
    """Least recently used :class:`Packets` by (file version, blksize), bounded in total bytes.

    One entry may take at most half the capacity, so no single huge image flushes all the
    small boot files; larger files are streamed instead (files.py).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.charged = 0  # the bytes of the entries held now; never above capacity
        self._entries: OrderedDict[tuple[Version, int], Packets] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def admits(self, size: int, blksize: int) -> bool:
        return charge(size, blksize) <= self.capacity // 2

    def get(self, version: Version, blksize: int) -> Packets | None:
        packets = self._entries.get((version, blksize))
        if packets is not None:
            self._entries.move_to_end((version, blksize))
        return packets

    def add(self, version: Version, blksize: int, packets: Packets) -> None:
        if packets.charge > self.capacity // 2 or (version, blksize) in self._entries:
            return
        self._entries[(version, blksize)] = packets
        self.charged += packets.charge
        while self.charged > self.capacity:
            _, evicted = self._entries.popitem(last=False)
            self.charged -= evicted.charge
