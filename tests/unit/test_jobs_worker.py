"""Worker and Exporter (node/jobs/worker.py, node/jobs/export.py): a job from ``queued`` through analysis to
results on disk, every way an analysis can end early, and sending the results to a destination.

Real SQLite, real files stored by ``InstanceStore``, the real ``Analyser`` with a narrow untrained model on the
real model grid (``tests.tiny_model.write_fast_checkpoint``) and a real pynetdicom storage SCP on loopback whose
answers the test chooses; no mocks. A Colin27 T1 series is written once per module; one successful analysis
is shared by the success test and, copied, by the exporter tests. Stage boundaries are reached
deterministically: the cancel request, the newer version or the stop request exists before the worker runs,
and the worker notices it at its first boundary (after preprocessing, before inference).
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from node.analysis import Analyser
from node.config import NodeConfig, ResultsSection
from node.db import Series, Study, open_database
from node.db.database import Database
from node.db.schema import utcnow
from node.jobs.config import CompletionSection, JobsSection
from node.jobs.export import Exporter
from node.jobs.intake import Intake
from node.jobs.states import JobState
from node.jobs.store import JobRecord, JobStore, Snapshot
from node.jobs.worker import Worker
from node.receiver.storage import InstanceStore
from node.selection import Contrast, SelectionSection
from node.sender import DeliveryState
from node.sender.deliveries import DeliveryLedger
from tests import brains
from tests.dicom_series import AXIAL, centred_grid, resample, write_mr_series
from tests.integration.test_sender import pynetdicom_scp
from tests.peers import free_port
from tests.stored_instances import put
from tests.tiny_model import write_fast_checkpoint
from tests.unit.conftest import make_store

pytestmark = pytest.mark.timeout(300)

SLICES = 26  # 2 x 2 x 3.5 mm, 96 x 112 px: enough head for the atlas registration, small enough to be quick
FIRST = 24  # stored at first; the last two arrive late where a test needs a newer version
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"


# -- module set-up: threads, the model, the series, one analysis -------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """As ``[jobs] threads = 1`` does (scheduler ``_preload``): oversubscribed threads crawl on a loaded machine."""
    import SimpleITK as sitk
    import torch

    torch_threads, itk_threads = torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    yield
    torch.set_num_threads(torch_threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(itk_threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fast_checkpoint(tmp_path_factory.mktemp("model") / "fast.pt")


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    """A T1 of Colin27 as a scanner sends it, one data set per slice in slice order."""
    colin = brains.colin27(skull=True)  # skips when mricron-data is absent
    volume = resample(colin, centred_grid(colin, AXIAL, (2.0, 2.0, 3.5), (96, 112, SLICES)))
    paths = write_mr_series(volume, tmp_path_factory.mktemp("t1"), description="T1 MPRAGE AX")
    return [pydicom.dcmread(path) for path in paths]


@pytest.fixture(scope="module")
def analyser(checkpoint: Path) -> Analyser:
    """One per module, as one per node process: the atlas and the model are loaded once."""
    analyser = Analyser(ResultsSection())
    analyser.load(checkpoint)
    return analyser


def t1_selection(checkpoint: Path, min_slices: int = 20) -> SelectionSection:
    return SelectionSection(min_slices=min_slices, models={Contrast.T1: checkpoint})


def make_worker(
    db: Database,
    analyser: Analyser,
    data_dir: Path,
    selection: SelectionSection,
    stopping: threading.Event | None = None,
    **jobs: object,
) -> Worker:
    section = JobsSection(**jobs)  # type: ignore[arg-type]
    return Worker(db, JobStore(db), analyser, data_dir, section, selection, stopping or threading.Event())


def make_intake(db: Database, selection: SelectionSection) -> Intake:
    return Intake(db, CompletionSection(series_quiet_s=1), selection, JobStore(db))


def poll(intake: Intake) -> list[JobRecord]:
    """Every stored series is complete: its quiet period is long over at this clock."""
    return intake.poll(utcnow() + timedelta(seconds=5))


def queue(store: InstanceStore, series: list[Dataset], selection: SelectionSection) -> tuple[Intake, JobRecord]:
    """Receive the first ``FIRST`` slices and let intake give the series its job."""
    for ds in series[:FIRST]:
        put(store, ds)
    intake = make_intake(store.db, selection)
    [job] = poll(intake)
    return intake, job


def results_of(data_dir: Path) -> list[Path]:
    root = data_dir / "results"
    return sorted(p for p in root.rglob("*")) if root.is_dir() else []


@dataclass(frozen=True)
class Analysed:
    """The module's one successful analysis: its database, data dir, what ``run_pending`` returned, the job."""

    db: Database
    data_dir: Path
    ran: list[JobRecord]
    job: JobRecord


