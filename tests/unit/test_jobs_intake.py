"""Intake (node/jobs/intake.py): when a received series is complete, and which job it gets.

Real instances stored by ``InstanceStore`` into a real SQLite database; arrival times are set on the instance
rows and ``poll(now)`` is given the clock, so nothing sleeps. Also the ``[completion]`` config rules.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import func, select, update

from node.config import NodeConfig
from node.db import Instance, Series
from node.db.database import Database
from node.jobs.config import CompletionSection, JobsSection, RetentionSection
from node.jobs.intake import Intake
from node.jobs.states import JobState
from node.jobs.store import JobRecord, JobStore
from node.receiver.storage import InstanceStore
from node.selection import Contrast, SelectionSection
from tests.mr_files import CT_IMAGE_STORAGE, mr_series, mr_slice
from tests.stored_instances import put

CHECKPOINT = Path("/nowhere/model.pt")  # intake only names the model; the worker loads it
EVERY_CONTRAST = SelectionSection(min_slices=3, models=dict.fromkeys(Contrast, CHECKPOINT))
T0 = datetime(2025, 3, 3, 8, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def make_intake(db: Database, selection: SelectionSection = EVERY_CONTRAST, **completion: object) -> Intake:
    return Intake(db, CompletionSection(**completion), selection, JobStore(db))  # type: ignore[arg-type]


def receive(store: InstanceStore, datasets: list[Dataset], *times: float) -> None:
    """Store ``datasets``; with ``times`` (seconds after T0, one per data set or one for all) as their arrival."""
    for ds in datasets:
        put(store, ds)
    if times:
        arrivals = times if len(times) == len(datasets) else times * len(datasets)
        for ds, seconds in zip(datasets, arrivals, strict=True):
            arrive(store.db, ds, at(seconds))


def arrive(db: Database, ds: Dataset, when: datetime) -> None:
    with db.session.begin() as session:
        session.execute(
            update(Instance).where(Instance.sop_instance_uid == str(ds.SOPInstanceUID)).values(received_at=when)
        )


def more(datasets: list[Dataset], count: int) -> list[Dataset]:
    """``count`` further slices of the series of ``datasets``."""
    first = datasets[0]
    return [mr_slice(first.StudyInstanceUID, first.SeriesInstanceUID, len(datasets) + i, size=8) for i in range(count)]


def series_of(count: int, study_uid: str | None = None) -> list[Dataset]:
    return mr_series(count, size=8, study_uid=study_uid)


def jobs_of(db: Database, datasets: list[Dataset]) -> list[JobRecord]:
    """The jobs of the series of ``datasets``, oldest version first."""
    uid = str(datasets[0].SeriesInstanceUID)
    return sorted((j for j in JobStore(db).all() if j.series_uid == uid), key=lambda j: j.version)


def newest_instance(db: Database, datasets: list[Dataset]) -> tuple[int, datetime]:
    """(id, received_at) of the series' newest instance row."""
    with db.session() as session:
        row = session.execute(
            select(Instance.id, Instance.received_at)
            .join(Series, Series.id == Instance.series_id)
            .where(Series.series_uid == str(datasets[0].SeriesInstanceUID))
            .order_by(Instance.id.desc())
            .limit(1)
        ).one()
    return row.id, row.received_at


def instance_count(db: Database) -> int:
    with db.session() as session:
        return int(session.scalar(select(func.count(Instance.id))))


# -- completion --------------------------------------------------------------------------------------------


def test_a_series_is_complete_series_quiet_s_after_its_newest_image(store: InstanceStore, db: Database) -> None:
    series = series_of(4)
    receive(store, series)
    last_id, newest = newest_instance(db, series)
    arrive(db, series[0], newest - timedelta(seconds=5))  # the quiet period runs from the newest, not the first
    intake = make_intake(db, series_quiet_s=10)

    assert intake.poll(newest + timedelta(seconds=9.5)) == []
    assert jobs_of(db, series) == []

    [job] = intake.poll(newest + timedelta(seconds=10))
    assert job.series_uid == series[0].SeriesInstanceUID
    assert (job.state, job.version, job.instances) == (JobState.QUEUED, 1, 4)
    assert (job.last_instance_id, job.seen_instance_id, job.last_received_at) == (last_id, last_id, newest)
    assert intake.poll(newest + timedelta(seconds=10.5)) == []  # accounted for: no second job
    assert [j.id for j in jobs_of(db, series)] == [job.id]


