"""pypxeboot for a dom0 as one file: a zipapp of its own modules and tftpy, for a bare Python.

A dom0 should need nothing of pxeserver's stack (Flask, the registry, ...), only what
pypxeboot imports. That list is read from a fresh interpreter that imports pypxeboot, so it
follows the code instead of being kept by hand; tftpy (pure Python) is vendored from the
installed package, so the file runs on the dom0's own ``python3`` with nothing installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipapp
from pathlib import Path

INTERPRETER = "/usr/bin/python3"  # xl runs the bootloader directly: no PATH lookup to trust
_PACKAGES = ("pxeserver", "tftpy")
_PROBE = ("import json, sys, pxeserver.pypxeboot; print(json.dumps({name: module.__file__ for name, module "
          f"in list(sys.modules.items()) if name.split('.')[0] in {_PACKAGES!r}}}))")


def modules() -> dict[Path, str]:
    """Each source file pypxeboot loads, and its path inside the archive."""
    probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, timeout=60)
    files = {}
    for name, file in json.loads(probe.stdout).items():
        path = Path(file)
        depth = name.count(".") + (path.name == "__init__.py")  # how far up the import root is
        files[path] = path.relative_to(path.parents[depth]).as_posix()
    return files


def build_pypxeboot(target: Path) -> int:
    """Write the zipapp to ``target`` (executable, ``#!/usr/bin/python3``); returns its size."""
    with tempfile.TemporaryDirectory() as staging:
        for source, name in modules().items():
            (Path(staging) / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, Path(staging) / name)
        zipapp.create_archive(staging, target, interpreter=INTERPRETER, main="pxeserver.pypxeboot:main",
                              compressed=True)
    return target.stat().st_size
