"""From received images to jobs: when is a series complete, and what job does it get.

A series is complete after ``series_quiet_s`` without a new image (``scope = "series"``) or once its whole
study has been quiet for ``study_quiet_s`` (``scope = "study"``), and at the latest ``max_wait_s`` after
the first image it is waiting on. A complete series is decided by the selection rules and gets a job:
queued with its model, or skipped with the rule that skipped it.

Images that arrive later: while the series' job is still queued, the job simply takes them in; once it
is analysing or done, ``late_images = "new-version"`` makes a new job version when the series is quiet
again (its results go out as new series; the older version, if still analysing, stops as superseded) and
``"ignore"`` counts them on the job and leaves it. A skipped, failed or cancelled series is always decided
again.

Finding what changed is cheap: each poll reads only instance rows newer than the last poll (a
high-water mark on ``instances.id``); a series stays in memory until it has a job that accounts for
its newest image. At start-up the mark is 0, so a restart finds every series that never got a job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from pydicom.errors import InvalidDicomError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from node.db import Instance, Job, Series, Study
from node.db.database import Database
from node.db.schema import as_utc, utcnow
from node.jobs.config import CompletionSection
from node.jobs.states import JobState
from node.jobs.store import JobRecord, JobStore, Snapshot
from node.selection import SelectionSection, decide_stored_series

log = logging.getLogger(__name__)

# The late-image policy applies to a series whose job is analysing or has delivered; one that was skipped,
# failed or cancelled is decided again with its new images (they may be what it was missing).
_STARTED = frozenset({JobState.PREPROCESSING, JobState.INFERRING, JobState.EXPORTING, JobState.DONE})


@dataclass(frozen=True)
class _Activity:
    """What the completion rule needs to know about one series."""

    series_id: int
    study_id: int
    newest_id: int
    newest_at: datetime
    waiting_since: datetime  # the first image not yet accounted for by a job
    seen_id: int  # the newest image a job accounts for (0: none)


class Intake:
    """Turns complete series into jobs; ``poll`` is called every ``poll_interval_s`` by the scheduler."""

    def __init__(
        self, db: Database, completion: CompletionSection, selection: SelectionSection, store: JobStore
    ) -> None:
        self.db = db
        self.completion = completion
        self.selection = selection
        self.store = store
        self._mark = 0
        self._pending: set[int] = set()

    def poll(self, now: datetime | None = None) -> list[JobRecord]:
        """Create or update the jobs of every series that is complete at ``now``; returns them."""
        now = now or utcnow()
        with self.db.session() as session:
            newest = session.scalar(select(func.max(Instance.id))) or 0
            if newest > self._mark:
                touched = session.scalars(
                    select(Instance.series_id).where(Instance.id > self._mark, Instance.id <= newest).distinct()
                )
                self._pending.update(touched)
                self._mark = newest
            activity = [a for a in (self._activity(session, sid) for sid in sorted(self._pending)) if a]
        self._pending = {a.series_id for a in activity}
        study_newest: dict[int, datetime] = {}
        if self.completion.scope == "study":
            study_newest = self._study_newest({a.study_id for a in activity})
        jobs: list[JobRecord] = []
        for item in activity:
            if self._complete(item, study_newest.get(item.study_id, item.newest_at), now):
                jobs.append(self._take(item))
                self._pending.discard(item.series_id)
        return jobs

    # -- completion ------------------------------------------------------------------------------

    def _activity(self, session: Session, series_id: int) -> _Activity | None:
        """None when the series' newest image is already accounted for by a job."""
        seen = session.scalar(
            select(Job.seen_instance_id).where(Job.series_id == series_id).order_by(Job.version.desc()).limit(1)
        )
        seen = seen or 0
        row = session.execute(
            select(
                func.max(Instance.id),
                func.max(Instance.received_at),
                func.min(Instance.received_at),
                Series.study_id,
            )
            .join(Series, Series.id == Instance.series_id)
            .where(Instance.series_id == series_id, Instance.id > seen)
            .group_by(Series.study_id)
        ).first()
        if row is None or row[0] is None:
            return None
        return _Activity(series_id, row[3], row[0], as_utc(row[1]), as_utc(row[2]), seen)

    def _study_newest(self, study_ids: set[int]) -> dict[int, datetime]:
        with self.db.session() as session:
            rows = session.execute(
                select(Series.study_id, func.max(Instance.received_at))
                .join(Instance, Instance.series_id == Series.id)
                .where(Series.study_id.in_(study_ids))
                .group_by(Series.study_id)
            )
            return {study_id: as_utc(at) for study_id, at in rows}

    def _complete(self, item: _Activity, study_newest_at: datetime, now: datetime) -> bool:
        rule = self.completion
        if (now - item.waiting_since).total_seconds() >= rule.max_wait_s:
            return True
        if rule.scope == "study":
            return (now - study_newest_at).total_seconds() >= rule.study_quiet_s
        return (now - item.newest_at).total_seconds() >= rule.series_quiet_s

    # -- jobs ------------------------------------------------------------------------------------

    def _take(self, item: _Activity) -> JobRecord:
        """Give a complete series its job (see the module docstring for late images)."""
        snapshot = self._snapshot(item)
        with self.db.session() as session:
            latest = self.store.latest(session, item.series_id)
            started = latest is not None and JobState(latest.state) in _STARTED
            late = 0
            if started:
                late = session.scalar(
                    select(func.count(Instance.id)).where(
                        Instance.series_id == item.series_id, Instance.id > item.seen_id, Instance.id <= item.newest_id
                    )
                )
        if started and self.completion.late_images == "ignore":
            assert latest is not None
            with self.db.session.begin() as session:
                session.execute(
                    update(Job)
                    .where(Job.id == latest.id)
                    .values(seen_instance_id=item.newest_id, late_instances=Job.late_instances + late)
                )
            log.warning(
                "job %d (study %s, series %s): %d late image(s) ignored (late_images = ignore)",
                latest.id, snapshot.study_uid, snapshot.series_uid, late,
            )  # fmt: skip
            return self.store.get(latest.id)
        state, reason, model = self._decide(snapshot)
        with self.db.session.begin() as session:
            latest = self.store.latest(session, item.series_id)
            updated = 0
            if latest is not None and latest.state == str(JobState.QUEUED):
                values = {
                    "state": str(state), "reason": reason, "model": model, "instances": snapshot.instances,
                    "last_instance_id": snapshot.last_instance_id, "seen_instance_id": snapshot.last_instance_id,
                    "last_received_at": snapshot.last_received_at,
                    "finished_at": utcnow() if state.finished else None,
                }  # fmt: skip
                updated = session.execute(
                    update(Job).where(Job.id == latest.id, Job.state == str(JobState.QUEUED)).values(**values)
                ).rowcount
                if updated:
                    job_id, verb = latest.id, "takes in the new images"
            if not updated:  # no queued job, or a worker claimed it meanwhile: the images are late for it
                version = (latest.version + 1) if latest is not None else 1
                job_id, verb = self.store.create(session, snapshot, state, reason, model, version).id, "created"
        job = self.store.get(job_id)
        log.info(
            "job %d (study %s, series %s, version %d): %s, %s with %d image(s)%s",
            job.id, job.study_uid, job.series_uid, job.version, verb, job.state, job.instances,
            f" ({job.reason})" if job.reason else "",
        )  # fmt: skip
        if started and late:
            log.info("job %d: %d image(s) arrived after an earlier version started", job.id, late)
        return job

    def _snapshot(self, item: _Activity) -> Snapshot:
        with self.db.session() as session:
            series_uid, study_uid = session.execute(
                select(Series.series_uid, Study.study_uid)
                .join(Study, Study.id == Series.study_id)
                .where(Series.id == item.series_id)
            ).one()
            stored = session.scalar(
                select(func.count(Instance.id)).where(
                    Instance.series_id == item.series_id, Instance.id <= item.newest_id, Instance.stored.is_(True)
                )
            )
        return Snapshot(item.series_id, study_uid, series_uid, int(stored or 0), item.newest_id, item.newest_at)

    def _decide(self, snapshot: Snapshot) -> tuple[JobState, str, str]:
        """(state, reason, model) of a new job: the selection rules on the stored headers."""
        if snapshot.instances == 0:
            with self.db.session() as session:
                why = session.scalar(select(Series.state_reason).where(Series.id == snapshot.series_id))
            return JobState.SKIPPED, why or "no images of this series are stored", ""
        try:
            decision = decide_stored_series(self.db, snapshot.series_uid, self.selection)
        except (OSError, InvalidDicomError, ValueError) as exc:
            return JobState.FAILED, f"cannot read the stored images: {exc}", ""
        if not decision.selected or decision.model is None:
            return JobState.SKIPPED, decision.reason, ""
        return JobState.QUEUED, decision.reason, str(decision.model)