@pytest.fixture(scope="module")
def analysed(
    tmp_path_factory: pytest.TempPathFactory, series: list[Dataset], analyser: Analyser, checkpoint: Path
) -> Iterator[Analysed]:
    root = tmp_path_factory.mktemp("analysed")
    db = open_database(f"sqlite:///{root / 'db' / 'node.sqlite'}")
    data_dir = root / "data"
    _, job = queue(make_store(data_dir, db), series, t1_selection(checkpoint))
    assert job.state is JobState.QUEUED, job.reason
    ran = make_worker(db, analyser, data_dir, t1_selection(checkpoint)).run_pending()
    yield Analysed(db, data_dir, ran, JobStore(db).get(job.id))
    db.close()


# -- the worker --------------------------------------------------------------------------------------------


def test_a_queued_job_is_analysed_to_durable_results_and_waits_for_export(analysed: Analysed) -> None:
    job, jobs = analysed.job, JobStore(analysed.db)
    assert analysed.ran == [job]  # run_pending ran it and then found nothing more
    assert (job.state, job.attempts, job.finished_at, job.next_attempt_at) == (JobState.EXPORTING, 1, None, None)
    assert "contrast class T1" in job.reason  # the selection's reason stays
    folder = analysed.data_dir / "results" / f"job-{job.id}"
    assert job.results_dir == str(folder)
    seg, summary, png = folder / "seg.dcm", folder / "overlays" / "000-summary.dcm", folder / "summary.png"
    assert seg.is_file() and summary.is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    seg_ds, summary_ds = pydicom.dcmread(seg), pydicom.dcmread(summary)
    assert (seg_ds.SOPClassUID, summary_ds.SOPClassUID) == (SEG_STORAGE, SC_STORAGE)
    assert seg_ds.StudyInstanceUID == summary_ds.StudyInstanceUID == job.study_uid  # results join the source study
    assert seg_ds.ReferencedSeriesSequence[0].SeriesInstanceUID == job.series_uid

    report = job.report
    assert report["series_uid"] == job.series_uid and report["selected"] is True
    assert "fast-test" in report["model"]
    assert set(report["timings_s"]) == {"volume", "preprocessing", "quality", "inference", "objects"}
    assert all(seconds >= 0 for seconds in report["timings_s"].values())
    assert report["analysed"] is True
    assert report["components"] >= 0 and report["anomaly_volume_ml"] >= 0 and report["max_score"] > 0
    assert report["threshold"] == pytest.approx(0.44)
    quality = report["quality"]  # the gate's values are recorded for a series it let through too
    assert quality["contrast"] == "t1" and quality["looks_like"] == "t1"
    assert quality["registration_similarity"] > 0.5 and quality["coverage"] > 0.8
    assert 0 <= quality["anomaly_fraction"] < 0.2

    assert job.preprocessing_at < job.inferring_at < job.exporting_at  # type: ignore[operator]
    stages = job.stage_seconds()
    assert stages["preprocessing"] > 0 and stages["inferring"] > 0
    assert [j.id for j in jobs.due_exports()] == [job.id]  # the exporter's turn now
    assert jobs.claim() is None


def test_a_job_cancelled_while_analysing_stops_at_the_next_stage_without_results(
    store: InstanceStore, db: Database, data_dir: Path, analyser: Analyser, checkpoint: Path, series: list[Dataset]
) -> None:
    _, job = queue(store, series, t1_selection(checkpoint))
    jobs = JobStore(db)
    claimed = jobs.claim()
    assert claimed is not None and claimed.id == job.id
    assert jobs.cancel(job.id).cancel_requested  # analysing: the worker is asked, not overruled

    ended = make_worker(db, analyser, data_dir, t1_selection(checkpoint)).run(claimed)
    assert (ended.state, ended.reason) == (JobState.CANCELLED, "cancelled by an admin")
    assert ended.inferring_at is None and ended.finished_at is not None  # stopped before the model ran
    assert (ended.results_dir, ended.report) == ("", {})
    assert results_of(data_dir) == []
    assert jobs.claim() is None


