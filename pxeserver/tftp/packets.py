"""TFTP wire format (RFC 1350) and option negotiation (RFC 2347, 2348, 2349, 7440).

Built on tftpy 0.8.7's packet layer where it serves: OACK packets are encoded by
``tftpy.TftpPacketTypes.TftpPacketOACK`` and error packets carry tftpy's standard texts
(``TftpPacketERR.errmsgs``). Requests, DATA and ACK are hand-written here because tftpy's
versions do not serve a server that must survive any packet: its request decoder raises
``UnicodeDecodeError`` (not its own ``TftpException``) on one non-ASCII byte and keeps option
names case-sensitive; its ``TftpPacketERR`` can only send the fixed text of codes 1-8; and
``TftpPacketFactory.parse`` formats debug strings eagerly for every packet, which costs more
than the ``sendto`` on the DATA/ACK hot path.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

from tftpy.TftpPacketTypes import TftpPacketERR, TftpPacketOACK

RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6

MIN_BLKSIZE, MAX_BLKSIZE = 8, 65464  # RFC 2348
DEFAULT_BLKSIZE = 512
MAX_WINDOWSIZE = 65535  # RFC 7440
MAX_TIMEOUT = 255  # RFC 2349

HEADER = struct.Struct("!HH")  # opcode and block number (DATA, ACK) or error code (ERROR)
_STANDARD_TEXT: dict[int, bytes] = TftpPacketERR().errmsgs


class ErrorCode(IntEnum):
    NOT_DEFINED = 0
    FILE_NOT_FOUND = 1
    ACCESS_VIOLATION = 2
    DISK_FULL = 3
    ILLEGAL_OPERATION = 4
    UNKNOWN_TID = 5
    FILE_EXISTS = 6
    NO_SUCH_USER = 7
    BAD_OPTIONS = 8


class TftpError(Exception):
    """A request the server refuses; it becomes one ERROR packet to the client."""

    def __init__(self, code: ErrorCode, message: str = "") -> None:
        super().__init__(message or _STANDARD_TEXT.get(code, b"").decode())
        self.code = code

    @property
    def packet(self) -> bytes:
        return encode_error(self.code, str(self))


@dataclass(frozen=True)
class Request:
    """A decoded RRQ or WRQ; option names lower-cased (RFC 2347 says case-insensitive)."""

    opcode: int
    filename: str
    mode: str  # "octet" or "netascii"
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Negotiated:
    """The transfer parameters both sides agreed on, and the OACK that says so (if any)."""

    blksize: int = DEFAULT_BLKSIZE
    windowsize: int = 1
    timeout: int | None = None  # seconds the client asked for and got; None: the server's default
    oack: dict[str, str] = field(default_factory=dict)


def opcode_of(packet: bytes) -> int | None:
    return None if len(packet) < 2 else (packet[0] << 8) | packet[1]


def parse_request(packet: bytes) -> Request:
    """Decode an RRQ/WRQ, or raise TftpError(ILLEGAL_OPERATION) saying what is wrong."""
    opcode = opcode_of(packet)
    if opcode not in (RRQ, WRQ):
        raise TftpError(ErrorCode.ILLEGAL_OPERATION, "not a read or write request")
    if not packet.endswith(b"\0"):
        raise TftpError(ErrorCode.ILLEGAL_OPERATION, "truncated request: no NUL after the last field")
    fields = packet[2:-1].split(b"\0")
    # Quirk: some PXE ROMs pad the request with extra NULs; empty trailing fields are ignored.
    while len(fields) > 2 and not fields[-1]:
        fields.pop()
    if len(fields) < 2 or not fields[0]:
        raise TftpError(ErrorCode.ILLEGAL_OPERATION, "malformed request: needs a file name and a mode")
    mode = fields[1].decode("ascii", "replace").lower()
    if mode not in ("octet", "netascii"):
        raise TftpError(ErrorCode.ILLEGAL_OPERATION, f"unsupported transfer mode {mode[:16]!r}")
    try:
        filename = fields[0].decode("utf-8")
    except UnicodeDecodeError:
        raise TftpError(ErrorCode.FILE_NOT_FOUND, "file name is not valid UTF-8") from None
    options: dict[str, str] = {}
    pairs = fields[2:]
    for index in range(0, len(pairs) - 1, 2):  # a dangling option name without value is ignored
        name = pairs[index].decode("ascii", "replace").lower()
        options[name] = pairs[index + 1].decode("ascii", "replace")
    return Request(opcode, filename, mode, options)


def _number(options: dict[str, str], name: str, low: int, high: int | None) -> int | None:
    """An option's integer value, None when absent; ERROR 8 when it is not a number >= low."""
    if name not in options:
        return None
    text = options[name].strip()
    if not text.isascii() or not text.isdigit() or int(text) < low or (high and int(text) > high):
        bound = f"{low}..{high}" if high else f">= {low}"
        raise TftpError(ErrorCode.BAD_OPTIONS, f"{name} must be a number {bound}, not {text[:16]!r}")
    return int(text)


def negotiate(options: dict[str, str], size: int, max_blksize: int, max_windowsize: int,
              max_timeout: int) -> Negotiated:
    """Accept what we support, clamp to our limits, and answer only what the client asked.

    An OACK naming an option the client did not send makes pxelinux fail the transfer, so
    the OACK is built from the request's own names, never from a template. A timeout above
    ``max_timeout`` is not acknowledged (the server keeps its own): RFC 2349 lets a server
    answer a smaller blksize, but an acknowledged timeout "must match the value specified by
    the client", and a client asking 255 s would hold the session for minutes per resend.
    """
    oack: dict[str, str] = {}
    blksize = _number(options, "blksize", MIN_BLKSIZE, None)
    if blksize is not None:
        # RFC 2348: a server may answer a smaller block size than requested.
        blksize = min(blksize, max_blksize, MAX_BLKSIZE)
        oack["blksize"] = str(blksize)
    if _number(options, "tsize", 0, None) is not None:
        oack["tsize"] = str(size)  # RFC 2349: the client sends 0 on a read; we answer the size
    timeout = _number(options, "timeout", 1, MAX_TIMEOUT)
    if timeout is not None and timeout > max_timeout:
        timeout = None
    if timeout is not None:
        oack["timeout"] = str(timeout)
    windowsize = _number(options, "windowsize", 1, None)
    if windowsize is not None:
        windowsize = min(windowsize, max_windowsize, MAX_WINDOWSIZE)
        oack["windowsize"] = str(windowsize)
    return Negotiated(blksize or DEFAULT_BLKSIZE, windowsize or 1, timeout, oack)


def encode_oack(options: dict[str, str]) -> bytes:
    packet = TftpPacketOACK()
    packet.options = options
    encoded: bytes = packet.encode().buffer
    return encoded


def encode_error(code: ErrorCode, message: str = "") -> bytes:
    text = message.encode("utf-8", "replace")[:200] if message else _STANDARD_TEXT.get(code, b"")
    return HEADER.pack(ERROR, code) + text + b"\0"


def netascii(data: bytes) -> bytes:
    """RFC 764 netascii: CR becomes CR NUL, LF becomes CR LF (in that order)."""
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")
