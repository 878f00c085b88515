"""The web dashboard at ``/``: hosts, one host, profiles and live activity, for people.

Server-rendered Jinja2 pages with a little plain JavaScript (static/dashboard.js) and the
vendored uPlot for the activity chart; nothing is fetched from elsewhere and nothing needs a
build step. Pages read through :class:`~pxeserver.overview.Overview` and change things
through :class:`~pxeserver.provisioning.Provisioning`, exactly as the API does.

Access: with ``[api] token`` set, a browser presents the token once on ``/login`` and then
holds a signed session cookie (Flask's, HttpOnly, SameSite=Strict, keyed from the token, so
changing the token logs everyone out). Every POST must carry the session's CSRF token and,
when the browser sends one, an ``Origin`` of this server. Without a token the pages warn, as
``pxeserver serve`` does, that anyone who can reach the port can change the registry.

Live updates are Server-Sent Events from the timeline's feed. Each stream holds one of the
HTTP service's worker threads, so at most ``[dashboard] max_streams`` run at once and each
ends after ``stream_seconds``; the browser's EventSource reconnects by itself with the last
event number it saw, so nothing is missed and no connection is held for long.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.blueprints import BlueprintSetupState
from werkzeug.wrappers import Response as BaseResponse

from pxeserver.app import Context
from pxeserver.mac import InvalidMac, MacAddress
from pxeserver.overview import HostQuery, Overview
from pxeserver.registry import Conflict, Event, NotFound, ValidationError

blueprint = Blueprint("dashboard", __name__, template_folder="templates",
                      static_folder="static", static_url_path="/assets")

OVERVIEW = "pxeserver.overview"
STREAM_SLOTS = "pxeserver.dashboard.streams"
COUNTS_EVERY = 1.0  # seconds between status-count updates on one stream
# Seconds a stream waits after a message before the next: a flood of events becomes a few
# messages a second (the newest events of each, see EventFeed.after), not one per event.
COALESCE = 0.1
OPEN_ENDPOINTS = {"dashboard.login", "dashboard.login_submit", "dashboard.static"}


@blueprint.record_once
def _setup(state: BlueprintSetupState) -> None:
    app, context = state.app, state.app.extensions["pxeserver"]
    token = context.config.api.token
    # Keyed from the token: sessions survive a restart and end when the token changes.
    app.secret_key = (hmac.new(token.encode(), b"pxeserver dashboard session", hashlib.sha256).digest()
                      if token else secrets.token_bytes(32))
    app.config.update(SESSION_COOKIE_NAME="pxeserver_session", SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Strict")
    app.extensions[OVERVIEW] = Overview(context.store, context.policy, context.timeline, context.config)
    app.extensions[STREAM_SLOTS] = threading.BoundedSemaphore(context.config.dashboard.max_streams)


def _context() -> Context:
    context: Context = current_app.extensions["pxeserver"]
    return context


def _overview() -> Overview:
    overview: Overview = current_app.extensions[OVERVIEW]
    return overview


@blueprint.app_template_filter("duration")
def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"+{seconds:.1f} s"
    return f"+{int(seconds // 60)} min {int(seconds % 60)} s"


@blueprint.app_template_filter("filesize")
def _filesize(size: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


# -- access ---------------------------------------------------------------------------------

def _login_mark(token: str) -> str:
    return hmac.new(token.encode(), b"pxeserver dashboard login", hashlib.sha256).hexdigest()


def _logged_in() -> bool:
    token = _context().config.api.token
    return not token or hmac.compare_digest(session.get("login", ""), _login_mark(token))


def csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    token: str = session["csrf"]
    return token


def _same_origin() -> bool:
    """A browser's Origin, when it sends one, names this server."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    return f"{parts.scheme}://{parts.netloc}" == request.host_url.rstrip("/")


@blueprint.before_request
def _guard() -> BaseResponse | None:
    if request.method == "POST":
        presented = request.form.get("csrf", "")
        expected = session.get("csrf", "")
        if not (expected and hmac.compare_digest(presented.encode(), expected.encode())
                and _same_origin()):
            return Response(render_template("dashboard/error.html", status=403,
                                            message="refused: this form did not come from a page "
                                                    "of this dashboard (missing or wrong CSRF "
                                                    "token); reload the page and try again"),
                            status=403)
    if request.endpoint in OPEN_ENDPOINTS or _logged_in():
        return None
    if request.endpoint == "dashboard.stream":
        return Response("log in first\n", status=401, content_type="text/plain")
    return redirect(url_for("dashboard.login", next=request.full_path.rstrip("?")))


