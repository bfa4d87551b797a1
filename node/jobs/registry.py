"""The workers table: each analysis worker process (role ``worker``) and each receiver process of a
multi-process receiver (role ``receiver``, ``node.receiver.processes``) registers itself, reports a heartbeat,
and is marked when it exits, so ``serve``'s supervisors, readiness (/readyz), ``uad-node status`` and the web
page all read the same picture.

A worker row is live while its state is ``starting`` or ``ready`` and its heartbeat is recent
(``STALE_AFTER_S``): a process killed with its whole ``serve`` stops beating and drops out by itself.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update

from node.db import Worker as WorkerRow
from node.db.database import Database
from node.db.schema import as_utc, utcnow

HEARTBEAT_S = 2.0
STALE_AFTER_S = 15.0
LIVE_STATES = ("starting", "ready")


@dataclass(frozen=True)
class WorkerInfo:
    """A worker row as status and readiness show it."""

    name: str
    host: str
    pid: int
    role: str
    state: str
    detail: str
    models: dict[str, str]
    current_job: int | None
    started_at: datetime
    heartbeat_at: datetime

    @classmethod
    def of(cls, row: WorkerRow) -> WorkerInfo:
        return cls(
            name=row.name,
            host=row.host,
            pid=row.pid,
            role=row.role,
            state=row.state,
            detail=row.detail,
            models=json.loads(row.models or "{}"),
            current_job=row.current_job_id,
            started_at=as_utc(row.started_at),
            heartbeat_at=as_utc(row.heartbeat_at),
        )

    def live(self, now: datetime | None = None) -> bool:
        now = now or utcnow()
        return self.state in LIVE_STATES and (now - self.heartbeat_at).total_seconds() < STALE_AFTER_S


def this_host() -> str:
    return socket.gethostname()


def worker_name(slot: int | str, pid: int | None = None) -> str:
    return f"{this_host()}:{pid or os.getpid()}:{slot}"[:64]


def register(db: Database, name: str, pid: int, models: dict[str, str], role: str = "worker") -> None:
    """Insert this process's row (state ``starting``)."""
    now = utcnow()
    with db.session.begin() as session:
        session.add(
            WorkerRow(
                name=name, host=this_host(), pid=pid, role=role, state="starting", detail="",
                models=json.dumps(models), current_job_id=None, started_at=now, heartbeat_at=now,
            )
        )  # fmt: skip


def heartbeat(
    db: Database, name: str, state: str, models: dict[str, str], current_job: int | None, detail: str | None = None
) -> None:
    """Beat: still alive, in ``state``, with these model states and this job (guarded: an ``exited`` row stays so);
    ``detail``, when given, says what the process did so far (a receiver's counts)."""
    values = {"state": state, "models": json.dumps(models), "current_job_id": current_job, "heartbeat_at": utcnow()}
    if detail is not None:
        values["detail"] = detail
    with db.session.begin() as session:
        session.execute(
            update(WorkerRow).where(WorkerRow.name == name, WorkerRow.state.in_(LIVE_STATES)).values(**values)
        )


def mark(db: Database, name: str, state: str, detail: str) -> None:
    """``stopped`` (a clean exit) or ``exited`` (died; ``detail`` says how); the job it held is no longer its."""
    with db.session.begin() as session:
        session.execute(
            update(WorkerRow).where(WorkerRow.name == name).values(state=state, detail=detail, current_job_id=None)
        )


def mark_gone_on_this_host(db: Database, role: str | None = None) -> list[str]:
    """At start-up: rows of this host (of ``role``, or all) still claiming to be live whose process no longer
    exists (a previous ``serve`` that was killed) are marked ``exited``. Returns their names."""
    gone = []
    query = select(WorkerRow).where(WorkerRow.host == this_host(), WorkerRow.state.in_(LIVE_STATES))
    if role is not None:
        query = query.where(WorkerRow.role == role)
    with db.session() as session:
        rows = session.scalars(query).all()
        candidates = [(row.name, row.pid) for row in rows]
    for name, pid in candidates:
        if not _alive(pid):
            mark(db, name, "exited", "gone: its process no longer existed when serve started")
            gone.append(name)
    return gone


def all_workers(db: Database) -> list[WorkerInfo]:
    with db.session() as session:
        return [WorkerInfo.of(row) for row in session.scalars(select(WorkerRow).order_by(WorkerRow.id)).all()]


def recent_workers(db: Database, keep_exited_s: float = 3600.0) -> list[WorkerInfo]:
    """Live workers, and those that stopped or died in the last ``keep_exited_s`` (for status)."""
    now = utcnow()
    since = now - timedelta(seconds=keep_exited_s)
    return [w for w in all_workers(db) if w.live(now) or w.heartbeat_at >= since]


def model_states(db: Database, configured: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Contrast class -> "loaded" when a live worker reports it loaded; else what a live worker reports
    ("loading", "failed: why"); "no live worker" when none is running."""
    live = [w for w in all_workers(db) if w.live() and w.role == "worker"]
    states = {}
    for contrast in configured:
        reported = [w.models.get(contrast, "loading") for w in live]
        if "loaded" in reported:
            states[contrast] = "loaded"
        elif reported:
            failed = [r for r in reported if r.startswith("failed")]
            states[contrast] = failed[0] if failed else reported[0]
        else:
            states[contrast] = "loading (no live analysis worker)"
    return states


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