def test_selection_queues_a_series_with_its_model(store: InstanceStore, db: Database) -> None:
    series = series_of(4)  # "T1 AX": contrast class T1
    receive(store, series, 0)
    [job] = make_intake(db, series_quiet_s=10).poll(at(10.5))
    assert job.state is JobState.QUEUED
    assert job.model == str(CHECKPOINT)
    assert "contrast class T1" in job.reason and "4 slices" in job.reason
    assert job.finished_at is None
    with db.session() as session:
        assert session.scalar(select(Series.state).where(Series.series_uid == job.series_uid)) == "selected"


def test_selection_skips_a_series_with_the_rule_that_failed(store: InstanceStore, db: Database) -> None:
    series = series_of(4)
    receive(store, series, 0)
    selection = SelectionSection(min_slices=50, models=dict.fromkeys(Contrast, CHECKPOINT))
    [job] = make_intake(db, selection, series_quiet_s=10).poll(at(10.5))
    assert (job.state, job.reason, job.model) == (JobState.SKIPPED, "4 slices < minimum 50", "")
    assert job.finished_at is not None
    assert JobStore(db).claim() is None  # nothing to analyse


def test_a_series_without_a_model_for_its_contrast_is_skipped(store: InstanceStore, db: Database) -> None:
    series = series_of(4)
    receive(store, series, 0)
    selection = SelectionSection(min_slices=3, models={Contrast.T2: CHECKPOINT})
    [job] = make_intake(db, selection, series_quiet_s=10).poll(at(10.5))
    assert job.state is JobState.SKIPPED
    assert "contrast class T1 has no model configured" in job.reason


def test_study_scope_waits_for_the_whole_study_to_be_quiet(store: InstanceStore, db: Database) -> None:
    first = series_of(3)
    second = series_of(3, study_uid=first[0].StudyInstanceUID)
    other_study = series_of(3)
    receive(store, first, 0)
    receive(store, second, 20)
    receive(store, other_study, 0)
    intake = make_intake(db, scope="study", series_quiet_s=10, study_quiet_s=60)

    # ``first`` has been quiet 30 s, far beyond series_quiet_s, but its study received ``second`` at 20 s.
    completed = intake.poll(at(30))
    assert completed == []
    assert intake.poll(at(59.5)) == []
    [other] = intake.poll(at(60))  # the other study has been quiet 60 s
    assert other.series_uid == other_study[0].SeriesInstanceUID
    assert intake.poll(at(79.5)) == []
    jobs = intake.poll(at(80.5))
    assert {j.series_uid for j in jobs} == {first[0].SeriesInstanceUID, second[0].SeriesInstanceUID}
    assert all(j.state is JobState.QUEUED for j in jobs)


def test_a_series_that_never_goes_quiet_is_complete_max_wait_s_after_its_first_waiting_image(
    store: InstanceStore, db: Database
) -> None:
    series = series_of(3)
    intake = make_intake(db, series_quiet_s=10, max_wait_s=60)
    receive(store, series, 0, 8, 16)  # an image every 8 s: never 10 s quiet
    assert intake.poll(at(17)) == []
    batch = more(series, 3)
    receive(store, batch, 24, 32, 40)
    assert intake.poll(at(41)) == []
    batch2 = more(series + batch, 3)
    receive(store, batch2, 48, 56, 59)
    assert intake.poll(at(59.5)) == []

    [job] = intake.poll(at(60))  # 60 s after the first image, only 1 s after the newest
    assert (job.state, job.instances, job.last_received_at) == (JobState.QUEUED, 9, at(59))

    # The queued job takes in what follows; the clock now runs from the first image after the snapshot.
    later = more(series + batch + batch2, 2)
    receive(store, later, 64, 72)
    assert intake.poll(at(73)) == []  # 73 s after the first image ever, but only 9 s after the first waiting one
    assert intake.poll(at(81.5)) == []
    [again] = intake.poll(at(82))
    assert (again.id, again.version, again.instances) == (job.id, 1, 11)


