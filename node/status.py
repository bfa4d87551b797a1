"""What the node holds, for ``uad-node status``: studies, series, instance counts and states."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select

from node.db import Instance, Series, Study
from node.db.database import Database


@dataclass(frozen=True)
class SeriesStatus:
    series_uid: str
    modality: str
    instances: int
    state: str
    reason: str
    description: str
    last_received_at: str


@dataclass(frozen=True)
class StudyStatus:
    study_uid: str
    series: list[SeriesStatus]


def collect_status(db: Database) -> list[StudyStatus]:
    """Every study with its series, oldest first, in one query."""
    counts = (
        select(
            Instance.series_id,
            func.count(Instance.id).label("n"),
            func.max(Instance.received_at).label("last"),
        )
        .group_by(Instance.series_id)
        .subquery()
    )
    with db.session() as session:
        rows = session.execute(
            select(Study.study_uid, Series, func.coalesce(counts.c.n, 0), counts.c.last)
            .join(Series, Series.study_id == Study.id)
            .outerjoin(counts, counts.c.series_id == Series.id)
            .order_by(Study.id, Series.id)
        )
        studies: dict[str, list[SeriesStatus]] = {}
        for study_uid, series, count, last in rows:
            studies.setdefault(study_uid, []).append(
                SeriesStatus(
                    series_uid=series.series_uid,
                    modality=series.modality,
                    instances=int(count),
                    state=series.state,
                    reason=series.state_reason,
                    description=series.description,
                    last_received_at=_utc_iso(last),
                )
            )
    return [StudyStatus(study_uid=uid, series=series) for uid, series in studies.items()]


def status_json(studies: list[StudyStatus]) -> dict:
    """The ``status --json`` contract: ``{"studies": [{"study_uid", "series": [...]}]}``."""
    return {"studies": [asdict(study) for study in studies]}


def status_text(studies: list[StudyStatus]) -> str:
    """A table for people: one line per series, grouped by study."""
    if not studies:
        return "no studies received"
    lines = []
    for study in studies:
        lines.append(f"study {study.study_uid}")
        for s in study.series:
            reason = f"  ({s.reason})" if s.reason else ""
            lines.append(f"  {s.series_uid}  {s.modality or '-':<4} {s.instances:>5} instances  {s.state}{reason}")
    return "\n".join(lines)


def _utc_iso(value: datetime | str | None) -> str:
    """Aggregates bypass the column type: SQLite hands back a naive string, PostgreSQL an
    aware value in the session's time zone. Both become UTC."""
    if value is None:
        return ""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return (value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)).isoformat()
