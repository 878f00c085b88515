"""The Flask application: the JSON API and the files installers fetch."""

from __future__ import annotations

from flask import Flask

from pxeserver.app import Context
from pxeserver.web import api, files, metrics

MAX_BODY_BYTES = 256 * 1024


def create_app(context: Context) -> Flask:
    app = Flask("pxeserver")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["JSON_SORT_KEYS"] = False
    app.extensions["pxeserver"] = context
    app.register_blueprint(api.blueprint)
    app.register_blueprint(files.blueprint)
    metrics.install(app, context)
    return app
