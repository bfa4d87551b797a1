"""What the node holds and does, for ``uad-node status``: studies and series with their decisions, jobs with
their state, reason and per-stage timings, and whether low disk space makes the node refuse images."""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime

from sqlalchemy import func, select

from node.config import NodeSection
from node.db import Instance, Series, Study
from node.db.database import Database
from node.db.schema import as_utc, utcnow
from node.jobs.states import JobState
from node.jobs.store import JobRecord, JobStore


@dataclass(frozen=True)
class SeriesStatus:
    series_uid: str
    modality: str
    instances: int
    state: str
    reason: str
    description: str
    last_received_at: str
    images_deleted_at: str = ""
    analysed: bool | None = None  # by its newest job (see JobStatus); None while no job has decided
    quality: dict | None = None  # the quality gate's measures of its newest job, when it got that far


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
        newest = {job.series_uid: job for job in JobStore(db).all()}  # oldest first: the newest version wins
        studies: dict[str, list[SeriesStatus]] = {}
        for study_uid, series, count, last in rows:
            job = newest.get(series.series_uid)
            studies.setdefault(study_uid, []).append(
                SeriesStatus(
                    series_uid=series.series_uid,
                    modality=series.modality,
                    instances=int(count),
                    state=series.state,
                    reason=series.state_reason,
                    description=series.description,
                    last_received_at=_utc_iso(last),
                    images_deleted_at=_utc_iso(series.images_deleted_at),
                    analysed=_analysed(job) if job else None,
                    quality=job.report.get("quality") if job else None,
                )
            )
    return [StudyStatus(study_uid=uid, series=series) for uid, series in studies.items()]


@dataclass(frozen=True)
class JobStatus:
    id: int
    study_uid: str
    series_uid: str
    version: int
    state: str
    reason: str
    model: str
    instances: int
    late_instances: int
    attempts: int
    created_at: str
    finished_at: str
    stage_seconds: dict[str, float]  # completion_wait, queued, preprocessing, inferring, exporting (wall time)
    analysis_seconds: dict[str, float]  # volume, preprocessing, inference, objects (inside the analysis)
    findings: dict[str, float | int | None]  # anomaly_volume_ml, components, max_score, threshold
    results_dir: str
    analysed: bool | None  # True: screened; False: skipped or not screened (``reason`` says why); None: not yet
    quality: dict | None  # the quality gate's measures, when the series reached it
    calibration: str | None = None  # where the threshold comes from ("shipped" or the site rule), when analysed


def collect_jobs(db: Database) -> list[JobStatus]:
    """Every job, oldest first."""
    jobs = []
    for job in JobStore(db).all():
        report = job.report
        jobs.append(
            JobStatus(
                id=job.id,
                study_uid=job.study_uid,
                series_uid=job.series_uid,
                version=job.version,
                state=str(job.state),
                reason=job.reason,
                model=job.model,
                instances=job.instances,
                late_instances=job.late_instances,
                attempts=job.attempts,
                created_at=_utc_iso(job.created_at),
                finished_at=_utc_iso(job.finished_at),
                stage_seconds=job.stage_seconds(),
                analysis_seconds=report.get("timings_s", {}),
                findings={key: report.get(key) for key in ("anomaly_volume_ml", "components", "max_score", "threshold")}
                if report
                else {},
                results_dir=job.results_dir,
                analysed=_analysed(job),
                quality=report.get("quality"),
                calibration=report.get("calibration"),
            )
        )
    return jobs


@dataclass(frozen=True)
class DiskStatus:
    data_dir: str
    free_mb: int
    min_free_mb: int
    refusing_images: bool  # below the floor, new images get 0xA700 (the sender keeps and retries them)


def disk_status(node: NodeSection) -> DiskStatus:
    free = shutil.disk_usage(node.data_dir if node.data_dir.exists() else node.data_dir.parent).free // 2**20
    return DiskStatus(str(node.data_dir), int(free), node.min_free_disk_mb, free < node.min_free_disk_mb)


@dataclass(frozen=True)
class WorkerStatus:
    """An analysis worker process, or a receiver process, as it last reported itself (the workers table)."""

    name: str  # host:pid:slot (receivers: host:pid:r<slot>)
    host: str
    pid: int
    role: str  # "worker" (analysis) or "receiver" ([node] receiver_processes > 1)
    state: str  # starting, ready (live); stopped, exited (detail says how)
    live: bool  # starting or ready, with a heartbeat in the last few seconds
    current_job: int | None
    heartbeat_at: str
    seconds_since_heartbeat: float
    models: dict[str, str]  # contrast class -> "loading", "loaded" or "failed: <why>"
    detail: str
    started_at: str


