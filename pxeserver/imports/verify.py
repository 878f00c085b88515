"""What a source says its files' checksums are, and the check of copied bytes against them.

Three kinds of lists are read: a ``.treeinfo``'s ``[checksums]`` (Fedora, RHEL, CentOS), a
``SHA256SUMS`` file (Debian and Ubuntu installer images), and a Debian ``Release`` file that
lists that ``SHA256SUMS`` (the chain a mirror publishes from the suite down to each file).
A list that the source offers but that does not fit (a SHA256SUMS whose own hash is not the
one Release gives) is refused, not ignored. The Release file itself must be signed
(``InRelease`` or ``Release.gpg``) by a key in ``[imports] debian_keyrings``, checked with
gpgv: only then does the chain hold against a hostile mirror, not just a corrupt one. A
``.treeinfo`` or a lone SHA256SUMS carries no signature; they catch corrupt and truncated
copies only.
"""

from __future__ import annotations

import configparser
import hashlib
import os
import posixpath
import subprocess
import tempfile
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
    """A ``sha256sum`` output file at ``path``; False if the source has no such file."""
    text = source.read_text(path)
    if text is None:
        return False
    _read_sums(text, path, checksums)
    return True


def _read_sums(text: str, path: str, checksums: Checksums) -> None:
    """The entries of the SHA256SUMS at ``path``; they are relative to its directory."""
    base = posixpath.dirname(path)
    for line in text.splitlines():
        digest, _, name = line.strip().partition(" ")
        name = name.strip().lstrip("*")
        if len(digest) == 64 and name:
            checksums.add(posixpath.join(base, name.removeprefix("./")),
                          Expected("sha256", _digest_text(digest), path))


def signed_release(source: Source, keyrings: list[str]) -> tuple[str, str]:
    """The suite's Release text, as signed in ``InRelease`` or ``Release.gpg``, and who
    signed it; ChecksumMismatch if the signature is missing or no keyring key made it."""
    usable = [k for k in keyrings if os.path.isfile(k)]
    inline, detached = source.read_small("InRelease"), source.read_small("Release.gpg")
    release = source.read_small("Release")
    if inline is None and (detached is None or release is None):
        raise ChecksumMismatch("the suite's Release is not signed (no InRelease, no Release.gpg): "
                               "import its installer images/ directory to rely on SHA256SUMS alone")
    if not usable:
        raise ChecksumMismatch("no keyring to check the suite's Release signature: none of "
                               f"[imports] debian_keyrings exists ({', '.join(keyrings) or 'empty'})")
    with tempfile.TemporaryDirectory(prefix="pxeserver-gpgv-") as scratch:
        command = ["gpgv", "--status-fd", "1", *(f"--keyring={k}" for k in usable)]
        if inline is not None:
            signed, output = os.path.join(scratch, "InRelease"), os.path.join(scratch, "Release")
            with open(signed, "wb") as file:
                file.write(inline)
            command += ["--output", output, signed]
        else:
            output, signature = os.path.join(scratch, "Release"), os.path.join(scratch, "Release.gpg")
            for path, data in ((output, release), (signature, detached)):
                with open(path, "wb") as file:
                    file.write(data or b"")
            command += [signature, output]
        try:
            checked = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                     env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                          "GNUPGHOME": scratch})
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ChecksumMismatch(f"cannot run gpgv to check the Release signature: {exc}") from None
        good = [line.split(" ", 3)[-1] for line in checked.stdout.splitlines()
                if line.startswith("[GNUPG:] GOODSIG ")]
        if checked.returncode != 0 or not good or "[GNUPG:] VALIDSIG " not in checked.stdout:
            reason = (checked.stderr.strip().splitlines() or ["no good signature"])[-1]
            raise ChecksumMismatch(f"the suite's {'InRelease' if inline is not None else 'Release.gpg'} "
                                   f"signature does not verify: {reason}")
        with open(output, encoding="utf-8", errors="replace") as file:
            return file.read(), good[0]


def release_chain(source: Source, release: str, listed: str, checksums: Checksums) -> None:
    """Check that the suite's Release text lists ``listed`` (a SHA256SUMS, relative to the
    suite) with its true SHA-256 and size, then read the entries of those very bytes."""
    entries = {entry["name"]: entry for entry in Release(release).get("SHA256", [])}
    entry = entries.get(listed)
    if entry is None:
        raise ChecksumMismatch(f"Release does not list {listed}")
    data = source.read_small(listed)
    if data is None:
        raise SourceError(f"{listed} is missing from {source.description}")
    actual = hashlib.sha256(data).hexdigest()
    if actual != _digest_text(entry["sha256"]) or str(len(data)) != str(entry["size"]).strip():
        raise ChecksumMismatch(
            f"{listed}: sha256 {actual} ({len(data)} bytes), but Release says "
            f"{entry['sha256']} ({entry['size']} bytes)")
    _read_sums(data.decode("utf-8", errors="replace"), listed, checksums)