# -- images after the job was made -------------------------------------------------------------------------


def test_a_queued_job_takes_in_later_images(store: InstanceStore, db: Database) -> None:
    series = series_of(4)
    receive(store, series, 0)
    intake = make_intake(db, series_quiet_s=10)
    [job] = intake.poll(at(10))
    later = more(series, 2)
    receive(store, later, 20)
    assert intake.poll(at(29.5)) == []
    assert jobs_of(db, series) == [job]  # unchanged until quiet again

    [updated] = intake.poll(at(30))
    last_id, _ = newest_instance(db, series)
    assert (updated.id, updated.version, updated.state) == (job.id, 1, JobState.QUEUED)
    assert (updated.instances, updated.last_instance_id, updated.last_received_at) == (6, last_id, at(20))
    assert updated.last_instance_id > job.last_instance_id
    assert len(jobs_of(db, series)) == 1


def test_a_queued_job_whose_later_images_fail_selection_becomes_skipped(store: InstanceStore, db: Database) -> None:
    series = series_of(4)
    receive(store, series, 0)
    intake = make_intake(db, series_quiet_s=10)
    [job] = intake.poll(at(10))
    derived = more(series, 1)
    derived[0].ImageType = ["DERIVED", "SECONDARY"]
    receive(store, derived, 20)

    [decided] = intake.poll(at(30))
    assert (decided.id, decided.version, decided.state, decided.instances) == (job.id, 1, JobState.SKIPPED, 5)
    assert (decided.reason, decided.model) == ("ImageType contains DERIVED, SECONDARY", "")
    assert decided.finished_at is not None
    assert jobs_of(db, series) == [decided]


def start(db: Database, job: JobRecord, state: JobState) -> None:
    """A worker claims ``job`` (and, for a later ``state``, takes it there)."""
    store = JobStore(db)
    claimed = store.claim()
    assert claimed is not None and claimed.id == job.id
    if state is not JobState.PREPROCESSING:
        assert store.move(job.id, JobState.PREPROCESSING, state)


@pytest.mark.parametrize("state", [JobState.PREPROCESSING, JobState.DONE])
def test_images_after_the_job_started_make_a_new_version_once_quiet(
    store: InstanceStore, db: Database, state: JobState
) -> None:
    series = series_of(4)
    receive(store, series, 0)
    intake = make_intake(db, series_quiet_s=10, late_images="new-version")
    [first] = intake.poll(at(10))
    start(db, first, state)
    receive(store, more(series, 2), 20)
    assert intake.poll(at(29.5)) == []

    [second] = intake.poll(at(30))
    last_id, _ = newest_instance(db, series)
    assert (second.version, second.state, second.model) == (2, JobState.QUEUED, str(CHECKPOINT))
    assert (second.instances, second.last_instance_id, second.last_received_at) == (6, last_id, at(20))
    old = JobStore(db).get(first.id)
    assert (old.state, old.instances, old.last_instance_id) == (state, 4, first.last_instance_id)
    assert JobStore(db).newer_version(old) == second.id  # a running worker sees it is superseded
    assert intake.poll(at(100)) == []
    assert len(jobs_of(db, series)) == 2


def test_ignored_late_images_are_counted_once_and_make_no_job(store: InstanceStore, db: Database) -> None:
    series = series_of(4)
    receive(store, series, 0)
    intake = make_intake(db, series_quiet_s=10, late_images="ignore")
    [job] = intake.poll(at(10))
    start(db, job, JobState.INFERRING)
    receive(store, more(series, 2), 20)
    assert intake.poll(at(25)) == []

    [counted] = intake.poll(at(30))
    assert (counted.id, counted.state, counted.late_instances, counted.instances) == (job.id, JobState.INFERRING, 2, 4)
    assert counted.last_instance_id == job.last_instance_id  # the snapshot being analysed is unchanged
    assert intake.poll(at(100)) == []
    assert make_intake(db, series_quiet_s=10, late_images="ignore").poll(at(100)) == []  # nor after a restart
    assert [(j.id, j.late_instances) for j in jobs_of(db, series)] == [(job.id, 2)]

    receive(store, more(series, 3)[-1:], 110)  # one more, later still
    [again] = intake.poll(at(120))
    assert (again.id, again.late_instances) == (job.id, 3)
    assert len(jobs_of(db, series)) == 1


