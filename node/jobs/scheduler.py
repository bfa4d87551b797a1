"""The node's background work inside ``uad-node serve``, on an APScheduler thread pool.

Every ``poll_interval_s``: completion (``Intake.poll``), each model worker (``Worker.run_pending``) and
exports (``Exporter.export_due``); retention every ``check_interval_min``. Each kind runs one instance at
a time (``max_instances=1``, missed runs coalesced), so a slow analysis delays only its own worker.

Start-up first recovers what a previous process left: analyses that were running go back to the queue,
exports resume. Stopping lets a running stage finish (a stage is at most one model pass), then returns
its job to the queue, so the next start picks it up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from node.analysis import Analyser, AnalysisError
from node.config import NodeConfig
from node.db.database import Database
from node.db.schema import utcnow
from node.jobs.export import Exporter
from node.jobs.intake import Intake
from node.jobs.observer import JobObserver
from node.jobs.retention import delete_expired_images
from node.jobs.store import JobStore
from node.jobs.worker import Worker

log = logging.getLogger(__name__)


class JobScheduler:
    """Completion, analysis, export and retention for one node process."""

    def __init__(
        self,
        config: NodeConfig,
        db: Database,
        analyser: Analyser | None = None,
        observer: JobObserver | None = None,
    ) -> None:
        self.config, self.db, self.observer = config, db, observer
        self.store = JobStore(db)
        self.stopping = threading.Event()
        self.intake = Intake(db, config.completion, config.selection, self.store)
        self.exporter = Exporter(config, db, self.store, observer=observer)
        self.analyser = analyser or Analyser(config.results, config.quality)
        self.workers = [
            Worker(
                db, self.store, self.analyser, config.node.data_dir, config.jobs, config.selection, self.stopping,
                observer,
            )
            for _ in range(config.jobs.workers)
        ]  # fmt: skip
        # contrast class -> "loading", "loaded" or "failed: <why>" (readiness: every configured model is loaded)
        self.model_states: dict[str, str] = dict.fromkeys(config.selection.models, "loading")
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(config.jobs.workers + 3)},
            job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": None},
            timezone="UTC",
        )

    def start(self) -> None:
        jobs, retention = self.config.jobs, self.config.retention
        for job, state in self.store.recover(jobs.analysis_attempts):
            log.warning(
                "job %d (series %s): was %s when the node stopped; now %s", job.id, job.series_uid, job.state, state
            )
        every = jobs.poll_interval_s
        self._every(every, self.intake.poll, "completion")
        for index, worker in enumerate(self.workers):
            self._every(every, self._analyse_then_export(worker), f"worker-{index + 1}")
        self._every(every, self.exporter.export_due, "export")
        if retention.delete_images_after_days > 0:
            days, data_dir = retention.delete_images_after_days, self.config.node.data_dir
            self._every(
                retention.check_interval_min * 60, lambda: delete_expired_images(self.db, data_dir, days), "retention"
            )
        self._scheduler.add_job(self._preload, id="preload", name="preload")
        self._scheduler.start()
        rule = self.config.completion
        quiet = rule.study_quiet_s if rule.scope == "study" else rule.series_quiet_s
        log.info(
            "jobs: %d worker(s); a %s is complete after %g s without new images (at most %g s); late images: %s",
            len(self.workers), rule.scope, quiet, rule.max_wait_s, rule.late_images,
        )  # fmt: skip

    def stop(self) -> None:
        """Finish the running stage of each analysis, requeue it, and wait for every thread."""
        self.stopping.set()
        self._scheduler.shutdown(wait=True)
        log.info("jobs stopped")

    def _preload(self) -> None:
        """Load the atlas and every configured model now, so the first series does not wait for them and a
        missing or broken model is reported at start-up, not when the first series fails on it."""
        if threads := self.config.jobs.threads:
            # Process-wide settings: oversubscribed threads spin at barriers and run many times slower.
            import SimpleITK as sitk
            import torch

            torch.set_num_threads(threads)
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
        for contrast, checkpoint in self.config.selection.models.items():
            started = time.monotonic()
            try:
                self.analyser.load(checkpoint)
            except AnalysisError as exc:
                self.model_states[contrast] = f"failed: {exc}"
                log.error("model for %s unusable, its series will fail until it is fixed: %s", contrast, exc)
                continue
            self.model_states[contrast] = "loaded"
            if self.observer is not None:
                self.observer.model_loaded(contrast, time.monotonic() - started)

    def _analyse_then_export(self, worker: Worker) -> Callable[[], None]:
        """A worker exports what it analysed at once instead of waiting for the next export round."""

        def run() -> None:
            for job in worker.run_pending():
                if job.results_dir and not self.stopping.is_set():
                    self.exporter.export(job)  # it reads the job's current row itself

        return run

    def _every(self, seconds: float, function: Callable[[], object], name: str) -> None:
        def guarded() -> None:
            try:
                function()
            except Exception:  # a database hiccup must not end the schedule
                log.exception("%s failed; trying again in %g s", name, seconds)

        self._scheduler.add_job(guarded, "interval", seconds=seconds, id=name, name=name, next_run_time=utcnow())
