"""The jobs table: creating, claiming, advancing and finishing jobs, and the admin's retry and cancel.

Every change is one short transaction guarded by the state it expects (``UPDATE ... WHERE state = ...``),
so the serve process, several workers and an admin's ``uad-node cancel`` in another process never
overwrite each other: whoever comes second sees that the row moved on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from node.db import Job
from node.db.database import Database
from node.db.schema import utcnow
from node.jobs.states import ENTERED_AT, JobState


class JobError(Exception):
    """An admin's request cannot be done (no such job, wrong state); the message says why."""


@dataclass(frozen=True)
class JobRecord:
    """A job as the rest of the node sees it (a detached copy of its row)."""

    id: int
    series_id: int
    study_uid: str
    series_uid: str
    version: int
    state: JobState
    reason: str
    model: str
    instances: int
    last_instance_id: int
    seen_instance_id: int
    late_instances: int
    attempts: int
    cancel_requested: bool
    resend_failed: bool
    results_dir: str
    report: dict
    last_received_at: datetime | None
    next_attempt_at: datetime | None
    created_at: datetime
    preprocessing_at: datetime | None
    inferring_at: datetime | None
    exporting_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, row: Job) -> JobRecord:
        values = {name: getattr(row, name) for name in cls.__dataclass_fields__ if name not in ("state", "report")}
        return cls(state=JobState(row.state), report=json.loads(row.report) if row.report else {}, **values)

    def stage_seconds(self) -> dict[str, float]:
        """Wall time per stage so far: waiting for completion, in the queue, and each state it went through."""
        marks = [
            ("completion_wait", self.last_received_at, self.created_at),
            ("queued", self.created_at, self.preprocessing_at),
            ("preprocessing", self.preprocessing_at, self.inferring_at),
            ("inferring", self.inferring_at, self.exporting_at),
            ("exporting", self.exporting_at, self.finished_at if self.state is JobState.DONE else None),
        ]
        return {name: round((end - start).total_seconds(), 3) for name, start, end in marks if start and end}


@dataclass(frozen=True)
class Snapshot:
    """The instances of a series a job analyses: stored ones with ``instances.id <= last_instance_id``."""

    series_id: int
    study_uid: str
    series_uid: str
    instances: int
    last_instance_id: int
    last_received_at: datetime


