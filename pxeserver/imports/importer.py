"""An import: from a source to ``tftp_root/images/NAME/`` and a profile, or to nothing.

The kernel and initrd are copied and hashed in one pass into a staging directory beside the
target (``images/.import-NAME-<pid>-<random>``, mode 0700, files 0600: never served, as the
TFTP and HTTP services publish only world-readable files), checked against every checksum
the source offers, made readable, then renamed into place in one step. A failure, Ctrl-C or
a full disk removes the staging directory; a directory a killed import left is removed by
the next import of the same name. If ``images/NAME`` already holds the same files nothing is
copied over it (a repeated import is a no-op); other files there are refused, not replaced.
The profile and the files' sizes and SHA-256 are then stored in one registry transaction.
"""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pxeserver.app import Context
from pxeserver.bootfiles import CHUNK, hash_stream
from pxeserver.imports.layouts import Layout, detect
from pxeserver.imports.progress import Progress
from pxeserver.imports.sources import Source, SourceError, open_source, read_chunk
from pxeserver.imports.verify import ALGORITHMS
from pxeserver.registry import BootFile, Conflict, NotFound, Profile
from pxeserver.registry.models import validate_profile_name

STAGING_PREFIX = ".import-"


class ImportFailed(Exception):
    """The import could not finish; nothing was published. One line for the user."""


@dataclass(frozen=True)
class Copied:
    role: str  # "kernel" or "initrd"
    path: str  # relative to the TFTP root: images/NAME/<file>
    size: int
    sha256: str
    verified_by: tuple[str, ...]  # the checksum lists that confirmed it; empty: none offered


@dataclass(frozen=True)
class ImportResult:
    profile: Profile
    profile_added: bool  # False: the same profile already existed
    files_copied: bool  # False: images/NAME already held these files
    layout: Layout
    files: tuple[Copied, ...]

    def to_dict(self, secret_vars: list[str]) -> dict[str, Any]:
        return {
            "profile": self.profile.to_dict(secret_vars),
            "profile_added": self.profile_added,
            "files_copied": self.files_copied,
            "layout": {"family": self.layout.family.name, "found_by": self.layout.found_by,
                       "release": self.layout.release},
            "files": [{"role": f.role, "path": f.path, "size": f.size, "sha256": f.sha256,
                       "verified_by": list(f.verified_by)} for f in self.files],
        }


def run_import(context: Context, name: str, source_text: str, progress: Progress, *,
               arch: str = "x86_64", autoinstall: str = "") -> ImportResult:
    validate_profile_name(name)
    images = context.config.tftp_root / "images"
    with open_source(source_text) as source:
        progress.step(f"reading {source.description}")
        layout = detect(source, arch, context.config.imports.debian_keyrings)
        progress.step(f"found {layout.family.name} installer ({layout.found_by})"
                      + (f": {layout.release}" if layout.release else ""))
        names = {role: posixpath.basename(path) for role, path in layout.files.items()}
        wanted = context.provisioning.check_profile({
            "name": name, "kernel": f"images/{name}/{names['kernel']}",
            "initrd": f"images/{name}/{names['initrd']}", "append": f"console={layout.family.console}",
            "autoinstall": autoinstall or layout.family.template,
        })
        _check_no_other_profile(context, wanted)
        sizes = _sizes(source, layout, context.config.imports.max_file_mb << 20)
        images.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(images, name)
        free = shutil.disk_usage(images).free
        if sum(sizes.values()) > free:
            raise ImportFailed(f"not enough space in {images}: the files need {sum(sizes.values())} "
                               f"bytes and {free} are free")
        staging = images / f"{STAGING_PREFIX}{name}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            staging.mkdir(mode=0o700)
            copied = tuple(_copy(source, layout, role, sizes[role], staging / names[role],
                                 f"images/{name}/{names[role]}", progress)
                           for role in ("kernel", "initrd"))
            _fsync(staging)
            with _interrupts_deferred(progress):
                files_copied = _publish(staging, images / name)
                if files_copied:
                    progress.step(f"published {images / name}/")
                else:
                    progress.step(f"{images / name}/ already holds these files: nothing copied")
                profile, added = context.provisioning.add_imported_profile(
                    wanted.to_dict(), [BootFile(c.path, c.size, c.sha256, source.description) for c in copied])
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ImportFailed(f"no space left in {images} while importing {name}: nothing was "
                                   "published") from None
            raise ImportFailed(f"cannot write under {images}: {exc.strerror or exc}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    progress.step(f"profile {name} {'added' if added else 'already there, unchanged'} "
                  f"(autoinstall {profile.autoinstall}, {profile.append})")
    return ImportResult(profile, added, files_copied, layout, copied)


