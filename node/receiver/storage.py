"""Durable storage of received instances: the file first, then the database row.

The order is the whole point: a C-STORE is answered Success only after the
file has been fsynced and renamed into place (and its directory fsynced) and
the database transaction that records it has committed. Any failure on the
way removes what was written and raises :class:`StoreRefused`, which the
handler turns into a failure status so the sender keeps the image and retries.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, Row, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from node.db import Event, Instance, Series, Study
from node.db.database import Database
from node.db.schema import utcnow
from node.receiver.part10 import InstanceHeader, file_meta

log = logging.getLogger(__name__)

_STUDIES, _SERIES, _INSTANCES, _EVENTS = (m.__table__ for m in (Study, Series, Instance, Event))
# Built once and executed with parameters: per image, statement construction cost more than the commit.
_INSERT_INSTANCE = insert(_INSTANCES)

# C-STORE failure statuses (PS3.4 Annex B.2.3)
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000


class Outcome(enum.Enum):
    """What a successful ``store`` did."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # same bytes already held: nothing written
    REPLACED = "replaced"  # same SOP Instance UID, different bytes: newest kept, replacement recorded
    IGNORED = "ignored"  # SOP class not kept: acknowledged and recorded, no file


class StoreRefused(Exception):
    """The instance was not kept; ``status`` is the DIMSE failure status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Caller:
    """Who sent an instance (recorded with it, and in every event)."""

    ae_title: str
    host: str


class InstanceStore:
    """Writes instances under ``data_dir/studies/<study>/<series>/<sop>.dcm`` and records them.

    Thread-safe: pynetdicom runs each association in its own thread.
    """

    def __init__(self, data_dir: Path, database: Database, stored_sop_classes: set[str], min_free_bytes: int) -> None:
        self.studies_dir = data_dir / "studies"
        self.incoming_dir = data_dir / "incoming"
        self.db = database
        self.stored_sop_classes = stored_sop_classes
        self.min_free_bytes = min_free_bytes
        # One lock per SOP Instance UID stripe, so concurrent duplicates are decided one at a time.
        self._locks = [threading.Lock() for _ in range(64)]
        self._closed = threading.Event()
        # series UID -> row id, filled after commit; rows are never deleted while the node runs.
        self._series_ids: dict[str, int] = {}
        self.studies_dir.mkdir(parents=True, exist_ok=True)
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.incoming_dir.glob("*.tmp"):
            # Left by a crash mid-store: never acknowledged, so the sender still has it.
            leftover.unlink(missing_ok=True)
            log.warning("removed partial file from an interrupted store: %s", leftover.name)

    def close(self) -> None:
        """Refuse further instances (retryable), e.g. while the node shuts down."""
        self._closed.set()

    def has_room(self) -> bool:
        """False when free space is below the configured floor (new images are refused)."""
        return shutil.disk_usage(self.incoming_dir).free >= self.min_free_bytes

    def store(self, header: InstanceHeader, dataset: bytes | memoryview, caller: Caller) -> Outcome:
        """Keep one instance durably (or record it as ignored); raise StoreRefused otherwise.

        ``dataset`` is the data set as received (no file meta); the file gets a fresh
        PS3.10 header naming the calling AE as source.
        """
        bad = header.invalid_uid()
        if bad is not None:
            raise StoreRefused(CANNOT_UNDERSTAND, f"missing or invalid {bad}")
        if self._closed.is_set():
            raise StoreRefused(OUT_OF_RESOURCES, "node is shutting down")
        keep = header.sop_class_uid in self.stored_sop_classes
        if keep and not self.has_room():
            raise StoreRefused(OUT_OF_RESOURCES, "free disk space below min_free_disk_mb")
        meta = file_meta(header.sop_class_uid, header.sop_instance_uid, header.transfer_syntax_uid, caller.ae_title)
        digest = hashlib.sha256(dataset).hexdigest()  # of the data set: the same image re-sent matches
        target = self.studies_dir / header.study_uid / header.series_uid / f"{header.sop_instance_uid}.dcm"
        size = len(meta) + len(dataset)
        with self._locks[hash(header.sop_instance_uid) % len(self._locks)]:
            try:
                # Fast path: a new instance is one INSERT. Anything else meets the unique UID.
                if not target.exists():
                    path = self._write_file(target, meta, dataset) if keep else None
                    try:
                        self._insert(header, caller, path, size, digest)
                        return Outcome.STORED if keep else Outcome.IGNORED
                    except IntegrityError:
                        pass  # known UID: decide below (the file just written is the newest copy)
                existing = self._existing(header.sop_instance_uid)
                if existing is None:  # a row for the study/series appeared concurrently
                    path = self._write_file(target, meta, dataset) if keep else None
                    self._insert(header, caller, path, size, digest)
                    return Outcome.STORED if keep else Outcome.IGNORED
                if not keep:
                    return Outcome.IGNORED
                if existing.sha256 == digest and existing.path:
                    if not target.exists():  # acknowledged before, lost since: restore it
                        self._write_file(target, meta, dataset)
                    return Outcome.DUPLICATE
                self._write_file(target, meta, dataset)
                self._replace(existing, header, caller, target, size, digest)
                return Outcome.REPLACED
            except SQLAlchemyError as exc:
                log.error("database error while recording %s: %s", header.sop_instance_uid, exc)
                raise StoreRefused(OUT_OF_RESOURCES, "database unavailable") from exc

    def _write_file(self, target: Path, meta: bytes, dataset: bytes | memoryview) -> Path:
        """Temp file, fsync, rename into place, fsync the directory: all or nothing on disk."""
        temp = self.incoming_dir / f"{uuid.uuid4().hex}.tmp"
        try:
            _make_dirs_durably(target.parent, self.studies_dir)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                pending = [memoryview(meta), memoryview(dataset)]
                while pending:
                    written = os.writev(fd, pending)
                    while pending and written >= len(pending[0]):
                        written -= len(pending.pop(0))
                    if pending:
                        pending[0] = pending[0][written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            log.error("cannot write %s: %s", target.name, exc.strerror or exc)
            raise StoreRefused(OUT_OF_RESOURCES, f"cannot write file: {exc.strerror or exc}") from exc
        return target

    def _existing(self, sop_instance_uid: str) -> Row | None:
        with self.db.engine.connect() as conn:
            return conn.execute(
                select(_INSTANCES.c.id, _INSTANCES.c.sha256, _INSTANCES.c.path).where(
                    _INSTANCES.c.sop_instance_uid == sop_instance_uid
                )
            ).first()

    def _insert(self, header: InstanceHeader, caller: Caller, path: Path | None, size: int, digest: str) -> None:
        """One transaction (Core, not the ORM: this runs for every image) for a new instance.

        If it fails, the file just written is removed (it was never acknowledged), unless the
        failure is the UID being known already: then that file is the newest copy.
        """
        try:
            with self.db.engine.begin() as conn:
                series_id = self._series_id(conn, header)
                conn.execute(
                    _INSERT_INSTANCE,
                    {
                        "series_id": series_id,
                        "sop_instance_uid": header.sop_instance_uid,
                        **_instance_values(header, caller, path, size, digest),
                    },
                )
        except IntegrityError:
            raise
        except SQLAlchemyError:
            if path is not None:
                path.unlink(missing_ok=True)  # never acknowledged: the sender will send it again
            raise
        self._series_ids[header.series_uid] = series_id

    def _replace(
        self, existing: Row, header: InstanceHeader, caller: Caller, path: Path, size: int, digest: str
    ) -> None:
        """Same SOP Instance UID, new content: the newest wins and the replacement is audited."""
        values = _instance_values(header, caller, path, size, digest)
        with self.db.engine.begin() as conn:
            conn.execute(
                update(_INSTANCES)
                .where(_INSTANCES.c.id == existing.id)
                .values(replaced_count=_INSTANCES.c.replaced_count + 1, **values)
            )
            conn.execute(
                insert(_EVENTS).values(
                    at=values["received_at"],
                    kind="instance_replaced",
                    calling_ae=caller.ae_title,
                    calling_host=caller.host,
                    study_uid=header.study_uid,
                    series_uid=header.series_uid,
                    sop_instance_uid=header.sop_instance_uid,
                    detail=f"sha256 {existing.sha256} -> {digest}",
                )
            )

    def _series_id(self, conn: Connection, header: InstanceHeader) -> int:
        """The series row's id, creating study and series rows on first sight."""
        cached = self._series_ids.get(header.series_uid)
        if cached is not None:
            return cached
        series_id = conn.execute(select(_SERIES.c.id).where(_SERIES.c.series_uid == header.series_uid)).scalar()
        if series_id is not None:
            return int(series_id)
        study_id = conn.execute(select(_STUDIES.c.id).where(_STUDIES.c.study_uid == header.study_uid)).scalar()
        if study_id is None:
            study_id = conn.execute(
                insert(_STUDIES).values(study_uid=header.study_uid, first_received_at=utcnow())
            ).inserted_primary_key[0]
        ignored = header.sop_class_uid not in self.stored_sop_classes
        return int(
            conn.execute(
                insert(_SERIES).values(
                    study_id=study_id,
                    series_uid=header.series_uid,
                    modality=header.modality[:16],
                    series_number=header.series_number,
                    description=header.series_description[:64],
                    state="ignored" if ignored else "receiving",
                    state_reason=f"SOP class {header.sop_class_uid} is not configured for storage" if ignored else "",
                    first_received_at=utcnow(),
                )
            ).inserted_primary_key[0]
        )


def _instance_values(header: InstanceHeader, caller: Caller, path: Path | None, size: int, digest: str) -> dict:
    """Column values shared by a new and a replaced instance row."""
    return {
        "sop_class_uid": header.sop_class_uid,
        "transfer_syntax_uid": header.transfer_syntax_uid,
        "instance_number": header.instance_number,
        "stored": path is not None,
        "path": str(path) if path is not None else None,
        "size_bytes": size,
        "sha256": digest,
        "calling_ae": caller.ae_title,
        "calling_host": caller.host,
        "received_at": utcnow(),
    }


def _make_dirs_durably(directory: Path, root: Path) -> None:
    """Create missing directories below ``root`` and fsync each new entry's parent."""
    if directory.is_dir():
        return
    missing: list[Path] = []
    current = directory
    while not current.is_dir() and current != root:
        missing.append(current)
        current = current.parent
    for new_dir in reversed(missing):
        try:
            new_dir.mkdir()
        except FileExistsError:
            continue  # another association created it first
        _fsync_dir(new_dir.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename or a new entry in ``directory`` survive a power loss."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
