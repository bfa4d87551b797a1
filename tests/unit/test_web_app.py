"""The HTTP interface (node/web) served by uvicorn on loopback, over a real receiver, SQLite database and job
store: readiness part by part, metrics after real C-STOREs, the token rules of the write actions, the status
page without patient data, and HTTPS with the [tls] certificate."""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import MRImageStorage
from sqlalchemy import select, update
from starlette.applications import Starlette

from node.config import NodeConfig
from node.db import Job, Series
from node.db.database import Database, open_database
from node.jobs.states import JobState
from node.jobs.store import JobStore, Snapshot
from node.network import set_tcp_nodelay
from node.receiver import Receiver
from node.status import collect_status
from node.web.app import create_app
from node.web.health import ReadinessChecks
from node.web.metrics import NodeMetrics
from node.web.queries import job_counts
from node.web.stow import StowReceiver
from tests.mr_files import mr_series
from tests.peers import free_port, require_tool
from tests.web_peers import served

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def node_config(data_dir: Path, *, token: str = TOKEN, min_free_disk_mb: int = 1, **web: object) -> NodeConfig:
    return NodeConfig.model_validate(
        {
            "node": {"port": free_port(), "data_dir": str(data_dir), "min_free_disk_mb": min_free_disk_mb},
            "web": {"enabled": True, "port": free_port(), "token": token, **web},
        }
    )


@dataclass
class Node:
    """The parts ``run_node`` wires together, minus the scheduler (its model states are a dict here)."""

    config: NodeConfig
    db: Database
    receiver: Receiver
    metrics: NodeMetrics
    models: dict[str, str] = field(default_factory=dict)

    def app(self, stow: StowReceiver | None = None) -> Starlette:
        checks = ReadinessChecks(lambda: self.receiver.listening, self.db, lambda: self.models, self.config.node)
        return create_app(self.config, self.db, checks, self.metrics, stow=stow)


def make_node(tmp_path: Path, db: Database, **options: Any) -> Node:
    config = node_config(tmp_path / "data", **options)
    metrics = NodeMetrics(lambda: job_counts(db), tmp_path)
    return Node(config, db, Receiver(config=config, db=db, observer=metrics), metrics)


@pytest.fixture
def node(tmp_path: Path, db: Database) -> Iterator[Node]:
    made = make_node(tmp_path, db)
    yield made
    made.receiver.stop(grace_s=1)


def c_store(node: Node, datasets: list[Dataset]) -> list[int]:
    """Send over one pynetdicom association; returns the statuses."""
    ae = AE(ae_title="SCANNER1")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate(
        "127.0.0.1", node.config.node.port, ae_title="UADNODE", evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)]
    )
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def add_job(db: Database, state: JobState, **values: object) -> int:
    """A new job (next version) of the first stored series, moved to ``state`` with ``values`` set on its row."""
    [study] = collect_status(db)
    series = study.series[0]
    store = JobStore(db)
    with db.session.begin() as session:
        row = session.scalars(select(Series).where(Series.series_uid == series.series_uid)).one()
        latest = store.latest(session, row.id)
        version = latest.version + 1 if latest else 1
        snapshot = Snapshot(row.id, study.study_uid, series.series_uid, series.instances, 1, row.first_received_at)
        job = store.create(session, snapshot, JobState.QUEUED, "selected: T1", "/models/t1.pt", version)
        session.execute(update(Job).where(Job.id == job.id).values(state=str(state), **values))
        return job.id


@dataclass
class FakeStow:
    """Stands in for node.dicomweb.stow_rs (another module's job): records what the app hands over."""

    calls: list[tuple[bytes, str, str, str]] = field(default_factory=list)

    def receive(self, body: bytes, content_type: str, sender: str, *, host: str = "") -> StowAnswer:
        self.calls.append((body, content_type, sender, host))
        return StowAnswer(200, b'{"00081199": {"vr": "SQ"}}', "application/dicom+json")


@dataclass(frozen=True)
class StowAnswer:
    status: int
    body: bytes
    content_type: str


# -- readiness ----------------------------------------------------------------------------------------------


def test_healthz_always_and_readyz_names_each_failing_part(node: Node, tmp_path: Path) -> None:
    node.models["T1"] = "loading"
    with served(node.app(), node.config) as http:
        assert http.get("/healthz").status_code == 200
        not_ready = http.get("/readyz")
        assert not_ready.status_code == 503
        parts = not_ready.json()["parts"]
        assert not parts["scp"]["ok"] and "not listening" in parts["scp"]["detail"]
        assert not parts["models"]["ok"] and parts["models"]["detail"] == "T1: loading"
        assert parts["database"]["ok"] and parts["disk"]["ok"]

        node.receiver.start()
        assert http.get("/readyz").json()["parts"]["scp"]["ok"]
        assert http.get("/readyz").status_code == 503  # the model still loads
        node.models["T1"] = "loaded"
        ready = http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        node.models["T1"] = "failed: no calibrated threshold"
        assert http.get("/readyz").json()["parts"]["models"]["detail"] == "T1: failed: no calibrated threshold"
        node.receiver.stop(grace_s=1)
        assert http.get("/readyz").json()["parts"]["scp"]["ok"] is False


