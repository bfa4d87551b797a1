"""Deciding a stored series and writing the decision where ``uad-node status`` shows it."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select, update

from node.db import Instance, Series
from node.db.database import Database
from node.selection.config import SelectionSection
from node.selection.selector import SeriesDecision, select_series
from node.selection.series import SeriesHeaders, read_headers

SELECTED = "selected"
SKIPPED = "skipped"


def decide_stored_series(db: Database, series_uid: str, config: SelectionSection) -> SeriesDecision:
    """Read the headers of a series' stored files, decide, and record state and reason on its row.

    Series whose SOP class the receiver ignores (no files) keep their "ignored" state and reason.
    """
    with db.session() as session:
        row = session.execute(select(Series.id, Series.state).where(Series.series_uid == series_uid)).one()
        paths = session.scalars(
            select(Instance.path).where(Instance.series_id == row.id, Instance.stored.is_(True))
        ).all()
    if not paths:
        raise ValueError(f"series {series_uid} has no stored instances to decide on")
    decision = select_series(SeriesHeaders(series_uid, tuple(read_headers(Path(p) for p in paths))), config)
    with db.session.begin() as session:
        session.execute(
            update(Series)
            .where(Series.id == row.id)
            .values(state=SELECTED if decision.selected else SKIPPED, state_reason=decision.reason)
        )
    return decision
