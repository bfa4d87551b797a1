"""The HTTP interface inside a real ``uad-node serve`` (subprocess): a study sent by dcmtk storescu, analysed by
the fast test model and delivered to a real Orthanc; a real Prometheus server scrapes /metrics; /readyz goes
from 503 (model loading) to 200; the token guards retry; the status page is rendered by headless Chromium; the
job gauges are right again after a restart.

Everything runs on loopback; every process started here is stopped at the end of the module."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmwrite
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.demo.pacs import stop_process
from node.demo.series_writer import SYNTHETIC_PATIENT_ID, SYNTHETIC_PATIENT_NAME
from node.jobs.states import JobState
from node.jobs.store import JobRecord
from tests.integration.test_node_jobs import jobs_of, send, sent, wait_for, write_study
from tests.mr_files import mr_series
from tests.peers import REPO, NodeProcess, Orthanc, free_port, node_config, require_tool, running_orthanc, wait_for_port
from tests.tiny_model import write_fast_checkpoint

TOKEN = "integration-token-42"
READY_S = 120.0  # loading torch and the model on a busy 2-core machine
pytestmark = pytest.mark.peers


@dataclass
class Site:
    """The node, its HTTP address, the PACS and the study it received."""

    node: NodeProcess
    http: httpx.Client
    orthanc: Orthanc
    study_uid: str
    t1_uid: str
    localizer_uid: str
    sent_files: int
    readiness: list[tuple[int, dict]]  # /readyz answers from start-up until ready


def metrics(http: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = http.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def readiness_until_ready(http: httpx.Client, node: NodeProcess) -> list[tuple[int, dict]]:
    """/readyz from the moment the node listens until it answers 200 (or READY_S passes)."""
    answers: list[tuple[int, dict]] = []
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        answer = http.get("/readyz")
        answers.append((answer.status_code, answer.json()))
        if answer.status_code == 200:
            return answers
        time.sleep(0.1)
    raise AssertionError(f"not ready after {READY_S} s: {answers[-1]}\n{node.log()[-3000:]}")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("web")
    study_uid, t1_uid, localizer_uid = write_study(folder / "study")
    checkpoint = write_fast_checkpoint(folder / "fast.pt")
    with running_orthanc(folder / "orthanc", {"node": "UADNODE"}) as orthanc:
        port, web_port = free_port(), free_port()
        config = node_config(
            folder,
            port,
            extra=f"""
[selection]
models = {{ T1 = "{checkpoint}" }}

[completion]
series_quiet_s = 2

[jobs]
threads = 1
poll_interval_s = 0.2

[web]
enabled = true
port = {web_port}
token = "{TOKEN}"

