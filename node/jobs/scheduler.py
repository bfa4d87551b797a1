"""The node's background work inside ``uad-node serve``, on an APScheduler thread pool.

Every ``poll_interval_s``: completion (``Intake.poll``) and exports (``Exporter.export_due``); retention
every ``check_interval_min``. Each kind runs one instance at a time (``max_instances=1``, missed runs
coalesced).

Analyses run in ``[jobs] workers`` separate processes watched by ``node.jobs.supervisor.Supervisor``, so a
crash, an OOM kill or a native fault during an analysis never takes the receiver down; the model is loaded
there, never in this process. Given an ``analyser`` (tests inject a stand-in), analyses run in-process on
this pool instead, as ``Worker.run_pending`` on threads.

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
from node.jobs import registry
from node.jobs.export import Exporter
from node.jobs.intake import Intake
from node.jobs.observer import JobObserver
from node.jobs.retention import delete_expired_images
from node.jobs.store import JobStore
from node.jobs.supervisor import Supervisor
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
        # In-process analyses only with an injected analyser; otherwise worker processes (the supervisor).
        self.analyser = analyser
        self.supervisor = None if analyser is not None else Supervisor(config, db, self.store, observer)
        self.workers = (
            [
                Worker(
                    db, self.store, analyser, config.node.data_dir, config.jobs, config.selection, self.stopping,
                    observer,
                )
                for _ in range(config.jobs.workers)
            ]
            if analyser is not None
            else []
        )  # fmt: skip
        # in-process: contrast class -> "loading", "loaded" or "failed: <why>"; see ``model_states``
        self._model_states: dict[str, str] = dict.fromkeys(config.selection.models, "loading")
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
        if self.supervisor is not None:
            self.supervisor.start()
        self._every(every, self.exporter.export_due, "export")
        if retention.delete_images_after_days > 0:
            days, data_dir = retention.delete_images_after_days, self.config.node.data_dir
            self._every(
                retention.check_interval_min * 60, lambda: delete_expired_images(self.db, data_dir, days), "retention"
            )
        if self.analyser is not None:
            self._scheduler.add_job(self._preload, id="preload", name="preload")
        self._scheduler.start()
        rule = self.config.completion
        quiet = rule.study_quiet_s if rule.scope == "study" else rule.series_quiet_s
        log.info(
            "jobs: %d %s; a %s is complete after %g s without new images (at most %g s); late images: %s",
            jobs.workers, "worker thread(s)" if self.supervisor is None else "analysis worker process(es)",
            rule.scope, quiet, rule.max_wait_s, rule.late_images,
        )  # fmt: skip

    def stop(self, grace_s: float = 60.0) -> None:
        """Finish the running stage of each analysis, requeue it, and wait for every thread and worker
        process (a worker still running after ``grace_s`` is killed)."""
        self.stopping.set()
        if self.supervisor is not None:
            self.supervisor.stop(grace_s)
        self._scheduler.shutdown(wait=True)
        log.info("jobs stopped")

    @property
    def model_states(self) -> dict[str, str]:
        """Contrast class -> "loading", "loaded" or "failed: <why>" (readiness: every configured model is
        loaded): with worker processes, as the live workers report them in the workers table."""
        if self.supervisor is None:
            return dict(self._model_states)
        return registry.model_states(self.db, list(self.config.selection.models))

    def _preload(self) -> None:
        """In-process analyses: load the atlas and every configured model now, so the first series does not wait
        for them and a missing or broken model is reported at start-up, not when the first series fails on it."""
        assert self.analyser is not None
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
                self._model_states[contrast] = f"failed: {exc}"
                log.error("model for %s unusable, its series will fail until it is fixed: %s", contrast, exc)
                continue
            self._model_states[contrast] = "loaded"
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
