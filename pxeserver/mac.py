"""The one canonical MAC address type.

A MAC is parsed once, where it enters (API path, JSON body, CLI argument, a DHCP chaddr, a
pxelinux file name), into :class:`MacAddress`; everything after that compares and stores the
canonical form, so ``00:16:3E:AA:BB:CC`` and ``00-16-3e-aa-bb-cc`` can never become two hosts.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Container
from dataclasses import dataclass

XEN_OUI = bytes((0x00, 0x16, 0x3E))

_SEPARATED = re.compile(r"^[0-9a-fA-F]{2}([:-])[0-9a-fA-F]{2}(?:\1[0-9a-fA-F]{2}){4}$")
_BARE = re.compile(r"^[0-9a-fA-F]{12}$")


class InvalidMac(ValueError):
    """Raised for text that is not a MAC address; the message says what was wrong."""


@dataclass(frozen=True, slots=True, order=True)
class MacAddress:
    packed: bytes

    def __post_init__(self) -> None:
        if len(self.packed) != 6:
            raise InvalidMac(f"a MAC address has 6 bytes, not {len(self.packed)}")

    @classmethod
    def parse(cls, text: object) -> MacAddress:
        """Accept ``aa:bb:cc:dd:ee:ff`` in any case, with ``:`` or ``-``, or 12 bare hex digits."""
        if isinstance(text, MacAddress):
            return text
        if not isinstance(text, str):
            raise InvalidMac(f"a MAC address must be a string, not {type(text).__name__}")
        candidate = text.strip()
        if _SEPARATED.match(candidate):
            return cls(bytes.fromhex(candidate.replace(":", "").replace("-", "")))
        if _BARE.match(candidate):
            return cls(bytes.fromhex(candidate))
        shown = candidate if len(candidate) <= 40 else candidate[:40] + "..."
        raise InvalidMac(
            f"invalid MAC address {shown!r}: expected six two-digit hex groups separated by "
            "':' or '-' (00:16:3e:12:34:56) or 12 hex digits"
        )

    @classmethod
    def random_xen(cls, taken: Container[MacAddress] = ()) -> MacAddress:
        """A random MAC in Xen's 00:16:3e range that is not in ``taken``.

        The fourth byte's top bit stays clear, as xl's own generator does, which leaves
        2**23 addresses; a collision merely draws again.
        """
        for _ in range(10_000):
            tail = bytearray(secrets.token_bytes(3))
            tail[0] &= 0x7F
            mac = cls(XEN_OUI + bytes(tail))
            if mac not in taken:
                return mac
        raise RuntimeError("no free MAC address found in the Xen range")

    def __str__(self) -> str:
        return ":".join(f"{b:02x}" for b in self.packed)

    @property
    def dashed(self) -> str:
        """``aa-bb-cc-dd-ee-ff``: the form pxelinux uses in file names."""
        return "-".join(f"{b:02x}" for b in self.packed)

    @property
    def pxelinux_name(self) -> str:
        """The file name pxelinux asks first: ARP hardware type 1 (Ethernet), then the MAC."""
        return f"01-{self.dashed}"

    @property
    def is_xen(self) -> bool:
        return self.packed[:3] == XEN_OUI