def _check_no_other_profile(context: Context, wanted: Profile) -> None:
    """Refuse before copying anything when a different profile already has the name."""
    try:
        existing = context.store.get_profile(wanted.name)
    except NotFound:
        return
    if existing != wanted:
        raise Conflict(f"profile {wanted.name!r} already exists with other settings; "
                       "choose another NAME or remove it first")


def _sizes(source: Source, layout: Layout, limit: int) -> dict[str, int]:
    sizes = {}
    for role, path in layout.files.items():
        size = source.size(path)
        if size is None:
            raise SourceError(f"{path} in {source.description} has no known size")
        if size > limit:
            raise ImportFailed(f"{path} is {size} bytes, more than [imports] max_file_mb allows")
        sizes[role] = size
    return sizes


def _copy(source: Source, layout: Layout, role: str, size: int, target: Path, published_as: str,
          progress: Progress) -> Copied:
    """Copy and hash one file; SourceError if it is short or long, ChecksumMismatch if a list
    the source offers disagrees."""
    path = layout.files[role]
    algorithms = {"sha256"} | {e.algorithm for e in layout.checksums.of(path)}
    digests = {a: hashlib.new(a) for a in algorithms if a in ALGORITHMS}
    done = 0
    progress.begin(target.name, size)
    try:
        created = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with source.open(path) as stream, open(created, "wb") as out:
            while chunk := read_chunk(stream, min(CHUNK, size + 1 - done), path, source):
                done += len(chunk)
                if done > size:
                    raise SourceError(f"{path} in {source.description} is longer than its {size} bytes")
                out.write(chunk)
                for digest in digests.values():
                    digest.update(chunk)
                progress.advance(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    finally:
        progress.end()
    if done != size:
        raise SourceError(f"{path} in {source.description} is truncated: {done} of {size} bytes")
    hexes = {a: d.hexdigest() for a, d in digests.items()}
    verified_by = tuple(layout.checksums.check(path, hexes))
    os.chmod(target, 0o644)
    progress.step(f"{target.name}: {size} bytes, sha256 {hexes['sha256']}, "
                  + (f"matches {', '.join(verified_by)}" if verified_by else "no checksum offered by the source"))
    return Copied(role, published_as, size, hexes["sha256"], verified_by)


def _same_files(staging: Path, target: Path) -> bool:
    """Whether ``target`` holds exactly the staged files, byte for byte (by SHA-256)."""
    try:
        if sorted(p.name for p in target.iterdir()) != sorted(p.name for p in staging.iterdir()):
            return False
        for staged in staging.iterdir():
            with open(staged, "rb") as a, open(target / staged.name, "rb") as b:
                if hash_stream(a) != hash_stream(b):
                    return False
    except OSError:
        return False
    return True


def _publish(staging: Path, target: Path) -> bool:
    """Rename the staging directory to ``target``; False if ``target`` already held the same
    files. ImportFailed if it holds others."""
    os.chmod(staging, 0o755)
    try:
        os.rename(staging, target)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
            raise
        if _same_files(staging, target):
            return False
        raise ImportFailed(f"{target} already holds other files; remove it or choose another NAME") from None
    _fsync(target.parent)
    return True


def _fsync(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_abandoned(images: Path, name: str) -> None:
    """Staging directories of ``name`` whose importing process is gone (killed with SIGKILL,
    a power cut): never published, so removing them loses nothing."""
    for leftover in images.glob(f"{STAGING_PREFIX}{name}-*"):
        owner, pid_text, _random = (leftover.name.rsplit("-", 2) + ["", ""])[:3]
        if owner == f"{STAGING_PREFIX}{name}" and (not pid_text.isdigit() or not _alive(int(pid_text))):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _interrupts_deferred(progress: Progress) -> Iterator[None]:
    """Ctrl-C during the rename and the registry write is held back: by then everything is
    copied and checked, so the import finishes rather than leave files without a profile."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, _frame: received.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        progress.step("interrupted while publishing: the import was finished first")

