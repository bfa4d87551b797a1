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
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from node.child_process import FIRST_BACKOFF_S, HEALTHY_AFTER_S, MAX_BACKOFF_S, how_ended, log_target, short_exit
from node.config import NodeConfig
from node.db.database import Database
from node.jobs import registry
from node.jobs.observer import JobObserver
from node.jobs.store import JobStore
from node.jobs.worker_process import worker_main

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    number: int
    process: BaseProcess | None = None
    name: str = ""
    started: float = 0.0
    backoff_s: float = FIRST_BACKOFF_S
    restart_at: float | None = None  # monotonic time of the next start, while waiting for the backoff
    deaths: int = 0
    events: Connection | None = None  # the worker's observer calls (metrics), read here


class Supervisor:
    """Starts, watches and restarts the analysis worker processes; see the module docstring."""

    def __init__(
        self, config: NodeConfig, db: Database, store: JobStore | None = None, observer: JobObserver | None = None
    ) -> None:
        self.config, self.db, self.observer = config, db, observer
        self.store = store or JobStore(db)
        self.slots = [_Slot(number) for number in range(1, config.jobs.workers + 1)]
        self._context = multiprocessing.get_context("spawn")
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- the main process's side -------------------------------------------------------------------

    def start(self) -> None:
        for name in registry.mark_gone_on_this_host(self.db):
            log.warning("worker %s of a previous serve is gone; marked exited", name)
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._thread.start()

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGTERM every worker, wait up to ``grace_s`` for them, SIGKILL the rest; returns when all are gone."""
        self._grace_s = grace_s
        self._stop.set()
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def pids(self) -> dict[str, int]:
        """Live worker name -> pid (for tests and logs)."""
        with self._lock:
            return {s.name: s.process.pid for s in self.slots if s.process is not None and s.process.pid}

    # -- the supervisor thread -------------------------------------------------------------------------

    def _watch(self) -> None:
        for slot in self.slots:
            self._spawn(slot)
        while not self._stop.is_set():
            now = time.monotonic()
            for slot in self.slots:
                if slot.process is None and slot.restart_at is not None and now >= slot.restart_at:
                    self._spawn(slot)
            waits = [s.restart_at - now for s in self.slots if s.process is None and s.restart_at is not None]
            timeout = max(0.05, min([1.0, *waits]))
            sentinels = {s.process.sentinel: s for s in self.slots if s.process is not None}
            events = {s.events: s for s in self.slots if s.events is not None}
            ready = wait([*sentinels, *events, self._wake_r], timeout=timeout)
            for handle in ready:
                if handle in events:
                    self._forward(events[handle])
            for handle in ready:
                if handle in sentinels and not self._stop.is_set():
                    self._died(sentinels[handle])
        self._shutdown(getattr(self, "_grace_s", 60.0))

    def _spawn(self, slot: _Slot) -> None:
        log_file, level = log_target()
        # One pipe per worker, written by it alone: a worker killed mid-write can garble only its own.
        reader, writer = self._context.Pipe(duplex=False) if self.observer is not None else (None, None)
        process = self._context.Process(
            target=worker_main,
            args=(self.config, slot.number, os.getpid(), log_file, level, writer),
            name=f"uad-node-worker-{slot.number}",
        )
        try:
            process.start()
        except OSError as exc:  # out of processes or memory: try again later
            log.error("cannot start analysis worker %d: %s", slot.number, exc)
            for end in (reader, writer):
                if end is not None:
                    end.close()
            self._schedule_restart(slot)
            return
        if writer is not None:
            writer.close()  # the child has its copy; EOF on the reader once the child is gone
        with self._lock:
            slot.process, slot.started, slot.restart_at, slot.events = process, time.monotonic(), None, reader
            slot.name = registry.worker_name(slot.number, process.pid)
        log.info("analysis worker %s started (pid %d)", slot.name, process.pid)

    def _forward(self, slot: _Slot) -> None:
        """Pass the worker's observer calls on to serve's observer (the metrics); drop the pipe at its end."""
        connection = slot.events
        if connection is None or self.observer is None:
            return
        try:
            while connection.poll():
                method, args = connection.recv()
                if method in ("stage_finished", "export_finished", "model_loaded"):
                    getattr(self.observer, method)(*args)
        except (EOFError, OSError, ValueError, TypeError):  # the worker ended (perhaps mid-message)
            connection.close()
            slot.events = None
        except Exception:  # a garbled message: metrics are not worth a supervisor
            log.exception("worker %s: unreadable event; ignoring its events from now on", slot.name)
            connection.close()
            slot.events = None

    def _died(self, slot: _Slot) -> None:
        process = slot.process
        assert process is not None
        self._forward(slot)  # what it reported before it died
        if slot.events is not None:
            slot.events.close()
            slot.events = None
        process.join(timeout=5)
        code = process.exitcode
        how = how_ended(code)
        lived = time.monotonic() - slot.started
        with self._lock:
            slot.process = None
        slot.deaths += 1
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
        if lived >= HEALTHY_AFTER_S:
            slot.backoff_s = FIRST_BACKOFF_S
        self._schedule_restart(slot)

    def _schedule_restart(self, slot: _Slot) -> None:
        slot.restart_at = time.monotonic() + slot.backoff_s
        log.info("analysis worker slot %d: restarting in %g s", slot.number, slot.backoff_s)
        slot.backoff_s = min(slot.backoff_s * 2, MAX_BACKOFF_S)

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
            process = slot.process
            assert process is not None
            if process.is_alive():
                log.warning("analysis worker %s did not stop within %g s; killing it", slot.name, grace_s)
                process.kill()
                process.join(timeout=10)
            code = process.exitcode
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
            self._forward(slot)
            if slot.events is not None:
                slot.events.close()
                slot.events = None
            process.close()
            with self._lock:
                slot.process = None
