"""Tables. Any change here needs an Alembic revision in ``migrations/versions``."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)
AE = String(16)


def utcnow() -> datetime:
    """Timestamps are stored in UTC, timezone-aware."""
    return datetime.now(UTC)


def as_utc(value: datetime | str) -> datetime:
    """A timestamp from an aggregate (``max(received_at)``), which bypasses the column type: SQLite hands
    back a naive string, PostgreSQL an aware value in the session's time zone. Both become aware UTC."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend, whatever the server's own time zone."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            return value.astimezone(UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:  # SQLite
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)  # PostgreSQL answers in the session's time zone


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime}


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    description: Mapped[str] = mapped_column(String(64), default="")
    # "receiving" while images are stored; "ignored" when its SOP class is not kept.
    state: Mapped[str] = mapped_column(String(32), default="receiving")
    state_reason: Mapped[str] = mapped_column(Text, default="")
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Set when retention deleted the received files; the rows stay as the record of what was received.
    images_deleted_at: Mapped[datetime | None] = mapped_column(nullable=True)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", order_by="Instance.id")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"))
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # True: the file at ``path`` is durable. False: acknowledged but not kept (SOP class ignored).
    stored: Mapped[bool] = mapped_column(Boolean, default=True)
    path: Mapped[str | None] = mapped_column(Text, nullable=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(AE)
    calling_host: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    replaced_count: Mapped[int] = mapped_column(Integer, default=0)
    # Set by start-up reconciliation when the row's file is missing or unreadable ("" when fine).
    file_problem: Mapped[str] = mapped_column(Text, default="", server_default="")

    series: Mapped[Series] = relationship(back_populates="instances")

    # "When did this series last receive an image" (quiet-period completion) is answered here.
    __table_args__ = (Index("ix_instances_series_received", "series_id", "received_at"),)


class Event(Base):
    """Audit trail: associations, rejections, replacements. UIDs and AE titles only, no patient data."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(48), index=True)
    calling_ae: Mapped[str] = mapped_column(String(64), default="")
    calling_host: Mapped[str] = mapped_column(String(64), default="")
    study_uid: Mapped[str] = mapped_column(String(64), default="")
    series_uid: Mapped[str] = mapped_column(String(64), default="")
    sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    detail: Mapped[str] = mapped_column(Text, default="")


class Delivery(Base):
    """One result instance owed to one destination, and how sending it went.

    A row exists from the first attempt on; ``delivered`` rows are never sent again, which
    makes a re-run after a partial failure send only the rest. No patient data, only UIDs.
    """

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    destination: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    # The sent object's own series (a SEG or SC series) and the analysed series it belongs to.
    series_uid: Mapped[str] = mapped_column(UID)
    source_series_uid: Mapped[str] = mapped_column(UID, index=True)
    path: Mapped[str] = mapped_column(Text)
    # pending | delivered | failed-transient | failed-permanent
    state: Mapped[str] = mapped_column(String(24), index=True, default="pending")
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    __table_args__ = (UniqueConstraint("destination", "sop_instance_uid", name="uq_deliveries_destination_sop"),)


class Job(Base):
    """One analysis of one series, from "complete" to "results delivered", with when each stage began.

    A job analyses the series' instances up to ``last_instance_id`` (its snapshot). Images arriving
    after a job started make a new version (or are counted as ignored), see ``node.jobs.intake``.
    States and transitions: ``node.jobs.states``. No patient data, only UIDs.
    """

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    study_uid: Mapped[str] = mapped_column(UID)
    series_uid: Mapped[str] = mapped_column(UID)
    version: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    model: Mapped[str] = mapped_column(Text, default="")  # checkpoint file; empty when skipped
    instances: Mapped[int] = mapped_column(Integer, default=0)  # stored instances in the snapshot
    last_instance_id: Mapped[int] = mapped_column(Integer, default=0)  # the snapshot: instances.id <= this
    seen_instance_id: Mapped[int] = mapped_column(Integer, default=0)  # late images accounted for up to here
    late_instances: Mapped[int] = mapped_column(Integer, default=0)  # arrived after the start, not analysed
    last_received_at: Mapped[datetime | None] = mapped_column(nullable=True)  # newest image in the snapshot
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # analysis attempts started
    next_attempt_at: Mapped[datetime | None] = mapped_column(nullable=True)  # not before (backoff)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    resend_failed: Mapped[bool] = mapped_column(Boolean, default=False)  # an admin's retry after a rejection
    results_dir: Mapped[str] = mapped_column(Text, default="")  # set once the results are durable
    report: Mapped[str] = mapped_column(Text, default="")  # JSON: the report.json entry of the series
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    preprocessing_at: Mapped[datetime | None] = mapped_column(nullable=True)
    inferring_at: Mapped[datetime | None] = mapped_column(nullable=True)
    exporting_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # workers.name of the process that claimed the running analysis ("" when none)
    worker: Mapped[str] = mapped_column(String(64), default="", server_default="")

    __table_args__ = (UniqueConstraint("series_id", "version", name="uq_jobs_series_version"),)


class Worker(Base):
    """One analysis worker process, as it last reported itself (``status``, readiness, supervision).

    ``name`` is unique per process (host, pid and slot), so a restarted worker is a new row and the
    history of crashes stays readable. ``models`` is JSON: contrast class -> "loading", "loaded" or
    "failed: <why>".
    """

    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    host: Mapped[str] = mapped_column(String(255), default="")
    pid: Mapped[int] = mapped_column(Integer, default=0)
    role: Mapped[str] = mapped_column(String(16), default="worker")
    state: Mapped[str] = mapped_column(String(16), default="starting")  # starting, ready, stopped, exited
    detail: Mapped[str] = mapped_column(Text, default="")  # why it exited, when it did
    models: Mapped[str] = mapped_column(Text, default="{}")
    current_job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
