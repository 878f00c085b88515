"""Whether a profile's kernel and initrd are there and still what an import recorded.

A file is checked as the TFTP and HTTP services would serve it (published.py: inside the
root, regular, world-readable), so "served: false" here means a booting guest gets an error.
Its SHA-256 is compared with the registry's record; hashes are remembered per file version
(device, inode, size, mtime), so showing a profile again does not re-read a 50 MB initrd.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any, BinaryIO

from pxeserver.published import NotPublished, Published, open_published
from pxeserver.registry import Profile, Store

CHUNK = 1 << 20
_HASH_CACHE_ENTRIES = 256


def hash_stream(stream: BinaryIO, algorithm: str = "sha256") -> tuple[str, int]:
    """The hex digest and length of everything ``stream`` still holds."""
    digest, size = hashlib.new(algorithm), 0
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


class _HashCache:
    """SHA-256 per file version. One thread hashes a version while others asking for it wait:
    at the start of a boot storm every /boot/ request asks for the same initrd's digest at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[tuple[int, int, int, int], str] = {}
        self._hashing: dict[tuple[int, int, int, int], threading.Lock] = {}

    def sha256(self, fd: int, info: os.stat_result) -> str:
        version = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        with self._lock:
            known = self._known.get(version)
            if known is not None:
                return known
            hashing = self._hashing.setdefault(version, threading.Lock())
        with hashing:
            with self._lock:
                known = self._known.get(version)
            if known is not None:
                return known
            digest = _hash_fd(fd)  # pread: the descriptor's offset stays where a sender expects it
            with self._lock:
                if len(self._known) >= _HASH_CACHE_ENTRIES:
                    self._known.pop(next(iter(self._known)))
                self._known[version] = digest
                self._hashing.pop(version, None)
        return digest


def _hash_fd(fd: int) -> str:
    digest, offset = hashlib.sha256(), 0
    while chunk := os.pread(fd, CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


_cache = _HashCache()


def served_sha256(published: Published) -> str:
    """The SHA-256 of the file version behind an open published descriptor (what /boot/
    announces), computed once per version."""
    return _cache.sha256(published.fd, published.info)


def file_status(tftp_root: Path, path: str, store: Store) -> dict[str, Any]:
    """``path``'s size, whether it is served and whether it matches its recorded SHA-256
    (``matches`` is None when no import recorded it)."""
    record = store.boot_files([path]).get(path)
    status: dict[str, Any] = {"path": path, "served": False, "size": None, "sha256": None,
                              "recorded_size": None, "recorded_sha256": None, "matches": None}
    if record is not None:
        status.update(recorded_size=record.size, recorded_sha256=record.sha256, source=record.source)
    try:
        published = open_published(tftp_root, path)
    except NotPublished as exc:
        status["problem"] = str(exc)
        if record is not None:
            status["matches"] = False
        return status
    try:
        status.update(served=True, size=published.info.st_size)
        if record is not None:
            status["sha256"] = _cache.sha256(published.fd, published.info)
            status["matches"] = status["sha256"] == record.sha256 and status["size"] == record.size
    finally:
        os.close(published.fd)
    return status


def profile_files(tftp_root: Path, profile: Profile, store: Store) -> dict[str, dict[str, Any]]:
    return {role: file_status(tftp_root, getattr(profile, role), store) for role in ("kernel", "initrd")}


def missing_files(tftp_root: Path, profile: Profile) -> list[str]:
    """One warning per kernel or initrd the TFTP root does not serve (yet).

    A warning, not a refusal: admins define profiles before their files land (a config
    management run that copies files after, a TFTP root mounted later), and the API has
    always accepted that. `profile show` keeps showing the file as not served until it is.
    """
    warnings = []
    for role in ("kernel", "initrd"):
        path = getattr(profile, role)
        try:
            os.close(open_published(tftp_root, path).fd)
        except NotPublished as exc:
            warnings.append(f"{role} {path} is not served from the TFTP root: {exc}")
    return warnings
