"""The node end to end: dcmtk ``storescu`` sends studies to ``uad-node serve``; the node completes the series,
decides, analyses and sends SEG and Secondary Captures to a real Orthanc; restarts and a PACS outage lose and
duplicate nothing.

The model is a narrow untrained network on the real model grid (``tests.tiny_model.write_fast_checkpoint``):
every stage runs for real, inference takes about a second. Quiet periods are 1 s to keep the suite fast.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from node.db import open_database
from node.jobs.states import JobState
from node.jobs.store import JobRecord, JobStore
from node.sender import DeliveryState
from node.sender.deliveries import DeliveryLedger
from tests import brains
from tests.dicom_series import AXIAL, SAGITTAL, centred_grid, resample, write_mr_series
from tests.peers import REPO, NodeProcess, Orthanc, free_port, node_config, require_tool, running_orthanc
from tests.tiny_model import write_fast_checkpoint

pytestmark = [pytest.mark.peers, pytest.mark.timeout(900)]

WAIT_S = 180.0  # a generous bound for one analysis on a loaded 2-core machine
ROUTING_SCRIPT = REPO / "deploy" / "orthanc" / "uad-node-routing.lua"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fast_checkpoint(tmp_path_factory.mktemp("model") / "fast.pt")


def write_study(folder: Path, slices: int = 40) -> tuple[str, str, str]:
    """A T1 of Colin27 to analyse and a 3-slice localizer to skip, in one new study: (study, t1, localizer)."""
    colin = brains.colin27(skull=True)
    study_uid = generate_uid()
    t1 = write_mr_series(
        resample(colin, centred_grid(colin, AXIAL, (1.5, 1.5, 3.5), (120, 140, slices))),
        folder / "t1",
        description="T1 MPRAGE AX",
        study_uid=study_uid,
    )
    localizer = write_mr_series(
        resample(colin, centred_grid(colin, SAGITTAL, (2.0, 2.0, 10.0), (64, 64, 3))),
        folder / "localizer",
        description="localizer",
        study_uid=study_uid,
        series_number=2,
    )
    uid = lambda path: str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)  # noqa: E731
    return study_uid, uid(t1[0]), uid(localizer[0])


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str, str]:
    folder = tmp_path_factory.mktemp("study")
    return (folder, *write_study(folder))


@pytest.fixture(scope="module")
def other_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str, str]:
    folder = tmp_path_factory.mktemp("other-study")
    return (folder, *write_study(folder, slices=36))


def config_for(
    tmp_path: Path, port: int, checkpoint: Path, pacs_port: int, extra: str = "", senders: str | None = None
) -> Path:
    return node_config(
        tmp_path,
        port,
        senders=senders,
        extra=f"""
[selection]
models = {{ T1 = "{checkpoint}" }}

[completion]
series_quiet_s = 1
study_quiet_s = 2

[jobs]
threads = 1  # the suite shares two cores with the test process and its peers
poll_interval_s = 0.2
export_first_delay_s = 0.5
export_max_delay_s = 2
{extra}