@pytest.mark.parametrize("ended", [JobState.FAILED, JobState.CANCELLED])
def test_a_failed_or_cancelled_series_that_receives_more_images_is_decided_again(
    store: InstanceStore, db: Database, ended: JobState
) -> None:
    """The late-image policy ("ignore" here) covers jobs analysing or done; new images may be what a failed
    series was missing."""
    series = series_of(4)
    receive(store, series, 0)
    intake = make_intake(db, series_quiet_s=10, late_images="ignore")
    [job] = intake.poll(at(10))
    start(db, job, ended)
    receive(store, more(series, 2), 20)
    [again] = intake.poll(at(30))
    assert (again.version, again.state, again.instances) == (2, JobState.QUEUED, 6)


def test_a_skipped_series_that_receives_more_images_is_decided_again(store: InstanceStore, db: Database) -> None:
    series = series_of(4)
    receive(store, series, 0)
    selection = SelectionSection(min_slices=6, models=dict.fromkeys(Contrast, CHECKPOINT))
    intake = make_intake(db, selection, series_quiet_s=10, late_images="ignore")  # skipped is never "started"
    [skipped] = intake.poll(at(10))
    assert (skipped.state, skipped.reason) == (JobState.SKIPPED, "4 slices < minimum 6")
    receive(store, more(series, 2), 20)

    [decided] = intake.poll(at(30))
    assert (decided.version, decided.state, decided.instances, decided.model) == (
        2,
        JobState.QUEUED,
        6,
        str(CHECKPOINT),
    )
    assert JobStore(db).get(skipped.id).state is JobState.SKIPPED


# -- restart -----------------------------------------------------------------------------------------------


def test_a_restarted_intake_finds_complete_series_without_a_job_and_duplicates_nothing(
    store: InstanceStore, db: Database
) -> None:
    done = series_of(4)
    pending = series_of(4)
    receive(store, done, 0)
    receive(store, pending, 50)
    before = make_intake(db, series_quiet_s=10)
    [first] = before.poll(at(20))  # ``pending`` was seen (below the mark) but not yet complete
    assert first.series_uid == done[0].SeriesInstanceUID
    del before  # the node stops

    after = make_intake(db, series_quiet_s=10)
    [found] = after.poll(at(100))
    assert found.series_uid == pending[0].SeriesInstanceUID
    assert (found.version, found.instances) == (1, 4)
    assert after.poll(at(200)) == []
    assert make_intake(db, series_quiet_s=10).poll(at(300)) == []
    assert len(JobStore(db).all()) == 2


# -- series without stored images --------------------------------------------------------------------------


def test_a_series_of_an_ignored_sop_class_gets_a_skipped_job_with_its_reason(
    store: InstanceStore, db: Database
) -> None:
    study, series_uid = generate_uid(), generate_uid()
    ct = [mr_slice(study, series_uid, i, size=8, sop_class_uid=CT_IMAGE_STORAGE) for i in range(3)]
    receive(store, ct, 0)
    with db.session() as session:
        assert not any(session.scalars(select(Instance.stored)))
        state, why = session.execute(select(Series.state, Series.state_reason)).one()
    assert state == "ignored" and CT_IMAGE_STORAGE in why

    [job] = make_intake(db, series_quiet_s=10).poll(at(10))
    assert (job.state, job.reason, job.instances, job.model) == (JobState.SKIPPED, why, 0, "")
    assert instance_count(db) == 3


# -- config ------------------------------------------------------------------------------------------------


