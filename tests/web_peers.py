"""The HTTP interface for tests: the real app on uvicorn on a free loopback port, always stopped."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from starlette.types import ASGIApp

from node.config import NodeConfig
from node.web.server import WebServer


@contextmanager
def served(app: ASGIApp, config: NodeConfig) -> Iterator[httpx.Client]:
    """``app`` served by uvicorn on ``config.web`` (a free port), with a client whose base URL points at it."""
    server = WebServer(app, config)
    host, port = server.start()
    scheme = "https" if config.web.https else "http"
    try:
        with httpx.Client(base_url=f"{scheme}://{host}:{port}", timeout=10, verify=False) as client:
            yield client
    finally:
        server.stop()
