"""`python -m pipeline ui` serves Prefect's app behind pipeline.ui_server.LocalOnly: a request a web page of another
origin made (a CORS "simple" POST that Prefect would execute, a preflight, a websocket) or one addressed to another
host name (DNS rebinding) gets 403 before Prefect sees it; the CLI, the Prefect client and curl send no Origin and
pass. In process, no server started (the end-to-end check with a real server is in test_cache_identity.py)."""
from __future__ import annotations

from contextlib import asynccontextmanager

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from pipeline.ui_server import LocalOnly, allowed_hosts, allowed_origins

PORT = 4311
OWN = f"http://127.0.0.1:{PORT}"


def recording_app() -> tuple[Starlette, list[str]]:
    """A stand-in for Prefect: records every request that reaches it, and whether its lifespan ran."""
    calls: list[str] = []

    async def pause(request):
        calls.append(f"{request.method} {request.url.path} {(await request.body()).decode()}")
        return PlainTextResponse("paused")

    async def events(ws):
        await ws.accept()
        calls.append("ws")
        await ws.send_text("hello")
        await ws.close()

    @asynccontextmanager
    async def lifespan(app):
        calls.append("lifespan")
        yield

    routes = [Route("/api/deployments/d/pause_deployment", pause, methods=["POST", "OPTIONS"]),
              WebSocketRoute("/api/events/out", events)]
    return Starlette(routes=routes, lifespan=lifespan), calls


@pytest.fixture
def guarded():
    app, calls = recording_app()
    with TestClient(LocalOnly(app, PORT), base_url=OWN) as client:  # `with`: runs the lifespan
        assert calls == ["lifespan"]  # passed through: Prefect starts its services there
        calls.clear()
        yield client, calls


PAUSE = "/api/deployments/d/pause_deployment"


def test_requests_without_origin_and_from_the_ui_itself_pass(guarded):
    client, calls = guarded
    assert client.post(PAUSE, content="{}").status_code == 200  # the CLI, the Prefect client, curl
    for origin in (OWN, f"http://localhost:{PORT}"):
        assert client.post(PAUSE, content="{}", headers={"Origin": origin}).status_code == 200
    assert client.post(PAUSE, content="{}", headers={"Host": f"localhost:{PORT}"}).status_code == 200
    assert len(calls) == 4


@pytest.mark.parametrize("origin", ["http://evil.example", "null", f"http://127.0.0.1:{PORT + 1}",
                                    f"https://127.0.0.1:{PORT}", f"http://127.0.0.1.evil.example:{PORT}"])
def test_other_origins_are_refused_before_the_app(guarded, origin):
    client, calls = guarded
    # a CORS "simple" request: the browser sends it without asking, so CORS settings alone do not stop it
    simple = client.post(PAUSE, content='{"x": 1}', headers={"Origin": origin, "Content-Type": "text/plain"})
    assert simple.status_code == 403 and "cross-origin" in simple.json()["detail"]
    preflight = client.options(PAUSE, headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 403
    assert calls == []


def test_other_host_names_are_refused(guarded):
    """DNS rebinding: a page of evil.example resolved to 127.0.0.1 is same-origin with itself, so its GETs carry
    no Origin; its Host header still names evil.example."""
    client, calls = guarded
    for host in (f"evil.example:{PORT}", "127.0.0.1", f"127.0.0.1:{PORT + 1}"):
        resp = client.post(PAUSE, content="{}", headers={"Host": host})
        assert resp.status_code == 403 and "Host" in resp.json()["detail"]
    assert calls == []


def test_websockets_of_other_origins_are_refused(guarded):
    client, calls = guarded
    url = f"ws://127.0.0.1:{PORT}/api/events/out"
    with client.websocket_connect(url, headers={"Origin": OWN}) as ws:
        assert ws.receive_text() == "hello"
    with pytest.raises(WebSocketDisconnect) as refused:  # closed before accept: the handshake gets 403
        with client.websocket_connect(url, headers={"Origin": "http://evil.example"}):
            pass
    assert refused.value.code == 1008 and "cross-origin" in refused.value.reason
    assert calls == ["ws"]


def test_allowed_origins_and_hosts_are_the_ui_address_only():
    assert allowed_origins(4200) == {"http://127.0.0.1:4200", "http://localhost:4200"}
    assert allowed_hosts(4200) == {"127.0.0.1:4200", "localhost:4200"}
    assert allowed_hosts(80) == {"127.0.0.1:80", "localhost:80", "127.0.0.1", "localhost"}


def test_the_factory_wraps_prefects_own_app(tmp_path, monkeypatch):
    """What `ui` runs: Prefect's server app (API and UI) for the configured port, behind LocalOnly."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "ph"))
    from prefect.server.api.server import create_app as prefect_app

    from pipeline.ui_server import create_app
    app = create_app(PORT)  # `ui` passes the port its child's settings name (Prefect caches settings per process)
    assert isinstance(app, LocalOnly) and app.origins == allowed_origins(PORT)
    assert app.app is prefect_app(final=True, webserver_only=False)  # Prefect's cached app, services included
    client = TestClient(app, base_url=OWN)  # no `with`: no lifespan, so no database and no services start
    assert client.get("/api/health").json() is True  # reached Prefect
    page = client.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()  # the UI
    evil = client.post(f"/api{PAUSE.removeprefix('/api')}", content="{}",
                       headers={"Origin": "http://evil.example", "Content-Type": "text/plain"})
    assert evil.status_code == 403
