"""JobStore (node/jobs/store.py): claiming, guarded moves, recovery after a restart, and the admin's retry and
cancel, on a real SQLite database. Jobs are made with ``JobStore.create`` on real study/series rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import update

from node.db import Job, Series, Study
from node.db.database import Database
from node.db.schema import utcnow
from node.jobs.states import JobState
from node.jobs.store import JobError, JobRecord, JobStore, Snapshot
from tests.stored_instances import run_concurrently

T0 = datetime(2025, 3, 3, 8, 0, tzinfo=UTC)


@pytest.fixture
def jobs(db: Database) -> JobStore:
    return JobStore(db)


def add_series(db: Database) -> int:
    with db.session.begin() as session:
        study = Study(study_uid=generate_uid())
        series = Series(study=study, series_uid=generate_uid(), modality="MR")
        session.add_all([study, series])
        session.flush()
        return series.id


def add_job(
    jobs: JobStore,
    state: JobState = JobState.QUEUED,
    *,
    series_id: int | None = None,
    version: int = 1,
    **values: object,
) -> JobRecord:
    """A job of a new series (or of ``series_id``) in ``state``; ``values`` are set on its row as they are."""
    series_id = series_id or add_series(jobs.db)
    with jobs.db.session.begin() as session:
        snapshot = Snapshot(series_id, "1.2.3", "1.2.3.4", 5, 50, T0)
        created = state if state in (JobState.QUEUED, JobState.SKIPPED) else JobState.QUEUED
        job_id = jobs.create(session, snapshot, created, "", "/models/t1.pt", version).id
        if state is not created or values:
            session.execute(update(Job).where(Job.id == job_id).values(state=str(state), **values))
    return jobs.get(job_id)


def states(jobs: JobStore) -> dict[int, JobState]:
    return {job.id: job.state for job in jobs.all()}


# -- claim -------------------------------------------------------------------------------------------------


def test_claim_takes_the_oldest_due_queued_job_and_counts_an_attempt(jobs: JobStore) -> None:
    add_job(jobs, JobState.DONE)
    first, second = add_job(jobs, attempts=1), add_job(jobs)
    now = utcnow()

    claimed = jobs.claim(now)
    assert claimed is not None and claimed.id == first.id
    assert (claimed.state, claimed.attempts, claimed.preprocessing_at) == (JobState.PREPROCESSING, 2, now)
    assert jobs.get(first.id) == claimed
    assert jobs.get(second.id).state is JobState.QUEUED
    again = jobs.claim(now)
    assert again is not None and (again.id, again.attempts) == (second.id, 1)
    assert jobs.claim(now) is None


def test_a_job_waiting_for_its_next_attempt_is_not_claimed_before_it_is_due(jobs: JobStore) -> None:
    waiting = add_job(jobs, next_attempt_at=T0 + timedelta(seconds=60))
    later = add_job(jobs)
    claimed = jobs.claim(T0)
    assert claimed is not None and claimed.id == later.id  # the older job is not due yet
    assert jobs.claim(T0 + timedelta(seconds=59)) is None
    due = jobs.claim(T0 + timedelta(seconds=60))
    assert due is not None and due.id == waiting.id
    assert due.next_attempt_at is None


def test_claims_never_return_the_same_job(jobs: JobStore) -> None:
    ids = [add_job(jobs).id for _ in range(3)]
    one, two = jobs.claim(), jobs.claim()
    assert one is not None and two is not None and one.id != two.id

    results = run_concurrently([jobs.claim, jobs.claim])  # two workers at once, one job left
    assert not any(isinstance(r, Exception) for r in results), results
    claimed = [r.id for r in results if r is not None]
    assert claimed == [ids[2]]
    assert all(job.attempts == 1 for job in jobs.all())


def test_concurrent_claims_of_two_jobs_take_one_each(jobs: JobStore) -> None:
    ids = {add_job(jobs).id for _ in range(2)}
    results = run_concurrently([jobs.claim, jobs.claim])
    assert not any(isinstance(r, Exception) for r in results), results
    assert {r.id for r in results if r is not None} == ids
    assert all(r is not None for r in results)


# -- move --------------------------------------------------------------------------------------------------


def test_move_from_a_state_the_job_is_not_in_changes_nothing(jobs: JobStore) -> None:
    job = add_job(jobs)
    assert not jobs.move(job.id, JobState.PREPROCESSING, JobState.INFERRING, reason="x")
    assert jobs.get(job.id) == job

    assert jobs.move(job.id, (JobState.INFERRING, JobState.QUEUED), JobState.PREPROCESSING, reason="started")
    moved = jobs.get(job.id)
    assert (moved.state, moved.reason) == (JobState.PREPROCESSING, "started")
    assert moved.preprocessing_at is not None and moved.inferring_at is None
    assert not jobs.move(job.id, JobState.QUEUED, JobState.DONE)
    assert jobs.get(job.id) == moved


# -- recover -----------------------------------------------------------------------------------------------


def test_recover_requeues_interrupted_analyses_marks_repeat_offenders_and_resumes_exports(jobs: JobStore) -> None:
    preprocessing = add_job(jobs, JobState.PREPROCESSING, attempts=1)
    inferring = add_job(jobs, JobState.INFERRING, attempts=2)
    worn_out = add_job(jobs, JobState.INFERRING, attempts=3)
    cancelled = add_job(jobs, JobState.PREPROCESSING, attempts=3, cancel_requested=True)
    exporting = add_job(jobs, JobState.EXPORTING, attempts=1, results_dir="/data/results/job-5")
    queued, done = add_job(jobs), add_job(jobs, JobState.DONE)

    changed = jobs.recover(max_attempts=3)

    assert {(job.id, state) for job, state in changed} == {
        (preprocessing.id, JobState.QUEUED),
        (inferring.id, JobState.QUEUED),
        (worn_out.id, JobState.QUEUED),  # only for the worker to end it as not screened, without analysing
        (cancelled.id, JobState.CANCELLED),
    }
    for job in (preprocessing, inferring):
        back = jobs.get(job.id)
        assert back.state is JobState.QUEUED and "restart" in back.reason
        assert back.attempts == job.attempts and back.finished_at is None
    marked = jobs.get(worn_out.id)
    assert marked.state is JobState.QUEUED and marked.attempts == 3
    assert marked.reason.endswith("interrupted 3 times (the node stopped or crashed during it); not analysing again")
    stopped = jobs.get(cancelled.id)
    assert stopped.state is JobState.CANCELLED and "cancelled by an admin" in stopped.reason
    for job in (exporting, queued, done):
        assert jobs.get(job.id) == job
    assert jobs.recover(max_attempts=3) == []


# -- retry -------------------------------------------------------------------------------------------------


def test_retry_of_a_failed_job_with_results_resends_them(jobs: JobStore) -> None:
    job = add_job(
        jobs, JobState.FAILED, results_dir="/data/results/job-1", reason="rejected", finished_at=T0, attempts=1
    )
    retried = jobs.retry(job.id)
    assert (retried.id, retried.state, retried.resend_failed) == (job.id, JobState.EXPORTING, True)
    assert (retried.reason, retried.finished_at, retried.attempts) == ("", None, 1)
    assert retried.exporting_at is not None
    assert jobs.get(job.id) == retried
    assert [j.id for j in jobs.due_exports()] == [job.id]


@pytest.mark.parametrize("state", [JobState.FAILED, JobState.CANCELLED])
def test_retry_of_a_job_without_results_analyses_it_again(jobs: JobStore, state: JobState) -> None:
    job = add_job(jobs, state, reason="broken", attempts=3, finished_at=T0, next_attempt_at=T0, cancel_requested=True)
    retried = jobs.retry(job.id)
    assert (retried.id, retried.state, retried.attempts, retried.reason) == (job.id, JobState.QUEUED, 0, "")
    assert (retried.finished_at, retried.next_attempt_at, retried.cancel_requested) == (None, None, False)
    assert retried.resend_failed is False
    claimed = jobs.claim()
    assert claimed is not None and claimed.id == job.id


@pytest.mark.parametrize("state", [JobState.DONE, JobState.SKIPPED])
def test_retry_of_a_finished_job_makes_a_new_version(jobs: JobStore, state: JobState) -> None:
    job = add_job(jobs, state, finished_at=T0, last_received_at=T0, results_dir="/data/results/job-1")
    retried = jobs.retry(job.id)
    assert retried.id != job.id
    assert (retried.series_id, retried.version, retried.state) == (job.series_id, 2, JobState.QUEUED)
    assert (retried.model, retried.reason, retried.results_dir) == ("", f"retry of job {job.id}", "")
    assert (retried.instances, retried.last_instance_id, retried.attempts) == (job.instances, job.last_instance_id, 0)
    assert retried.seen_instance_id == job.seen_instance_id
    assert jobs.get(job.id) == job  # the old version and its results stay as they were
    assert jobs.newer_version(job) == retried.id


@pytest.mark.parametrize("state", [JobState.QUEUED, JobState.PREPROCESSING, JobState.INFERRING, JobState.EXPORTING])
def test_retry_of_an_unfinished_job_is_refused(jobs: JobStore, state: JobState) -> None:
    job = add_job(jobs, state)
    with pytest.raises(JobError, match=f"job {job.id} is {state}"):
        jobs.retry(job.id)
    assert jobs.all() == [job]


def test_retry_while_a_newer_version_is_unfinished_is_refused(jobs: JobStore) -> None:
    old = add_job(jobs, JobState.DONE, finished_at=T0)
    newer = add_job(jobs, JobState.INFERRING, series_id=old.series_id, version=2, seen_instance_id=80)
    with pytest.raises(JobError, match=f"already has job {newer.id}"):
        jobs.retry(old.id)
    assert jobs.all() == [old, newer]

    assert jobs.move(newer.id, JobState.INFERRING, JobState.DONE)
    retried = jobs.retry(old.id)
    assert (retried.version, retried.last_instance_id) == (3, old.last_instance_id)  # job 1's snapshot
    assert retried.seen_instance_id == 80  # what version 2 accounted for stays accounted for


def test_retry_of_an_unknown_job_is_refused(jobs: JobStore) -> None:
    with pytest.raises(JobError, match="no job 42"):
        jobs.retry(42)


# -- cancel ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [JobState.QUEUED, JobState.EXPORTING])
def test_cancel_of_a_job_no_worker_holds_ends_it_at_once(jobs: JobStore, state: JobState) -> None:
    job = add_job(jobs, state)
    cancelled = jobs.cancel(job.id)
    assert (cancelled.state, cancelled.reason) == (JobState.CANCELLED, "cancelled by an admin")
    assert cancelled.finished_at is not None
    assert jobs.get(job.id) == cancelled
    assert jobs.claim() is None


@pytest.mark.parametrize("state", [JobState.PREPROCESSING, JobState.INFERRING])
def test_cancel_of_an_analysing_job_only_asks_the_worker(jobs: JobStore, state: JobState) -> None:
    job = add_job(jobs, state)
    asked = jobs.cancel(job.id)
    assert (asked.state, asked.cancel_requested, asked.finished_at) == (state, True, None)
    assert jobs.cancel_requested(job.id)


@pytest.mark.parametrize("state", [JobState.DONE, JobState.FAILED, JobState.SKIPPED, JobState.CANCELLED])
def test_cancel_of_a_finished_job_is_refused(jobs: JobStore, state: JobState) -> None:
    job = add_job(jobs, state, finished_at=T0)
    with pytest.raises(JobError, match=f"already {state}"):
        jobs.cancel(job.id)
    assert jobs.get(job.id) == job


def test_cancel_of_an_unknown_job_is_refused(jobs: JobStore) -> None:
    with pytest.raises(JobError, match="no job 7"):
        jobs.cancel(7)


# -- timings -----------------------------------------------------------------------------------------------


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_stage_seconds_of_a_finished_job(jobs: JobStore) -> None:
    stamps = {
        "last_received_at": at(0),
        "created_at": at(10),
        "preprocessing_at": at(15),
        "inferring_at": at(45.5),
        "exporting_at": at(105.5),
        "finished_at": at(107.25),
    }
    done = add_job(jobs, JobState.DONE, **stamps)
    assert done.stage_seconds() == {
        "completion_wait": 10.0,
        "queued": 5.0,
        "preprocessing": 30.5,
        "inferring": 60.0,
        "exporting": 1.75,
    }
    failed = add_job(jobs, JobState.FAILED, **stamps)  # failed while exporting: no exporting time to show
    assert set(failed.stage_seconds()) == {"completion_wait", "queued", "preprocessing", "inferring"}
    waiting = add_job(jobs, last_received_at=at(0), created_at=at(10))
    assert waiting.stage_seconds() == {"completion_wait": 10.0}
