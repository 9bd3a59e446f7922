"""The dashboard's token: with `neuro.security.dashboard-token` set, every HTTP route of the
scheduler answers 403 unless the request carries the token.

What is covered: everything Dask's HTTP server routes, since the check sits where that server
picks a handler for every request (`http_application.find_handler`): Dask's own routes (/status
via Bokeh, /info, /json, /metrics, /health, /statics, /sitemap.json, ...), the Bokeh server's
pages, its static files and its /ws websockets (a sub-application), our /neuro/* pages, and
anything added later (Jupyter) the same way.

How a request shows the token, any one of:
- `?token=TOKEN` in the URL (a person opening the dashboard): the answer then sets an HttpOnly
  cookie, so that the page's own follow-up requests (scripts, JSON, the websocket) need nothing;
- `Authorization: Bearer TOKEN` (Prometheus: `authorization: {credentials: TOKEN}`);
- that cookie. It holds an HMAC of the token, not the token, and is named after the port so that
  two schedulers on one host keep theirs apart.

The token is taken out of the request's URL before any handler (or tornado's access and error
logs) sees it, and tokens are compared with `hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import weakref
from typing import Any
from urllib.parse import unquote_plus

import tornado.web

from neuro_dask.errors import ConfigFieldError

log = logging.getLogger(__name__)

TOKEN_PARAM = "token"
COOKIE_PREFIX = "neuro_dashboard_"
_GUARD_ATTR = "neuro_dashboard_guard"
_COOKIE_SALT = b"neuro_dask dashboard cookie v1"
FORBIDDEN_TEXT = (
    "403 Forbidden: this dashboard asks for its token (neuro.security.dashboard-token). "
    "Open it as /status?token=TOKEN (a cookie then keeps you in), or send the header "
    "'Authorization: Bearer TOKEN' (Prometheus).\n"
)


def protect_dashboard(server: Any, token: str) -> None:
    """Make every route of `server`'s HTTP application (a Dask Scheduler, or any Dask server with
    `http_application`) ask for `token`. Idempotent: a second call only replaces the token."""
    if not isinstance(token, str) or not token.strip():
        raise ConfigFieldError(
            "neuro.security",
            "dashboard-token",
            "must be a non-empty string (or null for no token); e.g. `openssl rand -hex 24`",
        )
    app = getattr(server, "http_application", None)
    if app is None:
        log.info("%s has no HTTP server: no dashboard to protect", type(server).__name__)
        return
    guard = getattr(app, _GUARD_ATTR, None)
    if guard is None:
        http_server = getattr(server, "http_server", None)
        guard = _Guard(app, token, getattr(http_server, "port", None))
        setattr(app, _GUARD_ATTR, guard)
        app.find_handler = guard.find_handler  # every request of the HTTP server passes here
        log.info("the dashboard asks for its token (neuro.security.dashboard-token) on every route")
    else:
        guard.set_token(token)
    guard.install_transforms()


class DashboardForbiddenHandler(tornado.web.RequestHandler):
    """What a request without the token gets, whatever its path and method."""

    def prepare(self) -> None:
        self.set_status(403)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish("" if self.request.method == "HEAD" else FORBIDDEN_TEXT)

    def check_xsrf_cookie(self) -> None:  # refused anyway: no need to ask for an XSRF token first
        pass


class _Guard:
    def __init__(self, app: tornado.web.Application, token: str, port: int | None):
        self.app = app
        self.original = app.find_handler  # the class's method, bound to app
        self.cookie_name = f"{COOKIE_PREFIX}{port}" if port else COOKIE_PREFIX.rstrip("_")
        self.logins: weakref.WeakSet = weakref.WeakSet()  # requests that came with ?token= (cookie due)
        self.transform = _cookie_transform(self)
        self.set_token(token)

    def set_token(self, token: str) -> None:
        self._token = token.encode()
        self._cookie_value = hmac.new(self._token, _COOKIE_SALT, hashlib.sha256).hexdigest().encode()

    def install_transforms(self) -> None:
        """The cookie is set by an output transform of whichever application answers: the top one
        and its sub-applications (Bokeh's, Jupyter's), some of which may be added after us."""
        for app in [self.app, *getattr(self.app, "applications", [])]:
            if self.transform not in app.transforms:
                app.add_transform(self.transform)

    def find_handler(self, request: Any, **kwargs: Any) -> Any:
        supplied = _take_query_token(request)
        if self.authorized(request, supplied):
            if supplied is not None:
                self.logins.add(request)
                self.install_transforms()
            return self.original(request, **kwargs)
        return self.app.get_handler_delegate(request, DashboardForbiddenHandler)

    def authorized(self, request: Any, supplied: bytes | None) -> bool:
        ok = False
        if supplied is not None:
            ok |= hmac.compare_digest(supplied, self._token)
        scheme, _, credentials = (request.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            ok |= hmac.compare_digest(credentials.strip().encode(), self._token)
        cookie = _cookie(request, self.cookie_name)
        if cookie is not None:
            ok |= hmac.compare_digest(cookie.encode(), self._cookie_value)
        return ok

    def set_cookie_header(self, secure: bool) -> str:
        return f"{self.cookie_name}={self._cookie_value.decode()}; Path=/; HttpOnly; SameSite=Lax" + (
            "; Secure" if secure else ""
        )


def _cookie(request: Any, name: str) -> str | None:
    try:
        morsel = request.cookies.get(name)
    except Exception:  # a malformed Cookie header: as if there were none
        return None
    return None if morsel is None else morsel.value


def _take_query_token(request: Any) -> bytes | None:
    """The ?token= of the request (its last value), removed from the request's URL and arguments
    so that no handler and no log line sees it; None when the URL has none."""
    values = request.query_arguments.pop(TOKEN_PARAM, None)
    if values is None:
        return None
    request.arguments.pop(TOKEN_PARAM, None)
    kept = [p for p in request.query.split("&") if p and unquote_plus(p.partition("=")[0]) != TOKEN_PARAM]
    request.query = "&".join(kept)
    request.uri = request.path + ("?" + request.query if request.query else "")
    return values[-1] if values else b""


def _cookie_transform(guard: _Guard) -> type[tornado.web.OutputTransform]:
    class SetDashboardCookie(tornado.web.OutputTransform):
        """Adds the dashboard's cookie to the answer of a request that came with ?token=."""

        def __init__(self, request: Any):
            self.login = request in guard.logins
            self.secure = request.protocol == "https"

        def transform_first_chunk(self, status_code: int, headers: Any, chunk: bytes, finishing: bool):
            if self.login:
                headers.add("Set-Cookie", guard.set_cookie_header(self.secure))
            return status_code, headers, chunk

    return SetDashboardCookie
