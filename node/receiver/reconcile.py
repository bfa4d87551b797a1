"""Start-up reconciliation: make the image store and the database agree again after a crash.

A store is a file renamed into place, then a committed row (``node.receiver.storage``); a process killed
between the two leaves a file without a row, one killed earlier a temp file in ``incoming/``, and files
can disappear or be damaged behind the node's back. At start (``reconcile_at_start``, run by ``serve``
once the receiver listens, before analysis and retention start):

- ``incoming/*.tmp`` older than the start are removed: they were never acknowledged, the sender still
  has them (event ``partial_file_removed``). Any other file there is quarantined.
- A file under ``studies/`` without a row is *adopted* when it is a complete, valid PS3.10 file of a
  stored SOP class whose UIDs match its path: study, series and instance rows are inserted as a C-STORE
  would have (calling AE from the file meta's Source AE Title, calling host ``reconciled``), event
  ``orphan_file_adopted``. Such a file may come from an acknowledged store whose row was lost (a
  database restored from an older backup), so adopting never loses an image; a sender that resends it
  gets a duplicate. Anything else is moved to ``quarantine/<its path under data_dir>`` (never deleted:
  it may be patient data), event ``orphan_file_quarantined`` with the reason.
- A stored row whose file is missing, has another size than recorded or has no ``DICM`` prefix gets
  ``instances.file_problem`` set (events ``instance_file_missing`` / ``instance_file_unreadable``); a
  flagged row whose file is fine again is cleared (``instance_file_restored``). One event per change:
  a row still missing at the next start is not reported again. Rows of series whose images retention
  deleted are not problems.

Safe beside a listening receiver: files created, renamed or changed after ``since`` (stores in flight)
are not judged, a candidate orphan's UID is looked up again just before it is adopted and the insert
relies on the unique SOP Instance UID, and every flag change is one UPDATE guarded by the values read.
Costs one ``stat`` and one 132-byte read per stored file plus one streamed query (see README).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.filereader import read_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian
from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from node.db import Event, Instance, Series, Study
from node.db.database import Database
from node.db.schema import utcnow
from node.receiver.audit import safe_uid
from node.receiver.codecs import decodable_transfer_syntaxes
from node.receiver.part10 import InstanceHeader, WholeReads, read_header, split_part10
from node.receiver.storage import Caller, instance_values, series_row_id

if TYPE_CHECKING:
    from node.config import NodeConfig

log = logging.getLogger(__name__)

_STUDIES, _SERIES, _INSTANCES, _EVENTS = (m.__table__ for m in (Study, Series, Instance, Event))

PARTIAL_FILE_REMOVED = "partial_file_removed"
ORPHAN_FILE_ADOPTED = "orphan_file_adopted"
ORPHAN_FILE_QUARANTINED = "orphan_file_quarantined"
INSTANCE_FILE_MISSING = "instance_file_missing"
INSTANCE_FILE_UNREADABLE = "instance_file_unreadable"
INSTANCE_FILE_RESTORED = "instance_file_restored"

MISSING = "missing"
ADOPTED_FROM_HOST = "reconciled"  # instances.calling_host of an adopted file
# Filesystem timestamps come from a coarse clock that may lag time.time() by a tick or two.
CLOCK_SLACK_S = 0.05
_BATCH = 500  # flag changes per transaction, UIDs per IN (...) look-up
_EXAMPLES = 5


@dataclass
class ReconcileReport:
    """What one reconciliation found and did (counts, and a few examples for the log)."""

    stored_rows: int = 0  # rows with a file, checked
    files_scanned: int = 0  # regular files under studies/
    partial_files_removed: int = 0
    orphans_adopted: int = 0
    orphans_quarantined: int = 0
    orphans_left: int = 0  # no row by path, but the UID is recorded (under another path) or appeared meanwhile
    in_flight: int = 0  # changed after the start: left to the receiver
    newly_flagged: int = 0
    restored: int = 0
    flagged: int = 0  # rows flagged after this run, old and new
    seconds: float = 0.0
    examples: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(
            self.partial_files_removed or self.orphans_adopted or self.orphans_quarantined or self.newly_flagged
        ) or bool(self.restored)

    def summary(self) -> str:
        text = (
            f"reconciled {self.files_scanned} file(s) with {self.stored_rows} stored row(s) in {self.seconds:.1f}s: "
            f"{self.partial_files_removed} partial removed, {self.orphans_adopted} orphan(s) adopted, "
            f"{self.orphans_quarantined} quarantined, {self.newly_flagged} row(s) newly flagged, "
            f"{self.restored} restored, {self.flagged} flagged in all"
        )
        if self.in_flight:
            text += f", {self.in_flight} file(s) changed since the start left to the receiver"
        if self.orphans_left:
            text += f", {self.orphans_left} unrecorded file(s) of known UIDs left in place"
        if self.examples:
            text += "; e.g. " + "; ".join(self.examples)
        return text

    def _example(self, text: str) -> None:
        if len(self.examples) < _EXAMPLES:
            self.examples.append(text)


@dataclass(frozen=True)
class FileProblem:
    """A stored instance whose file reconciliation found missing or unreadable (``uad-node status``)."""

    sop_instance_uid: str
    study_uid: str
    series_uid: str
    path: str
    problem: str  # "missing", "size N != recorded M", "unreadable: <why>"


def file_problems(db: Database, limit: int | None = None) -> list[FileProblem]:
    """The rows currently flagged, oldest first (``limit``: at most that many)."""
    query = (
        select(
            _INSTANCES.c.sop_instance_uid,
            _STUDIES.c.study_uid,
            _SERIES.c.series_uid,
            _INSTANCES.c.path,
            _INSTANCES.c.file_problem,
        )
        .join(_SERIES, _SERIES.c.id == _INSTANCES.c.series_id)
        .join(_STUDIES, _STUDIES.c.id == _SERIES.c.study_id)
        .where(_INSTANCES.c.file_problem != "")
        .order_by(_INSTANCES.c.id)
        .limit(limit)
    )
    with db.engine.connect() as conn:
        return [
            FileProblem(uid, study, series, path or "", problem)
            for uid, study, series, path, problem in conn.execute(query)
        ]


def count_file_problems(db: Database) -> int:
    """How many rows are flagged now."""
    with db.engine.connect() as conn:
        flagged = conn.execute(select(func.count()).select_from(_INSTANCES).where(_INSTANCES.c.file_problem != ""))
        return int(flagged.scalar() or 0)


def reconcile_at_start(config: NodeConfig, db: Database) -> ReconcileReport | None:
    """``reconcile_storage`` for ``serve``, once the receiver (and STOW-RS) may be storing: files changed since
    this process started are its own stores in flight and are left alone. A one-line summary goes to the log
    (a warning when something changed or is flagged); an error is logged, never raised."""
    try:
        since = process_started_at()
        report = reconcile_storage(config.node.data_dir, db, set(config.storage.stored_sop_classes), since=since)
    except Exception:  # a failed check must not keep the node from receiving
        log.exception("start-up reconciliation of data_dir with the database failed")
        return None
    log.log(logging.WARNING if report.changed or report.flagged else logging.INFO, "%s", report.summary())
    return report


def process_started_at() -> float:
    """When this process started, as ``time.time()`` (Linux: /proc/self/stat, 10 ms ticks); now elsewhere."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime: clock ticks after boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - max(age, 0.0)
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


