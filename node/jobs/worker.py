"""One model worker: claims queued jobs and takes each through preprocessing and inference to results on disk.

The results of job N are written to ``data_dir/results/job-N/`` and fsynced before the job records them:
from then on the job only needs exporting, which survives any restart. Until then nothing durable exists,
so an interrupted analysis simply runs again.

Failures: an ``AnalysisError`` (the series cannot be analysed: broken volume, unreadable pixels, failed
registration, refused by the quality gate, a missing or corrupt model) ends the analysis at once with its
reason; anything else (disk full, out of memory) is retried with a doubling delay up to ``analysis_attempts``
tries, and a job already interrupted that often (the node crashed during it) is not tried again. Either way
the series was selected and not screened: its NOT SCREENED notice is written like results and the job goes
to ``exporting``, so the notice reaches PACS through the same export (retries, exactly once) and the job
ends ``failed`` with the reason once it is delivered (see ``node.jobs.export``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from sqlalchemy import select

from node.analysis import Analyser, AnalysisError, write_notice, write_results
from node.db import Instance, Job
from node.db.database import Database
from node.jobs.config import JobsSection
from node.jobs.observer import JobObserver
from node.jobs.states import JobState
from node.jobs.store import JobRecord, JobStore
from node.results import series_report
from node.selection import SelectionSection, decide_stored_series

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Leave the analysis at a stage boundary; ``state`` and ``reason`` say where the job goes."""

    def __init__(self, state: JobState, reason: str, count_attempt: bool = True) -> None:
        super().__init__(reason)
        self.state, self.reason, self.count_attempt = state, reason, count_attempt