def test_readyz_fails_below_the_disk_floor_and_without_a_database(tmp_path: Path, db: Database) -> None:
    full = make_node(tmp_path, db, min_free_disk_mb=2**40)  # a petabyte floor: "full"
    with served(full.app(), full.config) as http:
        full.receiver.start()
        try:
            answer = http.get("/readyz")
        finally:
            full.receiver.stop(grace_s=1)
    assert answer.status_code == 503
    assert not answer.json()["parts"]["disk"]["ok"] and "refusing images" in answer.json()["parts"]["disk"]["detail"]

    gone = open_database(f"sqlite:///{tmp_path / 'no-such-dir' / 'x' / 'db.sqlite'}", migrate=False)
    (tmp_path / "no-such-dir" / "x").rmdir()  # open_database made the folder; without it SQLite cannot open
    broken = make_node(tmp_path, gone)
    with served(broken.app(), broken.config) as http:
        part = http.get("/readyz").json()["parts"]["database"]
    gone.close()
    assert part["ok"] is False and "does not answer" in part["detail"]


# -- metrics --------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the refused instance's UID, on purpose
def test_metrics_count_real_c_stores_and_read_jobs_from_the_database(node: Node) -> None:
    node.receiver.start()
    good = mr_series(3)
    bad = mr_series(1)[0]
    bad.StudyInstanceUID = "not-a-uid"
    assert c_store(node, [*good, bad]) == [0, 0, 0, 0xC000]
    add_job(node.db, JobState.DONE)
    add_job(node.db, JobState.QUEUED)
    with served(node.app(), node.config) as http:
        answer = http.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    values = samples(answer.text)
    assert values[("uad_instances_received_total", (("sop_class", "MRImageStorage"),))] == 3
    assert values[("uad_instances_refused_total", (("reason", "cannot_understand"),))] == 1
    assert values[("uad_instances_refused_total", (("reason", "out_of_resources"),))] == 0
    assert values[("uad_store_seconds_count", ())] == 4
    assert 0 < values[("uad_store_seconds_sum", ())] < 10
    jobs = {labels[0][1]: v for (name, labels), v in values.items() if name == "uad_jobs"}
    assert jobs == {state.value: (1 if state in (JobState.DONE, JobState.QUEUED) else 0) for state in JobState}
    assert values[("uad_disk_free_bytes", ())] > 0


def test_job_and_model_hooks_become_metrics(node: Node) -> None:
    node.metrics.stage_finished("inferring", 4.2)
    node.metrics.export_finished("pacs", "retry")
    node.metrics.export_finished("pacs", "delivered")
    node.metrics.model_loaded("T1", 1.5)
    with served(node.app(), node.config) as http:
        values = samples(http.get("/metrics").text)
    assert values[("uad_job_stage_seconds_count", (("stage", "inferring"),))] == 1
    assert values[("uad_job_stage_seconds_bucket", (("le", "5.0"), ("stage", "inferring")))] == 1
    assert values[("uad_job_stage_seconds_bucket", (("le", "2.5"), ("stage", "inferring")))] == 0
    assert values[("uad_exports_total", (("destination", "pacs"), ("outcome", "retry")))] == 1
    assert values[("uad_exports_total", (("destination", "pacs"), ("outcome", "delivered")))] == 1
    assert values[("uad_model_load_seconds", (("model", "T1"),))] == 1.5


def test_each_app_has_its_own_registry(tmp_path: Path, db: Database) -> None:
    first, second = make_node(tmp_path, db), make_node(tmp_path, db)
    first.metrics.stored("1.2.840.10008.5.1.4.1.1.4", 0.01)
    assert first.metrics.registry is not second.metrics.registry
    assert b"uad_instances_received_total" in first.metrics.exposition()
    assert b"uad_instances_received_total{" not in second.metrics.exposition()


# -- write actions ---------------------------------------------------------------------------------------------


def test_retry_and_cancel_need_the_bearer_token(node: Node) -> None:
    node.receiver.start()
    c_store(node, mr_series(2))
    queued = add_job(node.db, JobState.QUEUED)
    with served(node.app(), node.config) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            refused = http.post(f"/jobs/{queued}/cancel", headers=headers)
            assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
        assert JobStore(node.db).get(queued).state is JobState.QUEUED

        cancelled = http.post(f"/jobs/{queued}/cancel", headers=AUTH)
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        assert JobStore(node.db).get(queued).state is JobState.CANCELLED
        again = http.post(f"/jobs/{queued}/cancel", headers=AUTH)
        assert again.status_code == 409 and "already cancelled" in again.json()["error"]

        retried = http.post(f"/jobs/{queued}/retry", headers=AUTH)  # the CLI's retry: back to the queue
        assert retried.status_code == 200 and retried.json()["state"] == "queued"
        assert http.post("/jobs/999/retry", headers=AUTH).status_code == 404
        assert http.get(f"/jobs/{queued}/retry").status_code == 405