def test_a_job_superseded_by_a_newer_version_is_skipped_before_inference(
    store: InstanceStore, db: Database, data_dir: Path, analyser: Analyser, checkpoint: Path, series: list[Dataset]
) -> None:
    intake, job = queue(store, series, t1_selection(checkpoint))
    jobs = JobStore(db)
    claimed = jobs.claim()
    assert claimed is not None and claimed.id == job.id
    for ds in series[FIRST:]:  # late images while the job is analysing: a new version (late_images = new-version)
        put(store, ds)
    [newer] = poll(intake)
    assert (newer.version, newer.state, newer.instances) == (2, JobState.QUEUED, SLICES)

    ended = make_worker(db, analyser, data_dir, t1_selection(checkpoint)).run(claimed)
    assert ended.state is JobState.SKIPPED
    assert ended.reason.startswith(f"superseded by job {newer.id}")
    assert ended.inferring_at is None and ended.results_dir == ""
    assert results_of(data_dir) == []
    assert jobs.get(newer.id).state is JobState.QUEUED  # the newer version is analysed instead


def test_a_stopping_node_returns_the_job_to_the_queue_without_counting_the_attempt(
    store: InstanceStore, db: Database, data_dir: Path, analyser: Analyser, checkpoint: Path, series: list[Dataset]
) -> None:
    _, job = queue(store, series, t1_selection(checkpoint))
    jobs, stopping = JobStore(db), threading.Event()
    worker = make_worker(db, analyser, data_dir, t1_selection(checkpoint), stopping)
    stopping.set()
    assert worker.run_pending() == []  # a stopping worker claims nothing
    assert (jobs.get(job.id).state, jobs.get(job.id).attempts) == (JobState.QUEUED, 0)

    claimed = jobs.claim()  # claimed just before the stop request
    assert claimed is not None and claimed.attempts == 1
    ended = worker.run(claimed)
    assert (ended.state, ended.attempts) == (JobState.QUEUED, 0)
    assert "node stopping" in ended.reason
    assert ended.inferring_at is None and ended.next_attempt_at is None and ended.results_dir == ""
    assert results_of(data_dir) == []
    again = jobs.claim()  # due at once for the next process
    assert again is not None and (again.id, again.attempts) == (job.id, 1)


def test_an_analysis_error_ends_the_analysis_at_once_and_sends_a_not_screened_notice(
    store: InstanceStore, db: Database, data_dir: Path, analyser: Analyser, tmp_path: Path, series: list[Dataset]
) -> None:
    missing = tmp_path / "models" / "gone.pt"
    selection = t1_selection(missing)
    _, job = queue(store, series, selection)
    assert job.model == str(missing)
    worker = make_worker(db, analyser, data_dir, selection, analysis_attempts=3, analysis_retry_delay_s=0)

    [ended] = worker.run_pending()
    assert ended.id == job.id
    assert (ended.state, ended.attempts) == (JobState.EXPORTING, 1)  # the notice goes out like results
    assert ended.reason == f"not screened: {missing}: no such checkpoint file"
    assert ended.report["analysed"] is False and ended.report["reason"] == f"{missing}: no such checkpoint file"
    folder = data_dir / "results" / f"job-{job.id}"
    assert ended.results_dir == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["notice.dcm", "notice.png"]  # never a SEG
    notice = pydicom.dcmread(folder / "notice.dcm")
    assert notice.SOPClassUID == SC_STORAGE and notice.SeriesDescription.startswith("NOT SCREENED")
    assert notice.StudyInstanceUID == job.study_uid
    assert worker.run_pending() == []  # not retried: the same input fails the same way

    done = Exporter(export_config(data_dir), db, JobStore(db)).export(ended)
    assert done is not None and done.state is JobState.FAILED  # delivered or not, the series was not screened
    assert done.reason == (
        f"not screened: {missing}: no such checkpoint file; no destinations configured; "
        f"NOT SCREENED notice kept in {folder}"
    )

    retried = JobStore(db).retry(job.id)  # a not-screened series is analysed again, not its notice resent
    assert (retried.state, retried.results_dir, retried.attempts) == (JobState.QUEUED, "", 0)