@blueprint.app_context_processor
def _template_globals() -> dict[str, Any]:
    return {"csrf_token": csrf_token, "token_set": bool(_context().config.api.token)}


@blueprint.get("/login")
def login() -> str | BaseResponse:
    if not _context().config.api.token:
        return redirect(url_for("dashboard.hosts"))
    return render_template("dashboard/login.html", next=request.args.get("next", "/"))


@blueprint.post("/login")
def login_submit() -> BaseResponse | tuple[str, int]:
    token = _context().config.api.token
    presented = request.form.get("token", "")
    if not token:
        return redirect(url_for("dashboard.hosts"))
    if not hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), token.encode()):
        flash("wrong token")
        return render_template("dashboard/login.html", next=request.form.get("next", "/")), 401
    session.clear()  # a fresh session: no fixation of one planted before login
    session["login"] = _login_mark(token)
    csrf_token()
    return redirect(_local(request.form.get("next", "/")))


def _local(target: str) -> str:
    """A path on this server, never another site: browsers read ``//x`` and ``/\\x`` as a host."""
    if not target.startswith("/") or target[1:2] in ("/", "\\") or not target.isprintable():
        return "/"
    return target


@blueprint.post("/logout")
def logout() -> BaseResponse:
    session.clear()
    return redirect(url_for("dashboard.login") if _context().config.api.token else "/")


# -- errors ---------------------------------------------------------------------------------

def _mac(text: str) -> MacAddress:
    try:
        return MacAddress.parse(text)
    except InvalidMac as exc:
        abort(Response(render_template("dashboard/error.html", status=400, message=str(exc)), 400))


@blueprint.errorhandler(NotFound)
def _not_found(exc: NotFound) -> tuple[str, int]:
    return render_template("dashboard/error.html", status=404, message=str(exc)), 404


def _form_json(name: str) -> Any:
    text = request.form.get(name, "").strip()
    if not text:
        return {}
    try:
        return current_app.json.loads(text)  # the API's parser: too deep is a ValueError too
    except ValueError as exc:
        raise ValidationError(f"{name} must be a JSON object: {exc}") from None


# -- hosts ----------------------------------------------------------------------------------

@blueprint.get("/")
def hosts() -> str:
    query = HostQuery.from_args(request.args)
    started = time.perf_counter()
    page = _overview().hosts_page(query)
    return render_template(
        "dashboard/hosts.html", page=page, query=query, feed_last=_context().timeline.feed.last,
        stalled_after=_context().config.dashboard.stalled_after,
        query_ms=(time.perf_counter() - started) * 1000,
    )


@blueprint.get("/hosts/<mac>")
def host(mac: str) -> str:
    detail = _overview().host_detail(_mac(mac))
    return render_template("dashboard/host.html", detail=detail, profiles=_overview().profile_names(),
                           feed_last=_context().timeline.feed.last,
                           stalled_after=_context().config.dashboard.stalled_after)


def _change(action: str, done: str, back: str, work: Callable[[], object]) -> BaseResponse:
    """Run one change; its error, if any, is shown on the page it came from."""
    try:
        work()
    except (ValidationError, Conflict, NotFound) as exc:
        flash(f"{action} refused: {exc}", "error")
    else:
        flash(done, "ok")
    return redirect(back)


@blueprint.post("/hosts/<mac>/netboot")
def host_netboot(mac: str) -> BaseResponse:
    parsed, enabled = _mac(mac), request.form.get("netboot") == "on"
    return _change("netboot", f"netboot {'on: a new install' if enabled else 'off'}",
                   url_for("dashboard.host", mac=str(parsed)),
                   lambda: _context().provisioning.set_netboot(parsed, enabled))


@blueprint.post("/hosts/<mac>/edit")
def host_edit(mac: str) -> BaseResponse:
    parsed, form = _mac(mac), request.form

    def work() -> None:
        xen: dict[str, Any] = {"bridge": form.get("bridge", ""), "disk": form.get("disk", "")}
        for key in ("memory", "vcpus"):
            try:
                xen[key] = int(form.get(key, ""))
            except ValueError:
                raise ValidationError(f"xen.{key} must be a whole number") from None
        _context().provisioning.update_host(parsed, {
            "hostname": form.get("hostname", ""), "ip": form.get("ip", "").strip() or None,
            "profile": form.get("profile", ""), "vars": _form_json("vars"), "xen": xen,
        })

    return _change("edit", "saved", url_for("dashboard.host", mac=str(parsed)), work)