def test_stow_rs_goes_to_the_receiver_only_with_the_token(node: Node) -> None:
    stow = FakeStow()
    multipart = 'multipart/related; type="application/dicom"; boundary=xyz'
    with served(node.app(stow), node.config) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            assert http.post("/dicomweb/studies", content=b"--xyz--", headers=headers).status_code == 401
        assert stow.calls == []
        answer = http.post("/dicomweb/studies", content=b"--xyz--", headers={**AUTH, "Content-Type": multipart})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/dicom+json"
    assert answer.content == b'{"00081199": {"vr": "SQ"}}'
    assert stow.calls == [(b"--xyz--", multipart, "STOW-RS", "127.0.0.1")]


def test_without_a_token_write_actions_are_disabled(tmp_path: Path, db: Database) -> None:
    node = make_node(tmp_path, db, token="")
    stow = FakeStow()
    with served(node.app(stow), node.config) as http:
        for path in ("/jobs/1/retry", "/jobs/1/cancel", "/dicomweb/studies"):
            answer = http.post(path, headers=AUTH)
            assert answer.status_code == 403 and "disabled" in answer.json()["error"]
        page = http.get("/").text
    assert stow.calls == []
    assert "admin token" not in page and "<button" not in page and "Authorization" not in page


def test_no_stow_route_without_a_receiver(node: Node) -> None:
    with served(node.app(), node.config) as http:
        assert http.post("/dicomweb/studies", headers=AUTH).status_code == 404


# -- the status page ---------------------------------------------------------------------------------------------


def test_status_page_shows_series_jobs_and_summary_without_patient_data(node: Node, tmp_path: Path) -> None:
    node.receiver.start()
    series = mr_series(3)
    c_store(node, series)
    results = tmp_path / "results"
    results.mkdir()
    png = b"\x89PNG\r\n\x1a\n" + b"0" * 32
    (results / "summary.png").write_bytes(png)
    report = '{"analysed": true, "anomaly_volume_ml": 3.25, "components": 2, "max_score": 0.5, "threshold": 0.4}'
    done = add_job(node.db, JobState.DONE, results_dir=str(results), report=report, reason="delivered to pacs")
    queued = add_job(node.db, JobState.QUEUED)
    with served(node.app(), node.config) as http:
        page = http.get("/")
        image = http.get(f"/jobs/{done}/summary.png")
        missing = http.get(f"/jobs/{queued}/summary.png")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert series[0].SeriesInstanceUID in html and series[0].StudyInstanceUID in html and "T1 AX" in html
    assert "3.2 mL" in html and "delivered to pacs" in html and f'href="jobs/{done}/summary.png"' in html
    assert f'data-action="cancel" data-job="{queued}"' in html and f'data-action="retry" data-job="{done}"' in html
    assert "TEST^PATIENT" not in html and "TEST-0001" not in html
    assert image.status_code == 200 and image.headers["content-type"] == "image/png" and image.content == png
    assert missing.status_code == 404


# -- HTTPS ---------------------------------------------------------------------------------------------------------


def test_https_uses_the_tls_certificate(tmp_path: Path, db: Database) -> None:
    openssl = require_tool("openssl")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "web.key", "-out", "web.pem", "-days", "1", "-subj", "/CN=127.0.0.1"],
        cwd=tmp_path, check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    config = NodeConfig.model_validate(
        {
            "node": {"port": free_port(), "data_dir": str(tmp_path / "data")},
            "tls": {"certificate": str(tmp_path / "web.pem"), "private_key": str(tmp_path / "web.key")},
            "web": {"enabled": True, "port": free_port(), "https": True},
        }
    )
    metrics = NodeMetrics(lambda: job_counts(db), tmp_path)
    checks = ReadinessChecks(lambda: False, db, dict, config.node)
    with served(create_app(config, db, checks, metrics), config) as http:
        answer = http.get("/healthz")
        assert answer.status_code == 200 and answer.url.scheme == "https"
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(str(answer.url).replace("https", "http"), timeout=5)
        # the DICOM port's policy: ECDHE with an AEAD cipher, so nothing older than TLS 1.2
        for client in (_tls_client(maximum=ssl.TLSVersion.TLSv1_1), _tls_client(ciphers="ECDHE+AES256+SHA384")):
            with pytest.raises(ssl.SSLError), socket.create_connection(("127.0.0.1", config.web.port), 5) as raw:
                client.wrap_socket(raw, server_hostname="127.0.0.1").close()


def _tls_client(maximum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2, ciphers: str = "DEFAULT") -> ssl.SSLContext:
    """A client that trusts anything and offers only what it is given (TLS 1.0 needs security level 0)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.minimum_version, context.maximum_version = ssl.TLSVersion.TLSv1, maximum
    context.set_ciphers(f"{ciphers}:@SECLEVEL=0")
    return context