def test_with_the_notice_turned_off_an_analysis_error_fails_the_job_at_once(
    store: InstanceStore, db: Database, data_dir: Path, checkpoint: Path, tmp_path: Path, series: list[Dataset]
) -> None:
    missing = tmp_path / "models" / "gone.pt"
    selection = t1_selection(missing)
    _, job = queue(store, series, selection)
    analyser = Analyser(ResultsSection(not_screened_notice=False))
    worker = make_worker(db, analyser, data_dir, selection, analysis_attempts=3, analysis_retry_delay_s=0)

    [ended] = worker.run_pending()
    assert (ended.state, ended.attempts) == (JobState.FAILED, 1)
    assert ended.reason == f"{missing}: no such checkpoint file"
    assert ended.report["analysed"] is False and ended.report["quality"] is None
    assert ended.finished_at is not None and ended.results_dir == ""
    assert results_of(data_dir) == []


def test_a_series_the_quality_gate_refuses_is_not_screened_with_the_measures_recorded(
    store: InstanceStore, db: Database, data_dir: Path, checkpoint: Path, series: list[Dataset]
) -> None:
    """Rows flipped against the orientation tags: the model never sees the series, the job keeps the values."""
    flipped = [deepcopy(ds) for ds in series]
    for ds in flipped:
        ds.PixelData = ds.pixel_array[::-1].tobytes()
    _, job = queue(store, flipped, t1_selection(checkpoint))
    analyser = Analyser(ResultsSection())
    worker = make_worker(db, analyser, data_dir, t1_selection(checkpoint), analysis_retry_delay_s=0)

    [ended] = worker.run_pending()
    assert ended.state is JobState.EXPORTING and ended.inferring_at is None  # refused before inference
    assert ended.reason.startswith("not screened: quality gate: registration to the atlas failed")
    quality = ended.report["quality"]
    assert quality["registration_similarity"] < 0.5 and quality["anomaly_fraction"] is None
    assert sorted(p.name for p in Path(ended.results_dir).iterdir()) == ["notice.dcm", "notice.png"]


def test_a_transient_error_is_retried_after_a_delay_then_fails_after_the_last_attempt(
    store: InstanceStore, db: Database, data_dir: Path, analyser: Analyser, checkpoint: Path, series: list[Dataset]
) -> None:
    _, job = queue(store, series, t1_selection(checkpoint))
    blocker = data_dir / "results"
    blocker.write_text("a file where the results folder belongs: writing results raises OSError\n")
    jobs = JobStore(db)
    worker = make_worker(
        db, analyser, data_dir, t1_selection(checkpoint), analysis_attempts=2, analysis_retry_delay_s=60
    )

    [first] = worker.run_pending()
    assert (first.id, first.state, first.attempts) == (job.id, JobState.QUEUED, 1)
    assert str(blocker) in first.reason and first.reason.endswith("; retrying in 60 s")
    assert first.next_attempt_at is not None
    assert first.next_attempt_at - utcnow() > timedelta(seconds=50)
    assert worker.run_pending() == []  # not due before its delay
    assert jobs.claim(first.next_attempt_at - timedelta(seconds=1)) is None

    second = jobs.claim(first.next_attempt_at)
    assert second is not None and (second.id, second.attempts) == (job.id, 2)
    ended = worker.run(second)
    assert (ended.state, ended.attempts) == (JobState.FAILED, 2)
    # The notice cannot be written where the results cannot: the job fails with both reasons.
    assert str(blocker) in ended.reason and "(after 2 attempts) (no NOT SCREENED notice: " in ended.reason
    assert ended.results_dir == "" and blocker.is_file()


def retried_done_job(store: InstanceStore, series: list[Dataset], checkpoint: Path) -> JobRecord:
    """A delivered job that an admin retries: a new version with no model, decided again when it runs."""
    _, job = queue(store, series, t1_selection(checkpoint))
    jobs = JobStore(store.db)
    assert jobs.move(job.id, JobState.QUEUED, JobState.DONE, reason="delivered to pacs (15 objects)")
    retried = jobs.retry(job.id)
    assert (retried.version, retried.state, retried.model) == (2, JobState.QUEUED, "")
    return retried