def test_study_quiet_must_not_be_shorter_than_series_quiet() -> None:
    with pytest.raises(ValidationError, match="study_quiet_s must not be shorter than series_quiet_s"):
        CompletionSection(series_quiet_s=30, study_quiet_s=20)
    assert CompletionSection(series_quiet_s=30, study_quiet_s=30).study_quiet_s == 30


@pytest.mark.parametrize(
    ("settings", "quiet"),
    [
        ({"scope": "series", "series_quiet_s": 10, "max_wait_s": 9}, "10"),
        ({"scope": "study", "series_quiet_s": 10, "study_quiet_s": 60, "max_wait_s": 30}, "60"),
    ],
)
def test_max_wait_must_not_be_shorter_than_the_quiet_period(settings: dict, quiet: str) -> None:
    with pytest.raises(ValidationError, match=rf"max_wait_s .* shorter than the quiet period \({quiet}\)"):
        CompletionSection(**settings)


def test_max_wait_is_checked_against_the_quiet_period_of_the_scope_in_use() -> None:
    rule = CompletionSection(scope="series", series_quiet_s=10, study_quiet_s=60, max_wait_s=30)
    assert rule.max_wait_s == 30


def test_node_config_accepts_the_defaults() -> None:
    config = NodeConfig()
    assert config.completion == CompletionSection()
    assert (config.completion.scope, config.completion.late_images) == ("series", "new-version")
    assert config.completion.series_quiet_s <= config.completion.study_quiet_s <= config.completion.max_wait_s
    assert config.jobs == JobsSection()
    assert config.retention == RetentionSection()
    assert config.retention.delete_images_after_days == 0  # never delete unless the admin says so


# -- races and restarts with the admin's retry -------------------------------------------------------------


class ClaimedMeanwhile(JobStore):
    """A worker claims the series' queued job just after intake read it and before intake updates it: the
    interleaving the guarded UPDATE in ``Intake._take`` exists for, made deterministic."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.reads = 0

    def latest(self, session, series_id):  # type: ignore[no-untyped-def]
        row = super().latest(session, series_id)
        self.reads += 1
        if self.reads == 2:  # the read inside the transaction that updates or creates the job
            assert JobStore(self.db).claim() is not None
        return row


def test_images_for_a_job_claimed_while_intake_updates_it_make_the_next_version(
    store: InstanceStore, db: Database
) -> None:
    series = series_of(4)
    receive(store, series, 0)
    [first] = make_intake(db, series_quiet_s=10).poll(at(10))
    receive(store, more(series, 2), 20)
    racing = ClaimedMeanwhile(db)
    intake = Intake(db, CompletionSection(series_quiet_s=10), EVERY_CONTRAST, racing)

    [second] = intake.poll(at(30))
    assert racing.reads == 2
    assert (second.version, second.state, second.instances) == (2, JobState.QUEUED, 6)
    old = JobStore(db).get(first.id)
    assert (old.state, old.instances) == (JobState.PREPROCESSING, 4)


@pytest.mark.parametrize("late_images", ["new-version", "ignore"])
def test_a_retried_job_is_not_analysed_again_after_a_restart(
    store: InstanceStore, db: Database, late_images: str
) -> None:
    """Retrying a done job (the admin's ``uad-node retry``) must leave nothing for a restarted intake to do,
    also when the series has images the job did not analyse (ignored late images) or a newer version."""
    series = series_of(4)
    receive(store, series, 0)
    intake = make_intake(db, series_quiet_s=10, late_images=late_images)
    [first] = intake.poll(at(10))
    start(db, first, JobState.DONE)
    receive(store, more(series, 2), 20)
    [after] = intake.poll(at(30))  # a late count on job 1, or job 2
    jobs = JobStore(db)
    if after.id != first.id:
        assert jobs.claim() is not None and jobs.move(after.id, JobState.PREPROCESSING, JobState.DONE)

    retried = jobs.retry(first.id)
    assert retried.version == len(jobs_of(db, series))
    assert make_intake(db, series_quiet_s=10, late_images=late_images).poll(at(100)) == []
    assert jobs.get(retried.id) == retried
    assert len(jobs_of(db, series)) == retried.version