def reconcile_storage(
    data_dir: Path, db: Database, stored_sop_classes: set[str], *, since: float | None = None
) -> ReconcileReport:
    """Remove partial files, adopt or quarantine files without a row, flag rows without a (good) file.

    ``since``: when storing may have begun (``time.time()``; ``serve``: this process's start); files created,
    written or renamed after it are stores in flight and are not judged. None: nothing is storing, judge all.
    """
    started = time.monotonic()
    report = ReconcileReport()
    cutoff = None if since is None else since - CLOCK_SLACK_S
    data_dir = Path(data_dir)
    root = str(data_dir)
    _remove_partial_files(data_dir, db, cutoff, report)
    rows = _stored_rows(db, data_dir)
    report.stored_rows = len(rows.by_key) + len(rows.outside)
    orphans: list[tuple[str, os.stat_result]] = []
    changes: list[tuple[_Row, str]] = []
    for key, stat in _walk_files(data_dir / "studies", data_dir):
        report.files_scanned += 1
        row = rows.by_key.pop(key, None)
        if cutoff is not None and _changed_after(stat, cutoff):
            report.in_flight += 1
            continue
        if row is None:
            orphans.append((key, stat))
            continue
        problem = "" if row.retention_deleted else _problem(os.path.join(root, key), row.size_bytes, stat)
        if problem != row.file_problem:
            changes.append((row, problem))
    # Rows whose file the walk did not meet (missing), and rows recorded outside data_dir/studies.
    for row in [*rows.by_key.values(), *rows.outside]:
        problem = "" if row.retention_deleted else _current_problem(row, data_dir, cutoff)
        if problem is not None and problem != row.file_problem:
            changes.append((row, problem))
    _apply_flags(db, data_dir, changes, cutoff, report)
    _settle_orphans(db, data_dir, stored_sop_classes, orphans, cutoff, report)
    report.flagged = count_file_problems(db)
    report.seconds = time.monotonic() - started
    return report


