"""The Flask application: the JSON API, the files installers fetch and pypxeboot for dom0s."""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, jsonify
from flask.json.provider import DefaultJSONProvider

from pxeserver.app import Context
from pxeserver.registry import Unavailable
from pxeserver.web import api, dashboard, dom0, files, imports, metrics

MAX_BODY_BYTES = 256 * 1024


class JsonProvider(DefaultJSONProvider):
    """Flask's JSON, with a body nested too deeply for the parser made a plain decoding error.

    ``json.loads`` recurses per level: 100,000 ``[`` fit in the body size limit and raise
    RecursionError, which Flask would answer with a 500. As a ValueError it is a 400.
    """

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        try:
            return super().loads(s, **kwargs)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None


def create_app(context: Context) -> Flask:
    app = Flask("pxeserver")
    app.json = JsonProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["JSON_SORT_KEYS"] = False
    app.extensions["pxeserver"] = context
    app.register_blueprint(api.blueprint)
    app.register_blueprint(imports.blueprint)
    app.register_blueprint(files.blueprint)
    app.register_blueprint(dashboard.blueprint)
    if context.config.http.serve_pypxeboot:
        app.register_blueprint(dom0.blueprint)
    metrics.install(app, context)
    app.register_error_handler(Unavailable, _unavailable)
    return app


def _unavailable(exc: Unavailable) -> tuple[Response, int]:
    """The shared registry database is away: nothing was changed; the client may retry."""
    reply = jsonify(error=str(exc))
    reply.headers["Retry-After"] = "5"
    return reply, 503
