"""Sending a job's results to every configured destination, with backoff between attempts.

One call of ``export`` is one attempt per destination not yet served (the deliveries ledger skips what a
destination already has, so a restart or a retry never duplicates an object). The job is done when every
destination has everything; it waits and tries again while a destination is down or busy; it fails with
the destination's answer when one rejects the results for good or attempts run out (``uad-node retry``
sends again, including what was rejected).

A series that was not screened exports its NOT SCREENED notice the same way; once it is delivered the job ends
``failed`` with the reason the series was not screened (it is still a failed analysis, and counts as one).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from node.config import NodeConfig
from node.db.database import Database
from node.db.schema import utcnow
from node.jobs.observer import JobObserver
from node.jobs.states import JobState
from node.jobs.store import JobRecord, JobStore
from node.sender import RetryPolicy, Sender, SendResult

log = logging.getLogger(__name__)


def export_policy(config: NodeConfig) -> RetryPolicy:
    """The ``[jobs]`` export settings as a backoff policy (doubling, capped, with jitter)."""
    jobs = config.jobs
    return RetryPolicy(
        max_attempts=jobs.export_attempts,
        first_delay_s=jobs.export_first_delay_s,
        max_delay_s=max(jobs.export_max_delay_s, jobs.export_first_delay_s),
    )


class Exporter:
    """Exports jobs in ``exporting`` whose next attempt is due; one export per job at a time."""

    def __init__(
        self,
        config: NodeConfig,
        db: Database,
        store: JobStore,
        sender: Sender | None = None,
        observer: JobObserver | None = None,
    ) -> None:
        self.config, self.store, self.observer = config, store, observer
        self.sender = sender or Sender(config, db, policy=export_policy(config))
        self._busy: set[int] = set()
        self._lock = threading.Lock()

    def export_due(self) -> list[JobRecord]:
        """One attempt for every job whose export is due; returns them as they ended."""
        ended = [self.export(job) for job in self.store.due_exports()]
        return [job for job in ended if job is not None]

    def export(self, job: JobRecord) -> JobRecord | None:
        """One attempt for ``job``; None when another thread is exporting it right now."""
        with self._lock:
            if job.id in self._busy:
                return None
            self._busy.add(job.id)
        try:
            self._export(job)
        finally:
            with self._lock:
                self._busy.discard(job.id)
        return self.store.get(job.id)

    def _export(self, job: JobRecord) -> None:
        job = self.store.get(job.id)  # an admin may have cancelled it since it was found due
        if job.state is not JobState.EXPORTING:
            return
        folder = Path(job.results_dir)
        files = sorted(folder.rglob("*.dcm")) if folder.is_dir() else []
        if not files:  # results lost (a disk replaced, a folder deleted): the last durable step is the images
            if self.store.requeue(job.id, JobState.EXPORTING, f"results missing from {folder}; analysing again", 0):
                log.warning(
                    "job %d (series %s): results missing from %s; analysing again", job.id, job.series_uid, folder
                )
            return
        destinations = self.config.destinations
        # A series that was not screened has a NOT SCREENED notice for results and ends failed, with its reason.
        screened = job.report.get("analysed", True)
        end, why, what = (
            (JobState.DONE, "", "results")
            if screened
            else (JobState.FAILED, f"not screened: {job.report['reason']}; ", "NOT SCREENED notice")
        )
        if not destinations:
            self._finish(job, end, f"{why}no destinations configured; {what} kept in {folder}")
            return
        results = [
            self.sender.send_once(d, files, job.series_uid, resend_failed_permanent=job.resend_failed)
            for d in destinations
        ]
        if self.observer is not None:
            for result in results:
                self.observer.export_finished(result.destination, result.outcome)
        retry = [r for r in results if r.outcome == "retry"]
        failed = [r for r in results if r.outcome == "failed"]
        if retry:
            delay = min(r.retry_after_s or 0.0 for r in retry)
            reason = "; ".join(_line(r) for r in retry + failed) + f"; next attempt in {delay:.0f} s"
            self.store.postpone_export(job.id, reason, delay)
            log.warning("job %d (series %s): export postponed: %s", job.id, job.series_uid, reason)
        elif failed:
            self._finish(job, JobState.FAILED, "; ".join(_line(r) for r in failed))
        else:
            sent = ", ".join(f"{r.destination} ({r.delivered} objects)" for r in results)
            self._finish(job, end, f"{why}{'' if screened else what + ' '}delivered to {sent}")

    def _finish(self, job: JobRecord, state: JobState, reason: str) -> None:
        if self.store.move(job.id, JobState.EXPORTING, state, reason=reason, resend_failed=False):
            if self.observer is not None and job.exporting_at is not None:
                self.observer.stage_finished("exporting", (utcnow() - job.exporting_at).total_seconds())
            level = logging.INFO if state is JobState.DONE else logging.ERROR
            log.log(level, "job %d (study %s, series %s): %s: %s", job.id, job.study_uid, job.series_uid, state, reason)


def _line(result: SendResult) -> str:
    return f"{result.destination}: {result.error}"
