"""DICOMweb against real peers on 127.0.0.1: the sender's STOW-RS to Orthanc with its DICOMweb plugin
(Debian orthanc-dicomweb), the same sender against the node's own StowReceiver behind a small real HTTP
server, and Orthanc's own DICOMweb client sending to that receiver.

Every server a test starts is stopped at teardown; every network wait is a few seconds at most.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlalchemy import select

from node.config import Destination, NodeConfig
from node.db import Instance, open_database
from node.db.database import Database
from node.demo.pacs import stop_process
from node.dicomweb.stow_rs import StowReceiver
from node.receiver.storage import InstanceStore
from node.sender import DeliveryState, Sender
from tests.integration.test_sender import FAST, NODE_AE, make_sender, mr_files, sc_file, uids_of
from tests.mr_files import MR_IMAGE_STORAGE
from tests.peers import Orthanc, free_port, require_tool, running_orthanc, wait_for_port

pytestmark = pytest.mark.peers

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
HOST = "127.0.0.1"


def dicomweb_settings(**extra: object) -> dict[str, object]:
    """Orthanc settings that load the DICOMweb plugin at /dicom-web/, or skip (fail under UAD_REQUIRE_PEERS=1)."""
    if not PLUGIN.is_file():
        message = f"{PLUGIN} is missing (apt-get install orthanc-dicomweb)"
        if os.environ.get("UAD_REQUIRE_PEERS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return {"Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/", **extra}}


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = open_database(f"sqlite:///{tmp_path / 'node.sqlite'}")
    yield database
    database.close()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with running_orthanc(
        tmp_path_factory.mktemp("orthanc"), {"uadnode": NODE_AE}, settings=dicomweb_settings()
    ) as pacs:
        yield pacs


@contextmanager
def orthanc_on_http_port(folder: Path, http_port: int) -> Iterator[Orthanc]:
    """Orthanc with DICOMweb on a given HTTP port (``running_orthanc`` picks its own), always stopped."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "DicomPort": free_port(),
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        **dicomweb_settings(),
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    with open(folder / "orthanc.log", "wb") as log:
        process = subprocess.Popen([require_tool("Orthanc"), str(folder / "orthanc.json")], stdout=log, stderr=log)
    try:
        wait_for_port(http_port, process)
        yield Orthanc(dicom_port=int(config["DicomPort"]), http_port=http_port, process=process)  # type: ignore[call-overload]
    finally:
        stop_process(process)


def web_destination(url: str, name: str = "web", headers: dict[str, str] | None = None) -> Destination:
    return Destination(name=name, type="dicomweb", url=url, headers=headers or {})


def orthanc_url(pacs: Orthanc) -> str:
    return f"http://{HOST}:{pacs.http_port}/dicom-web"


def orthanc_uids(pacs: Orthanc, auth: str | None = None) -> set[str]:
    """SOP Instance UIDs Orthanc holds, from its REST API."""
    request = urllib.request.Request(f"http://{HOST}:{pacs.http_port}/instances?expand")
    if auth:
        request.add_header("Authorization", auth)
    with urllib.request.urlopen(request, timeout=10) as response:
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in json.loads(response.read())}


def results(folder: Path, study_uid: str | None = None) -> list[Path]:
    """Three MR slices and an RGB Secondary Capture of the same study, like a job's result folder."""
    files = mr_files(folder, 3, study_uid=study_uid)
    return [*files, sc_file(folder, read_study(files[0]))]


