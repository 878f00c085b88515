"""What installers and boot loaders fetch over HTTP: autoinstall files, iPXE scripts, boot files.

A Flask blueprint; the answers come from the boot policy (what does this MAC boot, which
profile, which template), never from the registry directly. ``/boot/`` serves the descriptor
that the publishing check opened, with its SHA-256 announced (``Repr-Digest``), through
Flask's ``send_file`` (HEAD, ETag, Last-Modified)
and werkzeug's Range handling, so that the WSGI server's ``wsgi.file_wrapper`` (and with it
``os.sendfile``) carries the body.
"""

from __future__ import annotations

import base64
import logging
import os
import zlib
from pathlib import Path

from flask import Blueprint, Response, abort, current_app, request, send_file
from flask.blueprints import BlueprintSetupState
from jinja2 import TemplateError

from pxeserver import bootfiles
from pxeserver.app import Context
from pxeserver.autoinstall import AutoinstallRenderer
from pxeserver.bootfiles import BootFileRefused
from pxeserver.mac import InvalidMac, MacAddress
from pxeserver.policy import AutoinstallKind, BootSpec, LocalBoot, NotInstalling, SecretRefused
from pxeserver.published import NotPublished, Published, open_published
from pxeserver.registry import Status

log = logging.getLogger(__name__)

blueprint = Blueprint("files", __name__)

RENDERER = "pxeserver.autoinstall"
TEXT = "text/plain; charset=utf-8"


@blueprint.record_once
def _make_renderer(state: BlueprintSetupState) -> None:
    """One renderer per app, so compiled templates are cached across requests."""
    state.app.extensions[RENDERER] = AutoinstallRenderer(state.app.extensions["pxeserver"].config)


def _context() -> Context:
    context: Context = current_app.extensions["pxeserver"]
    return context


def _text(body: str, status: int = 200) -> Response:
    return Response(body, status=status, content_type=TEXT)


def _parse_mac(text: str) -> MacAddress:
    """The MAC from the URL, in any spelling the contract allows; anything else is a 400."""
    try:
        return MacAddress.parse(text)
    except InvalidMac as exc:
        abort(_text(f"{exc}\n", 400))


# -- autoinstall files ----------------------------------------------------------------------

@blueprint.get("/ks/<mac>")
def kickstart(mac: str) -> Response:
    return _autoinstall(mac, AutoinstallKind.KICKSTART)


@blueprint.get("/preseed/<mac>")
def preseed(mac: str) -> Response:
    return _autoinstall(mac, AutoinstallKind.PRESEED)


def _autoinstall(text: str, kind: AutoinstallKind) -> Response:
    """Render the host's template; serving it moves the host to ``installing``."""
    mac = _parse_mac(text)
    policy = _context().policy
    host = policy.host(mac)
    if host is None:
        return _text(f"no host with MAC {mac} is registered\n", 404)
    try:  # the file carries the host's install token: only to the host, during its install
        policy.check_secret_access(host, request.remote_addr)
    except SecretRefused as exc:
        policy.record(mac, "http", f"refused {kind.value} to {request.remote_addr}: {exc}")
        return _text(f"{exc}\n", 404 if isinstance(exc, NotInstalling) else 403)
    profile = policy.profile(host.profile)
    if profile is None or policy.autoinstall_kind(profile.autoinstall) is not kind:
        return _text(f"host {mac} has no {kind.value} template\n", 404)
    renderer: AutoinstallRenderer = current_app.extensions[RENDERER]
    try:
        rendered = renderer.render(kind, host, profile)
    except (TemplateError, OSError) as exc:
        # The cause goes to the log only: a traceback would show the installer (and anyone
        # else asking) paths and template source.
        log.error("cannot render %s %r for %s: %s: %s",
                  kind.value, profile.autoinstall, mac, type(exc).__name__, exc)
        policy.record(mac, "http", f"{kind.value} {profile.autoinstall} failed to render")
        return _text(f"the {kind.value} template failed to render; see the server log\n", 500)
    policy.record(mac, "http", f"served {kind.value} {profile.autoinstall} to {request.remote_addr}")
    policy.advance(mac, Status.INSTALLING)
    return _text(rendered)