def test_a_retried_job_is_decided_again_and_skipped_when_the_rules_now_skip_its_series(
    store: InstanceStore, db: Database, data_dir: Path, analyser: Analyser, checkpoint: Path, series: list[Dataset]
) -> None:
    retried = retried_done_job(store, series, checkpoint)
    worker = make_worker(db, analyser, data_dir, t1_selection(checkpoint, min_slices=50))

    [ended] = worker.run_pending()
    assert ended.id == retried.id
    assert (ended.state, ended.reason, ended.model) == (JobState.SKIPPED, f"{FIRST} slices < minimum 50", "")
    assert ended.finished_at is not None and ended.inferring_at is None
    assert results_of(data_dir) == []


def test_a_retried_job_is_decided_again_with_the_current_model(
    store: InstanceStore, db: Database, data_dir: Path, analyser: Analyser, checkpoint: Path, series: list[Dataset]
) -> None:
    retried = retried_done_job(store, series, checkpoint)
    replaced = checkpoint.parent / "replaced" / "t1.pt"  # the admin configured a new model (not installed yet)
    worker = make_worker(db, analyser, data_dir, t1_selection(replaced))

    [ended] = worker.run_pending()
    assert ended.id == retried.id
    assert ended.model == str(replaced)  # decided under the current config, and recorded
    assert (ended.state, ended.reason) == (JobState.EXPORTING, f"not screened: {replaced}: no such checkpoint file")


def test_a_retried_job_whose_images_were_deleted_fails_at_once(
    store: InstanceStore, db: Database, data_dir: Path, analyser: Analyser, checkpoint: Path, series: list[Dataset]
) -> None:
    """Retention deletes the images of a delivered series but keeps its rows; retrying it cannot work."""
    retried = retried_done_job(store, series, checkpoint)
    images = sorted((data_dir / "studies").rglob("*.dcm"))
    assert len(images) == FIRST
    for path in images:
        path.unlink()
    worker = make_worker(db, analyser, data_dir, t1_selection(checkpoint), analysis_retry_delay_s=0)

    [ended] = worker.run_pending()
    assert ended.id == retried.id
    assert (ended.state, ended.attempts) == (JobState.FAILED, 1)  # not retried: the images will not come back
    assert "images is on disk" in ended.reason
    assert worker.run_pending() == []


# -- the exporter ------------------------------------------------------------------------------------------


@pytest.fixture
def exporting(db: Database, data_dir: Path, analysed: Analysed) -> JobRecord:
    """A job in ``exporting`` with a copy of the module's analysis as its results, in this test's database."""
    source = analysed.job
    with db.session.begin() as session:
        study = Study(study_uid=source.study_uid)
        row = Series(study=study, series_uid=source.series_uid, modality="MR")
        session.add_all([study, row])
        session.flush()
        snapshot = Snapshot(row.id, source.study_uid, source.series_uid, source.instances, 1, utcnow())
        job_id = JobStore(db).create(session, snapshot, JobState.QUEUED, source.reason, source.model, 1).id
    jobs = JobStore(db)
    folder = data_dir / "results" / f"job-{job_id}"
    shutil.copytree(source.results_dir, folder)
    assert jobs.move(job_id, JobState.QUEUED, JobState.EXPORTING)
    assert jobs.record_results(job_id, folder, source.report)
    return jobs.get(job_id)


def export_config(data_dir: Path, port: int | None = None, **jobs: object) -> NodeConfig:
    destinations = [] if port is None else [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}]
    return NodeConfig.model_validate(
        {
            "node": {"ae_title": "UADNODE", "data_dir": str(data_dir), "acse_timeout_s": 5, "dimse_timeout_s": 5},
            "destinations": destinations,
            "jobs": {"export_attempts": 5, "export_first_delay_s": 30, "export_max_delay_s": 60, **jobs},
        }
    )


def result_uids(job: JobRecord) -> list[str]:
    files = sorted(Path(job.results_dir).rglob("*.dcm"))
    assert len(files) >= 2  # the SEG and the summary at least
    return sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files)


def ledger_states(db: Database, job: JobRecord) -> dict[str, DeliveryState]:
    return {r.sop_instance_uid: r.state for r in DeliveryLedger(db).for_source_series(job.series_uid)}


def test_without_destinations_the_job_is_done_and_its_results_kept(
    db: Database, data_dir: Path, exporting: JobRecord
) -> None:
    done = Exporter(export_config(data_dir), db, JobStore(db)).export(exporting)
    assert done is not None and done.state is JobState.DONE
    assert done.reason == f"no destinations configured; results kept in {exporting.results_dir}"
    assert done.finished_at is not None and "exporting" in done.stage_seconds()
    assert Path(done.results_dir, "seg.dcm").is_file()
    assert ledger_states(db, done) == {}


