"""Whether a profile's kernel and initrd are there and still what an import recorded.

A file is checked as the TFTP and HTTP services would serve it (published.py: inside the
root, regular, world-readable), so "served: false" here means a booting guest gets an error.
Its SHA-256 is compared with the registry's record; hashes are remembered per file version
(device, inode, size, mtime), so showing a profile again does not re-read a 50 MB initrd.

Several nodes sharing one registry each serve their own copy of the files. A copy that differs
from the record (a half-finished rsync, an older import, a disk error) would boot guests into
an installer other than the one the registry names, so :class:`BootFileGuard` refuses to serve
it, over TFTP and HTTP alike, until the copy is fixed. Checking costs a hash lookup per request:
a file is read whole only once per version, and by one thread however many ask at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pxeserver.published import NotPublished, Published, open_published
from pxeserver.registry import BootFile, Profile, Store, Unavailable

log = logging.getLogger(__name__)

CHUNK = 1 << 20
_HASH_CACHE_ENTRIES = 256


def hash_stream(stream: BinaryIO, algorithm: str = "sha256") -> tuple[str, int]:
    """The hex digest and length of everything ``stream`` still holds."""
    digest, size = hashlib.new(algorithm), 0
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


Version = tuple[int, int, int, int]


def _pread_sha256(fd: int) -> str:
    """The SHA-256 of the whole file, read by offset: the descriptor's own position, from which
    HTTP then sends the file, stays where it is."""
    digest, offset = hashlib.sha256(), 0
    while chunk := os.pread(fd, CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def _version(info: os.stat_result) -> Version:
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


class _HashCache:
    """SHA-256 per file version. One thread hashes a version while others asking for it wait:
    at the start of a boot storm every /boot/ request asks for the same initrd's digest at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[Version, str] = {}
        self._hashing: dict[Version, threading.Lock] = {}

    def sha256(self, fd: int, info: os.stat_result) -> str:
        version = _version(info)
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
            try:
                digest = _pread_sha256(fd)
            finally:
                with self._lock:
                    self._hashing.pop(version, None)
            if _version(os.fstat(fd)) == version:  # not remembered if it changed while read
                with self._lock:
                    if len(self._known) >= _HASH_CACHE_ENTRIES:
                        self._known.pop(next(iter(self._known)))
                    self._known[version] = digest
        return digest


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


@dataclass(frozen=True)
class Mismatch:
    """A node's copy of a recorded boot file that is not what the registry records."""

    path: str  # as recorded, relative to the TFTP root
    expected: str  # the registry's SHA-256
    actual: str  # this node's copy's


class BootFileRefused(Exception):
    """This node's copy of a boot file differs from the registry's record; not served."""

    def __init__(self, mismatch: Mismatch) -> None:
        super().__init__(f"{mismatch.path} differs from the registry's checksum on this node")
        self.mismatch = mismatch


class BootFileGuard:
    """Refuses to serve a recorded kernel or initrd whose copy on this node is not the one the
    registry records, logs it once per bad copy, and counts it for the metrics.

    A request for a file no import recorded (a bootloader, a hand-added profile's kernel) is
    served as before. When the registry cannot be asked and never told this node about the
    file, it is served too: the node keeps booting guests from its last known state.
    """

    def __init__(self, store: Store, tftp_root: Path, node: str,
                 refused: Callable[[str], None] = lambda path: None) -> None:
        self._store = store
        self._root = tftp_root
        self._node = node
        self._refused = refused  # counts one refusal of a recorded path
        self._lock = threading.Lock()
        self._mismatched: dict[str, Mismatch] = {}  # the copies last found bad, by recorded path

    def check(self, name: str, published: Published, protocol: str) -> None:
        """Raise BootFileRefused if ``published`` (opened for ``name``) is a recorded boot file
        whose copy differs from the record. Both the name asked for and the file's real path
        under the root are looked up, so a symlink or another spelling is checked as well."""
        names = {name, os.path.relpath(published.path, os.path.realpath(self._root))}
        try:
            records = self._store.boot_files(names)
        except Unavailable:
            return
        for record in records.values():
            mismatch = self._compare(record, published)
            if mismatch is not None:
                self._refused(record.path)
                self._found(mismatch, f"refusing it over {protocol}")
                raise BootFileRefused(mismatch)

    def mismatched(self) -> int:
        """How many recorded files this node's last check found bad; those are checked again
        first (a scrape after the copy was fixed says so without waiting for a request)."""
        with self._lock:
            paths = list(self._mismatched)
        for path in paths:
            self.verify([path])
        with self._lock:
            return len(self._mismatched)

    def verify_all(self) -> None:
        """Check every profile's recorded kernel and initrd now (``serve`` does it at start in the
        background, so a bad copy is logged and counted before a guest asks for it)."""
        try:
            profiles = self._store.list_profiles()
        except Unavailable:
            return
        self.verify({path for profile in profiles for path in (profile.kernel, profile.initrd)})

    def verify(self, paths: Iterable[str]) -> None:
        # One path per read, as a request asks: a shared registry's node then holds each
        # record in its last known state, and refuses a bad copy through an outage too.
        for path in sorted(set(paths)):
            try:
                record = self._store.boot_files([path]).get(path)
            except Unavailable:
                return
            if record is not None:
                self._verify(record)

    def _verify(self, record: BootFile) -> None:
        try:
            published = open_published(self._root, record.path)
        except NotPublished:  # not served at all: a 404, not a mismatch
            self._matched(record.path, quiet=True)
            return
        try:
            mismatch = self._compare(record, published)
        finally:
            os.close(published.fd)
        if mismatch is not None:
            self._found(mismatch, "refusing to serve it")

    def _compare(self, record: BootFile, published: Published) -> Mismatch | None:
        """None (and the copy noted as good again) when ``published`` is what ``record`` says."""
        actual = _cache.sha256(published.fd, published.info)
        if actual == record.sha256 and published.info.st_size == record.size:
            self._matched(record.path)
            return None
        return Mismatch(record.path, record.sha256, actual)

    def _found(self, mismatch: Mismatch, action: str) -> None:
        with self._lock:
            known = self._mismatched.get(mismatch.path)
            self._mismatched[mismatch.path] = mismatch
        if known != mismatch:  # one line per bad copy, however many guests ask for it
            log.error("boot file %s on node %s does not match the registry: sha256 %s, expected %s; "
                      "%s until it is fixed", mismatch.path, self._node, mismatch.actual,
                      mismatch.expected, action)

    def _matched(self, path: str, quiet: bool = False) -> None:
        with self._lock:
            known = self._mismatched.pop(path, None)
        if known is not None and not quiet:
            log.warning("boot file %s on node %s matches the registry again: serving it", path, self._node)
