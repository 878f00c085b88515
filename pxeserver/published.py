"""Which files under the TFTP root are published, by TFTP and by HTTP's /boot/ alike.

One rule for both protocols, so a file refused over one is never handed out over the other:
the name is resolved with every symlink followed and must still lie inside the root's real
path; it must be a regular file; and, as with tftp-hpa, it must be world-readable (a server
running as root would otherwise publish a file its admin made private). The file is opened
here, with O_NOFOLLOW against a symlink swapped in after the check and O_NONBLOCK so a FIFO
cannot hang the caller. TFTP and HTTP both serve that descriptor, never the path again (by
then it may name something else).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path


class NotPublished(Exception):
    """A name that is not served; ``missing`` tells "no such file" from "not allowed"."""

    def __init__(self, reason: str, *, missing: bool) -> None:
        super().__init__(reason)
        self.missing = missing


@dataclass(frozen=True)
class Published:
    fd: int  # open read-only; the caller closes it
    info: os.stat_result
    path: str  # the real path, every symlink resolved


def open_published(root: Path, name: str) -> Published:
    """Open ``name`` under ``root`` if it is published; raises NotPublished otherwise."""
    real_root = os.path.realpath(root)
    try:
        path = os.path.realpath(os.path.join(real_root, name))
    except ValueError:  # a NUL byte
        raise NotPublished("invalid file name", missing=True) from None
    if os.path.commonpath([real_root, path]) != real_root:
        raise NotPublished("path leads outside the TFTP root", missing=False)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NotPublished("file not found", missing=True) from None
    except PermissionError:
        raise NotPublished("permission denied", missing=False) from None
    except OSError as exc:  # ELOOP (a symlink swapped in), ENAMETOOLONG, ENOTDIR, ...
        raise NotPublished(os.strerror(exc.errno or 0), missing=exc.errno == errno.ENOTDIR) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotPublished("not a regular file", missing=True)
        if not info.st_mode & stat.S_IROTH:
            raise NotPublished("file is not world-readable", missing=False)
    except BaseException:
        os.close(fd)
        raise
    return Published(fd, info, path)