@pytest.mark.peers
def test_results_are_delivered_once_and_a_second_export_sends_nothing(
    db: Database, data_dir: Path, exporting: JobRecord
) -> None:
    uids = result_uids(exporting)
    jobs = JobStore(db)
    with pynetdicom_scp() as (port, scp):
        exporter = Exporter(export_config(data_dir, port), db, jobs)
        [done] = exporter.export_due()
        assert (done.id, done.state) == (exporting.id, JobState.DONE)
        assert done.reason == f"delivered to pacs ({len(uids)} objects)"
        assert sorted(scp.received) == uids
        assert ledger_states(db, done) == dict.fromkeys(uids, DeliveryState.DELIVERED)

        assert exporter.export_due() == []  # finished: nothing due
        again = exporter.export(jobs.get(done.id))
        assert again == done  # unchanged
        assert sorted(scp.received) == uids  # nothing sent twice


@pytest.mark.peers
def test_a_destination_that_is_down_postpones_the_export(db: Database, data_dir: Path, exporting: JobRecord) -> None:
    jobs = JobStore(db)
    exporter = Exporter(export_config(data_dir, free_port()), db, jobs)  # nobody listens there

    waiting = exporter.export(exporting)
    assert waiting is not None and waiting.state is JobState.EXPORTING
    assert waiting.reason.startswith("pacs: ") and "; next attempt in " in waiting.reason
    assert waiting.next_attempt_at is not None
    assert waiting.next_attempt_at - utcnow() > timedelta(seconds=20)  # 30 s, give or take the jitter
    assert waiting.finished_at is None and waiting.results_dir == exporting.results_dir
    assert exporter.export_due() == []  # not before the next attempt is due
    assert [j.id for j in jobs.due_exports(waiting.next_attempt_at)] == [exporting.id]
    assert set(ledger_states(db, waiting).values()) == {DeliveryState.FAILED_TRANSIENT}


@pytest.mark.peers
def test_a_permanent_rejection_fails_the_job_and_an_admin_retry_resends_it(
    db: Database, data_dir: Path, exporting: JobRecord
) -> None:
    uids = result_uids(exporting)
    jobs = JobStore(db)
    # 0xA900 (data set does not match SOP class) the first time each instance arrives, accepted after that.
    with pynetdicom_scp(lambda uid, seen: 0xA900 if seen == 0 else 0x0000) as (port, scp):
        exporter = Exporter(export_config(data_dir, port), db, jobs)
        failed = exporter.export(exporting)
        assert failed is not None and failed.state is JobState.FAILED
        assert failed.reason.startswith("pacs: ") and "0xA900" in failed.reason
        assert failed.finished_at is not None
        assert ledger_states(db, failed) == dict.fromkeys(uids, DeliveryState.FAILED_PERMANENT)
        assert exporter.export_due() == []  # not retried by itself: the same bytes would be rejected again
        assert sorted(scp.received) == uids

        retried = jobs.retry(failed.id)
        assert (retried.state, retried.resend_failed, retried.results_dir) == (
            JobState.EXPORTING, True, exporting.results_dir,
        )  # fmt: skip
        [done] = exporter.export_due()
        assert (done.state, done.reason) == (JobState.DONE, f"delivered to pacs ({len(uids)} objects)")
        assert done.resend_failed is False
        assert sorted(scp.received) == sorted(uids * 2)  # each rejected instance sent once more
        assert ledger_states(db, done) == dict.fromkeys(uids, DeliveryState.DELIVERED)


def test_results_missing_from_disk_send_the_job_back_to_analysis(
    db: Database, data_dir: Path, exporting: JobRecord
) -> None:
    shutil.rmtree(exporting.results_dir)
    jobs = JobStore(db)
    requeued = Exporter(export_config(data_dir), db, jobs).export(exporting)
    assert requeued is not None and requeued.state is JobState.QUEUED
    assert requeued.reason == f"results missing from {exporting.results_dir}; analysing again"
    assert requeued.finished_at is None
    # No results any more: nothing may export the job again before a new analysis records new ones.
    assert requeued.results_dir == ""
    claimed = jobs.claim()
    assert claimed is not None and claimed.id == exporting.id
