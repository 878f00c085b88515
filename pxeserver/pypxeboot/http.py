"""HTTP downloads for pypxeboot: ``http://`` kernel and initrd paths, as lpxelinux reads them,
fetched only from the boot server, within the same bounds as TFTP.

The standard library's ``http.client`` rather than requests or urllib3: pypxeboot runs as root
in dom0 from a zipapp on the dom0's bare ``python3`` (``pxeserver build-pypxeboot``), so every
dependency is one more thing to vendor and to trust; and what is needed here is exactly one GET
with no redirects, no proxies, no cookies and no TLS, which ``http.client`` does and the
others would have to be told not to do (urllib follows redirects and reads proxy variables
from the environment by default).

Trust, as for TFTP: a URL counts only if its host is the boot server's address (the DHCP
next-server, or ``server=``) written as an IPv4 address, since a name would be resolved by
whoever answers DNS; a redirect is never followed; a Content-Length over the cap stops the
transfer before any body is read, and a body that passes the cap (chunked, or longer than it
said) stops there. Silence, a drip under the speed floor and the boot's deadline end it too:
each read waits at most until the end of the current rate window, and the headers must come
within one window.

For the dom0 cache (cache.py) a HEAD first asks the file's announced SHA-256 (``Repr-Digest``
or ``X-Checksum-SHA256``, under the same checks); a GET then made to fill the cache must
announce the same digest, and its body must hash to it, or nothing is kept and the boot fails.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from pxeserver.pypxeboot.tftp import BoundExceeded, Bounds, NoAnswer, ServerRefused, TransferFailed

if TYPE_CHECKING:
    from hashlib import _Hash as Hash

CHUNK = 256 * 1024  # bytes per read: at most one socket read each (read1)
_DIGITS = re.compile(r"[0-9]{1,30}")  # ASCII only: str.isdigit() takes "²", which int() refuses
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_URL = re.compile(r"http://([0-9.]{7,15})(?::([0-9]{1,5}))?(/[!-~]*)")


def is_url(path: str) -> bool:
    return path[:7].lower() == "http://"


def split_url(url: str, server: str) -> tuple[int, str]:
    """The port and path of ``url`` if it names the boot server ``server``; else TransferFailed."""
    found = _URL.fullmatch(url)
    if found is None or "#" in url:
        raise TransferFailed(f"{url}: not a plain http://<IPv4 address>[:port]/path URL: refused")
    host, port, path = found.group(1), int(found.group(2) or 80), found.group(3)
    if host != server:
        raise TransferFailed(f"{url}: names {host}, not the boot server {server}: refused")
    if not 1 <= port <= 65535:
        raise TransferFailed(f"{url}: port {port} is out of range: refused")
    return port, path


@dataclass(frozen=True)
class Announced:
    """What a HEAD said about a file: its SHA-256 (hex) and size, each None when not said."""

    sha256: str | None
    length: int | None


def head(url: str, server: str, bounds: Bounds) -> Announced:
    """HEAD ``url`` on ``server``: the digest and length the server announces for it."""
    connection, response, _ = _request("HEAD", url, server, bounds)
    try:
        announced = response.getheader("Content-Length", "").strip()
        return Announced(announced_sha256(response), int(announced) if _DIGITS.fullmatch(announced) else None)
    finally:
        response.close()
        connection.close()


def download(url: str, server: str, output: BinaryIO, limit: int, too_big: str, bounds: Bounds,
             expect_sha256: str | None = None) -> int:
    """Fetch ``url`` from ``server`` into ``output``; returns its size. Raises TransferFailed
    (a subclass) with a one-line message; past ``limit`` bytes, the message is ``too_big``.
    With ``expect_sha256``, the response must announce that digest and the body must have it."""
    connection, response, sock = _request("GET", url, server, bounds)
    try:
        announced = response.getheader("Content-Length", "").strip()
        if _DIGITS.fullmatch(announced) and int(announced) > limit:
            raise BoundExceeded(too_big)
        digest = None
        if expect_sha256 is not None:
            said = announced_sha256(response)
            if said != expect_sha256:
                raise TransferFailed(f"{url}: the GET announced sha-256 {said}, not the {expect_sha256} "
                                     "its HEAD announced: not kept; boot again")
            digest = hashlib.sha256()
        size = _body(sock, response, url, output, limit, too_big, bounds, digest)
        if digest is not None and digest.hexdigest() != expect_sha256:
            raise TransferFailed(f"{url}: the body's SHA-256 is {digest.hexdigest()}, not the {expect_sha256} "
                                 "the server announced: not kept, refused")
        return size
    finally:
        response.close()
        connection.close()


def announced_sha256(response: http.client.HTTPResponse) -> str | None:
    """The SHA-256 (hex) a response announces in Repr-Digest (RFC 9530) or X-Checksum-SHA256;
    None when it announces none, a malformed one, or two that disagree."""
    found = set()
    for field in response.getheader("Repr-Digest", "").split(","):
        key, _, value = field.strip().partition("=")
        if key.strip().lower() == "sha-256":
            try:
                raw = base64.b64decode(value.strip().strip(":"), validate=True)
            except ValueError:
                return None
            if len(raw) != 32:
                return None
            found.add(raw.hex())
    checksum = response.getheader("X-Checksum-SHA256", "").strip().lower()
    if checksum:
        if not _SHA256_HEX.fullmatch(checksum):
            return None
        found.add(checksum)
    return found.pop() if len(found) == 1 else None


Exchange = tuple[http.client.HTTPConnection, http.client.HTTPResponse, socket.socket]


def _request(method: str, url: str, server: str, bounds: Bounds) -> Exchange:
    """Send ``method`` for ``url`` and read the answer's headers (within one window); a
    response that is not 200 is refused (redirects are not followed)."""
    port, path = split_url(url, server)
    now = time.monotonic()
    if now >= bounds.deadline:
        raise BoundExceeded(f"{url}: the boot's deadline passed (deadline=)")
    connection = http.client.HTTPConnection(server, port, timeout=_wait(bounds, now + bounds.rate_window))
    response = None
    try:
        try:
            connection.request(method, path, headers={"User-Agent": "pypxeboot", "Accept-Encoding": "identity"})
            sock = connection.sock  # kept: http.client hands it to the response and forgets it
            assert sock is not None
            response = _headers(connection, sock, bounds)
        except TimeoutError:
            raise _late(url, bounds, "sent no answer within") from None
        except (OSError, http.client.HTTPException) as exc:
            raise NoAnswer(f"{url}: {type(exc).__name__}: {exc}") from None
        if response.status != 200:
            where = response.getheader("Location", "")
            redirect = f" (to {where[:100]}: redirects are not followed)" if 300 <= response.status < 400 else ""
            raise ServerRefused(f"{url}: the server answered {response.status} {response.reason}"[:200] + redirect)
        return connection, response, sock
    except BaseException:
        if response is not None:
            response.close()
        connection.close()
        raise


def _headers(connection: http.client.HTTPConnection, sock: socket.socket, bounds: Bounds) -> http.client.HTTPResponse:
    """The response's status and headers, all within one rate window: http.client reads
    header lines with a per-read timeout only, so a server dripping header bytes is cut off by
    shutting the socket when the window ends."""
    ends = min(time.monotonic() + bounds.rate_window, bounds.deadline)
    sock.settimeout(_wait(bounds, ends))
    fired = threading.Event()
    watchdog = threading.Timer(max(ends - time.monotonic(), 0.0), _shut, (sock, fired))
    watchdog.daemon = True
    watchdog.start()
    try:
        response = connection.getresponse()
    except (OSError, http.client.HTTPException):
        if fired.is_set():
            raise TimeoutError() from None
        raise
    finally:
        watchdog.cancel()
    if fired.is_set():  # cut off mid-headers: what http.client parsed is not the answer
        response.close()
        raise TimeoutError()
    return response


def _shut(sock: socket.socket, fired: threading.Event) -> None:
    fired.set()
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _body(sock: socket.socket, response: http.client.HTTPResponse, url: str,
          output: BinaryIO, limit: int, too_big: str, bounds: Bounds, digest: Hash | None) -> int:
    received, window_start, window_bytes = 0, time.monotonic(), 0
    while True:
        now = time.monotonic()
        if now >= bounds.deadline:
            raise BoundExceeded(f"{url}: the boot's deadline passed (deadline=)")
        if now - window_start >= bounds.rate_window:
            if received - window_bytes < bounds.min_rate * (now - window_start):
                raise _slow(url, bounds)
            window_start, window_bytes = now, received
        sock.settimeout(_wait(bounds, window_start + bounds.rate_window))
        try:
            data = response.read1(CHUNK)
        except TimeoutError:
            if time.monotonic() >= bounds.deadline:
                raise BoundExceeded(f"{url}: the boot's deadline passed (deadline=)") from None
            raise _slow(url, bounds) from None
        except http.client.IncompleteRead:
            raise _cut_short(url, received) from None
        except (OSError, http.client.HTTPException) as exc:
            raise TransferFailed(f"{url}: {type(exc).__name__}: {exc}"[:300]) from None
        if not data:
            if response.length:  # Content-Length said more than came before the close
                raise _cut_short(url, received)
            return received
        received += len(data)
        if received > limit:
            raise BoundExceeded(too_big)
        output.write(data)
        if digest is not None:
            digest.update(data)


def _cut_short(url: str, received: int) -> TransferFailed:
    return TransferFailed(f"{url}: the server closed the connection after {received} bytes, "
                          "before the end of the body it announced")


def _wait(bounds: Bounds, until: float) -> float:
    """Seconds one read may wait: to ``until`` or the deadline, whichever is first."""
    return max(min(until, bounds.deadline) - time.monotonic(), 0.001)


def _slow(url: str, bounds: Bounds) -> BoundExceeded:
    return BoundExceeded(f"{url}: slower than {bounds.min_rate // 1024} KiB/s over "
                         f"{bounds.rate_window:g} s (min_rate_kbs=, rate_window=)")


def _late(url: str, bounds: Bounds, what: str) -> BoundExceeded:
    if time.monotonic() >= bounds.deadline - 0.05:
        return BoundExceeded(f"{url}: the boot's deadline passed (deadline=)")
    return BoundExceeded(f"{url}: {what} {bounds.rate_window:g} s (rate_window=)")