class JobStore:
    """Reads and writes the jobs table (see the module docstring for the concurrency rule)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- creation (node.jobs.intake) ------------------------------------------------------------

    def latest(self, session: Session, series_id: int) -> Job | None:
        return session.scalars(
            select(Job).where(Job.series_id == series_id).order_by(Job.version.desc()).limit(1)
        ).first()

    def create(
        self, session: Session, snapshot: Snapshot, state: JobState, reason: str, model: str, version: int
    ) -> Job:
        """Add a job for ``snapshot`` in ``state`` (queued or skipped) inside the caller's transaction."""
        now = utcnow()
        job = Job(
            series_id=snapshot.series_id,
            study_uid=snapshot.study_uid,
            series_uid=snapshot.series_uid,
            version=version,
            state=str(state),
            reason=reason,
            model=model,
            instances=snapshot.instances,
            last_instance_id=snapshot.last_instance_id,
            seen_instance_id=snapshot.last_instance_id,
            late_instances=0,
            last_received_at=snapshot.last_received_at,
            attempts=0,
            cancel_requested=False,
            resend_failed=False,
            results_dir="",
            report="",
            created_at=now,
            finished_at=now if JobState(state).finished else None,
        )
        session.add(job)
        session.flush()
        return job

    # -- the worker's side ----------------------------------------------------------------------

    def claim(self, now: datetime | None = None, worker: str = "") -> JobRecord | None:
        """Take the oldest due queued job into ``preprocessing`` (one attempt more) for ``worker`` (its name in
        the workers table, recorded in ``jobs.worker``; "" in-process), or None."""
        now = now or utcnow()
        with self.db.session.begin() as session:
            candidates = session.scalars(
                select(Job.id)
                .where(Job.state == str(JobState.QUEUED))
                .where((Job.next_attempt_at.is_(None)) | (Job.next_attempt_at <= now))
                .order_by(Job.id)
                .limit(8)
            ).all()
            for job_id in candidates:
                taken = session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == str(JobState.QUEUED))
                    .values(
                        state=str(JobState.PREPROCESSING),
                        preprocessing_at=now,
                        inferring_at=None,
                        exporting_at=None,
                        finished_at=None,
                        next_attempt_at=None,
                        attempts=Job.attempts + 1,
                        worker=worker,
                    )
                ).rowcount
                if taken:
                    return JobRecord.of(session.get_one(Job, job_id))
        return None

    def get(self, job_id: int) -> JobRecord:
        with self.db.session() as session:
            row = session.get(Job, job_id)
            if row is None:
                raise JobError(f"no job {job_id}")
            return JobRecord.of(row)

    def newer_version(self, job: JobRecord) -> int | None:
        """The id of a later job of the same series, if images arriving meanwhile made one."""
        with self.db.session() as session:
            return session.scalar(
                select(Job.id).where(Job.series_id == job.series_id, Job.version > job.version).order_by(Job.version)
            )

    def move(self, job_id: int, expected: JobState | tuple[JobState, ...], state: JobState, **values: object) -> bool:
        """Set ``state`` (and when it was entered, and ``values``) if the job is still in ``expected``."""
        expected = (expected,) if isinstance(expected, JobState) else expected
        if state in ENTERED_AT:
            values = {ENTERED_AT[state]: utcnow(), **values}
        with self.db.session.begin() as session:
            return bool(
                session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state.in_([str(s) for s in expected]))
                    .values(state=str(state), **values)
                ).rowcount
            )

    def record_results(self, job_id: int, results_dir: Path, report: dict) -> bool:
        """The results of an ``exporting`` job are durable on disk: from now on a restart only resends them."""
        with self.db.session.begin() as session:
            return bool(
                session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == str(JobState.EXPORTING))
                    .values(results_dir=str(results_dir), report=json.dumps(report, allow_nan=False))
                ).rowcount
            )

    def requeue(self, job_id: int, expected: JobState | tuple[JobState, ...], reason: str, delay_s: float) -> bool:
        """Back to ``queued``, not before ``delay_s`` from now; the reason stays visible while it waits. Any
        results folder is forgotten: nothing may send it before a new analysis records its own."""
        due = utcnow() + timedelta(seconds=delay_s)
        return self.move(job_id, expected, JobState.QUEUED, reason=reason, next_attempt_at=due, results_dir="")

    def requeue_from_dead_worker(
        self, worker: str, why: str, max_attempts: int, count_attempt: bool = True
    ) -> JobRecord | None:
        """The worker process ``worker`` died (``why``: "SIGKILL", "exit code 3"): its job, if it was still
        analysing it, goes back to the queue with the attempt the claim counted, in one guarded UPDATE (state
        analysing, or exporting without recorded results, i.e. killed while writing them; and still this
        worker's). ``count_attempt`` False: serve killed it for not stopping in time, which is no fault of the
        series. Returns the job as it was before, or None when the worker held none."""
        with self.db.session() as session:
            row = session.scalars(select(Job).where(Job.worker == worker, _held_by_a_worker())).first()
            if row is None:
                return None
            job = JobRecord.of(row)
        values: dict[str, object] = {}
        if not count_attempt:
            values["attempts"] = Job.attempts - 1
            reason = f"worker {worker} killed ({why}) when the node stopped during {job.state}; analysing again"
        elif job.attempts >= max_attempts:
            reason = f"worker {worker} died ({why}) during {job.state}; attempt {job.attempts} of {max_attempts}; "
            reason += "not analysing again"
        else:
            reason = f"worker {worker} died ({why}) during {job.state}; attempt {job.attempts} of {max_attempts}; "
            reason += "analysing again"
        with self.db.session.begin() as session:
            moved = session.execute(
                update(Job)
                .where(Job.id == job.id, Job.worker == worker, _held_by_a_worker())
                .values(state=str(JobState.QUEUED), reason=reason, next_attempt_at=None, results_dir="", **values)
            ).rowcount
        return job if moved else None

    def holds_job(self, worker: str) -> bool:
        """Whether the worker process ``worker`` is analysing a job (or writing its results) now."""
        with self.db.session() as session:
            return session.scalar(select(Job.id).where(Job.worker == worker, _held_by_a_worker()).limit(1)) is not None

    def cancel_requested(self, job_id: int) -> bool:
        with self.db.session() as session:
            return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))

    def due_exports(self, now: datetime | None = None) -> list[JobRecord]:
        """Jobs whose results are on disk and whose next export attempt is due."""
        now = now or utcnow()
        with self.db.session() as session:
            rows = session.scalars(
                select(Job)
                .where(Job.state == str(JobState.EXPORTING), Job.results_dir != "")
                .where((Job.next_attempt_at.is_(None)) | (Job.next_attempt_at <= now))
                .order_by(Job.id)
            ).all()
            return [JobRecord.of(row) for row in rows]

    def postpone_export(self, job_id: int, reason: str, delay_s: float) -> None:
        with self.db.session.begin() as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == str(JobState.EXPORTING))
                .values(reason=reason, next_attempt_at=utcnow() + timedelta(seconds=delay_s))
            )

    def recover(self, max_attempts: int) -> list[tuple[JobRecord, JobState]]:
        """After a restart: analyses that were running go back to the queue; exports resume. A job interrupted
        ``max_attempts`` times (e.g. a series that kills the process) is queued too, but only for the worker to
        end it as not screened (``Worker.run`` checks the attempts before analysing)."""
        changed: list[tuple[JobRecord, JobState]] = []
        with self.db.session() as session:
            rows = session.scalars(select(Job).where(_held_by_a_worker())).all()
            interrupted = [JobRecord.of(row) for row in rows]
        for job in interrupted:
            if job.cancel_requested:
                state, values = JobState.CANCELLED, {"reason": "cancelled by an admin (while the node was stopped)"}
            elif job.attempts >= max_attempts:  # the worker sends its NOT SCREENED notice instead of analysing
                reason = f"analysis interrupted {job.attempts} times (the node stopped or crashed during it)"
                state, values = JobState.QUEUED, {"reason": f"{reason}; not analysing again", "results_dir": ""}
            else:
                state, values = JobState.QUEUED, {"reason": "interrupted by a restart; analysing again"}
                values["results_dir"] = ""
            if self.move(job.id, job.state, state, **values):
                changed.append((job, state))
        return changed

    # -- the admin's side -----------------------------------------------------------------------

    def all(self) -> list[JobRecord]:
        with self.db.session() as session:
            return [JobRecord.of(row) for row in session.scalars(select(Job).order_by(Job.id)).all()]

    def retry(self, job_id: int) -> JobRecord:
        """Run a job again, from its last durable step.

        failed or cancelled: with results on disk, export them again (including to a destination that
        rejected them permanently, which is why an admin retries); without, or when the series was not
        screened (its results are a NOT SCREENED notice), analyse again.
        done or skipped: a new version of the job, decided again under the current config (a new model,
        changed selection rules) and analysed again with new result UIDs.
        """
        with self.db.session.begin() as session:
            row = session.get(Job, job_id, with_for_update=True)
            if row is None:
                raise JobError(f"no job {job_id}")
            state = JobState(row.state)
            if state in (JobState.FAILED, JobState.CANCELLED):
                if row.results_dir and json.loads(row.report or "{}").get("analysed", True):
                    row.state, row.exporting_at, row.resend_failed = str(JobState.EXPORTING), utcnow(), True
                else:
                    row.state, row.attempts, row.results_dir = str(JobState.QUEUED), 0, ""
                row.reason, row.finished_at, row.next_attempt_at, row.cancel_requested = "", None, None, False
                session.flush()
                return JobRecord.of(row)
            if state in (JobState.DONE, JobState.SKIPPED):
                newest = self.latest(session, row.series_id)
                if newest is not None and newest.id != row.id and not JobState(newest.state).finished:
                    raise JobError(f"job {job_id}: its series already has job {newest.id} ({newest.state})")
                version = session.scalar(select(func.max(Job.version)).where(Job.series_id == row.series_id)) or 0
                snapshot = Snapshot(
                    row.series_id, row.study_uid, row.series_uid, row.instances, row.last_instance_id,
                    row.last_received_at or row.created_at,
                )  # fmt: skip
                # An empty model: the worker decides the series again before analysing it.
                job = self.create(session, snapshot, JobState.QUEUED, f"retry of job {job_id}", "", version + 1)
                # Images the series' jobs already accounted for (ignored late ones, a newer version's) stay
                # accounted for: intake reads this from the newest version and would take them for new ones.
                job.seen_instance_id = max(row.seen_instance_id, newest.seen_instance_id if newest else 0)
                return JobRecord.of(job)
            raise JobError(f"job {job_id} is {state}; only failed, cancelled, done or skipped jobs can be retried")

    def failed_ids(self) -> list[int]:
        with self.db.session() as session:
            return list(session.scalars(select(Job.id).where(Job.state == str(JobState.FAILED)).order_by(Job.id)))

    def cancel(self, job_id: int) -> JobRecord:
        """Stop a job: at once when queued or exporting, at the next stage when a worker is analysing it."""
        with self.db.session.begin() as session:
            row = session.get(Job, job_id, with_for_update=True)
            if row is None:
                raise JobError(f"no job {job_id}")
            state = JobState(row.state)
            if state.finished:
                raise JobError(f"job {job_id} is already {state}")
            if state.analysing:
                row.cancel_requested = True
            else:
                row.state, row.reason, row.finished_at = str(JobState.CANCELLED), "cancelled by an admin", utcnow()
            session.flush()
            return JobRecord.of(row)


def _held_by_a_worker():  # type: ignore[no-untyped-def]
    """A job a worker holds: analysing, or exporting before its results were recorded (while writing them)."""
    return Job.state.in_([str(JobState.PREPROCESSING), str(JobState.INFERRING)]) | (
        (Job.state == str(JobState.EXPORTING)) & (Job.results_dir == "")
    )
