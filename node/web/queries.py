"""Reads of the node's database that the HTTP interface needs and ``node.status`` does not offer: job counts
per state (for the ``uad_jobs`` gauge, right after a restart too) and the latest audit events."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select

from node.db import Event, Job
from node.db.database import Database
from node.db.schema import as_utc
from node.jobs.states import JobState


def job_counts(db: Database) -> dict[str, int]:
    """Jobs per state, every state present (0 when none), in one GROUP BY."""
    with db.session() as session:
        rows = session.execute(select(Job.state, func.count(Job.id)).group_by(Job.state)).all()
    counts = dict.fromkeys((str(state) for state in JobState), 0)
    counts.update({str(state): int(n) for state, n in rows})
    return counts


@dataclass(frozen=True)
class EventStatus:
    """One audit event as the status page shows it (UIDs and AE titles only, like the table itself)."""

    at: str
    kind: str
    calling_ae: str
    calling_host: str
    series_uid: str
    detail: str


# Every association writes these two: on the page they would push out the events a person acts on.
ROUTINE_EVENTS = ("association_accepted", "association_ended")


def recent_events(db: Database, limit: int = 20) -> list[EventStatus]:
    """The newest ``limit`` events worth a look (refusals, replacements, file problems), newest first."""
    with db.session() as session:
        rows = session.scalars(
            select(Event).where(Event.kind.not_in(ROUTINE_EVENTS)).order_by(Event.id.desc()).limit(limit)
        ).all()
        return [
            EventStatus(as_utc(e.at).isoformat(), e.kind, e.calling_ae, e.calling_host, e.series_uid, e.detail)
            for e in rows
        ]
