"""pypxeboot's dom0 cache: each boot file a dom0's guests share is downloaded once.

Every domU on a Xen host runs pypxeboot in that host's dom0, so in a boot storm the dom0
downloads the same kernel and initrd once per guest. With ``cache_dir=DIR`` pypxeboot keeps
what it downloaded under the SHA-256 the boot server announced for it (``Repr-Digest``,
RFC 9530, or ``X-Checksum-SHA256``: pxeserver sends both on /boot/) and, when a later boot is
announced a digest it holds, copies the kept file into its own new output file instead of
reading the body again. Guests booting at once take a lock per digest (``flock``), so one
downloads while the others wait, then copy; a kept file is copied without the lock (entries
appear whole: they are renamed into place).

Trust: the network chooses the digest, never what is kept under it. A body is kept only after
its own SHA-256 equals the digest it is kept under (and the one the response announced), so a
hostile server can make one boot fail but can never place bytes that a guest announced another
digest will get. The directory is root's alone: it must be a real directory (not a symlink)
owned by pypxeboot's user with no access for group or others (it is created so, 0700, when
missing; otherwise it is not used and the boot downloads as without a cache); an entry counts
only if it is a regular file of that owner, with one link and no access for others, opened
without following symlinks; anything else under an entry's name is removed. A file kept there
is trusted as root's own, not hashed again on every use (root can change dom0 anyway).

Size: ``cache_mb=`` caps the kept files together; the least recently used go first, and a
file larger than the cap is not kept.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import signal
import stat
import time
from collections.abc import Iterator
from typing import BinaryIO

from pxeserver.pypxeboot.tftp import BoundExceeded, Bounds

_ENTRY = re.compile(r"[0-9a-f]{64}")
_STALE_PARTIAL = 3600  # seconds after which a partial file (its writer was killed) is removed
_COPY = 1 << 24  # bytes per sendfile call


class CacheUnusable(OSError):
    """The cache directory cannot be trusted or used; the boot downloads without it."""


class Cache:
    """An open, checked cache directory; every operation is relative to its descriptor."""

    def __init__(self, path: str, max_bytes: int) -> None:
        self.path, self.max_bytes = path, max_bytes
        self.fd = _open_directory(path)

    def close(self) -> None:
        os.close(self.fd)

    @contextlib.contextmanager
    def download_lock(self, sha256: str, bounds: Bounds) -> Iterator[bool]:
        """True, holding ``sha256``'s lock, when no other pypxeboot is downloading it: the
        caller downloads. False, holding nothing, once another one that was has let go (the
        file is then kept, or its download failed): the caller looks in the cache again.

        Waiting is one blocking ``flock`` bounded by the boot's deadline (SIGALRM), not a
        poll: a storm's waiters then cost no CPU, which the one downloading guest per dom0
        needs (190 waiters polling every 20 ms woke 9,500 times a second). The lock file
        is removed by its holder before it lets go, so a lock taken on a removed file means
        that holder finished."""
        name = f"{sha256}.lock"
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.fd)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _wait_for_lock(fd, bounds.deadline - time.monotonic(), sha256)
                held = False  # taken only once its holder let go: nothing to download
            else:
                try:
                    current = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
                except FileNotFoundError:
                    current = None
                held = current is not None and (current.st_dev, current.st_ino) == _identity(os.fstat(fd))
            if not held:
                os.close(fd)
                fd = -1
            yield held
        finally:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=self.fd)
                os.close(fd)

    def copy_to(self, sha256: str, output: BinaryIO, limit: int, too_big: str) -> int | None:
        """Copy the kept file for ``sha256`` into ``output`` (empty, just created); its size,
        or None when none is kept (an untrusted file under that name is removed)."""
        try:
            fd = os.open(sha256, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno != errno.ELOOP:  # a symlink: removed below
                raise
            fd = -1
        try:
            info = os.fstat(fd) if fd >= 0 else None
            if info is None or not _trusted(info):
                os.unlink(sha256, dir_fd=self.fd)
                return None
            if info.st_size > limit:
                raise BoundExceeded(too_big)
            output.flush()
            copied = 0
            while copied < info.st_size:
                sent = os.sendfile(output.fileno(), fd, copied, min(_COPY, info.st_size - copied))
                if sent == 0:
                    raise CacheUnusable(f"{self.path}/{sha256}: shorter than it was a moment ago")
                copied += sent
            os.utime(fd)  # recently used: evicted last
            return copied
        finally:
            if fd >= 0:
                os.close(fd)

    @contextlib.contextmanager
    def new_entry(self, sha256: str) -> Iterator[BinaryIO]:
        """A file to download into; kept under ``sha256`` only if the block ends without an
        error (the caller checked its digest by then), else removed."""
        partial = f".{sha256}.{os.getpid()}"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self.fd)
        kept = False
        try:
            with os.fdopen(fd, "wb") as file:
                yield file
            os.rename(partial, sha256, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            kept = True
        finally:
            if not kept:
                with contextlib.suppress(OSError):
                    os.unlink(partial, dir_fd=self.fd)
        self._evict(keep=sha256)

    def _evict(self, keep: str) -> None:
        """Least recently used entries out until the rest fit ``max_bytes``; partial files
        whose writer died long ago out too."""
        entries, total, now = [], 0, time.time()
        with os.scandir(self.fd) as listing:
            for item in listing:
                with contextlib.suppress(OSError):
                    info = item.stat(follow_symlinks=False)
                    if _ENTRY.fullmatch(item.name):
                        entries.append((info.st_mtime, item.name, info.st_size))
                        total += info.st_size
                    elif item.name.startswith(".") and now - info.st_mtime > _STALE_PARTIAL:
                        os.unlink(item.name, dir_fd=self.fd)
        for _, name, size in sorted(entries):
            if total <= self.max_bytes:
                break
            if name != keep:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=self.fd)
                total -= size


class _LockWaitEnded(Exception):
    """Raised by the SIGALRM handler to end a blocking flock at the boot's deadline."""


def _wait_for_lock(fd: int, seconds: float, sha256: str) -> None:
    """Block until ``fd``'s lock is free, at most ``seconds``; BoundExceeded after that."""
    def ended(signum: int, frame: object) -> None:
        raise _LockWaitEnded()

    previous = signal.signal(signal.SIGALRM, ended)
    try:
        signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
        fcntl.flock(fd, fcntl.LOCK_EX)
    except _LockWaitEnded:
        raise BoundExceeded(f"waited for another pypxeboot's download of sha-256 {sha256[:16]}... "
                            "until the boot's deadline passed (deadline=)") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def _trusted(info: os.stat_result) -> bool:
    return (stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and info.st_nlink == 1
            and not info.st_mode & 0o077)


def _open_directory(path: str) -> int:
    """The cache directory's descriptor, created 0700 when missing; CacheUnusable unless it is
    a real directory of this user that nobody else may enter."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise CacheUnusable(f"cache_dir={path}: cannot create it: {exc.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise CacheUnusable(f"cache_dir={path}: not a directory pypxeboot can open without following "
                            f"a symlink ({exc.strerror})") from None
    info = os.fstat(fd)
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        os.close(fd)
        raise CacheUnusable(f"cache_dir={path}: owned by uid {info.st_uid} with mode {info.st_mode & 0o777:o}; "
                            f"it must be uid {os.geteuid()}'s alone (mode 700)")
    return fd
