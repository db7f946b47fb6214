"""The local Prefect server of `python -m pipeline ui`: Prefect's own app (REST API, UI, background services), run
by uvicorn as `prefect server start` runs it, behind one guard: a request that a web page of another origin made
is refused with 403 before Prefect sees it.

Prefect's CORS settings alone do not protect it: they stop a browser from reading the answer and from sending a
preflighted request, but a CORS "simple" request (a POST with Content-Type text/plain, say) is still sent, and
Prefect parses its body as JSON and executes it, so any page open in the browser could pause a deployment or
start a run. Browsers put an `Origin` header on every cross-origin request and on every same-origin request but
a GET / HEAD, so refusing any `Origin` but the UI's own stops them; the CLI, the Prefect client and curl send no
`Origin` and are not affected. The `Host` header must also name the server (127.0.0.1 or localhost and its
port), which stops DNS rebinding (a page of evil.example whose name then resolves to 127.0.0.1: its requests
carry `Host: evil.example`, and a same-origin GET carries no `Origin` at all).
"""
from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HOSTS = ("127.0.0.1", "localhost")  # the server binds 127.0.0.1; a browser may show it as either name


def allowed_origins(port: int) -> frozenset[str]:
    """The UI's own origins, as browsers write them (scheme://host:port, lower case, no path or slash)."""
    return frozenset(f"http://{host}:{port}" for host in HOSTS)


def allowed_hosts(port: int) -> frozenset[str]:
    """`Host` values that name this server; a client leaves out the port only when it is the scheme's default."""
    return frozenset(f"{host}:{port}" for host in HOSTS) | (frozenset(HOSTS) if port == 80 else frozenset())


class LocalOnly:
    """Pure ASGI middleware: http and websocket requests whose `Host` is not this server or whose `Origin` is
    present and not the UI's own get 403; everything else (and the lifespan, which starts Prefect's services)
    passes through untouched."""

    def __init__(self, app: ASGIApp, port: int) -> None:
        self.app, self.origins, self.hosts = app, allowed_origins(port), allowed_hosts(port)

    def refusal(self, scope: Scope) -> str | None:
        headers = {}
        for key, value in scope.get("headers") or ():
            headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
        host = headers.get("host", "").lower()
        if host not in self.hosts:
            return f"Host {host or '(none)'} is not this server ({', '.join(sorted(self.hosts))})"
        origin = headers.get("origin")
        if origin is not None and origin.lower() not in self.origins:
            return f"cross-origin request from {origin} refused (allowed: {', '.join(sorted(self.origins))})"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        why = self.refusal(scope) if scope["type"] in ("http", "websocket") else None
        if why is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            body = json.dumps({"detail": why}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 403, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        else:  # a websocket closed before it is accepted: the server answers the handshake with 403
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008, "reason": why[:120]})


def create_app(port: int | None = None, ephemeral: bool = False) -> ASGIApp:
    """Prefect's server app as `prefect server start` builds it (API + UI; the scheduler and the other services
    start in its lifespan), wrapped in LocalOnly for `port` (default: the setting PREFECT_SERVER_API_PORT).
    `ephemeral`: the API alone, without UI and services, as Prefect's own temporary server runs it."""
    from prefect.server.api.server import create_app as prefect_app
    from prefect.settings import PREFECT_SERVER_API_PORT

    return LocalOnly(prefect_app(final=True, webserver_only=False, ephemeral=ephemeral),
                     port or PREFECT_SERVER_API_PORT.value())


def serve_temporary(port: int, parent: int) -> None:
    """The temporary server of one `pipeline run` without a UI: create_app(ephemeral=True) on 127.0.0.1:`port`.
    It runs in a session of its own (the CLI starts it so), so a signal to the run's process group (`timeout`, a
    closed terminal) leaves it up while the run reports its end to it; it stops itself once `parent` is gone."""
    import os
    import signal
    import threading
    import time

    import uvicorn

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown

    threading.Thread(target=watch, daemon=True).start()
    uvicorn.run(create_app(port, ephemeral=True), host="127.0.0.1", port=port, log_level="error")


def serve() -> None:
    """Run create_app() with uvicorn on PREFECT_SERVER_API_HOST:PORT, with the keep-alive, websocket ping and log
    level settings that `prefect server start` passes (prefect/cli/_server_utils.py, one worker)."""
    import uvicorn
    from prefect.settings import (PREFECT_SERVER_API_HOST, PREFECT_SERVER_API_KEEPALIVE_TIMEOUT,
                                  PREFECT_SERVER_API_PORT, PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL,
                                  PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT, PREFECT_SERVER_LOGGING_LEVEL)

    port = PREFECT_SERVER_API_PORT.value()
    uvicorn.run(create_app(port), host=PREFECT_SERVER_API_HOST.value(), port=port,
                timeout_keep_alive=PREFECT_SERVER_API_KEEPALIVE_TIMEOUT.value(),
                ws_ping_interval=PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL.value(),
                ws_ping_timeout=PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT.value(),
                log_level=PREFECT_SERVER_LOGGING_LEVEL.value().lower())
