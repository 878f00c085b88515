"""The JSON API under /api: profiles, hosts, their timelines and the install-complete callback.

Handlers are thin: they parse the request into plain data and hand it to
:class:`~pxeserver.provisioning.Provisioning`, which validates and stores it; errors from
there map to 400 (bad input), 404 (unknown), 409 (conflict) and 403 (wrong token).

With ``[api] token`` set every request needs it, reads too (the registry names every host
and its profile); only the install-complete callback is authorised instead by the host's
own install token and address. Secret template variables are masked in every answer.
"""

from __future__ import annotations

import hmac
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import BadRequest, HTTPException, UnsupportedMediaType

from pxeserver import bootfiles
from pxeserver.app import Context
from pxeserver.mac import InvalidMac, MacAddress
from pxeserver.provisioning import InvalidToken
from pxeserver.registry import Conflict, Host, NotFound, Profile, ValidationError

blueprint = Blueprint("api", __name__, url_prefix="/api")


def _context() -> Context:
    context: Context = current_app.extensions["pxeserver"]
    return context


def _error(status: int, message: str) -> tuple[Response, int]:
    return jsonify(error=message), status


@blueprint.errorhandler(ValidationError)
@blueprint.errorhandler(InvalidMac)
def _bad_input(exc: Exception) -> tuple[Response, int]:
    return _error(400, str(exc))


@blueprint.errorhandler(NotFound)
def _not_found(exc: NotFound) -> tuple[Response, int]:
    return _error(404, str(exc.args[0]) if exc.args else "not found")


@blueprint.errorhandler(Conflict)
def _conflict(exc: Conflict) -> tuple[Response, int]:
    return _error(409, str(exc))


@blueprint.errorhandler(InvalidToken)
def _forbidden(exc: InvalidToken) -> tuple[Response, int]:
    return _error(403, str(exc))


@blueprint.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> tuple[Response, int]:
    return _error(exc.code or 500, exc.description or exc.name)


def _admin_authorized() -> bool:
    token = _context().config.api.token
    if not token:
        return True
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        presented.strip().encode("utf-8", "surrogateescape"), token.encode())


@blueprint.before_request
def _require_token() -> tuple[Response, int] | None:
    if _admin_authorized():
        return None
    if request.endpoint == "api.install_done":
        return None  # authorised by the per-install token and the host's address instead
    return _error(401, "the API needs 'Authorization: Bearer <token>'")


def _body() -> Any:
    try:
        return request.get_json()
    except (BadRequest, UnsupportedMediaType) as exc:  # bad or too deep JSON; not JSON at all
        reason = exc.__cause__ or exc.description  # Flask keeps the parser's message there
        raise ValidationError(
            f"the request body must be JSON (Content-Type: application/json): {reason}"
        ) from None


def _secret_vars() -> list[str]:
    return _context().config.api.secret_vars


def _host(host: Host) -> dict[str, Any]:
    return host.to_dict(_secret_vars())


def _profile(profile: Profile) -> dict[str, Any]:
    return profile.to_dict(_secret_vars())


def _mac(text: str) -> MacAddress:
    return MacAddress.parse(text)


# -- profiles -------------------------------------------------------------------------------

@blueprint.get("/profiles")
def list_profiles() -> Response:
    return jsonify([_profile(p) for p in _context().store.list_profiles()])


def _with_warnings(profile: Profile) -> Response:
    """A profile just written, with an HTTP ``Warning`` (199) for each file the TFTP root does
    not serve: the body stays the profile, which a client may write back as it is."""
    response = jsonify(_profile(profile))
    for warning in bootfiles.missing_files(_context().config.tftp_root, profile):
        text = warning.replace('"', "'").encode("ascii", "backslashreplace").decode()
        response.headers.add("Warning", f'199 pxeserver "{text}"')
    return response


@blueprint.post("/profiles")
def add_profile() -> tuple[Response, int]:
    profile = _context().provisioning.add_profile(_body())
    return _with_warnings(profile), 201


@blueprint.get("/profiles/<name>")
def show_profile(name: str) -> Response:
    return jsonify(_profile(_context().store.get_profile(name)))


@blueprint.get("/profiles/<name>/files")
def profile_files(name: str) -> Response:
    """Each file's size, whether it is served and whether it still matches the SHA-256 its
    import recorded; apart from the profile so that a profile read can be written back."""
    context = _context()
    profile = context.store.get_profile(name)
    return jsonify(bootfiles.profile_files(context.config.tftp_root, profile, context.store))


@blueprint.put("/profiles/<name>")
def replace_profile(name: str) -> Response:
    return _with_warnings(_context().provisioning.replace_profile(name, _body()))


@blueprint.delete("/profiles/<name>")
def delete_profile(name: str) -> tuple[str, int]:
    _context().provisioning.delete_profile(name)
    return "", 204


# -- hosts ----------------------------------------------------------------------------------

@blueprint.get("/hosts")
def list_hosts() -> Response:
    return jsonify([_host(h) for h in _context().store.list_hosts()])


@blueprint.post("/hosts")
def add_host() -> tuple[Response, int]:
    host = _context().provisioning.add_host(_body())
    return jsonify(_host(host)), 201


@blueprint.get("/hosts/<mac>")
def show_host(mac: str) -> Response:
    return jsonify(_host(_context().store.get_host(_mac(mac))))


@blueprint.patch("/hosts/<mac>")
def update_host(mac: str) -> Response:
    return jsonify(_host(_context().provisioning.update_host(_mac(mac), _body())))


@blueprint.delete("/hosts/<mac>")
def delete_host(mac: str) -> tuple[str, int]:
    _context().provisioning.delete_host(_mac(mac))
    return "", 204


@blueprint.post("/hosts/<mac>/installed")
def install_done(mac: str) -> Response:
    """The installer's callback; the per-install token comes as ``?token=`` or in a JSON body,
    from the host's own address (see BootPolicy.check_secret_access).

    An administrator holding the configured API token may also mark a host installed, from
    anywhere.
    """
    context = _context()
    host_mac = _mac(mac)
    body = request.get_json(silent=True)
    token = request.args.get("token") or (body.get("token") if isinstance(body, dict) else None)
    client_ip: str | None = request.remote_addr or ""
    if not token and context.config.api.token and _admin_authorized():
        token, client_ip = context.store.get_host(host_mac).install_token, None
    if not isinstance(token, str) or not token:
        raise InvalidToken("the install-complete call needs the host's install token")
    return jsonify(_host(context.provisioning.install_done(host_mac, token, client_ip=client_ip)))


@blueprint.get("/hosts/<mac>/events")
def host_events(mac: str) -> Response:
    context = _context()
    host = context.store.get_host(_mac(mac))
    return jsonify([e.to_dict() for e in context.timeline.events(host.mac)])
