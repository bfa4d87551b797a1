"""One analysis worker process, started by ``serve``'s supervisor (``node.jobs.supervisor``) with the "spawn"
start method: a fresh interpreter that shares nothing with the receiver but the database and the data folder.

It lowers its CPU priority (``[jobs] worker_nice``), applies the optional address-space limit
(``[jobs] worker_memory_mb``) and the thread count (``[jobs] threads``), registers itself in the workers
table, loads the atlas and every configured model, then claims and analyses queued jobs one at a time
(``node.jobs.worker.Worker.run``) until told to stop. A heartbeat thread reports its state, its models and
its current job every ``HEARTBEAT_S``. Exports stay in ``serve`` (a finished analysis is in ``exporting``
with its results on disk; the exporter there picks it up within one poll interval).

SIGTERM (from the supervisor): the running stage finishes, the job goes back to the queue without counting
the attempt, and the process exits 0. If ``serve`` itself dies (even with SIGKILL) the kernel kills this
process too (``PR_SET_PDEATHSIG``), and the heartbeat thread exits it when its parent changes.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection

from node.child_process import die_with_parent, log_like_serve
from node.config import NodeConfig
from node.jobs import registry

log = logging.getLogger(__name__)


class _PipeObserver:
    """A ``JobObserver`` that sends each call to serve (the metrics live there) over this worker's own pipe.
    Never raises: metrics must not fail an analysis."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._lock = threading.Lock()

    def _send(self, method: str, *args: object) -> None:
        try:
            with self._lock:
                self._connection.send((method, args))
        except (OSError, ValueError):  # serve is gone or stopping: nothing to report to
            pass

    def stage_finished(self, stage: str, seconds: float) -> None:
        self._send("stage_finished", stage, seconds)

    def export_finished(self, destination: str, outcome: str) -> None:
        self._send("export_finished", destination, outcome)

    def model_loaded(self, model: str, seconds: float) -> None:
        self._send("model_loaded", model, seconds)


def worker_main(
    config: NodeConfig,
    slot: int,
    parent_pid: int,
    log_file: str | None = None,
    log_level: int | str | None = None,
    events: Connection | None = None,
) -> None:
    """The process entry point (picklable: a module-level function of plain arguments). It logs where serve
    logs: to ``log_file`` when serve logs to a file (the demo), else to the standard error it inherits; it
    reports stage timings and model loads over ``events`` when serve watches them (metrics)."""
    die_with_parent(parent_pid)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: serve decides, then tells us
    log_like_serve(log_file, log_level if log_level is not None else config.logging.level)
    jobs = config.jobs
    if jobs.worker_nice:
        os.nice(jobs.worker_nice)
    if jobs.worker_memory_mb:
        import resource

        limit = jobs.worker_memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    observer = _PipeObserver(events) if events is not None else None
    code = _run(config, slot, parent_pid, stopping, observer)
    # Everything is committed and the database closed: skip the interpreter's teardown, which with torch and
    # ITK loaded takes seconds (on a busy machine, tens of them) and delays serve's own stop for nothing.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(
    config: NodeConfig, slot: int, parent_pid: int, stopping: threading.Event, observer: _PipeObserver | None
) -> int:
    from node.analysis import Analyser, AnalysisError
    from node.db.database import open_database
    from node.jobs.store import JobStore
    from node.jobs.worker import Worker

    name = registry.worker_name(slot)
    db = open_database(config.node.effective_database_url(), migrate=False)
    models = dict.fromkeys(config.selection.models, "loading")
    state = {"state": "starting", "job": None}
    registry.register(db, name, os.getpid(), models)
    limit = f"{config.jobs.worker_memory_mb} MiB" if config.jobs.worker_memory_mb else "none"
    log.info("analysis worker %s started (nice %d, memory limit %s)", name, config.jobs.worker_nice, limit)
    beating = threading.Thread(
        target=_beat, args=(db, name, models, state, parent_pid, stopping), name="heartbeat", daemon=True
    )
    beating.start()

    if threads := config.jobs.threads:
        # Process-wide settings: oversubscribed threads spin at barriers and run many times slower.
        import SimpleITK as sitk
        import torch

        torch.set_num_threads(threads)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    analyser = Analyser(config.results, config.quality)
    for contrast, checkpoint in config.selection.models.items():
        if stopping.is_set():
            break
        started = time.monotonic()
        try:
            analyser.load(checkpoint)
        except AnalysisError as exc:
            models[contrast] = f"failed: {exc}"
            log.error("model for %s unusable, its series will fail until it is fixed: %s", contrast, exc)
            continue
        models[contrast] = "loaded"
        seconds = time.monotonic() - started
        log.info("worker %s: model for %s loaded in %.1f s", name, contrast, seconds)
        if observer is not None:
            observer.model_loaded(contrast, seconds)
    state["state"] = "ready"
    _report(db, name, models, state)

    store = JobStore(db)
    worker = Worker(db, store, analyser, config.node.data_dir, config.jobs, config.selection, stopping, observer)
    while not stopping.is_set():
        try:
            job = store.claim(worker=name)
        except Exception:  # a database hiccup: try again at the next poll
            log.exception("worker %s: cannot claim a job", name)
            job = None
        if job is None:
            stopping.wait(config.jobs.poll_interval_s)
            continue
        state["job"] = job.id
        _report(db, name, models, state)
        try:
            worker.run(job)
        finally:
            state["job"] = None
            _report(db, name, models, state)
    registry.mark(db, name, "stopped", "stopped by serve")
    db.close()
    log.info("analysis worker %s stopped", name)
    return 0


def _report(db, name: str, models: dict[str, str], state: dict) -> None:  # type: ignore[no-untyped-def]
    try:
        registry.heartbeat(db, name, state["state"], dict(models), state["job"])
    except Exception:  # the next beat tries again
        log.exception("worker %s: heartbeat failed", name)


def _beat(db, name: str, models: dict[str, str], state: dict, parent_pid: int, stopping: threading.Event) -> None:  # type: ignore[no-untyped-def]
    while not stopping.wait(registry.HEARTBEAT_S):
        if os.getppid() != parent_pid:  # serve is gone (PR_SET_PDEATHSIG missed it): nothing may run unsupervised
            log.error("worker %s: serve (pid %d) is gone; exiting", name, parent_pid)
            os._exit(3)
        _report(db, name, models, state)
