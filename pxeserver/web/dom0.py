"""``GET /dom0/pypxeboot``: the file ``pxeserver build-pypxeboot`` writes, for ``curl`` on a dom0.

It is built on the first request and kept for the life of the process: the sources do not
change under a running server, and a build starts a Python to list pypxeboot's modules. The
HTTP port also faces the guests and a dom0 runs this file as root, so the reply names its
SHA-256 (``X-Checksum-SHA256`` and the ETag) for the admin to compare with
``pxeserver build-pypxeboot --print-sha256`` run on the server, and the admin fetches it over
the management network. ``[http] serve_pypxeboot = false`` leaves the route out.
"""

from __future__ import annotations

import functools
import threading

from flask import Blueprint, Response, request

from pxeserver.dom0 import Archive, pypxeboot_archive

blueprint = Blueprint("dom0", __name__, url_prefix="/dom0")
_building = threading.Lock()  # one build, however many dom0s ask at once


@functools.cache
def _built() -> Archive:
    return pypxeboot_archive()


def _archive() -> Archive:
    with _building:
        return _built()


@blueprint.get("/pypxeboot")
def pypxeboot() -> Response:
    archive = _archive()
    response = Response(archive.data, mimetype="application/octet-stream")
    response.headers["Content-Disposition"] = "attachment; filename=pypxeboot"
    response.headers["X-Checksum-SHA256"] = archive.sha256
    response.set_etag(archive.sha256)
    response.make_conditional(request)  # If-None-Match with the ETag: 304, no body
    return response