[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {orthanc.dicom_port}
""",
        )
        node = NodeProcess(config, folder / "data", port, "UADNODE").start()
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{web_port}", timeout=10) as http:
                sending = send(folder / "study", node.port)  # images need no model: send while it loads
                readiness = readiness_until_ready(http, node)
                sent(sending)
                files = sorted((folder / "study").rglob("*.dcm"))
                yield Site(node, http, orthanc, study_uid, t1_uid, localizer_uid, len(files), readiness)
        finally:
            node.stop()


def test_readyz_is_503_while_the_model_loads_then_200(site: Site) -> None:
    *loading, (status, ready) = site.readiness
    assert status == 200 and all(part["ok"] for part in ready["parts"].values()), ready
    assert ready["parts"]["models"]["detail"] == "loaded: T1"
    for status, body in loading:  # before: only the model may be missing (the SCP listens before the node starts)
        assert status == 503 and [name for name, p in body["parts"].items() if not p["ok"]] == ["models"], body
    print(f"/readyz: {len(loading)} answers 503 (model loading) before 200")


def test_prometheus_scrapes_the_c_stores(site: Site, tmp_path: Path) -> None:
    prometheus = require_tool("prometheus")
    web = site.http.base_url
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        f"scrape_configs: [{{job_name: uad-node, static_configs: [{{targets: ['{web.host}:{web.port}']}}]}}]\n"
    )
    port = free_port()
    process = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"),
    )  # fmt: skip
    try:
        wait_for_port(port, process)
        query = 'sum(uad_instances_received_total{job="uad-node",sop_class="MRImageStorage"})'
        deadline, value = time.monotonic() + 30, None
        while time.monotonic() < deadline:
            answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=5).json()
            result = answer["data"]["result"]
            if result:
                value = float(result[0]["value"][1])
                if value == site.sent_files:
                    break
            time.sleep(0.3)
        assert value == site.sent_files, (value, (tmp_path / "prometheus.log").read_text()[-2000:])
        up = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": "up"}, timeout=5).json()
        assert up["data"]["result"][0]["value"][1] == "1"
    finally:
        stop_process(process, 10)


def all_finished(jobs: list[JobRecord]) -> bool:
    """Both series have jobs and every job ended (on a busy machine a pause mid-send can make a series complete
    early: its late images then make a second version, which is what the node is meant to do)."""
    return len({job.series_uid for job in jobs}) >= 2 and all(job.state.finished for job in jobs)


def newest(jobs: list[JobRecord], series_uid: str) -> JobRecord:
    return max((job for job in jobs if job.series_uid == series_uid), key=lambda job: job.version)


def gauges(values: dict) -> dict[str, float]:
    return {labels[0][1]: v for (name, labels), v in values.items() if name == "uad_jobs"}


def test_the_job_stages_exports_and_model_load_are_measured(site: Site) -> None:
    jobs = wait_for(site.node.data_dir, site.node, all_finished, "both series done")
    assert (newest(jobs, site.t1_uid).state, newest(jobs, site.localizer_uid).state) == ("done", "skipped"), jobs
    analysed = [job for job in jobs if job.preprocessing_at is not None]
    values = metrics(site.http)
    for stage in ("queued", "preprocessing", "inferring"):
        assert values[("uad_job_stage_seconds_count", (("stage", stage),))] >= 1, stage
    assert values[("uad_job_stage_seconds_count", (("stage", "preprocessing"),))] == len(analysed)
    exported = sum(job.exporting_at is not None for job in jobs)
    assert values[("uad_job_stage_seconds_count", (("stage", "exporting"),))] == exported
    assert values[("uad_exports_total", (("destination", "pacs"), ("outcome", "delivered")))] >= 1
    assert values[("uad_model_load_seconds", (("model", "T1"),))] > 0
    assert gauges(values) == {state: sum(job.state == state for job in jobs) for state in JobState}
    assert values[("uad_store_seconds_count", ())] == site.sent_files


def test_status_page_in_headless_chromium(site: Site, tmp_path: Path) -> None:
    chromium = require_tool("chromium")
    stranger = AE(ae_title="STRANGER")
    stranger.add_requested_context(Verification)
    assert stranger.associate("127.0.0.1", site.node.port, ae_title="UADNODE").is_rejected
    deadline = time.monotonic() + 10
    while "association refused" not in (html := site.http.get("/").text) and time.monotonic() < deadline:
        time.sleep(0.1)  # the audit row is written just after the rejection goes out
    assert "association refused" in html and "STRANGER" in html and "association accepted" not in html
    assert site.t1_uid in html and site.localizer_uid in html and "T1 MPRAGE AX" in html
    assert SYNTHETIC_PATIENT_NAME not in html and SYNTHETIC_PATIENT_ID not in html
    t1_job = newest(jobs_of(site.node.data_dir), site.t1_uid)
    summary = site.http.get(f"/jobs/{t1_job.id}/summary.png")
    assert summary.status_code == 200 and summary.content.startswith(b"\x89PNG")

    shot = tmp_path / "status-page.png"
    run = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1440,1100",
         f"--screenshot={shot}", f"{site.http.base_url}/"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000  # a page, not a blank
    (REPO / "runs").mkdir(exist_ok=True)
    shutil.copyfile(shot, REPO / "runs" / "status-page.png")


def test_retry_needs_the_token(site: Site) -> None:
    localizer = newest(jobs_of(site.node.data_dir), site.localizer_uid)
    path = f"/jobs/{localizer.id}/retry"
    assert site.http.post(path).status_code == 401
    assert site.http.post(path, headers={"Authorization": "Bearer not-it"}).status_code == 401
    retried = site.http.post(path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert retried.status_code == 200, retried.text
    assert retried.json()["id"] != localizer.id and retried.json()["state"] == "queued"  # a new version


def test_stow_rs_through_serve_needs_the_token_and_is_counted(site: Site) -> None:
    ds = mr_series(1, seed=7)[0]
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    body = b"--b0\r\nContent-Type: application/dicom\r\n\r\n" + buffer.getvalue() + b"\r\n--b0--\r\n"
    headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b0'}
    before = metrics(site.http)[("uad_instances_received_total", (("sop_class", "MRImageStorage"),))]
    assert site.http.post("/dicomweb/studies", content=body, headers=headers).status_code == 401
    wrong = {**headers, "Authorization": "Bearer not-it"}
    assert site.http.post("/dicomweb/studies", content=body, headers=wrong).status_code == 401
    stored = site.http.post("/dicomweb/studies", content=body, headers={**headers, "Authorization": f"Bearer {TOKEN}"})
    assert stored.status_code == 200, stored.text
    assert stored.headers["content-type"].startswith("application/dicom+json")
    path = site.node.data_dir / "studies" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert path.is_file()
    after = metrics(site.http)[("uad_instances_received_total", (("sop_class", "MRImageStorage"),))]
    assert after == before + 1


def test_job_gauges_are_right_after_a_restart(site: Site) -> None:
    def decided(jobs: list[JobRecord]) -> bool:
        stow_series_decided = len({job.series_uid for job in jobs}) == 3  # the STOW-RS instance's series too
        return all_finished(jobs) and stow_series_decided and newest(jobs, site.localizer_uid).version > 1

    jobs = wait_for(site.node.data_dir, site.node, decided, "the retried localizer skipped again")
    expected = {state: sum(job.state == state for job in jobs) for state in JobState}
    assert expected["skipped"] >= 2 and expected["done"] >= 1
    assert site.node.stop() == 0
    # Without the model: the gauges need none, and a node stopped while it loads one waits for the load (~10 s).
    config = site.node.config_path.read_text()
    site.node.config_path.write_text(re.sub(r"models = \{.*\}", "models = {}", config))
    site.node.start()  # the DICOM port listens after the HTTP one: /metrics answers now
    values = metrics(site.http)
    assert gauges(values) == expected
    assert not any(name == "uad_instances_received_total" for name, _ in values)  # process counters start again