@blueprint.post("/hosts/<mac>/delete")
def host_delete(mac: str) -> BaseResponse:
    parsed = _mac(mac)
    try:
        _context().provisioning.delete_host(parsed)
    except NotFound as exc:
        flash(f"delete refused: {exc}", "error")
    else:
        flash(f"deleted host {parsed}", "ok")
    return redirect(url_for("dashboard.hosts"))


# -- profiles -------------------------------------------------------------------------------

def _profile_input() -> dict[str, Any]:
    form = request.form
    return {key: form.get(key, "") for key in ("name", "kernel", "initrd", "append", "autoinstall")
            } | {"vars": _form_json("vars")}


@blueprint.get("/profiles")
def profiles() -> str:
    return render_template("dashboard/profiles.html", profiles=_overview().profiles())


@blueprint.post("/profiles")
def profile_add() -> BaseResponse:
    data = _profile_input()
    return _change("add profile", f"added profile {data['name']}", url_for("dashboard.profiles"),
                   lambda: _context().provisioning.add_profile(data))


@blueprint.get("/profiles/<name>")
def profile(name: str) -> str:
    return render_template("dashboard/profile.html", summary=_overview().profile(name))


@blueprint.post("/profiles/<name>")
def profile_edit(name: str) -> BaseResponse:
    def work() -> None:
        _context().provisioning.replace_profile(name, _profile_input() | {"name": name})

    return _change("edit profile", "saved", url_for("dashboard.profile", name=name), work)


# -- activity -------------------------------------------------------------------------------

@blueprint.get("/activity")
def activity() -> str:
    overview = _overview()
    events = overview.recent_events()
    return render_template("dashboard/activity.html", events=reversed(events),
                           hosts=overview.live_rows(events),
                           chart=overview.chart(), feed_last=_context().timeline.feed.last)


@blueprint.get("/stream")
def stream() -> Response:
    """Server-Sent Events: new timeline events with their hosts' current rows and, at most
    once a second, the status counts. Ends after ``stream_seconds``; the page reconnects."""
    context, overview = _context(), _overview()
    slots: threading.BoundedSemaphore = current_app.extensions[STREAM_SLOTS]
    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    if not slots.acquire(blocking=False):  # full: come back in a few seconds
        return Response("retry: 5000\n\n", content_type="text/event-stream", headers=headers)
    try:
        seen = int(request.headers.get("Last-Event-ID") or request.args.get("since") or -1)
    except ValueError:
        seen = -1
    if seen < 0:
        seen = context.timeline.feed.last
    deadline = time.monotonic() + context.config.dashboard.stream_seconds
    return Response(_events(context, overview, slots, seen, deadline),
                    content_type="text/event-stream", headers=headers)


def _events(context: Context, overview: Overview, slots: threading.BoundedSemaphore,
            seen: int, deadline: float) -> Iterator[str]:
    counts_due: float | None = None  # when the counts changed and are yet to be sent
    counts_sent = 0.0
    try:
        yield f"retry: 1000\nid: {seen}\n\n"
        while (left := deadline - time.monotonic()) > 0:
            wait = min(left, 10.0)
            if counts_due is not None:
                wait = max(0.0, min(wait, counts_due - time.monotonic()))
            seen, events = context.timeline.feed.after(seen, timeout=wait)
            message: dict[str, Any] = {}
            if events:
                rows = overview.live_rows(events)
                message["events"] = [_event(event, rows) for event in events if str(event.mac) in rows]
                message["hosts"] = {mac: row.to_dict() for mac, row in rows.items()}
                counts_due = counts_due or max(time.monotonic(), counts_sent + COUNTS_EVERY)
            if counts_due is not None and time.monotonic() >= counts_due:
                message["counts"], counts_due = overview.status_counts(), None
                counts_sent = time.monotonic()
            # An empty message is a comment: it shows a client that went away as a failed write.
            yield f"id: {seen}\ndata: {json.dumps(message)}\n\n" if message else ": idle\n\n"
            if events:
                time.sleep(COALESCE)
    finally:
        slots.release()


def _event(event: Event, rows: dict[str, Any]) -> dict[str, Any]:
    return event.to_dict() | {"hostname": rows[str(event.mac)].hostname}
