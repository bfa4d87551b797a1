"""The node as a running service: the receiver and the job scheduler over one database, until told to stop.

``uad-node serve`` runs it on the main thread until SIGTERM; ``uad-node demo`` runs it on a thread.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.exc import SQLAlchemyError

from node.config import NodeConfig
from node.db.database import open_database

log = logging.getLogger("node")

# Libraries that narrate routine work at INFO (pynetdicom every PDU, highdicom every attribute it copies) or
# warn about what is by design (APScheduler: a worker still busy when its next poll comes).
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
    """The receiver and the job scheduler until ``stop`` is set (``serve``, and the demo in-process)."""
    from node.jobs.scheduler import JobScheduler
    from node.receiver import Receiver

    try:
        config.node.data_dir.mkdir(parents=True, exist_ok=True)
        db = open_database(config.node.effective_database_url())
    except (OSError, SQLAlchemyError) as exc:
        log.error("cannot open data directory or database: %s", exc)
        return 1
    receiver = Receiver(config=config, db=db)
    try:
        receiver.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.node.host, config.node.port, exc.strerror or exc)
        db.close()
        return 1
    scheduler = JobScheduler(config, db)
    scheduler.start()
    if started is not None:
        started.set()
    stop.wait()
    log.info("stopping: no new associations; finishing stores in flight and the running job stage")
    receiver.stop()
    scheduler.stop()
    db.close()
    return 0