def collect_workers(db: Database) -> list[WorkerStatus]:
    """Live workers and those that stopped or died in the last hour, oldest first."""
    from node.jobs.registry import recent_workers

    now = utcnow()
    return [
        WorkerStatus(
            name=w.name,
            host=w.host,
            pid=w.pid,
            role=w.role,
            state=w.state,
            live=w.live(now),
            current_job=w.current_job,
            heartbeat_at=_utc_iso(w.heartbeat_at),
            seconds_since_heartbeat=round((now - w.heartbeat_at).total_seconds(), 1),
            models=w.models,
            detail=w.detail,
            started_at=_utc_iso(w.started_at),
        )
        for w in recent_workers(db)
    ]


@dataclass(frozen=True)
class FileProblemsStatus:
    """Stored images whose file start-up reconciliation found missing or unreadable (``instances``: the first
    100, each with ``sop_instance_uid``, ``study_uid``, ``series_uid``, ``path`` and ``problem``)."""

    count: int = 0
    instances: list[dict] = field(default_factory=list)


def collect_file_problems(db: Database, limit: int = 100) -> FileProblemsStatus:
    from node.receiver.reconcile import count_file_problems, file_problems

    return FileProblemsStatus(count_file_problems(db), [asdict(p) for p in file_problems(db, limit=limit)])


@dataclass(frozen=True)
class NodeStatus:
    disk: DiskStatus
    studies: list[StudyStatus] = field(default_factory=list)
    jobs: list[JobStatus] = field(default_factory=list)
    workers: list[WorkerStatus] = field(default_factory=list)
    file_problems: FileProblemsStatus = field(default_factory=FileProblemsStatus)


def status_json(status: NodeStatus) -> dict:
    """The ``status --json`` contract: ``{"disk": {...}, "studies": [{"study_uid", "series": [...]}],
    "jobs": [...], "workers": [...], "file_problems": {"count", "instances"}}`` with the fields of the dataclasses
    above."""
    return asdict(status)


def status_text(status: NodeStatus) -> str:
    """Tables for people: series grouped by study, then jobs, then the disk."""
    lines = []
    for study in status.studies:
        lines.append(f"study {study.study_uid}")
        for s in study.series:
            reason = f"  ({s.reason})" if s.reason else ""
            deleted = f"  [images deleted {s.images_deleted_at[:10]}]" if s.images_deleted_at else ""
            lines.append(
                f"  {s.series_uid}  {s.modality or '-':<4} {s.instances:>5} instances  {s.state}{reason}{deleted}"
            )
    if not status.studies:
        lines.append("no studies received")
    if status.jobs:
        lines.append("")
        lines.append("jobs")
    for job in status.jobs:
        stages = " ".join(f"{name} {seconds:.1f}s" for name, seconds in job.stage_seconds.items())
        late = f", {job.late_instances} late images ignored" if job.late_instances else ""
        lines.append(f"  {job.id:>5}  v{job.version}  {job.state:<13} series {job.series_uid}{late}")
        if job.reason:
            lines.append(f"         {job.reason}")
        if job.analysed:
            f = job.findings
            lines.append(f"         found {f['anomaly_volume_ml']:.1f} mL in {f['components']} region(s)")
        if stages:
            lines.append(f"         {stages}")
    if status.workers:
        lines.append("")
        lines.append("workers")
    for w in status.workers:
        job = f"job {w.current_job}" if w.current_job is not None else "idle" if w.live else "-"
        job = "receiver" if w.role == "receiver" else job
        health = f"{w.state}" if w.live or w.state not in ("starting", "ready") else f"{w.state}, no heartbeat"
        lines.append(
            f"  {w.name:<32} pid {w.pid:<7} {health:<20} {job:<10} heartbeat {w.seconds_since_heartbeat:.0f} s ago"
        )
        if w.detail:
            lines.append(f"         {w.detail}")
    problems = status.file_problems
    if problems.count:
        lines.append("")
        lines.append(
            f"files: {problems.count} stored image(s) missing or unreadable (checked at start; events instance_file_*)"
        )
        lines.extend(
            f"  {p['sop_instance_uid']}  {p['problem']}  (series {p['series_uid']})" for p in problems.instances[:5]
        )
        if problems.count > 5:
            lines.append(f"  ... and {problems.count - 5} more")
    disk = status.disk
    state = "REFUSING NEW IMAGES" if disk.refusing_images else "accepting images"
    lines.append("")
    lines.append(f"disk: {disk.free_mb} MB free in {disk.data_dir} (floor {disk.min_free_mb} MB): {state}")
    return "\n".join(lines)


def _analysed(job: JobRecord) -> bool | None:
    if "analysed" in job.report:  # recorded with the results or the NOT SCREENED notice
        return bool(job.report["analysed"])
    return job.state is JobState.DONE if job.state.finished else None


def _utc_iso(value: datetime | str | None) -> str:
    return "" if value is None else as_utc(value).isoformat()
