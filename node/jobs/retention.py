"""Retention: delete received images some days after their results were delivered.

A series qualifies when its newest job is ``done`` (results delivered to every destination) or
``skipped`` (nothing to deliver) and finished more than
``delete_images_after_days`` ago. Its files are deleted and ``series.images_deleted_at`` is set;
every database row stays, so ``uad-node status`` and the audit trail still say what was received,
decided and sent. Results under ``data_dir/results`` are kept (they are small, and can be sent again).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select, update

from node.db import Instance, Job, Series
from node.db.database import Database
from node.db.schema import utcnow
from node.jobs.states import JobState

log = logging.getLogger(__name__)


def delete_expired_images(db: Database, data_dir: Path, days: float, now: datetime | None = None) -> list[str]:
    """Delete the images of every qualifying series; returns their series UIDs. ``days`` 0 does nothing."""
    if days <= 0:
        return []
    now = now or utcnow()
    cutoff = now - timedelta(days=days)
    newest = select(Job.series_id, func.max(Job.version).label("version")).group_by(Job.series_id).subquery()
    with db.session() as session:
        rows = session.execute(
            select(Series.id, Series.series_uid)
            .join(newest, newest.c.series_id == Series.id)
            .join(Job, (Job.series_id == Series.id) & (Job.version == newest.c.version))
            .where(
                # Images received after an earlier deletion (the series sent again) go with their own job.
                Series.images_deleted_at.is_(None) | (Series.images_deleted_at < Job.finished_at),
                Job.state.in_([str(JobState.DONE), str(JobState.SKIPPED)]),
                Job.finished_at <= cutoff,
            )
        ).all()
    deleted = []
    studies_dir = (data_dir / "studies").resolve()
    for series_id, series_uid in rows:
        with db.session() as session:
            paths = session.scalars(
                select(Instance.path).where(Instance.series_id == series_id, Instance.path.is_not(None))
            ).all()
        folders = set()
        for path in map(Path, paths):
            if studies_dir in path.resolve().parents:  # never delete outside the node's own store
                path.unlink(missing_ok=True)
                folders.add(path.parent)
        for folder in folders:
            _remove_empty(folder, studies_dir)
        with db.session.begin() as session:
            session.execute(update(Series).where(Series.id == series_id).values(images_deleted_at=now))
        log.info("retention: deleted %d image file(s) of series %s", len(paths), series_uid)
        deleted.append(series_uid)
    return deleted


def _remove_empty(folder: Path, root: Path) -> None:
    """Remove ``folder`` and its parents up to ``root`` while they are empty."""
    while folder.resolve() != root and root in folder.resolve().parents:
        try:
            folder.rmdir()
        except OSError:  # not empty
            return
        folder = folder.parent
