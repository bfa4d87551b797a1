"""``serve``'s supervisor of the analysis worker processes (``node.jobs.worker_process``).

It starts ``[jobs] workers`` processes ("spawn": a fresh interpreter, never a fork of a process with threads
and sockets) and watches them from one thread. When one exits without being asked to (a crash, an OOM kill,
``kill -9``, a non-zero exit) it

1. marks the worker's row ``exited`` with how it ended ("killed by SIGKILL", "exit code 3");
2. puts the job that worker held back in the queue in one guarded UPDATE, with the attempt the claim
   counted, so a series that kills every worker ends not screened after ``analysis_attempts`` instead of
   crash-looping (``Worker.run`` checks the attempts before analysing);
3. starts a new worker in the same slot after a backoff (1 s, doubling to 60 s; back to 1 s once a worker
   lived for a minute).

Stopping: a worker holding no job is killed at once (it may be importing torch or loading models, which it
cannot leave halfway, and it has nothing to lose); every other gets SIGTERM (it finishes its running stage and
requeues its job without counting the attempt), a grace period, then SIGKILL if still running (its job is
requeued here, its attempt not counted either: being slow to stop is no fault of the series).
All processes are started from the supervisor's own thread: a worker asks the kernel to kill it when the
thread that started it ends (``PR_SET_PDEATHSIG``), so none outlives ``serve``.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from node.child_process import ChildProcesses, Slot, how_ended, log_target, short_exit
from node.config import NodeConfig
from node.db.database import Database
from node.jobs import registry
from node.jobs.observer import JobObserver
from node.jobs.store import JobStore
from node.jobs.worker_process import worker_main

log = logging.getLogger(__name__)

_OBSERVED = ("stage_finished", "export_finished", "model_loaded")  # the JobObserver calls a worker sends


class Supervisor(ChildProcesses[Slot]):
    """Starts, watches and restarts the analysis worker processes; see the module docstring."""

    what = "analysis worker"
    process_name = "uad-node-worker-{}"

    def __init__(
        self, config: NodeConfig, db: Database, store: JobStore | None = None, observer: JobObserver | None = None
    ) -> None:
        super().__init__([Slot(number) for number in range(1, config.jobs.workers + 1)])
        self.config, self.db, self.observer = config, db, observer
        self.store = store or JobStore(db)

    def start(self) -> None:
        for name in registry.mark_gone_on_this_host(self.db):
            log.warning("worker %s of a previous serve is gone; marked exited", name)
        self._start_watching("supervisor")

    # -- the hooks, on the supervisor thread -----------------------------------------------------------

    def _target_args(self, slot: Slot, events: Connection | None) -> tuple[Callable[..., None], tuple[object, ...]]:
        log_file, level = log_target()
        return worker_main, (self.config, slot.number, os.getpid(), log_file, level, events)

    def _wants_events(self) -> bool:
        return self.observer is not None  # the pipe carries only the observer calls (metrics)

    def _on_message(self, slot: Slot, kind: str, args: tuple[object, ...]) -> None:
        """Pass the worker's observer calls on to serve's observer (the metrics)."""
        if kind in _OBSERVED and self.observer is not None:
            getattr(self.observer, kind)(*args)

    def _on_died(self, slot: Slot, code: int | None) -> bool:
        how = how_ended(code)
        try:
            registry.mark(self.db, slot.name, "exited", how)
            job = self.store.requeue_from_dead_worker(slot.name, short_exit(code), self.config.jobs.analysis_attempts)
        except Exception:  # the database is down: the job stays with the dead worker until serve restarts
            log.exception("worker %s %s; cannot record it", slot.name, how)
            job = None
        if job is not None:
            log.error(
                "analysis worker %s %s during job %d (series %s, %s, attempt %d of %d); the job is queued again",
                slot.name, how, job.id, job.series_uid, job.state, job.attempts, self.config.jobs.analysis_attempts,
            )  # fmt: skip
        else:
            log.error("analysis worker %s %s (no job held)", slot.name, how)
        return True

    def _shutdown(self, grace_s: float) -> None:
        running = [s for s in self.slots if s.process is not None and s.process.is_alive()]
        idle: set[str] = set()
        for slot in running:
            assert slot.process is not None
            try:
                busy = self.store.holds_job(slot.name)
            except Exception:  # the database is down: let it finish whatever it does
                busy = True
            if not busy:
                idle.add(slot.name)
            try:  # a job claimed meanwhile is requeued below, its attempt not counted
                os.kill(slot.process.pid or 0, signal.SIGTERM if busy else signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        for slot in running:
            assert slot.process is not None
            slot.process.join(timeout=max(0.0, deadline - time.monotonic()))
        for slot in [s for s in self.slots if s.process is not None]:
            code = self._reap(slot, grace_s)
            if slot.name in idle:
                try:
                    registry.mark(self.db, slot.name, "stopped", "stopped with serve (held no job)")
                except Exception:
                    log.exception("worker %s: cannot record its stop", slot.name)
            if code != 0:
                try:
                    if slot.name not in idle:
                        registry.mark(self.db, slot.name, "exited", how_ended(code))
                    self.store.requeue_from_dead_worker(
                        slot.name, short_exit(code), self.config.jobs.analysis_attempts, count_attempt=False
                    )
                except Exception:
                    log.exception("worker %s: cannot record its exit", slot.name)
