"""Where an import reads from: a directory, an ISO image, a tar archive or an http:// tree.

Every source answers the same few questions about a path relative to its root (is it a
file, how large, its bytes), so layout detection and verification never care which kind it
is. No source lets a path lead outside its root: a directory's symlinks must resolve inside
it, a tarball with a member or link leading out is refused whole (the standard library's
``tarfile.data_filter``), an ISO is read with pycdlib without mounting, and an HTTP path is
always joined below the tree's URL.
"""

from __future__ import annotations

import http.client
import os
import posixpath
import stat
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO, cast

import pycdlib
from pycdlib.pycdlibexception import PyCdlibException

TEXT_LIMIT = 16 << 20  # .treeinfo, SHA256SUMS and Release files are far smaller
HTTP_TIMEOUT = 30  # seconds without a byte before an http:// source is given up


class SourceError(Exception):
    """A source that cannot be read as asked; the message is one line for the user."""


def _normal(path: str) -> str:
    """``path`` as a relative POSIX path without '.' parts; SourceError if it leads out."""
    normal = posixpath.normpath(path.lstrip("/")) if path.strip("/") else "."
    if normal == ".." or normal.startswith("../"):
        raise SourceError(f"{path!r} leads outside the source")
    return normal


class Source(ABC):
    """A tree of files, read by relative POSIX path."""

    description: str  # what the user gave, for messages and the registry's record

    @abstractmethod
    def size(self, path: str) -> int | None:
        """The size of the regular file at ``path``, None if there is none."""

    @abstractmethod
    def open(self, path: str) -> BinaryIO:
        """The file's bytes; SourceError if it cannot be read."""

    def close(self) -> None:  # noqa: B027 - most sources hold nothing open
        """Release what the source holds open."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def read_small(self, path: str) -> bytes | None:
        """A small file (a checksum list, .treeinfo, a signature), None if there is none."""
        size = self.size(path)
        if size is None:
            return None
        if size > TEXT_LIMIT:
            raise SourceError(f"{path} in {self.description} is larger than {TEXT_LIMIT} bytes")
        with self.open(path) as stream:
            return read_chunk(stream, TEXT_LIMIT + 1, path, self)

    def read_text(self, path: str) -> str | None:
        data = self.read_small(path)
        return None if data is None else data.decode("utf-8", errors="replace")


class DirectorySource(Source):
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.description = str(root)

    def _path(self, path: str) -> Path:
        real = Path(os.path.realpath(self.root / _normal(path)))
        if real != self.root and self.root not in real.parents:
            raise SourceError(f"{path} in {self.description} is a symlink leading outside it")
        return real

    def size(self, path: str) -> int | None:
        try:
            info = self._path(path).stat()
        except OSError:
            return None
        return info.st_size if stat.S_ISREG(info.st_mode) else None

    def open(self, path: str) -> BinaryIO:
        real = self._path(path)
        try:
            return open(real, "rb")  # noqa: SIM115 - the caller closes it
        except OSError as exc:
            raise SourceError(f"cannot read {path} in {self.description}: {exc.strerror}") from None


class IsoSource(Source):
    """An ISO 9660 image read by pycdlib: Rock Ridge names if it has them, else Joliet, else
    plain ISO 9660 (upper case, ``;1`` versions)."""

    def __init__(self, image: Path) -> None:
        self.description = str(image)
        self._iso = pycdlib.PyCdlib()
        try:
            self._iso.open(str(image))
        except (PyCdlibException, OSError, ValueError) as exc:
            raise SourceError(f"{image} is not a readable ISO 9660 image: {exc}") from None
        if self._iso.has_rock_ridge():
            self._kind = "rr_path"
        elif self._iso.has_joliet():
            self._kind = "joliet_path"
        else:
            self._kind = "iso_path"

    def _key(self, path: str) -> dict[str, str]:
        name = "/" + _normal(path)
        if self._kind == "iso_path":
            name = name.upper() + ";1"
        return {self._kind: name}

    def size(self, path: str) -> int | None:
        try:
            record = self._iso.get_record(**self._key(path))
        except PyCdlibException:
            return None
        rock_ridge = getattr(record, "rock_ridge", None)  # UDF records have none
        if record.is_dir() or (rock_ridge is not None and rock_ridge.is_symlink()):
            return None
        return record.get_data_length()

    def open(self, path: str) -> BinaryIO:
        try:
            return self._iso.open_file_from_iso(**self._key(path))  # type: ignore[return-value]
        except PyCdlibException as exc:
            raise SourceError(f"cannot read {path} in {self.description}: {exc}") from None

    def close(self) -> None:
        self._iso.close()


class TarSource(Source):
    def __init__(self, archive: Path) -> None:
        self.description = str(archive)
        try:
            self._tar = tarfile.open(archive, "r:*")
            members = self._tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise SourceError(f"{archive} is not a readable tar archive: {exc}") from None
        self._members: dict[str, tarfile.TarInfo] = {}
        for member in members:
            try:
                tarfile.data_filter(member, "/nonexistent-import-root")
            except tarfile.FilterError as exc:
                self._tar.close()
                raise SourceError(f"{archive} is refused: member {member.name!r}: {exc}") from None
            self._members[_normal(member.name)] = member

    def _member(self, path: str) -> tarfile.TarInfo | None:
        member = self._members.get(_normal(path))
        seen = 0
        while member is not None and member.issym() and seen < 40:
            target = posixpath.join(posixpath.dirname(member.name), member.linkname)
            member, seen = self._members.get(_normal(target)), seen + 1
        if member is not None and member.islnk():
            member = self._members.get(_normal(member.linkname))
        return member if member is not None and member.isreg() else None

    def size(self, path: str) -> int | None:
        member = self._member(path)
        return member.size if member is not None else None

    def open(self, path: str) -> BinaryIO:
        member = self._member(path)
        stream = self._tar.extractfile(member) if member is not None else None
        if stream is None:
            raise SourceError(f"{path} is not a file in {self.description}")
        return cast(BinaryIO, stream)

    def close(self) -> None:
        self._tar.close()


class HttpSource(Source):
    """A tree published over http:// or https://; files are found by asking for them (HEAD),
    as a web server need not list directories."""

    def __init__(self, url: str) -> None:
        self.description = url
        self.base = url if url.endswith("/") else url + "/"
        self._sizes: dict[str, int | None] = {}

    def _url(self, path: str) -> str:
        return self.base + urllib.parse.quote(_normal(path))

    def _request(self, path: str, method: str) -> http.client.HTTPResponse:
        request = urllib.request.Request(self._url(path), method=method,
                                         headers={"User-Agent": "pxeserver-import"})
        reply: http.client.HTTPResponse = urllib.request.urlopen(request, timeout=HTTP_TIMEOUT)
        return reply

    def size(self, path: str) -> int | None:
        key = _normal(path)
        if key not in self._sizes:
            try:
                with self._request(key, "HEAD") as reply:
                    length = reply.headers.get("Content-Length")
                    self._sizes[key] = int(length) if length and length.isdigit() else None
            except urllib.error.HTTPError as exc:
                if exc.code not in (403, 404, 410):
                    raise SourceError(f"{self._url(key)}: HTTP {exc.code} {exc.reason}") from None
                self._sizes[key] = None
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                raise SourceError(f"cannot reach {self._url(key)}: {reason}") from None
        return self._sizes[key]

    def open(self, path: str) -> BinaryIO:
        try:
            reply = self._request(path, "GET")
        except urllib.error.HTTPError as exc:
            raise SourceError(f"{self._url(path)}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise SourceError(f"cannot reach {self._url(path)}: {getattr(exc, 'reason', exc)}") from None
        return cast(BinaryIO, reply)


def read_chunk(stream: BinaryIO, size: int, path: str, source: Source) -> bytes:
    """Up to ``size`` bytes of ``path``; a broken connection, a corrupt archive or a short
    image is a SourceError, whichever library reads it."""
    try:
        return stream.read(size)
    except (OSError, EOFError, tarfile.TarError, zlib.error, http.client.HTTPException,
            PyCdlibException) as exc:
        raise SourceError(f"cannot read {path} in {source.description}: {exc}") from None


def _is_iso(path: Path) -> bool:
    with open(path, "rb") as file:
        file.seek(16 * 2048 + 1)  # the primary volume descriptor's "CD001"
        return file.read(5) == b"CD001"


def open_source(text: str) -> Source:
    """The source ``text`` names: an http(s):// URL, a directory, an ISO image or a tarball."""
    scheme = urllib.parse.urlsplit(text).scheme.lower()
    if scheme in ("http", "https"):
        return HttpSource(text)
    if scheme and len(scheme) > 1:
        raise SourceError(f"{text}: only http:// and https:// URLs are supported, not {scheme}://")
    path = Path(text)
    if path.is_dir():
        return DirectorySource(path)
    if not path.is_file():
        raise SourceError(f"{text} is neither a directory, a file nor an http:// URL")
    try:
        if _is_iso(path):
            return IsoSource(path)
        if tarfile.is_tarfile(path):
            return TarSource(path)
    except OSError as exc:
        raise SourceError(f"cannot read {text}: {exc.strerror}") from None
    raise SourceError(f"{text} is neither an ISO 9660 image nor a tar archive")