# -- incoming/ ---------------------------------------------------------------------------------------------


def _remove_partial_files(data_dir: Path, db: Database, cutoff: float | None, report: ReconcileReport) -> None:
    incoming = data_dir / "incoming"
    try:
        entries = list(os.scandir(incoming))
    except FileNotFoundError:
        return
    for entry in entries:
        if not entry.is_file(follow_symlinks=False):
            continue
        try:
            stat = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # a store in flight renamed it into place
        if cutoff is not None and _changed_after(stat, cutoff):
            report.in_flight += 1
            continue
        relative = f"incoming/{entry.name}"
        if not entry.name.endswith(".tmp"):
            _quarantine(db, data_dir, relative, "unexpected file in incoming/", stat, cutoff is not None, report)
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        report.partial_files_removed += 1
        report._example(f"removed {relative}")
        log.warning("removed partial file from an interrupted store: %s", entry.name)
        with db.engine.begin() as conn:
            _event(conn, PARTIAL_FILE_REMOVED, detail=f"{relative} ({stat.st_size} bytes): never acknowledged")


# -- rows and their files ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    id: int
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    path: str
    size_bytes: int
    sha256: str
    file_problem: str
    retention_deleted: bool  # retention deleted the file on purpose


@dataclass
class _Rows:
    by_key: dict[str, _Row]  # by path relative to data_dir ("studies/<study>/<series>/<sop>.dcm")
    outside: list[_Row]  # recorded with an absolute path outside data_dir: checked one by one


def _stored_rows(db: Database, data_dir: Path) -> _Rows:
    """Every row that should have a file, in one streamed query."""
    roots = {os.path.join(str(p), "") for p in (data_dir, data_dir.absolute(), data_dir.resolve())}
    query = (
        select(
            _INSTANCES.c.id,
            _INSTANCES.c.sop_instance_uid,
            _SERIES.c.series_uid,
            _STUDIES.c.study_uid,
            _INSTANCES.c.path,
            _INSTANCES.c.size_bytes,
            _INSTANCES.c.sha256,
            _INSTANCES.c.file_problem,
            _INSTANCES.c.received_at,
            _SERIES.c.images_deleted_at,
        )
        .join(_SERIES, _SERIES.c.id == _INSTANCES.c.series_id)
        .join(_STUDIES, _STUDIES.c.id == _SERIES.c.study_id)
        .where(_INSTANCES.c.stored.is_(True), _INSTANCES.c.path.is_not(None))
    )
    rows = _Rows(by_key={}, outside=[])
    with db.engine.connect() as conn:
        result = conn.execution_options(yield_per=5000).execute(query)
        for row_id, uid, series_uid, study_uid, path, size, sha, problem, received_at, deleted_at in result:
            row = _Row(
                id=row_id,
                sop_instance_uid=uid,
                series_uid=series_uid,
                study_uid=study_uid,
                path=path,
                size_bytes=int(size),
                sha256=sha,
                file_problem=problem or "",
                retention_deleted=_deleted_before(received_at, deleted_at),
            )
            key = _key_of(path, roots)
            if key is None:
                rows.outside.append(row)
            else:
                rows.by_key[key] = row
    return rows


def _deleted_before(received_at: datetime | None, deleted_at: datetime | None) -> bool:
    """Retention deleted the series' files after this instance arrived (one re-sent since has a file)."""
    return deleted_at is not None and (received_at is None or received_at <= deleted_at)


def _key_of(path: str, roots: set[str]) -> str | None:
    """A recorded path as relative to data_dir: absolute ones under data_dir, or already relative ones."""
    for root in roots:
        if path.startswith(root):
            return os.path.normpath(path[len(root) :])
    return None if os.path.isabs(path) else os.path.normpath(path)