[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {pacs_port}
""",
    )


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path / "orthanc", {"node": "UADNODE", "scanner": "SCANNER1"}) as pacs:
        yield pacs


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[[Path], NodeProcess]]:
    started: list[NodeProcess] = []

    def start(config: Path) -> NodeProcess:
        node = NodeProcess(config, tmp_path / "data", int(_port_of(config)), "UADNODE").start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


def _port_of(config: Path) -> str:
    return next(line.split("=")[1].strip() for line in config.read_text().splitlines() if line.startswith("port"))


def send(folder: Path, port: int, calling_ae: str = "SCANNER1", called_ae: str = "UADNODE") -> subprocess.Popen[bytes]:
    storescu = require_tool("storescu")
    return subprocess.Popen(
        [storescu, "-aet", calling_ae, "-aec", called_ae, "+sd", "+r", "127.0.0.1", str(port), str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def sent(process: subprocess.Popen[bytes]) -> None:
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err.decode(errors="replace")


def jobs_of(data_dir: Path) -> list[JobRecord]:
    db = open_database(f"sqlite:///{data_dir / 'uad-node.sqlite'}", migrate=False)
    try:
        return JobStore(db).all()
    finally:
        db.close()


def wait_for(data_dir: Path, node: NodeProcess, done: Callable[[list[JobRecord]], bool], what: str) -> list[JobRecord]:
    deadline = time.monotonic() + WAIT_S
    jobs: list[JobRecord] = []
    while time.monotonic() < deadline:
        if (data_dir / "uad-node.sqlite").exists():
            jobs = jobs_of(data_dir)
            if done(jobs):
                return jobs
        assert node.process is not None and node.process.poll() is None, node.log()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"{what}: not after {WAIT_S} s; jobs: {jobs}\n{node.log()[-3000:]}")


def deliveries(data_dir: Path, series_uid: str) -> list:
    db = open_database(f"sqlite:///{data_dir / 'uad-node.sqlite'}", migrate=False)
    try:
        return DeliveryLedger(db).for_source_series(series_uid)
    finally:
        db.close()


def finished(count: int) -> Callable[[list[JobRecord]], bool]:
    return lambda jobs: len(jobs) >= count and all(job.state.finished for job in jobs)


def results_in_orthanc(orthanc: Orthanc, study_uid: str) -> dict[str, list[str]]:
    """Modality -> SOP Instance UIDs of the objects Orthanc holds in the study."""
    found: dict[str, list[str]] = {}
    studies = orthanc.get("/studies?expand")
    [study_id] = [s["ID"] for s in studies if s["MainDicomTags"]["StudyInstanceUID"] == study_uid]  # type: ignore
    for series in orthanc.get(f"/studies/{study_id}/series"):  # type: ignore[union-attr]
        modality = series["MainDicomTags"]["Modality"]
        for instance in orthanc.get(f"/series/{series['ID']}/instances"):  # type: ignore[union-attr]
            found.setdefault(modality, []).append(instance["MainDicomTags"]["SOPInstanceUID"])
    return found


def all_results(in_pacs: dict[str, list[str]]) -> list[str]:
    """Every result object's SOP Instance UID (SEG, SC and SR), sorted."""
    return sorted(uid for uids in in_pacs.values() for uid in uids)


def test_study_from_storescu_is_analysed_and_results_reach_orthanc(
    tmp_path: Path, study: tuple[Path, str, str, str], checkpoint: Path, orthanc: Orthanc, start_node: Callable
) -> None:
    folder, study_uid, t1_uid, localizer_uid = study
    node = start_node(config_for(tmp_path, free_port(), checkpoint, orthanc.dicom_port))
    sent(send(folder, node.port))
    jobs = wait_for(node.data_dir, node, finished(2), "both series decided and the T1 done")
    by_series = {job.series_uid: job for job in jobs}
    t1, localizer = by_series[t1_uid], by_series[localizer_uid]
    assert (t1.state, localizer.state) == (JobState.DONE, JobState.SKIPPED), jobs
    assert "slices" in localizer.reason or "localizer" in localizer.reason
    assert t1.reason.startswith("delivered to pacs")
    assert set(t1.stage_seconds()) == {"completion_wait", "queued", "preprocessing", "inferring", "exporting"}
    assert t1.stage_seconds()["completion_wait"] >= 1.0  # the quiet period
    assert set(t1.report["timings_s"]) == {"volume", "preprocessing", "quality", "inference", "objects"}

    in_pacs = results_in_orthanc(orthanc, study_uid)
    results = sorted(Path(t1.results_dir).rglob("*.dcm"))
    assert sorted(in_pacs) == ["OT", "SEG", "SR"]  # the source MR went to the node, not to Orthanc
    assert len(in_pacs["SEG"]) == len(in_pacs["SR"]) == 1 and len(in_pacs["OT"]) == len(results) - 2

    status = node.status()
    states = {job["series_uid"]: (job["state"], job["reason"]) for job in status["jobs"]}
    assert states[t1_uid][0] == "done" and states[localizer_uid] == ("skipped", localizer.reason)
    assert status["disk"]["refusing_images"] is False
    # Whether each series was screened, and the quality gate's values, for jobs and series alike.
    [t1_job] = [job for job in status["jobs"] if job["series_uid"] == t1_uid]
    assert t1_job["analysed"] is True and t1_job["quality"] == t1.report["quality"]
    series = {s["series_uid"]: s for study in status["studies"] for s in study["series"]}
    assert series[t1_uid]["analysed"] is True and series[t1_uid]["quality"]["registration_similarity"] > 0.4
    assert series[localizer_uid]["analysed"] is False and series[localizer_uid]["quality"] is None


def analysing(
    tmp_path: Path, study: tuple[Path, str, str, str], checkpoint: Path, orthanc: Orthanc, start_node: Callable
) -> tuple[Path, NodeProcess]:
    """A node that was sent ``study`` and is analysing its T1 now: (its config, the node)."""
    config = config_for(tmp_path, free_port(), checkpoint, orthanc.dicom_port)
    node = start_node(config)
    sent(send(study[0], node.port))
    running = lambda jobs: any(j.series_uid == study[2] and j.state.analysing for j in jobs)  # noqa: E731
    wait_for(node.data_dir, node, running, "the T1 analysis running")
    return config, node


def test_kill_9_during_the_analysis_then_restart_completes_it_once(
    tmp_path: Path, study: tuple[Path, str, str, str], checkpoint: Path, orthanc: Orthanc, start_node: Callable
) -> None:
    _, study_uid, t1_uid, _ = study
    config, node = analysing(tmp_path, study, checkpoint, orthanc, start_node)
    assert node.process is not None
    node.process.kill()  # SIGKILL: no clean-up of any kind
    node.process.wait(timeout=10)
    node.process = None

    restarted = start_node(config)
    jobs = wait_for(restarted.data_dir, restarted, finished(2), "the interrupted job done after the restart")
    [t1] = [job for job in jobs if job.series_uid == t1_uid]
    assert (t1.state, t1.attempts, t1.version) == (JobState.DONE, 2, 1)
    assert len([job for job in jobs if job.series_uid == t1_uid]) == 1
    rows = deliveries(restarted.data_dir, t1_uid)
    assert rows and {(r.state, r.attempts) for r in rows} == {(DeliveryState.DELIVERED, 1)}  # each sent once
    in_pacs = results_in_orthanc(orthanc, study_uid)
    assert len(in_pacs["SEG"]) == 1 and all_results(in_pacs) == sorted(r.sop_instance_uid for r in rows)
    assert "was preprocessing when the node stopped" in restarted.log() or "was inferring" in restarted.log()


def test_pacs_down_during_export_then_back_results_arrive_once(
    tmp_path: Path, study: tuple[Path, str, str, str], checkpoint: Path, start_node: Callable
) -> None:
    folder, study_uid, t1_uid, _ = study
    pacs_port = free_port()  # nothing listens there yet
    node = start_node(config_for(tmp_path, free_port(), checkpoint, pacs_port))
    sent(send(folder, node.port))
    postponed = lambda jobs: any(  # noqa: E731
        j.series_uid == t1_uid and j.state is JobState.EXPORTING and "next attempt" in j.reason for j in jobs
    )
    [waiting] = [j for j in wait_for(node.data_dir, node, postponed, "export postponed") if j.series_uid == t1_uid]
    assert "pacs:" in waiting.reason

    with running_orthanc(tmp_path / "orthanc", {"node": "UADNODE"}, dicom_port=pacs_port) as orthanc:
        jobs = wait_for(node.data_dir, node, finished(2), "results delivered once the PACS is back")
        [t1] = [job for job in jobs if job.series_uid == t1_uid]
        assert t1.state is JobState.DONE, t1
        rows = deliveries(node.data_dir, t1_uid)
        assert {r.state for r in rows} == {DeliveryState.DELIVERED} and min(r.attempts for r in rows) >= 2
        in_pacs = results_in_orthanc(orthanc, study_uid)
        results = sorted(Path(t1.results_dir).rglob("*.dcm"))
        assert len(in_pacs["SEG"]) == 1 and len(all_results(in_pacs)) == len(results) == len(rows)


def test_two_studies_sent_at_once_by_two_senders_are_both_analysed(
    tmp_path: Path,
    study: tuple[Path, str, str, str],
    other_study: tuple[Path, str, str, str],
    checkpoint: Path,
    orthanc: Orthanc,
    start_node: Callable,
) -> None:
    node = start_node(config_for(tmp_path, free_port(), checkpoint, orthanc.dicom_port))
    senders = [send(study[0], node.port, "SCANNER1"), send(other_study[0], node.port, "SCANNER2")]
    for process in senders:
        sent(process)
    jobs = wait_for(node.data_dir, node, finished(4), "both studies analysed")
    done = {job.series_uid for job in jobs if job.state is JobState.DONE}
    assert done == {study[2], other_study[2]}, jobs
    for _, study_uid, *_ in (study, other_study):
        assert len(results_in_orthanc(orthanc, study_uid)["SEG"]) == 1


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", *args, "--config", str(config)], capture_output=True, text=True, timeout=60
    )