class Worker:
    """Runs analyses one at a time; several workers may share the store and one ``Analyser``."""

    def __init__(
        self,
        db: Database,
        store: JobStore,
        analyser: Analyser,
        data_dir: Path,
        jobs: JobsSection,
        selection: SelectionSection,
        stopping: threading.Event,
        observer: JobObserver | None = None,
    ) -> None:
        self.db, self.store, self.analyser = db, store, analyser
        self.results_root = data_dir / "results"
        self.jobs, self.selection, self.stopping = jobs, selection, stopping
        self.observer = observer

    def run_pending(self) -> list[JobRecord]:
        """Analyse queued jobs until none is due or the node is stopping; returns them as they ended."""
        ran = []
        while not self.stopping.is_set() and (job := self.store.claim()) is not None:
            ran.append(self.run(job))
        return ran

    def run(self, job: JobRecord) -> JobRecord:
        """Take one claimed job (in ``preprocessing``) to ``exporting`` with results on disk, or end it."""
        _log(job, f"analysis started (attempt {job.attempts}, {job.instances} images)")
        current = JobState.PREPROCESSING
        entered = time.monotonic()
        if self.observer is not None and job.attempts == 1 and job.preprocessing_at is not None:
            self.observer.stage_finished("queued", (job.preprocessing_at - job.created_at).total_seconds())

        def left(stage: JobState) -> None:
            nonlocal entered
            if self.observer is not None:
                self.observer.stage_finished(str(stage), time.monotonic() - entered)
            entered = time.monotonic()

        def enter(stage: str) -> None:
            nonlocal current
            self._check(job)
            state = JobState(stage)
            if not self.store.move(job.id, current, state):
                raise _Stop(JobState.CANCELLED, "cancelled by an admin")
            left(current)
            current = state

        files: list[Path] = []
        try:
            files = self._files(job)  # first: images deleted by retention fail the job, not a transient retry
            if job.attempts > self.jobs.analysis_attempts:  # requeued after a worker died or the node stopped
                raise AnalysisError(_interrupted(job))
            model = job.model or self._decide_again(job)
            analysis = self.analyser.analyse(files, Path(model), on_stage=enter)
            folder = self.results_root / f"job-{job.id}"
            written = write_results(analysis, folder)
            report = analysis.report(job.reason)
            if self.store.record_results(job.id, folder, report):
                _log(job, f"results written: {len(written)} objects in {folder} ({_figures(report)})")
        except _Stop as stop:
            self._end(job, current, stop)
        except AnalysisError as exc:
            self._not_screened(job, current, str(exc), files, exc.quality)
        except Exception as exc:  # transient by assumption: disk full, out of memory, a peer file vanished
            log.exception("job %d (series %s): analysis failed", job.id, job.series_uid)
            reason = f"{type(exc).__name__}: {exc}"
            if job.attempts >= self.jobs.analysis_attempts:
                self._not_screened(job, current, f"{reason} (after {job.attempts} attempts)", files, None)
            else:
                delay = self.jobs.analysis_retry_delay_s * 2 ** (job.attempts - 1)
                self.store.requeue(job.id, current, f"{reason}; retrying in {delay:.0f} s", delay)
        if current.analysing:  # ended inside a stage (failed, stopped, cancelled): it still took this long
            left(current)
        return self.store.get(job.id)

    def _not_screened(
        self, job: JobRecord, current: JobState, reason: str, files: list[Path], quality: dict | None
    ) -> None:
        """The selected series will not be screened: send its NOT SCREENED notice, or fail the job at once when
        there is no notice to send (turned off, no images left to name the study, or it cannot be written)."""
        folder = self.results_root / f"job-{job.id}"
        try:
            notice = self.analyser.not_screened_notice(files, reason) if files else None
            if notice is not None:
                write_notice(notice, folder)
        except Exception as exc:  # unreadable headers, a full disk: the failure itself is still recorded
            log.exception("job %d (series %s): no NOT SCREENED notice", job.id, job.series_uid)
            notice, reason = None, f"{reason} (no NOT SCREENED notice: {type(exc).__name__}: {exc})"
        report = series_report(job.series_uid, True, reason, None, job.model or None, None, {}, quality=quality)
        values = {"report": json.dumps(report, allow_nan=False)}
        if notice is None:
            self._end(job, current, _Stop(JobState.FAILED, reason), **values)
        elif self.store.move(
            job.id, current, JobState.EXPORTING, reason=f"not screened: {reason}", results_dir=str(folder), **values
        ):
            _log(job, f"not screened: {reason}; sending a NOT SCREENED notice")

    def _check(self, job: JobRecord) -> None:
        """Between stages: has the node been asked to stop, the job to cancel, or a newer version come?"""
        if self.stopping.is_set():
            raise _Stop(JobState.QUEUED, "interrupted by the node stopping; analysing again", count_attempt=False)
        if self.store.cancel_requested(job.id):
            raise _Stop(JobState.CANCELLED, "cancelled by an admin")
        if (newer := self.store.newer_version(job)) is not None:
            raise _Stop(JobState.SKIPPED, f"superseded by job {newer}: more images arrived after this one started")

    def _end(self, job: JobRecord, current: JobState, stop: _Stop, **values: object) -> None:
        values["reason"] = stop.reason
        if not stop.count_attempt:
            values["attempts"] = Job.attempts - 1
        if self.store.move(job.id, current, stop.state, **values):
            _log(job, f"{stop.state}: {stop.reason}")

    def _decide_again(self, job: JobRecord) -> str:
        """A retried done/skipped job is decided under the current config first."""
        decision = decide_stored_series(self.db, job.series_uid, self.selection)
        if not decision.selected or decision.model is None:
            raise _Stop(JobState.SKIPPED, decision.reason)
        self.store.move(job.id, JobState.PREPROCESSING, JobState.PREPROCESSING, model=str(decision.model))
        return str(decision.model)

    def _files(self, job: JobRecord) -> list[Path]:
        with self.db.session() as session:
            paths = session.scalars(
                select(Instance.path)
                .where(
                    Instance.series_id == job.series_id,
                    Instance.id <= job.last_instance_id,
                    Instance.stored.is_(True),
                )
                .order_by(Instance.id)
            ).all()
        files = [Path(p) for p in paths if p and Path(p).is_file()]
        if not files:
            raise AnalysisError("none of the series' images is on disk any more (deleted by retention?)")
        return files


def _interrupted(job: JobRecord) -> str:
    """Why a job interrupted ``analysis_attempts`` times is not analysed again: the last interruption's reason
    (``JobStore.requeue_from_dead_worker``: "worker host:pid:1 died (SIGKILL) during inferring; ...")."""
    interrupted = job.attempts - 1
    last = job.reason.split(";")[0] if job.reason.startswith("worker ") else ""
    if last:
        return f"analysis interrupted {interrupted} times, its worker process killed (last: {last})"
    return f"analysis interrupted {interrupted} times (a worker died or the node stopped or crashed during it)"


def _log(job: JobRecord, message: str) -> None:
    log.info("job %d (study %s, series %s): %s", job.id, job.study_uid, job.series_uid, message)


def _figures(report: dict) -> str:
    return (
        f"{report['anomaly_volume_ml']:.1f} mL in {report['components']} region(s), "
        f"max score {report['max_score']:.3f}, threshold {report['threshold']:.3g}"
    )
