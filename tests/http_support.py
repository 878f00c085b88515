"""The HTTP service on loopback, and curl (the real client) to talk to it."""

from __future__ import annotations

import subprocess
import tempfile
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from conftest import started

from pxeserver.app import Context
from pxeserver.web.server import HttpService

PROFILE = {
    "name": "centos5",
    "kernel": "images/centos5/vmlinuz",
    "initrd": "images/centos5/initrd.img",
    "append": "console=xvc0",
    "autoinstall": "centos5-xen-pv.ks",
}
MAC = "00:16:3e:12:34:56"


def running(context: Context) -> AbstractContextManager[HttpService]:
    return started(HttpService(context))


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


def curl(url: str, *args: str) -> Reply:
    """One request with curl; ``--path-as-is`` so ``..`` reaches the server as typed."""
    with tempfile.TemporaryDirectory() as scratch:
        headers, body = Path(scratch, "headers"), Path(scratch, "body")
        done = subprocess.run(
            ["curl", "-sS", "--path-as-is", "--max-time", "30", "-D", str(headers),
             "-o", str(body), "-w", "%{http_code}", *args, url],
            capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 0, done.stderr
        fields: dict[str, str] = {}
        for line in headers.read_text(errors="replace").splitlines()[1:]:
            name, sep, value = line.partition(":")
            if sep:
                fields[name.strip().lower()] = value.strip()
        return Reply(int(done.stdout), fields, body.read_bytes() if body.exists() else b"")


def post_json(url: str, data: str, method: str = "POST") -> Reply:
    return curl(url, "-X", method, "-H", "Content-Type: application/json", "--data-binary", data)