def test_sigterm_mid_analysis_requeues_the_job_without_costing_an_attempt(
    tmp_path: Path, study: tuple[Path, str, str, str], checkpoint: Path, orthanc: Orthanc, start_node: Callable
) -> None:
    t1_uid = study[2]
    config, node = analysing(tmp_path, study, checkpoint, orthanc, start_node)
    assert node.stop(timeout_s=120) == 0
    [t1] = [job for job in jobs_of(node.data_dir) if job.series_uid == t1_uid]
    assert (t1.state, t1.attempts) == (JobState.QUEUED, 0), t1
    assert "node stopping" in t1.reason

    restarted = start_node(config)
    jobs = wait_for(restarted.data_dir, restarted, finished(2), "the requeued job done after the restart")
    [t1] = [job for job in jobs if job.series_uid == t1_uid]
    assert (t1.state, t1.attempts) == (JobState.DONE, 1)


def test_status_retry_and_cancel_from_the_command_line(
    tmp_path: Path, study: tuple[Path, str, str, str], checkpoint: Path, orthanc: Orthanc, start_node: Callable
) -> None:
    folder, study_uid, t1_uid, localizer_uid = study
    config = config_for(tmp_path, free_port(), checkpoint, orthanc.dicom_port)
    node = start_node(config)
    sent(send(folder, node.port))
    jobs = wait_for(node.data_dir, node, finished(2), "both series decided and the T1 done")
    [t1] = [job for job in jobs if job.series_uid == t1_uid]
    [localizer] = [job for job in jobs if job.series_uid == localizer_uid]

    text = cli(config, "status").stdout
    assert f"{t1.id}  v1  done" in text and localizer.reason in text and "accepting images" in text, text

    refused = cli(config, "cancel", str(t1.id))
    assert refused.returncode == 2 and f"job {t1.id} is already done" in refused.stderr
    assert cli(config, "retry", "--failed").stdout.strip() == "no failed jobs"

    # Asked explicitly, a done job runs again as version 2, with new result series.
    again = cli(config, "retry", str(t1.id))
    assert again.returncode == 0 and "queued" in again.stdout, again.stderr
    jobs = wait_for(node.data_dir, node, finished(3), "version 2 done")
    [second] = [job for job in jobs if job.series_uid == t1_uid and job.version == 2]
    assert second.state is JobState.DONE and second.results_dir != t1.results_dir
    assert len(results_in_orthanc(orthanc, study_uid)["SEG"]) == 2
    assert cli(config, "retry", "12345").returncode == 2
    assert {job.series_uid for job in jobs} == {t1_uid, localizer_uid}


