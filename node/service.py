"""The node as a running service: the receiver, the job scheduler and (with ``[web] enabled``) the HTTP
interface over one database, until told to stop.

This process holds the receiver (C-STORE, and STOW-RS on the HTTP interface; with ``[node] receiver_processes``
> 1 C-STORE is received by that many child processes, ``node.receiver.processes``), completion, exports and
retention; analyses run in separate worker processes that the scheduler's supervisor starts, watches and
restarts (``node.jobs.supervisor``), so nothing an analysis does (a crash, an OOM kill, ``kill -9``) stops
the receiver, and no model is ever loaded here.

``uad-node serve`` runs it on the main thread until SIGTERM; ``uad-node demo`` runs it on a thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from node.config import NodeConfig
from node.db.database import Database, open_database

if TYPE_CHECKING:
    from node.jobs.scheduler import JobScheduler
    from node.receiver import Receiver
    from node.receiver.processes import ReceiverProcesses
    from node.web.metrics import NodeMetrics
    from node.web.server import WebServer

log = logging.getLogger("node")

# Libraries that narrate routine work at INFO (pynetdicom every PDU, highdicom every attribute it copies) or
# warn about what is by design (APScheduler: a worker still busy when its next poll comes).
WORKER_STOP_GRACE_S = 60.0  # a worker's running stage may finish; then it is killed (its job requeued)

_QUIET = {"pynetdicom": logging.WARNING, "highdicom": logging.WARNING, "apscheduler": logging.ERROR}


def configure_logging(level: str | int, handler: logging.Handler) -> None:
    """One line per event: time, level, module, message (UIDs and job ids; no patient data by default)."""
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    for name, floor in _QUIET.items():
        logging.getLogger(name).setLevel(floor)


def run_node(config: NodeConfig, stop: threading.Event, started: threading.Event | None = None) -> int:
    """The receiver, the job scheduler and the HTTP interface until ``stop`` is set (``serve``, and the demo
    in-process)."""
    from node.jobs.scheduler import JobScheduler
    from node.receiver import Receiver

    try:
        config.node.data_dir.mkdir(parents=True, exist_ok=True)
        db = open_database(config.node.effective_database_url())
    except (OSError, SQLAlchemyError) as exc:
        log.error("cannot open data directory or database: %s", exc)
        return 1
    metrics = _metrics(config, db) if config.web.enabled else None
    # With receiver_processes > 1 this one never listens: its store is STOW-RS's (the children receive C-STORE).
    receiver = Receiver(config=config, db=db, observer=metrics)
    processes = _receiver_processes(config, db, metrics)
    listening = (lambda: receiver.listening) if processes is None else (lambda: processes.listening)
    scheduler = JobScheduler(config, db, observer=metrics)
    web = None
    if metrics is not None:  # first, so /readyz answers 503 while the rest starts and the models load
        try:
            web = _start_web(config, db, receiver, listening, scheduler, metrics)
        except OSError as exc:
            log.error("cannot serve HTTP on %s:%d: %s", config.web.host, config.web.port, exc.strerror or exc)
            db.close()
            return 1
    try:
        if processes is None:
            receiver.start()
        else:  # every child listens before reconciliation and the scheduler start
            processes.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.node.host, config.node.port, exc.strerror or exc)
        if web is not None:
            web.stop()
        db.close()
        return 1
    # Issue 16: files and rows made to agree again (one line in the log). Synchronous, ~1.5 s per 20,000 files:
    # images are received meanwhile, analysis and retention start after it.
    from node.receiver.reconcile import reconcile_at_start

    reconcile_at_start(config, db)
    scheduler.start()
    if started is not None:
        started.set()
    # Python runs signal handlers on the main thread between bytecodes; a signal the kernel delivers to another
    # thread does not wake a blocked Event.wait(). Waiting in slices handles SIGTERM and SIGHUP within 0.5 s.
    while not stop.wait(0.5):
        pass
    log.info("stopping: no new associations; finishing stores in flight and the running job stage")
    if processes is None:
        receiver.stop()
    else:
        receiver.store.close()  # STOW-RS: later instances are refused, as Receiver.stop does
        processes.stop()
    if web is not None:  # after the receiver, before the database: STOW-RS requests in flight finish
        web.stop()
    scheduler.stop(grace_s=WORKER_STOP_GRACE_S)
    db.close()
    return 0


def _metrics(config: NodeConfig, db: Database) -> NodeMetrics:
    from node.web.metrics import NodeMetrics
    from node.web.queries import job_counts

    return NodeMetrics(lambda: job_counts(db), config.node.data_dir)


def _receiver_processes(config: NodeConfig, db: Database, metrics: NodeMetrics | None) -> ReceiverProcesses | None:
    """The receiver as ``[node] receiver_processes`` child processes, or None for the in-process one (1)."""
    if config.node.receiver_processes == 1:
        return None
    from node.receiver.processes import ReceiverProcesses

    return ReceiverProcesses(config, db, observer=metrics)


def _start_web(
    config: NodeConfig,
    db: Database,
    receiver: Receiver,
    listening: Callable[[], bool],
    scheduler: JobScheduler,
    metrics: NodeMetrics,
) -> WebServer:
    """The HTTP interface over the running parts (imported here: serve without [web] never loads uvicorn)."""
    from node.dicomweb.stow_rs import StowReceiver
    from node.web.app import create_app
    from node.web.health import ReadinessChecks
    from node.web.server import WebServer

    checks = ReadinessChecks(listening=listening, db=db, models=lambda: dict(scheduler.model_states), node=config.node)
    if not config.web.token:
        log.info("HTTP interface: no [web] token, so job retry/cancel and STOW-RS are disabled")
    # STOW-RS shares the C-STORE receiver's store: its per-UID locks, disk floor and shutdown refusal.
    stow = StowReceiver(config, receiver.store, db, observer=metrics)
    app = create_app(config, db, checks, metrics, stow=stow)
    server = WebServer(app, config)
    server.start()
    return server
