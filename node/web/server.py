"""uvicorn on a thread of the serve process: bound before ``start`` returns (so a busy port is an error at
start-up, like the DICOM port), stopped by ``stop`` after the requests in flight finish."""

from __future__ import annotations

import logging
import socket
import threading

import uvicorn
from starlette.types import ASGIApp

from node.config import TLS12_CIPHERS, NodeConfig

log = logging.getLogger(__name__)


class WebServer:
    """One uvicorn server for ``app`` on ``[web] host:port`` (HTTPS with the [tls] certificate when asked)."""

    def __init__(self, app: ASGIApp, config: NodeConfig, graceful_s: float = 10.0) -> None:
        web, tls = config.web, config.tls
        self._host, self._port, self._https = web.host, web.port, web.https
        self._uvicorn = uvicorn.Config(
            app,
            log_level="warning",  # the node logs what matters; uvicorn's access log would log every scrape
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=int(graceful_s),
            ssl_certfile=str(tls.certificate) if web.https else None,
            ssl_keyfile=str(tls.private_key) if web.https else None,
            ssl_ciphers=TLS12_CIPHERS,  # the DICOM port's policy: ECDHE with AEAD only, so TLS 1.2 at least
        )
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    def start(self, timeout_s: float = 10.0) -> tuple[str, int]:
        """Bind, serve in a background thread and wait until it accepts; returns the bound (host, port)."""
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host, self._port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        server = uvicorn.Server(self._uvicorn)
        # uvicorn installs no signal handlers outside the main thread: serve keeps SIGTERM for itself.
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uad-node-web", daemon=True)
        self._server = server
        self._thread.start()
        self._sock = sock
        while not server.started:
            if not self._thread.is_alive():
                raise OSError(f"HTTP interface on {self._host}:{self._port} did not start (see the log)")
            self._thread.join(0.01)
            timeout_s -= 0.01
            if timeout_s <= 0:
                self.stop()
                raise OSError(f"HTTP interface on {self._host}:{self._port} did not start in time")
        host, port = sock.getsockname()[:2]
        log.info("HTTP interface on %s://%s:%d", "https" if self._https else "http", host, port)
        return str(host), int(port)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop accepting, let requests in flight finish (at most ``graceful_s``), then close."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            if self._thread.is_alive():
                log.warning("HTTP interface did not stop in %g s", timeout_s)
        if self._sock is not None:
            self._sock.close()
        log.info("HTTP interface stopped")
