"""pypxeboot for a dom0 as one file: a zipapp of its own modules and tftpy, for a bare Python.

A dom0 should need nothing of pxeserver's stack (Flask, the registry, ...), only what
pypxeboot imports. That list is read from a fresh interpreter that imports pypxeboot, so it
follows the code instead of being kept by hand; tftpy (pure Python) is vendored from the
installed package, so the file runs on the dom0's own ``python3`` with nothing installed.

xl starts one pypxeboot per domU boot, so its start-up is paid by every guest of a storm, and
in a dom0 it is most of pypxeboot's CPU (0.13 s of a boot that downloads 48 MB, Python 3.11).
Two things cut it: only tftpy's packet layer is vendored, under a package ``__init__`` of its
own (tftpy's imports its client, server and state machine and asks importlib.metadata for its
version, a third of the start-up), and the interpreter runs with ``-IS``: isolated (no
PYTHON* variables, no user site: root's bootloader takes no code from the environment) and
without ``site`` (nothing outside the archive and the standard library is needed).
"""

from __future__ import annotations

import hashlib
import io
import json
import stat
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

INTERPRETER = "/usr/bin/python3"  # xl runs the bootloader directly: no PATH lookup to trust
INTERPRETER_FLAGS = "-IS"  # one word: the kernel passes a #! line's rest as a single argument
_PACKAGES = ("pxeserver", "tftpy")
_TFTPY_INIT = b'"""The packet layer of tftpy, vendored for pypxeboot (see pxeserver/dom0.py)."""\n'
_MAIN = "# -*- coding: utf-8 -*-\nimport pxeserver.pypxeboot\npxeserver.pypxeboot.main()\n"  # as zipapp writes it
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can carry
# Imports pypxeboot under an empty tftpy package (as the archive's), so tftpy's own __init__
# and what only it imports are not recorded.
_PROBE = ("import importlib.util, json, sys, types; spec = importlib.util.find_spec('tftpy'); "
          "tftpy = sys.modules['tftpy'] = types.ModuleType('tftpy'); tftpy.__file__ = spec.origin; "
          "tftpy.__path__ = list(spec.submodule_search_locations); import pxeserver.pypxeboot; "
          "print(json.dumps({name: module.__file__ for name, module "
          f"in list(sys.modules.items()) if name.split('.')[0] in {_PACKAGES!r}}}))")


@dataclass(frozen=True)
class Archive:
    """The built file and its SHA-256 (hex), which the admin compares after a download."""

    data: bytes
    sha256: str


def modules() -> dict[Path, str]:
    """Each source file pypxeboot loads, and its path inside the archive."""
    probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, timeout=60)
    files = {}
    for name, file in json.loads(probe.stdout).items():
        path = Path(file)
        depth = name.count(".") + (path.name == "__init__.py")  # how far up the import root is
        files[path] = path.relative_to(path.parents[depth]).as_posix()
    return files


def pypxeboot_archive() -> Archive:
    """The zipapp in memory: a ``#!/usr/bin/python3 -IS`` line, then a zip of :func:`modules`.

    zipapp would record each staged file's mtime, mode and directory order, so every build
    would differ; entries here are sorted, dated 1980-01-01 and mode 0644, so the same sources
    give the same bytes and an admin can check a download against a checksum computed here.
    """
    buffer = io.BytesIO()
    buffer.write(f"#!{INTERPRETER} {INTERPRETER_FLAGS}\n".encode())
    entries = sorted((name, _TFTPY_INIT if name == "tftpy/__init__.py" else source.read_bytes())
                     for source, name in modules().items())
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in [*entries, ("__main__.py", _MAIN.encode())]:
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    data = buffer.getvalue()
    return Archive(data, hashlib.sha256(data).hexdigest())


def build_pypxeboot(target: Path) -> Archive:
    """Write the zipapp to ``target``, executable (by its owner, as zipapp makes it)."""
    archive = pypxeboot_archive()
    target.write_bytes(archive.data)
    target.chmod(target.stat().st_mode | stat.S_IEXEC)
    return archive
