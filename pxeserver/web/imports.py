"""``/api/imports``: start an import (``POST``, 202) and read its progress while it runs.

The same ``[api] token`` rule as the rest of /api (reads need it too) and the same JSON
errors; the work is :mod:`pxeserver.imports.jobs`.
"""

from __future__ import annotations

import threading

from flask import Blueprint, Response, current_app, jsonify
from werkzeug.exceptions import HTTPException

from pxeserver.imports.jobs import ImportJobs
from pxeserver.registry import Conflict, NotFound, ValidationError
from pxeserver.web.api import _bad_input, _body, _conflict, _context, _http_error, _not_found, _require_token

blueprint = Blueprint("imports", __name__, url_prefix="/api/imports")
blueprint.before_request(_require_token)
blueprint.register_error_handler(ValidationError, _bad_input)
blueprint.register_error_handler(NotFound, _not_found)
blueprint.register_error_handler(Conflict, _conflict)
blueprint.register_error_handler(HTTPException, _http_error)

_jobs_lock = threading.Lock()


def _jobs() -> ImportJobs:
    with _jobs_lock:
        if "pxeserver-imports" not in current_app.extensions:
            current_app.extensions["pxeserver-imports"] = ImportJobs(_context())
        jobs: ImportJobs = current_app.extensions["pxeserver-imports"]
        return jobs


def _secret_vars() -> list[str]:
    return _context().config.api.secret_vars


@blueprint.post("")
def start_import() -> tuple[Response, int, dict[str, str]]:
    job = _jobs().start(_body())
    return jsonify(job.to_dict(_secret_vars())), 202, {"Location": f"/api/imports/{job.id}"}


@blueprint.get("")
def list_imports() -> Response:
    return jsonify([job.to_dict(_secret_vars()) for job in _jobs().list()])


@blueprint.get("/<job_id>")
def show_import(job_id: str) -> Response:
    return jsonify(_jobs().get(job_id).to_dict(_secret_vars()))