def _walk_files(studies: Path, data_dir: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(path relative to data_dir, stat) of every regular file under ``studies``; symbolic links are skipped."""
    base = os.path.relpath(studies, data_dir)
    stack = [(str(studies), base)]
    while stack:
        folder, relative = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append((entry.path, os.path.join(relative, entry.name)))
            elif entry.is_file(follow_symlinks=False):
                try:
                    yield os.path.join(relative, entry.name), entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # replaced or removed by a store in flight


def _changed_after(stat: os.stat_result, cutoff: float) -> bool:
    """Created, written or renamed (ctime) at or after ``cutoff``: a store in flight, not judged."""
    return max(stat.st_mtime, stat.st_ctime) >= cutoff


def _problem(path: str | Path, recorded_size: int, stat: os.stat_result) -> str:
    """The empty string when the file has the recorded size and a DICM prefix, else what is wrong with it."""
    if stat.st_size != recorded_size:
        return f"size {stat.st_size} != recorded {recorded_size}"
    try:  # three system calls: this runs for every stored file
        fd = os.open(path, os.O_RDONLY)
        try:
            prefix = os.pread(fd, 4, 128)
        finally:
            os.close(fd)
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    return "" if prefix == b"DICM" else "unreadable: no DICM prefix after the 128-byte preamble"


def _current_problem(row: _Row, data_dir: Path, cutoff: float | None) -> str | None:
    """The file's problem now ("" if none), or None when it changed after ``cutoff`` (in flight)."""
    path = Path(row.path) if os.path.isabs(row.path) else data_dir / row.path
    try:
        stat = path.stat()
    except FileNotFoundError:
        return MISSING
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if cutoff is not None and _changed_after(stat, cutoff):
        return None
    return _problem(path, row.size_bytes, stat)


def _apply_flags(
    db: Database, data_dir: Path, changes: list[tuple[_Row, str]], cutoff: float | None, report: ReconcileReport
) -> None:
    """One guarded UPDATE per change (the row as read: same problem, same content), its event only if it
    matched; in transactions of ``_BATCH``. Each file is looked at again just before: a store in flight
    may have restored or replaced it since the walk."""
    for start in range(0, len(changes), _BATCH):
        with db.engine.begin() as conn:
            for row, problem in changes[start : start + _BATCH]:
                if not row.retention_deleted:
                    now = _current_problem(row, data_dir, cutoff)
                    if now != problem:
                        continue  # changed meanwhile: the next start decides
                matched = conn.execute(
                    update(_INSTANCES)
                    .where(
                        _INSTANCES.c.id == row.id,
                        _INSTANCES.c.file_problem == row.file_problem,
                        _INSTANCES.c.sha256 == row.sha256,
                        _INSTANCES.c.size_bytes == row.size_bytes,
                    )
                    .values(file_problem=problem)
                ).rowcount
                if matched != 1:
                    continue
                if row.retention_deleted:
                    log.info("instance %s: images deleted by retention, file problem cleared", row.sop_instance_uid)
                    continue
                if problem:
                    kind = INSTANCE_FILE_MISSING if problem == MISSING else INSTANCE_FILE_UNREADABLE
                    report.newly_flagged += 1
                    report._example(f"{row.sop_instance_uid} {problem}")
                    log.error("stored instance %s: file %s (%s)", row.sop_instance_uid, problem, row.path)
                else:
                    kind = INSTANCE_FILE_RESTORED
                    report.restored += 1
                    log.warning("stored instance %s: file is back (was %s)", row.sop_instance_uid, row.file_problem)
                detail = problem or f"file is back (was {row.file_problem})"
                _event(conn, kind, row.study_uid, row.series_uid, row.sop_instance_uid, f"{detail}: {row.path}")


# -- files without a row -----------------------------------------------------------------------------------


def _settle_orphans(
    db: Database,
    data_dir: Path,
    stored_sop_classes: set[str],
    orphans: list[tuple[str, os.stat_result]],
    cutoff: float | None,
    report: ReconcileReport,
) -> None:
    """Adopt each complete, valid file without a row, quarantine the others; a file whose UID is recorded
    (under another path, or by a store that landed meanwhile) is left alone."""
    if not orphans:
        return
    known = _recorded_uids(db, [Path(key).stem for key, _ in orphans])
    accepted = set(decodable_transfer_syntaxes())  # what the receiver negotiates
    live = cutoff is not None
    for key, walked in orphans:
        path = data_dir / key
        try:
            with open(path, "rb") as fp:
                judged = os.fstat(fp.fileno())
                if live and _changed_after(judged, cutoff):  # type: ignore[arg-type]
                    report.in_flight += 1
                    continue
                data = fp.read()
        except FileNotFoundError:
            continue
        except OSError as exc:
            _quarantine(db, data_dir, key, f"cannot read: {exc.strerror or exc}", walked, live, report)
            continue
        if Path(key).stem in known:
            report.orphans_left += 1
            log.warning("file %s has no row of its own, but its SOP Instance UID is recorded: left in place", key)
            continue
        checked = _check_orphan(key, data, stored_sop_classes, accepted)
        if isinstance(checked, str):
            _quarantine(db, data_dir, key, checked, judged, live, report)
            continue
        header, source_ae, dataset = checked
        if _adopt(db, data_dir, key, header, source_ae, dataset, len(data)):
            report.orphans_adopted += 1
            report._example(f"adopted {key}")
            log.warning("adopted %s: a complete file without a database row", key)
        else:
            report.orphans_left += 1


def _recorded_uids(db: Database, uids: list[str]) -> set[str]:
    found: set[str] = set()
    with db.engine.connect() as conn:
        for start in range(0, len(uids), _BATCH):
            chunk = uids[start : start + _BATCH]
            found.update(
                conn.execute(select(_INSTANCES.c.sop_instance_uid).where(_INSTANCES.c.sop_instance_uid.in_(chunk)))
                .scalars()
                .all()
            )
    return found


def _check_orphan(
    key: str, data: bytes, stored_sop_classes: set[str], transfer_syntaxes: set[str]
) -> tuple[InstanceHeader, str, bytes] | str:
    """(header, source AE, data set) of a file a C-STORE could have stored, or why it is not."""
    parts = Path(key).parts
    if len(parts) != 4 or parts[0] != "studies" or not parts[3].endswith(".dcm"):
        return "not at studies/<study>/<series>/<sop>.dcm"
    try:
        part10 = split_part10(data)
    except ValueError as exc:
        return f"not a DICOM file: {exc}"
    if part10.transfer_syntax_uid not in transfer_syntaxes:
        return f"transfer syntax {part10.transfer_syntax_uid} is not one this node accepts"
    dataset = bytes(part10.dataset)
    try:
        header = read_header(dataset, part10.transfer_syntax_uid)
        complete = _read_whole(dataset, part10.transfer_syntax_uid)
    except ValueError as exc:
        return f"incomplete or unparsable: {exc.__cause__ or exc}"
    if "PixelData" not in complete and "FloatPixelData" not in complete and "DoubleFloatPixelData" not in complete:
        return "incomplete: no Pixel Data"
    bad = header.invalid_uid()
    if bad is not None:
        return f"missing or invalid {bad}"
    study, series, name = parts[1], parts[2], parts[3][: -len(".dcm")]
    if (header.study_uid, header.series_uid, header.sop_instance_uid) != (study, series, name):
        return "its Study/Series/SOP Instance UIDs do not match its path"
    named = (part10.media_storage_sop_instance_uid, part10.media_storage_sop_class_uid)
    if named[0] not in ("", header.sop_instance_uid) or named[1] not in ("", header.sop_class_uid):
        return "its file meta names another SOP instance or class than its data set"
    if header.sop_class_uid not in stored_sop_classes:
        return f"SOP class {header.sop_class_uid} is not stored by this node"
    return header, _source_ae(data, len(data) - len(dataset)), dataset


def _read_whole(dataset: bytes, transfer_syntax_uid: str):  # type: ignore[no-untyped-def]
    """The whole data set (pydicom takes a truncated file for a complete one: ``WholeReads`` refuses)."""
    try:
        raw = dataset
        if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
            raw = zlib.decompressobj(-zlib.MAX_WBITS).decompress(raw)
        return read_dataset(
            WholeReads(raw),
            is_implicit_VR=transfer_syntax_uid == ImplicitVRLittleEndian,
            is_little_endian=transfer_syntax_uid != ExplicitVRBigEndian,
            defer_size=None,
        )
    except Exception as exc:  # pydicom raises many types on malformed input
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc


def _source_ae(data: bytes, dataset_start: int) -> str:
    """(0002,0016) Source Application Entity Title of the file meta, or ""."""
    try:
        meta = read_dataset(WholeReads(data[132:dataset_start]), is_implicit_VR=False, is_little_endian=True)
        return str(meta.get("SourceApplicationEntityTitle", "") or "").strip()[:16]
    except Exception:  # the meta was read once already; a malformed optional element just means no AE
        return ""


def _adopt(
    db: Database, data_dir: Path, key: str, header: InstanceHeader, source_ae: str, dataset: bytes, size: int
) -> bool:
    """Study, series and instance rows as a C-STORE inserts them, and the event, in one transaction.
    False when the UID got a row meanwhile (the unique SOP Instance UID decides)."""
    caller = Caller(ae_title=source_ae, host=ADOPTED_FROM_HOST)
    path = data_dir / key
    values = instance_values(header, caller, path, size, hashlib.sha256(dataset).hexdigest())
    for _attempt in range(2):  # a concurrent store may create the same study or series first
        try:
            with db.engine.begin() as conn:
                series_id = series_row_id(conn, header, stored=True)
                conn.execute(
                    insert(_INSTANCES).values(series_id=series_id, sop_instance_uid=header.sop_instance_uid, **values)
                )
                _event(
                    conn,
                    ORPHAN_FILE_ADOPTED,
                    header.study_uid,
                    header.series_uid,
                    header.sop_instance_uid,
                    f"{key} ({size} bytes): complete file without a database row",
                    calling_ae=source_ae,
                )
            return True
        except IntegrityError:
            if _recorded_uids(db, [header.sop_instance_uid]):
                log.info("%s: recorded by a store that landed meanwhile", key)
                return False
    return False


def _quarantine(
    db: Database, data_dir: Path, key: str, reason: str, judged: os.stat_result, live: bool, report: ReconcileReport
) -> None:
    """Move ``data_dir/key`` to ``data_dir/quarantine/key`` (a free name beside it if taken) and record why.

    ``judged``: the file as it was examined. If a store in flight put a new file at that path meanwhile, it
    is not moved (or moved back at once). ``live``: the receiver runs, so emptied folders stay (a store may
    be about to use them); without it they are removed."""
    source = data_dir / key
    target = data_dir / "quarantine" / key
    n = 0
    while target.exists() or target.is_symlink():
        n += 1
        target = data_dir / "quarantine" / f"{key}.{n}"
    try:
        if not _same_file(source.stat(), judged):
            report.in_flight += 1
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(source, target)
        if not _same_file(target.stat(), judged, renamed=True):  # replaced since the check: put it back
            os.link(target, source)  # fails if yet another file is there: then both are kept
            target.unlink()
            report.in_flight += 1
            return
    except FileNotFoundError:
        return
    except OSError as exc:
        log.error("cannot quarantine %s (%s): %s", key, reason, exc.strerror or exc)
        return
    if not live:
        _remove_empty(source.parent, data_dir / "studies")
    report.orphans_quarantined += 1
    report._example(f"quarantined {key} ({reason})")
    log.warning("quarantined %s: %s", key, reason)
    parts = Path(key).parts
    study, series, sop = (parts[1], parts[2], Path(parts[3]).stem) if len(parts) == 4 else ("", "", "")
    with db.engine.begin() as conn:
        _event(
            conn,
            ORPHAN_FILE_QUARANTINED,
            safe_uid(study) if study else "",
            safe_uid(series) if series else "",
            safe_uid(sop) if sop else "",
            f"{key} -> {target.relative_to(data_dir)}: {reason}",
        )


def _same_file(now: os.stat_result, judged: os.stat_result, renamed: bool = False) -> bool:
    """The file examined, unchanged (a rename changes the ctime, so only an unrenamed one is compared on it)."""
    same = (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) == (
        judged.st_dev,
        judged.st_ino,
        judged.st_size,
        judged.st_mtime_ns,
    )
    return same and (renamed or now.st_ctime_ns == judged.st_ctime_ns)


def _remove_empty(folder: Path, root: Path) -> None:
    """Remove ``folder`` and its parents below ``root`` while they are empty."""
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty (or a store in flight just created a file in it)
            return
        folder = folder.parent


def _event(
    conn: Connection,
    kind: str,
    study_uid: str = "",
    series_uid: str = "",
    sop_instance_uid: str = "",
    detail: str = "",
    calling_ae: str = "",
) -> None:
    """One events row in the caller's transaction, so a change and its event commit together."""
    conn.execute(
        insert(_EVENTS).values(
            at=utcnow(),
            kind=kind,
            calling_ae=calling_ae[:64],
            study_uid=study_uid[:64],
            series_uid=series_uid[:64],
            sop_instance_uid=sop_instance_uid[:64],
            detail=detail,
        )
    )
