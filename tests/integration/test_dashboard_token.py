"""The dashboard's token (neuro_dask/dashboard/access.py): with it set, every route of the
scheduler's HTTP server (Dask's, Bokeh's and ours) answers 403 unless the request carries the
token in the URL, in an `Authorization: Bearer` header, or in the cookie the URL sets.

Each test starts a Scheduler in this process with the neuro_scheduler preload and its dashboard
on a free port, and talks to it with tornado's HTTP client on the same event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

import pytest
import tornado.routing
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from neuro_dask.dashboard.access import FORBIDDEN_TEXT, protect_dashboard
from neuro_dask.errors import ConfigFieldError

TOKEN = "dash-9f2c41d7e0"


@contextlib.asynccontextmanager
async def protected_scheduler(token: str = TOKEN):
    from distributed import Scheduler

    async with Scheduler(port=0, dashboard_address="127.0.0.1:0", preload=["neuro_scheduler"]) as scheduler:
        protect_dashboard(scheduler, token)
        yield scheduler, f"http://127.0.0.1:{scheduler.http_server.port}"


async def fetch(url: str, **options):
    """(status, headers, body) of one request; redirects are not followed."""
    try:
        reply = await AsyncHTTPClient().fetch(url, follow_redirects=False, **options)
    except HTTPClientError as exc:
        if exc.response is None:
            raise
        reply = exc.response
    return reply.code, reply.headers, reply.body.decode(errors="replace")


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def route_paths(app) -> list[str]:
    """One concrete path for every route of the HTTP application and its sub-applications (Bokeh's):
    "/status/?$" -> "/status", "/statics/(.*)$" -> "/statics/x"."""
    patterns: set[str] = set()

    def walk(router, seen: set[int]) -> None:
        if id(router) in seen:
            return
        seen.add(id(router))
        for rule in router.rules:
            if isinstance(rule.matcher, tornado.routing.PathMatches):
                patterns.add(rule.matcher.regex.pattern)
            if isinstance(rule.target, tornado.routing.RuleRouter):
                walk(rule.target, seen)

    for application in [app, *app.applications]:
        walk(application.default_router, set())
        walk(application.wildcard_router, set())
    paths = set()
    for pattern in patterns:
        path = pattern.rstrip("$").replace("/?", "").replace(r"(\d+)", "1").replace("(.*?)", "x")
        paths.add(path.replace("(.*)", "x") or "/")
    return sorted(paths)


def test_every_route_answers_403_without_the_token():
    async def check():
        async with protected_scheduler() as (scheduler, base):
            paths = route_paths(scheduler.http_application)
            assert {
                "/",
                "/status",
                "/workers",
                "/status/ws",
                "/status/static/x",
                "/statics/x",
                "/metrics",
                "/health",
                "/info/main/workers.html",
                "/json/identity.json",
                "/sitemap.json",
                "/neuro/network",
                "/neuro/network/ws",
                "/neuro/economy",
            } <= set(paths)
            for path in paths + ["/no/such/page"]:
                status, headers, body = await fetch(f"{base}{path}")
                assert (path, status) == (path, 403)
                assert body == FORBIDDEN_TEXT and "Set-Cookie" not in headers
            wrong = [
                {"headers": bearer("not-it")},
                {"headers": {"Cookie": "neuro_dashboard_1=abc"}},
                {"headers": {"Authorization": TOKEN}},  # no scheme: not a bearer token
                {"method": "POST", "body": b"{}"},
                {"method": "HEAD"},
            ]
            for path in ["/status", "/metrics", "/neuro/network", "/json/identity.json", "/statics/x"]:
                for options in wrong:
                    status, _, _ = await fetch(f"{base}{path}", **options)
                    assert (path, status) == (path, 403), options
                status, _, _ = await fetch(f"{base}{path}?token=not-it")
                assert (path, status) == (path, 403)
            port = scheduler.http_server.port
            status, _, _ = await fetch(f"{base}/status", headers={"Cookie": f"neuro_dashboard_{port}={TOKEN}"})
            assert status == 403  # the cookie holds an HMAC of the token, not the token

    asyncio.run(check())


def test_the_token_in_the_url_opens_the_page_and_its_cookie_the_follow_ups():
    async def check():
        async with protected_scheduler() as (scheduler, base):
            status, headers, html = await fetch(f"{base}/status?token={TOKEN}")
            assert status == 200 and "Bokeh" in html
            (cookie_header,) = headers.get_list("Set-Cookie")
            assert "HttpOnly" in cookie_header and "SameSite=Lax" in cookie_header
            assert TOKEN not in cookie_header  # the cookie holds an HMAC of the token
            cookie = {"Cookie": cookie_header.split(";")[0]}

            # what the page asks for next: its scripts, our pages, JSON, and Bokeh's websocket
            scripts = re.findall(r'src="([^"]+\.js)[?"]', html)
            assert scripts
            for path in [f"/{scripts[0]}", "/neuro/network", "/json/identity.json", "/status"]:
                status, headers, _ = await fetch(f"{base}{path}", headers=cookie)
                assert (path, status) == (path, 200)
                assert "Set-Cookie" not in headers  # only the URL's token sets it
            session = re.search(r'"token":"([^"]+)"', html).group(1)
            origin = {"Origin": base}
            ws = await websocket_connect(
                HTTPRequest(f"{base.replace('http', 'ws')}/status/ws", headers={**cookie, **origin}),
                subprotocols=["bokeh", session],
            )
            assert "ACK" in await ws.read_message()
            ws.close()
            with pytest.raises(HTTPClientError) as refused:
                await websocket_connect(
                    HTTPRequest(f"{base.replace('http', 'ws')}/status/ws", headers=origin),
                    subprotocols=["bokeh", session],
                )
            assert refused.value.code == 403

            # "/" redirects to /status: the cookie comes with the redirect, the token does not
            status, headers, _ = await fetch(f"{base}/?token={TOKEN}")
            assert status in (301, 302) and TOKEN not in headers["Location"]
            assert headers.get_list("Set-Cookie") == [cookie_header]

    asyncio.run(check())


def test_a_bearer_header_opens_metrics_for_prometheus():
    async def check():
        async with protected_scheduler() as (_, base):
            status, headers, text = await fetch(f"{base}/metrics", headers=bearer())
            assert status == 200 and "Set-Cookie" not in headers
            assert "dask_scheduler_workers" in text and "neuro_" in text
            status, _, _ = await fetch(f"{base}/metrics", headers={"Authorization": f"bearer   {TOKEN} "})
            assert status == 200  # the scheme in any case, blanks around the token

    asyncio.run(check())


def test_the_token_never_reaches_a_handler_or_a_log_line(caplog):
    seen: list[str] = []

    async def check():
        async with protected_scheduler() as (scheduler, base):
            original = scheduler.http_application.neuro_dashboard_guard.original

            def spy(request, **kwargs):
                seen.append(request.uri)
                seen.extend(f"{k}={v!r}" for k, v in request.arguments.items())
                return original(request, **kwargs)

            scheduler.http_application.neuro_dashboard_guard.original = spy
            status, _, _ = await fetch(f"{base}/json/identity.json?a=1&token={TOKEN}&b=2")
            assert status == 200
            status, _, _ = await fetch(f"{base}/json/identity.json?token={TOKEN}x")
            assert status == 403

    with caplog.at_level(logging.DEBUG, logger="tornado"):
        asyncio.run(check())
    assert seen[0] == "/json/identity.json?a=1&b=2"
    assert all(TOKEN not in s for s in seen)
    assert any("identity.json" in r.getMessage() for r in caplog.records)  # the access log did log them
    assert all(TOKEN not in r.getMessage() for r in caplog.records)


def test_protecting_twice_keeps_one_guard_and_the_latest_token():
    async def check():
        async with protected_scheduler("first-token") as (scheduler, base):
            guard = scheduler.http_application.neuro_dashboard_guard
            protect_dashboard(scheduler, "second-token")
            assert scheduler.http_application.neuro_dashboard_guard is guard
            assert scheduler.http_application.find_handler == guard.find_handler
            transforms = [t for t in scheduler.http_application.transforms if t is guard.transform]
            assert len(transforms) == 1
            status, _, _ = await fetch(f"{base}/health", headers=bearer("first-token"))
            assert status == 403
            status, _, _ = await fetch(f"{base}/health", headers=bearer("second-token"))
            assert status == 200

    asyncio.run(check())


@pytest.mark.parametrize("token", ["", "   ", None])
def test_an_empty_token_is_a_config_error(token):
    with pytest.raises(ConfigFieldError, match="dashboard-token"):
        protect_dashboard(object(), token)