# -- iPXE -----------------------------------------------------------------------------------

@blueprint.get("/ipxe/<mac>")
def ipxe_script(mac: str) -> Response:
    """The iPXE script for a MAC: its boot spec, with kernel and initrd fetched from /boot/."""
    parsed = _parse_mac(mac)
    context = _context()
    spec = context.policy.boot_spec(parsed)
    if context.policy.host(parsed) is not None:
        context.policy.record(parsed, "http", f"served iPXE script to {request.remote_addr}")
        context.policy.advance(parsed, Status.NETBOOTING)
    return _text(render_ipxe(spec, f"{context.config.http_base_url}/boot"))


def render_ipxe(spec: BootSpec, boot_url: str) -> str:
    if isinstance(spec, LocalBoot):
        # `exit` hands control back to the firmware (or pypxeboot's caller), which then boots
        # the next device: the installed disk.
        return "#!ipxe\nexit\n"
    # iPXE quirk: an EFI kernel finds its initrd only by the name given with --name, and the
    # kernel line must say initrd=<that name>; BIOS kernels ignore both, so always give them.
    initrd_name = Path(spec.initrd).name
    args = " ".join(filter(None, [f"initrd={initrd_name}", spec.cmdline]))
    return (
        "#!ipxe\n"
        f"kernel {boot_url}/{spec.kernel} {args}\n"
        f"initrd --name {initrd_name} {boot_url}/{spec.initrd}\n"
        "boot\n"
    )


# -- boot files -----------------------------------------------------------------------------

@blueprint.route("/boot/<path:subpath>", methods=["GET", "HEAD"])
def boot_file(subpath: str) -> Response:
    """A file under the TFTP root that TFTP would also publish (published.py); else 404.

    Containment is checked on the real path, after symlinks are followed, so ``..``,
    ``%2e%2e`` (decoded before routing) and a symlink pointing out of the root all end here.
    A recorded kernel or initrd whose copy here differs from the registry's checksum gets 503:
    another node, or this one once the copy is fixed, serves it.
    """
    context = _context()
    try:
        published = open_published(context.config.tftp_root, subpath)
    except NotPublished:
        return _text("not found\n", 404)
    try:
        context.policy.check_boot_file(subpath, published, "http")
    except BootFileRefused as exc:
        os.close(published.fd)
        response = _text(f"{exc}; refused\n", 503)
        response.headers["Retry-After"] = "60"
        return response
    announced = bootfiles.served_sha256(published) if context.config.http.announce_digests else None
    response = _send_published(published)
    if announced is not None and response.status_code in (200, 206):
        announce_digest(response, announced)
    if request.method == "GET" and response.status_code == 200:
        host = context.policy.host_by_ip(request.remote_addr or "")
        if host is not None:
            context.policy.record(host.mac, "http", f"downloaded /boot/{subpath}")
    return response


def announce_digest(response: Response, sha256_hex: str) -> None:
    """The whole file's SHA-256 (RFC 9530's Repr-Digest, and the older X-Checksum-SHA256):
    pypxeboot's dom0 cache keys on it and checks every body it keeps against it."""
    response.headers["Repr-Digest"] = f"sha-256=:{base64.b64encode(bytes.fromhex(sha256_hex)).decode()}:"
    response.headers["X-Checksum-SHA256"] = sha256_hex


def _send_published(published: Published) -> Response:
    """Serve the very descriptor that was checked, never the path again: the name may point
    elsewhere by now (a symlink or another file swapped in). Size, Last-Modified, the ETag
    (in werkzeug's format for paths, so it is stable) and Range come from that descriptor."""
    info = published.info
    file = os.fdopen(published.fd, "rb")
    try:
        response = send_file(
            file,
            download_name=os.path.basename(published.path),
            conditional=False,
            etag=f"{info.st_mtime}-{info.st_size}-{zlib.adler32(published.path.encode()) & 0xFFFFFFFF}",
            last_modified=info.st_mtime,
            max_age=0,
        )
        response.content_length = info.st_size
        response.make_conditional(request.environ, accept_ranges=True, complete_length=info.st_size)
        return response
    except BaseException:  # a 416 from make_conditional included: the response never runs
        file.close()
        raise
