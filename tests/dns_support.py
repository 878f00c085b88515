"""Shared pieces of the DNS tests: a running DnsService and dig, the real client, to ask it."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from pxeserver import app
from pxeserver.dns import DnsService

DOMAIN = "domu.example"


@dataclass
class Dig:
    """What dig printed, split the way a person reads it."""

    status: str
    flags: set[str]
    answer: list[list[str]]
    authority: list[list[str]]
    additional: list[list[str]]
    output: str

    def values(self) -> list[str]:
        return [fields[-1] for fields in self.answer]


def dig(port: int, *args: str) -> Dig:
    """Run dig against 127.0.0.1:port; +norec because an authoritative server needs no RD."""
    command = ["dig", "@127.0.0.1", "-p", str(port), "+norec", "+time=2", "+tries=1", *args]
    output = subprocess.run(command, capture_output=True, text=True, timeout=20).stdout
    header = re.search(r"status: (\w+)", output)
    flags = re.search(r";; flags: ([a-z ]*);", output)
    assert header and flags, output
    return Dig(header.group(1), set(flags.group(1).split()), _section(output, "ANSWER"),
               _section(output, "AUTHORITY"), _section(output, "ADDITIONAL"), output)


def _section(output: str, name: str) -> list[list[str]]:
    lines = output.split(f";; {name} SECTION:\n", 1)
    if len(lines) == 1:
        return []
    body = lines[1].split("\n\n", 1)[0]
    return [line.split() for line in body.splitlines() if line and not line.startswith(";")]


@pytest.fixture
def dns(ctx: app.Context) -> Iterator[DnsService]:
    """The DNS service on 127.0.0.1 (a free port), with one profile to add hosts to."""
    ctx.config.dns.domain = DOMAIN
    ctx.provisioning.add_profile({"name": "debian", "kernel": "k", "initrd": "i"})
    service = DnsService(ctx)
    service.start()
    yield service
    service.stop()
