"""The OHIF viewer as a radiologist's browser shows it, for tests: OHIF's prebuilt ``dist/`` from npm, served by
nginx on 127.0.0.1 with Orthanc's DICOMweb root behind the same origin, and headless Debian Chromium driven over
the DevTools protocol (CDP).

Nothing downloads at run time but the npm package (once, into a cache folder). Every process started here is
stopped when its ``with`` block ends.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.demo.pacs import free_port, stop_process, wait_for_port
from tests.peers import require_tool

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
DICOMWEB_ROOT = "/dicom-web"


VIEWER_PACKAGES = "apt-get install orthanc orthanc-dicomweb nginx chromium npm"


def cache_dir() -> Path:
    """Where the OHIF package is unpacked once per version (``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "uad-node" / "ohif" / OHIF_VERSION


def ohif_dist() -> Path:
    """OHIF's prebuilt viewer (``package/dist``), fetched with ``npm pack`` the first time and reused after.

    ``npm pack`` fetches the one published tarball: the viewer is prebuilt, so none of its build dependencies
    are installed. The package is unpacked beside a marker written last, so an interrupted fetch is redone."""
    folder = cache_dir()
    dist, marker = folder / "package" / "dist", folder / "complete"
    if marker.exists() and (dist / "index.html").exists():
        return dist
    npm = require_tool("npm")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=folder) as download:
        run = subprocess.run(
            [npm, "pack", f"{OHIF_PACKAGE}@{OHIF_VERSION}", "--pack-destination", download, "--silent"],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=download,
        )
        assert run.returncode == 0, f"npm pack {OHIF_PACKAGE}@{OHIF_VERSION} failed: {run.stderr[-2000:]}"
        [tarball] = Path(download).glob("*.tgz")
        with tarfile.open(tarball) as archive:
            archive.extractall(folder, filter="data")
    marker.write_text(f"{OHIF_PACKAGE}@{OHIF_VERSION}\n")
    return dist


def app_config(name: str) -> str:
    """OHIF's ``app-config.js``: one DICOMweb data source at this origin's ``/dicom-web`` (Orthanc behind nginx)."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": name,
            "name": "orthanc",
            "wadoUriRoot": DICOMWEB_ROOT,
            "qidoRoot": DICOMWEB_ROOT,
            "wadoRoot": DICOMWEB_ROOT,
            "qidoSupportsIncludeField": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 1,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "defaultDataSourceName": "orthanc",
        "dataSources": [source],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


@dataclass
class Viewer:
    """OHIF served at ``url`` (nginx on 127.0.0.1), DICOMweb at ``url + /dicom-web``."""

    url: str
    process: subprocess.Popen[bytes]


@contextmanager
def running_viewer(folder: Path, dist: Path, orthanc_http_port: int) -> Iterator[Viewer]:
    """nginx serving ``dist`` (any unknown path answers index.html, as OHIF's router needs) with its own
    app-config.js, and forwarding ``/dicom-web/`` to Orthanc's DICOMweb plugin: one origin, so no CORS. Stopped
    when the block ends."""
    nginx = require_tool("nginx")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "app-config.js").write_text(app_config("Orthanc (uad-node test)"))
    port = free_port()
    user = "user root;" if os.geteuid() == 0 else ""  # workers must read the cache under /root
    temp = "\n".join(
        f"  {kind}_temp_path {folder / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (folder / "nginx.conf").write_text(
        f"""{user}
daemon off;
worker_processes 1;
pid {folder / "nginx.pid"};
error_log {folder / "error.log"} warn;
events {{ worker_connections 256; }}
http {{
  include /etc/nginx/mime.types;
  default_type application/octet-stream;
  access_log {folder / "access.log"};
{temp}
  server {{
    listen 127.0.0.1:{port};
    root {dist};
    location = /app-config.js {{ alias {folder / "app-config.js"}; }}
    location {DICOMWEB_ROOT}/ {{
      proxy_pass http://127.0.0.1:{orthanc_http_port};
      proxy_set_header Host $http_host;
      proxy_read_timeout 60s;
    }}
    location / {{ try_files $uri /index.html; }}
  }}
}}
"""
    )
    with open(folder / "nginx.out", "wb") as log:
        process = subprocess.Popen(
            [nginx, "-c", str(folder / "nginx.conf"), "-p", str(folder), "-e", str(folder / "error.log")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, process, timeout_s=10)
        yield Viewer(url=f"http://127.0.0.1:{port}", process=process)
    finally:
        stop_process(process)


@dataclass
class Browser:
    """One page of headless Chromium, driven over CDP; console messages and uncaught exceptions are collected."""

    process: subprocess.Popen[bytes]
    socket: Any  # websocket.WebSocket
    console: list[str] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def send(self, method: str, timeout_s: float = 30.0, **params: Any) -> dict[str, Any]:
        """One CDP command; events that arrive meanwhile are recorded. Raises on a protocol error."""
        ident = next(self._ids)
        self.socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.socket.settimeout(max(0.1, deadline - time.monotonic()))
            message = json.loads(self.socket.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._record(message)
        raise TimeoutError(f"{method}: no answer in {timeout_s} s")

    def _record(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", []))
            self.console.append(f"{params.get('type')}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.console.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            self.console.append(f"log {entry.get('level')}: {entry.get('text')}")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float, what: str) -> Any:
        """Poll a JavaScript expression until it is truthy; fail with ``what`` and the console after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            self.pump(0.25)
        raise AssertionError(f"{what}: not seen in {timeout_s} s; console:\n" + "\n".join(self.console[-30:]))

    def pump(self, seconds: float) -> None:
        """Receive events for ``seconds`` (console messages keep arriving while the page works)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.socket.settimeout(left)
            try:
                self._record(json.loads(self.socket.recv()))
            except TimeoutError:
                return
            except Exception as exc:  # websocket-client raises its own timeout type
                if type(exc).__name__ != "WebSocketTimeoutException":
                    raise
                return

    def double_click(self, x: float, y: float) -> None:
        """A real double click (mouse events through the browser's input pipeline, as a person's)."""
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for count in (1, 2):
            for kind in ("mousePressed", "mouseReleased"):
                self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=count)

    def click(self, x: float, y: float) -> None:
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path


@contextmanager
def running_browser(folder: Path, width: int = 1600, height: int = 1000) -> Iterator[Browser]:
    """Headless Debian Chromium on a blank page with CDP on a free loopback port; always stopped.

    WebGL runs on SwiftShader (no GPU here), as OHIF's image rendering needs it."""
    import websocket  # websocket-client

    chromium = require_tool("chromium")
    profile = folder / "profile"
    profile.mkdir(parents=True, exist_ok=True)
    args = [
        chromium,
        "--headless=new",
        "--no-sandbox",  # as root (CI): Chromium refuses its sandbox; the page is our own, on loopback
        "--disable-dev-shm-usage",
        "--use-angle=swiftshader",
        "--enable-unsafe-swiftshader",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        "about:blank",
    ]
    with open(folder / "chromium.log", "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    socket = None
    try:
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (active.exists() and active.read_text().count("\n") >= 1):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("Chromium did not start: " + (folder / "chromium.log").read_text()[-2000:])
            time.sleep(0.1)
        port = int(active.read_text().splitlines()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            [page] = [target for target in json.loads(response.read()) if target["type"] == "page"]
        socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        browser = Browser(process=process, socket=socket)
        for domain in ("Runtime", "Log", "Page"):
            browser.send(f"{domain}.enable")
        browser.send(
            "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False
        )
        yield browser
    finally:
        if socket is not None:
            socket.close()
        stop_process(process)