def test_orthanc_routes_stable_mr_series_to_the_node_and_keeps_the_results(
    tmp_path: Path, study: tuple[Path, str, str, str], checkpoint: Path, start_node: Callable
) -> None:
    """deploy/orthanc as shipped: a scanner stores a study in Orthanc; the Lua script sends each stable MR
    series to the node; the node's SEG, SC and SR come back into the study and are not sent on again."""
    folder, study_uid, t1_uid, localizer_uid = study
    node_port, pacs_port, stable_age_s = free_port(), free_port(), 1
    settings = {
        "DicomModalities": {"uadnode": ["UADNODE", "127.0.0.1", node_port], "scanner": ["SCANNER1", "127.0.0.1", 104]},
        "StableAge": stable_age_s,
        "LuaScripts": [str(ROUTING_SCRIPT)],
    }
    senders = '[ { ae_title = "ORTHANC", host = "127.0.0.1" } ]'
    with running_orthanc(tmp_path / "orthanc", {}, dicom_port=pacs_port, settings=settings) as orthanc:
        node = start_node(config_for(tmp_path, node_port, checkpoint, pacs_port, senders=senders))
        sent(send(folder, pacs_port, called_ae="ORTHANC"))  # the scanner stores in the PACS only
        jobs = wait_for(node.data_dir, node, finished(2), "both series routed by Orthanc and decided, the T1 done")
        states = {job.series_uid: job.state for job in jobs}
        assert states == {t1_uid: JobState.DONE, localizer_uid: JobState.SKIPPED}, jobs
        assert sorted(results_in_orthanc(orthanc, study_uid)) == ["MR", "OT", "SEG", "SR"]

        time.sleep(stable_age_s + 4)  # the result series become stable too: the script must leave them alone
        stores = [job for job in orthanc.get("/jobs?expand") if job["Type"] == "DicomModalityStore"]  # type: ignore
        assert len(stores) == 2 and {job["State"] for job in stores} == {"Success"}, stores
        assert {job["Content"]["RemoteAet"] for job in stores} == {"UADNODE"}
        assert len(jobs_of(node.data_dir)) == 2
