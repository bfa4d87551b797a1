"""Retention (node/jobs/retention.py): received images are deleted some days after their series' newest job
finished done or skipped; every database row stays. Real files stored by ``InstanceStore``, real SQLite."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import select, update

from node.db import Instance, Job, Series
from node.db.database import Database
from node.db.schema import utcnow
from node.jobs.retention import delete_expired_images
from node.jobs.states import JobState
from node.jobs.store import JobStore, Snapshot
from node.receiver.storage import InstanceStore
from tests.mr_files import mr_series
from tests.stored_instances import files_under, put, target_of

NOW = utcnow()
DAYS = 7


def days_ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


def stored_series(store: InstanceStore, count: int = 3, study_uid: str | None = None) -> list[Dataset]:
    series = mr_series(count, size=8, study_uid=study_uid)
    for ds in series:
        put(store, ds)
    return series


def give_job(
    db: Database, series: list[Dataset], state: JobState, finished_at: datetime | None, version: int = 1
) -> None:
    """A job of ``state`` for the series, finished at ``finished_at``."""
    with db.session.begin() as session:
        series_id, last_id = session.execute(
            select(Series.id, Instance.id)
            .join(Instance, Instance.series_id == Series.id)
            .where(Series.series_uid == str(series[0].SeriesInstanceUID))
            .order_by(Instance.id.desc())
            .limit(1)
        ).one()
        snapshot = Snapshot(series_id, series[0].StudyInstanceUID, series[0].SeriesInstanceUID, 3, last_id, NOW)
        job = JobStore(db).create(session, snapshot, JobState.QUEUED, "", "/m.pt", version)
        session.execute(update(Job).where(Job.id == job.id).values(state=str(state), finished_at=finished_at))


def paths_of(data_dir: Path, series: list[Dataset]) -> list[Path]:
    return [target_of(data_dir, ds) for ds in series]


def series_row(db: Database, series: list[Dataset]) -> Series:
    with db.session() as session:
        return session.scalars(select(Series).where(Series.series_uid == str(series[0].SeriesInstanceUID))).one()


def instance_rows(db: Database, series: list[Dataset]) -> list[tuple[str, bool, str | None]]:
    uids = [str(ds.SOPInstanceUID) for ds in series]
    with db.session() as session:
        return [
            tuple(row)
            for row in session.execute(
                select(Instance.sop_instance_uid, Instance.stored, Instance.path)
                .where(Instance.sop_instance_uid.in_(uids))
                .order_by(Instance.id)
            )
        ]


def test_zero_days_deletes_nothing(store: InstanceStore, db: Database, data_dir: Path) -> None:
    series = stored_series(store)
    give_job(db, series, JobState.DONE, days_ago(1000))
    before = files_under(data_dir / "studies")
    assert delete_expired_images(db, data_dir, 0, now=NOW) == []
    assert files_under(data_dir / "studies") == before == sorted(paths_of(data_dir, series))
    assert series_row(db, series).images_deleted_at is None


def test_images_go_some_days_after_their_results_were_delivered_and_the_record_stays(
    store: InstanceStore, db: Database, data_dir: Path
) -> None:
    old_done = stored_series(store)
    recent_done = stored_series(store, study_uid=old_done[0].StudyInstanceUID)  # same study: its folder stays
    old_skipped = stored_series(store)  # a study of its own: its folder goes
    old_failed = stored_series(store)
    exporting = stored_series(store)
    newer_version_queued = stored_series(store)
    give_job(db, old_done, JobState.DONE, days_ago(DAYS + 0.01))
    give_job(db, recent_done, JobState.DONE, days_ago(DAYS - 0.01))
    give_job(db, old_skipped, JobState.SKIPPED, days_ago(30))
    give_job(db, old_failed, JobState.FAILED, days_ago(30))
    give_job(db, exporting, JobState.EXPORTING, None)
    give_job(db, newer_version_queued, JobState.DONE, days_ago(30))
    give_job(db, newer_version_queued, JobState.QUEUED, None, version=2)
    rows_before = {id(s): instance_rows(db, s) for s in (old_done, old_skipped)}

    deleted = delete_expired_images(db, data_dir, DAYS, now=NOW)

    assert sorted(deleted) == sorted([old_done[0].SeriesInstanceUID, old_skipped[0].SeriesInstanceUID])
    studies = data_dir / "studies"
    for gone in (old_done, old_skipped):
        assert not any(p.exists() for p in paths_of(data_dir, gone))
        assert instance_rows(db, gone) == rows_before[id(gone)]  # the record of what was received stays
        row = series_row(db, gone)
        assert row.images_deleted_at == NOW
    assert not (studies / old_done[0].StudyInstanceUID / old_done[0].SeriesInstanceUID).exists()
    assert (studies / old_done[0].StudyInstanceUID).is_dir()  # still holds recent_done
    assert not (studies / old_skipped[0].StudyInstanceUID).exists()
    kept = [recent_done, old_failed, exporting, newer_version_queued]
    assert files_under(studies) == sorted(p for s in kept for p in paths_of(data_dir, s))
    assert all(series_row(db, s).images_deleted_at is None for s in kept)
    assert studies.is_dir()

    assert delete_expired_images(db, data_dir, DAYS, now=NOW) == []  # a second run has nothing to do
    assert files_under(studies) == sorted(p for s in kept for p in paths_of(data_dir, s))


def test_a_path_outside_the_store_is_never_deleted(
    store: InstanceStore, db: Database, data_dir: Path, tmp_path: Path
) -> None:
    series = stored_series(store)
    outside = tmp_path / "elsewhere" / "keep.dcm"
    outside.parent.mkdir()
    outside.write_bytes(b"not the node's to delete")
    sneaky = data_dir / "studies" / ".." / "results" / "keep.dcm"  # inside data_dir, outside studies/
    sneaky.parent.mkdir(parents=True)
    sneaky.write_bytes(b"a result")
    with db.session.begin() as session:
        for ds, path in zip(series[:2], (outside, sneaky), strict=True):
            target_of(data_dir, ds).unlink()  # the row now names a file elsewhere
            session.execute(
                update(Instance).where(Instance.sop_instance_uid == str(ds.SOPInstanceUID)).values(path=str(path))
            )
    give_job(db, series, JobState.DONE, days_ago(30))

    assert delete_expired_images(db, data_dir, DAYS, now=NOW) == [series[0].SeriesInstanceUID]
    assert outside.read_bytes() == b"not the node's to delete"
    assert sneaky.read_bytes() == b"a result"
    assert not target_of(data_dir, series[2]).exists()
    assert files_under(data_dir / "studies") == []


def test_images_received_after_a_deletion_go_once_their_own_job_has_expired(
    store: InstanceStore, db: Database, data_dir: Path
) -> None:
    """A series sent again after retention deleted its images (a re-routed study) gets a new job version; its
    new files must go in their turn, not stay forever because the series was cleaned once."""
    series = stored_series(store)
    give_job(db, series, JobState.DONE, days_ago(30))
    assert delete_expired_images(db, data_dir, DAYS, now=NOW) == [series[0].SeriesInstanceUID]
    first_deletion = series_row(db, series).images_deleted_at
    assert first_deletion == NOW

    again = mr_series(2, size=8)
    for ds in again:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = series[0].StudyInstanceUID, series[0].SeriesInstanceUID
        put(store, ds)
    give_job(db, series, JobState.DONE, first_deletion + timedelta(seconds=1), version=2)
    assert delete_expired_images(db, data_dir, DAYS, now=NOW) == []  # version 2 finished just now
    assert all(p.exists() for p in paths_of(data_dir, again))

    later = first_deletion + timedelta(days=DAYS + 1)
    assert delete_expired_images(db, data_dir, DAYS, now=later) == [series[0].SeriesInstanceUID]
    assert files_under(data_dir / "studies") == []
    assert series_row(db, series).images_deleted_at > first_deletion
    assert delete_expired_images(db, data_dir, DAYS, now=later) == []