def read_study(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


# ---------------------------------------------------------------------------------------------
# the node's StowReceiver behind a small real HTTP server


@dataclass
class StowServer:
    """POST /dicomweb/studies -> ``StowReceiver.receive``; counts the parts it was sent."""

    receiver: StowReceiver
    port: int = 0
    parts_received: int = 0
    requests: int = 0
    _server: ThreadingHTTPServer | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> StowServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.rstrip("/") != "/dicomweb/studies":
                    self.send_error(404)
                    return
                body = self._body()
                content_type = self.headers.get("Content-Type", "")
                reply = owner.receiver.receive(body, content_type, "WEBCLIENT", host=self.client_address[0])
                owner.requests += 1
                owner.parts_received += body.count(b"Content-Type: application/dicom")
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            def _body(self) -> bytes:
                """The request body, also when sent chunked (Orthanc's DICOMweb client does by default)."""
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length", "0")))
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline().strip():  # trailer fields, up to the empty line
                    pass
                return b"".join(chunks)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's naming)
                pass

        self._server = ThreadingHTTPServer((HOST, self.port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/dicomweb"


@contextmanager
def stow_server(tmp_path: Path, **storage: object) -> Iterator[tuple[StowServer, Database]]:
    """A receiving node (store + database under ``tmp_path/receiver``) behind HTTP; stopped at exit."""
    folder = tmp_path / "receiver"
    folder.mkdir(parents=True, exist_ok=True)
    database = open_database(f"sqlite:///{folder / 'node.sqlite'}")
    store = InstanceStore(folder / "data", database, {MR_IMAGE_STORAGE}, min_free_bytes=0)
    config = NodeConfig.model_validate({"storage": storage} if storage else {})
    server = StowServer(StowReceiver(config, store, database)).start()
    try:
        yield server, database
    finally:
        server.stop()
        database.close()


def stored_uids(database: Database) -> set[str]:
    with database.session() as session:
        return set(session.scalars(select(Instance.sop_instance_uid).where(Instance.stored)))


# ---------------------------------------------------------------------------------------------
# out: STOW-RS to Orthanc


def test_orthanc_receives_results_by_stow_rs_once(db: Database, orthanc: Orthanc, tmp_path: Path) -> None:
    files = results(tmp_path / "out")
    sender = make_sender(db)
    dest = web_destination(orthanc_url(orthanc))

    result = sender.deliver(dest, files, "1.2.3.100", FAST)

    assert (result.outcome, result.delivered, result.sent, result.attempts) == ("delivered", 4, 4, 1)
    assert uids_of(files) <= orthanc_uids(orthanc)
    rows = sender.ledger.for_source_series("1.2.3.100")
    assert {(r.state, r.last_status, r.attempts, r.destination) for r in rows} == {
        (DeliveryState.DELIVERED, 0, 1, "web")
    }
    again = sender.send_once(dest, files, "1.2.3.100")
    assert (again.outcome, again.sent, again.delivered) == ("delivered", 0, 4)


def test_orthanc_down_is_retried_and_delivered_once_it_is_up(db: Database, tmp_path: Path) -> None:
    port = free_port()
    files = results(tmp_path / "out")
    sender = make_sender(db)
    dest = web_destination(f"http://{HOST}:{port}/dicom-web")

    first = sender.send_once(dest, files, "1.2.3.101")
    assert (first.outcome, first.failed_transient, first.sent) == ("retry", 4, 0)
    assert "cannot reach" in first.error and first.retry_after_s is not None

    outcome: dict[str, object] = {}
    worker = threading.Thread(target=lambda: outcome.update(result=sender.deliver(dest, files, "1.2.3.101", FAST)))
    started = time.monotonic()
    worker.start()
    time.sleep(0.5)  # let at least one more attempt find nobody listening
    with orthanc_on_http_port(tmp_path / "orthanc", port) as pacs:
        worker.join(timeout=30)
        assert not worker.is_alive()
        result = outcome["result"]
        assert result.outcome == "delivered", result  # type: ignore[attr-defined]
        assert result.attempts >= 2  # type: ignore[attr-defined]
        assert uids_of(files) <= orthanc_uids(pacs)
    assert time.monotonic() - started < 30
    rows = sender.ledger.for_source_series("1.2.3.101")
    assert {r.state for r in rows} == {DeliveryState.DELIVERED}
    assert min(r.attempts for r in rows) >= 3  # the send_once, at least one refused retry, the success


def test_wrong_url_is_a_permanent_rejection_and_not_retried(db: Database, orthanc: Orthanc, tmp_path: Path) -> None:
    files = results(tmp_path / "out")
    sender = make_sender(db)
    dest = web_destination(f"http://{HOST}:{orthanc.http_port}/no-such-root", name="wrong")

    started = time.monotonic()
    result = sender.deliver(dest, files, "1.2.3.102", FAST)

    assert (result.outcome, result.failed_permanent, result.attempts, result.retry_after_s) == ("failed", 4, 1, None)
    assert "HTTP 404" in result.error
    assert time.monotonic() - started < 5  # no backoff wait
    assert {(r.state, r.attempts) for r in sender.ledger.for_source_series("1.2.3.102")} == {
        (DeliveryState.FAILED_PERMANENT, 1)
    }
    again = sender.send_once(dest, files, "1.2.3.102")  # a scheduler calling again does not send them
    assert (again.outcome, again.sent, again.failed_permanent) == ("failed", 0, 4)
    assert {r.attempts for r in sender.ledger.for_source_series("1.2.3.102")} == {1}
    assert not uids_of(files) & orthanc_uids(orthanc)


def test_orthanc_with_authentication_needs_the_configured_header(db: Database, tmp_path: Path) -> None:
    settings = {**dicomweb_settings(), "AuthenticationEnabled": True, "RegisteredUsers": {"node": "s3cret"}}
    auth = "Basic " + base64.b64encode(b"node:s3cret").decode()
    files = results(tmp_path / "out")
    sender = make_sender(db)
    with running_orthanc(tmp_path / "orthanc", {}, settings=settings) as pacs:
        refused = sender.deliver(web_destination(orthanc_url(pacs), name="anonymous"), files, "1.2.3.103", FAST)
        assert (refused.outcome, refused.failed_permanent, refused.attempts) == ("failed", 4, 1)
        assert "HTTP 401" in refused.error

        dest = web_destination(orthanc_url(pacs), name="authorized", headers={"Authorization": auth})
        result = sender.deliver(dest, files, "1.2.3.103", FAST)
        assert (result.outcome, result.delivered) == ("delivered", 4)
        assert uids_of(files) <= orthanc_uids(pacs, auth)


# ---------------------------------------------------------------------------------------------
# out: STOW-RS to the node's own receiver (per-instance answers, exactly once)


def test_delivery_is_not_repeated_after_a_restart(tmp_path: Path) -> None:
    files = results(tmp_path / "out")
    url = f"sqlite:///{tmp_path / 'sender.sqlite'}"
    with stow_server(tmp_path) as (server, received):
        dest = web_destination(server.url)
        first_db = open_database(url)
        try:
            partial = make_sender(first_db).send_once(dest, files[:2], "1.2.3.104")
            assert (partial.outcome, partial.sent) == ("delivered", 2)
        finally:
            first_db.close()  # the node stops

        restarted = open_database(url)
        try:
            sender = make_sender(restarted)
            result = sender.send_once(dest, files, "1.2.3.104")
            assert (result.outcome, result.sent, result.delivered) == ("delivered", 2, 4)  # only the rest
            again = sender.send_once(dest, files, "1.2.3.104")
            assert (again.sent, again.delivered) == (0, 4)
        finally:
            restarted.close()
        assert server.parts_received == 4  # each instance crossed the network once
        assert stored_uids(received) == uids_of(files[:3])  # the SC is acknowledged, not kept (MR only)


def test_per_instance_failures_map_to_permanent_and_transient(db: Database, tmp_path: Path) -> None:
    files = results(tmp_path / "out")
    sender = make_sender(db)
    with stow_server(tmp_path / "reject", other_sop_classes="reject") as (server, received):
        result = sender.deliver(web_destination(server.url), files, "1.2.3.105", FAST)
        # 202: the MR slices stored, the SC refused with 0x0122 (SOP class not supported) for good
        assert (result.outcome, result.delivered, result.failed_permanent, result.attempts) == ("failed", 3, 1, 1)
        assert "0x0122" in result.error
        assert stored_uids(received) == uids_of(files[:3])
    by_state = {r.sop_instance_uid: (r.state, r.last_status) for r in sender.ledger.for_source_series("1.2.3.105")}
    [sc_uid] = uids_of(files[3:])
    assert by_state[sc_uid] == (DeliveryState.FAILED_PERMANENT, 0x0122)

    with stow_server(tmp_path / "closing") as (server, received):
        server.receiver.store.close()  # shutting down: 0xA700 for everything, which is worth another try
        dest = web_destination(server.url, name="busy")
        first = sender.send_once(dest, files, "1.2.3.106")
        assert (first.outcome, first.failed_transient) == ("retry", 4)
        assert {r.last_status for r in sender.ledger.for_source_series("1.2.3.106")} == {0xA700}
        server.receiver.store = InstanceStore(
            tmp_path / "closing" / "receiver" / "data", received, {MR_IMAGE_STORAGE}, min_free_bytes=0
        )  # back up
        result = sender.deliver(dest, files, "1.2.3.106", FAST)
        assert (result.outcome, result.delivered) == ("delivered", 4)
        assert stored_uids(received) == uids_of(files[:3])


# ---------------------------------------------------------------------------------------------
# in: Orthanc's own DICOMweb client sends to the node's StowReceiver


def test_orthanc_stow_client_stores_into_the_node(tmp_path: Path) -> None:
    files = mr_files(tmp_path / "out", 3)
    with stow_server(tmp_path) as (server, received):
        settings = dicomweb_settings(Servers={"node": [server.url + "/"]})
        with running_orthanc(tmp_path / "orthanc", {}, settings=settings) as pacs:
            base = f"http://{HOST}:{pacs.http_port}"
            for path in files:
                upload = urllib.request.Request(f"{base}/instances", data=path.read_bytes(), method="POST")
                with urllib.request.urlopen(upload, timeout=10) as response:
                    study = json.loads(response.read())["ParentStudy"]
            stow = urllib.request.Request(
                f"{base}/dicom-web/servers/node/stow",
                data=json.dumps({"Resources": [study], "Synchronous": True}).encode(),
                method="POST",
            )
            with urllib.request.urlopen(stow, timeout=30) as response:
                assert response.status == 200
        assert stored_uids(received) == uids_of(files)
        assert server.requests >= 1
        with received.session() as session:
            assert set(session.scalars(select(Instance.calling_ae))) == {"WEBCLIENT"}


def test_sender_is_usable_for_both_types_side_by_side(db: Database, orthanc: Orthanc, tmp_path: Path) -> None:
    """One Sender, one ledger: a DIMSE and a DICOMweb destination of the same Orthanc keep separate rows."""
    files = results(tmp_path / "out")
    sender: Sender = make_sender(db)
    dimse = Destination(name="dimse", ae_title=orthanc.ae_title, host=HOST, port=orthanc.dicom_port)
    web = web_destination(orthanc_url(orthanc))
    assert sender.deliver(dimse, files, "1.2.3.107", FAST).outcome == "delivered"
    assert sender.deliver(web, files, "1.2.3.107", FAST).sent == 4
    rows = sender.ledger.for_source_series("1.2.3.107")
    assert sorted((r.destination, r.state) for r in rows) == sorted(
        [("dimse", DeliveryState.DELIVERED)] * 4 + [("web", DeliveryState.DELIVERED)] * 4
    )
