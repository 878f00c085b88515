"""What a source says its files' checksums are, and the check of copied bytes against them.

Three kinds of lists are read: a ``.treeinfo``'s ``[checksums]`` (Fedora, RHEL, CentOS), a
``SHA256SUMS`` file (Debian and Ubuntu installer images), and a Debian ``Release`` file that
lists that ``SHA256SUMS`` (the chain a mirror publishes from the suite down to each file).
A list that the source offers but that does not fit (a SHA256SUMS whose own hash is not the
one Release gives) is refused, not ignored. Signatures (Release.gpg, InRelease) are not
checked: the checksums catch a corrupt or truncated copy, not a hostile mirror.
"""

from __future__ import annotations

import configparser
import hashlib
import posixpath
from dataclasses import dataclass, field

from debian.deb822 import Release

from pxeserver.imports.sources import Source, SourceError

ALGORITHMS = ("md5", "sha1", "sha256", "sha512")


class ChecksumMismatch(Exception):
    """A file, or a checksum list, is not what the source says it is."""


@dataclass(frozen=True)
class Expected:
    algorithm: str
    digest: str
    origin: str  # the list that says so, e.g. "SHA256SUMS" or ".treeinfo"


@dataclass
class Checksums:
    """Expected digests by path relative to the source root."""

    by_path: dict[str, list[Expected]] = field(default_factory=dict)

    def add(self, path: str, expected: Expected) -> None:
        self.by_path.setdefault(posixpath.normpath(path.removeprefix("./")), []).append(expected)

    def of(self, path: str) -> list[Expected]:
        return self.by_path.get(posixpath.normpath(path), [])

    def check(self, path: str, digests: dict[str, str]) -> list[str]:
        """The origins that confirm ``path``'s ``digests``; ChecksumMismatch if one does not."""
        confirmed = []
        for expected in self.of(path):
            actual = digests[expected.algorithm]
            if actual != expected.digest:
                raise ChecksumMismatch(
                    f"{path}: {expected.algorithm} is {actual}, but {expected.origin} says "
                    f"{expected.digest}")
            confirmed.append(expected.origin)
        return confirmed


def _digest_text(value: str) -> str:
    return value.strip().lower()


def read_treeinfo(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # paths are case-sensitive
    try:
        parser.read_string(text)
    except configparser.Error as exc:
        raise SourceError(f".treeinfo cannot be read: {str(exc).splitlines()[0]}") from None
    return parser


def treeinfo_checksums(treeinfo: configparser.ConfigParser, checksums: Checksums) -> None:
    """``[checksums]`` entries: ``images/pxeboot/vmlinuz = sha256:<hex>``."""
    if not treeinfo.has_section("checksums"):
        return
    for path, value in treeinfo.items("checksums"):
        algorithm, sep, digest = value.partition(":")
        if sep and algorithm.strip().lower() in ALGORITHMS:
            checksums.add(path, Expected(algorithm.strip().lower(), _digest_text(digest), ".treeinfo"))


def sums_file(source: Source, path: str, checksums: Checksums) -> bool:
    """A ``sha256sum`` output file at ``path``; entries are relative to its directory.
    False if the source has no such file."""
    text = source.read_text(path)
    if text is None:
        return False
    base = posixpath.dirname(path)
    for line in text.splitlines():
        digest, _, name = line.strip().partition(" ")
        name = name.strip().lstrip("*")
        if len(digest) == 64 and name:
            checksums.add(posixpath.join(base, name.removeprefix("./")),
                          Expected("sha256", _digest_text(digest), path))
    return True


def release_chain(source: Source, release_path: str, listed: str, checksums: Checksums) -> None:
    """Check that the Release file at ``release_path`` lists ``listed`` (a SHA256SUMS) with
    its true SHA-256 and size, then read that SHA256SUMS's entries."""
    text = source.read_text(release_path)
    if text is None:
        raise SourceError(f"{release_path} is missing")
    base = posixpath.dirname(release_path)
    name = posixpath.relpath(listed, base or ".")
    entries = {entry["name"]: entry for entry in Release(text).get("SHA256", [])}
    entry = entries.get(name)
    if entry is None:
        raise ChecksumMismatch(f"{release_path} does not list {name}")
    with source.open(listed) as stream:
        data = stream.read()
    actual = hashlib.sha256(data).hexdigest()
    if actual != _digest_text(entry["sha256"]) or str(len(data)) != str(entry["size"]).strip():
        raise ChecksumMismatch(
            f"{listed}: sha256 {actual} ({len(data)} bytes), but {release_path} says "
            f"{entry['sha256']} ({entry['size']} bytes)")
    sums_file(source, listed, checksums)
