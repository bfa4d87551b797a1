"""Start-up reconciliation (node/receiver/reconcile.py) on real files under tmp_path and a real SQLite database.

Each state a crash or an outside hand can leave is planted as it would be found: a temp file in incoming/, a file
renamed into place whose row never committed (valid, truncated, filed under the wrong folder, of a class not
stored), rows whose file went missing, shrank, lost its prefix or came back. What it guards: nothing acknowledged
is lost, nothing is deleted that might be an image, every change is one event, a second run changes nothing.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import insert, select, update

from node.db import Event, Instance, Series, Study
from node.db.database import Database
from node.db.schema import utcnow
from node.receiver.part10 import file_meta
from node.receiver.reconcile import (
    FileProblem,
    ReconcileReport,
    count_file_problems,
    file_problems,
    reconcile_storage,
)
from node.receiver.storage import InstanceStore
from tests.mr_files import CT_IMAGE_STORAGE, MR_IMAGE_STORAGE, mr_series, mr_slice
from tests.stored_instances import encode, files_under, put, rows, target_of

STORED = {MR_IMAGE_STORAGE}
MPEG2_VIDEO = "1.2.840.10008.1.2.4.100"  # never negotiated: no decoder


def reconcile(data_dir: Path, db: Database, **kwargs: float) -> ReconcileReport:
    return reconcile_storage(data_dir, db, STORED, **kwargs)


def events(db: Database) -> list[tuple[str, str, str]]:
    """(kind, sop_instance_uid, detail) of every event, oldest first."""
    return [(e.kind, e.sop_instance_uid, e.detail) for e in rows(db, Event)]


def kinds(db: Database) -> list[str]:
    return [kind for kind, _, _ in events(db)]


def part10_bytes(ds: Dataset, source_ae: str = "SCANNER1") -> bytes:
    """The file exactly as the store writes it: its own PS3.10 header, then the data set as received."""
    return file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), ExplicitVRLittleEndian, source_ae) + encode(ds)


def plant_orphan(data_dir: Path, ds: Dataset, data: bytes | None = None, *, at: Path | None = None) -> Path:
    """A file renamed into place by a store killed before its commit: on disk, no row."""
    path = at or target_of(data_dir, ds)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(part10_bytes(ds) if data is None else data)
    return path


def stored(store: InstanceStore, data_dir: Path, count: int = 3) -> list[Path]:
    """``count`` slices of a new series stored through the C-STORE path; their files."""
    series = mr_series(count)
    for ds in series:
        put(store, ds)
    return [target_of(data_dir, ds) for ds in series]


def problem_of(db: Database, path: Path) -> str:
    with db.session() as session:
        return session.scalar(select(Instance.file_problem).where(Instance.path == str(path)))


def snapshot(db: Database, data_dir: Path) -> tuple:
    """Everything reconciliation could change: every table it writes and every file."""
    return (
        [(r.id, r.sop_instance_uid, r.path, r.size_bytes, r.sha256, r.file_problem) for r in rows(db, Instance)],
        [(r.id, r.series_uid, r.state) for r in rows(db, Series)],
        [(r.id, r.study_uid) for r in rows(db, Study)],
        events(db),
        [(p, p.stat().st_size) for p in files_under(data_dir)],
    )


def test_clean_tree_changes_nothing(store: InstanceStore, data_dir: Path, db: Database) -> None:
    stored(store, data_dir, 4)
    before = snapshot(db, data_dir)
    report = reconcile(data_dir, db)
    assert snapshot(db, data_dir) == before
    assert (report.stored_rows, report.files_scanned, report.changed, report.flagged) == (4, 4, False, 0)
    assert events(db) == []
    assert file_problems(db) == []


def test_partial_file_in_incoming_is_removed(store: InstanceStore, data_dir: Path, db: Database) -> None:
    """A temp file of a store killed before its rename: never acknowledged, removed, one event."""
    leftover = data_dir / "incoming" / f"{'a' * 32}.tmp"
    leftover.write_bytes(b"\x00" * 128 + b"DICM partial")
    report = reconcile(data_dir, db)
    assert not leftover.exists()
    assert report.partial_files_removed == 1
    [(kind, _, detail)] = events(db)
    assert kind == "partial_file_removed" and leftover.name in detail


def test_valid_orphan_is_adopted_as_a_c_store_would_record_it(
    store: InstanceStore, data_dir: Path, db: Database
) -> None:
    """Renamed into place, killed before the commit: the rows a C-STORE of it would have written, and one event."""
    study, series = generate_uid(), generate_uid()
    sent = mr_slice(study, series, 0)
    put(store, sent)  # a sibling stored the normal way, to compare the rows with
    orphan = mr_slice(study, series, 1)
    path = plant_orphan(data_dir, orphan, part10_bytes(orphan, source_ae="SCANNER2"))
    data = path.read_bytes()

    report = reconcile(data_dir, db)

    assert (report.orphans_adopted, report.orphans_quarantined) == (1, 0)
    assert path.read_bytes() == data  # adopted where it lies, byte for byte
    normal, adopted = rows(db, Instance)
    assert adopted.sop_instance_uid == orphan.SOPInstanceUID
    assert (adopted.series_id, adopted.sop_class_uid, adopted.transfer_syntax_uid) == (
        normal.series_id,
        MR_IMAGE_STORAGE,
        ExplicitVRLittleEndian,
    )
    assert (adopted.stored, adopted.path, adopted.size_bytes) == (True, str(path), len(data))
    assert adopted.sha256 == hashlib.sha256(encode(orphan)).hexdigest()  # of the data set, as a C-STORE hashes it
    assert (adopted.calling_ae, adopted.calling_host) == ("SCANNER2", "reconciled")
    assert (adopted.instance_number, adopted.replaced_count, adopted.file_problem) == (2, 0, "")
    assert adopted.received_at >= normal.received_at
    [(kind, uid, detail)] = events(db)
    assert (kind, uid) == ("orphan_file_adopted", orphan.SOPInstanceUID)
    [event] = rows(db, Event)
    assert (event.study_uid, event.series_uid, event.calling_ae) == (study, series, "SCANNER2")
    assert not reconcile(data_dir, db).changed  # adopted once


def test_orphan_of_a_new_series_gets_study_and_series_rows(data_dir: Path, db: Database) -> None:
    ds = mr_slice(generate_uid(), generate_uid(), 4)
    plant_orphan(data_dir, ds)
    assert reconcile(data_dir, db).orphans_adopted == 1
    [study] = rows(db, Study)
    [series] = rows(db, Series)
    assert study.study_uid == ds.StudyInstanceUID
    assert (series.series_uid, series.modality, series.series_number, series.description, series.state) == (
        ds.SeriesInstanceUID,
        "MR",
        1,
        "T1 AX",
        "receiving",
    )
    [instance] = rows(db, Instance)
    assert instance.series_id == series.id and instance.instance_number == 5


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("truncated", "incomplete or unparsable"),
        ("wrong folder", "do not match its path"),
        ("not stored class", f"SOP class {CT_IMAGE_STORAGE} is not stored"),
        ("not dicom", "not a DICOM file"),
        ("cut before pixel data", "no Pixel Data"),
        ("syntax not accepted", f"transfer syntax {MPEG2_VIDEO} is not one this node accepts"),
    ],
)
def test_unfit_orphans_are_quarantined_never_deleted(data_dir: Path, db: Database, case: str, reason: str) -> None:
    """Truncated, unparsable, filed under other UIDs, of a class not stored: moved to quarantine/, with the reason."""
    ds = mr_slice(
        generate_uid(),
        generate_uid(),
        0,
        sop_class_uid=CT_IMAGE_STORAGE if case == "not stored class" else MR_IMAGE_STORAGE,
    )
    data = part10_bytes(ds)
    path = target_of(data_dir, ds)
    if case == "truncated":
        data = data[:-100]
    elif case == "wrong folder":
        path = data_dir / "studies" / ds.StudyInstanceUID / generate_uid() / f"{ds.SOPInstanceUID}.dcm"
    elif case == "not dicom":
        data = b"%PDF-1.4 not an image at all" * 10
    elif case == "syntax not accepted":
        data = file_meta(MR_IMAGE_STORAGE, str(ds.SOPInstanceUID), MPEG2_VIDEO, "SCANNER1") + encode(ds)
    elif case == "cut before pixel data":
        data = data[: data.index(b"\xe0\x7f\x10\x00")]  # (7FE0,0010) tag: everything before it
    plant_orphan(data_dir, ds, data, at=path)

    report = reconcile(data_dir, db)

    assert (report.orphans_adopted, report.orphans_quarantined) == (0, 1)
    assert not path.exists()
    assert not (data_dir / "studies" / ds.StudyInstanceUID).exists()  # emptied folders go too
    moved = data_dir / "quarantine" / path.relative_to(data_dir)
    assert moved.read_bytes() == data
    assert rows(db, Instance) == []
    [(kind, uid, detail)] = events(db)
    assert kind == "orphan_file_quarantined" and uid == ds.SOPInstanceUID
    assert reason in detail and "quarantine/studies/" in detail


def test_quarantine_keeps_an_earlier_file_of_the_same_name(data_dir: Path, db: Database) -> None:
    ds = mr_slice(generate_uid(), generate_uid(), 0)
    for payload in (b"first", b"second"):
        plant_orphan(data_dir, ds, payload)
        assert reconcile(data_dir, db).orphans_quarantined == 1
    held = files_under(data_dir / "quarantine")
    assert sorted(p.read_bytes() for p in held) == [b"first", b"second"]


def test_missing_file_is_flagged_once_across_runs(store: InstanceStore, data_dir: Path, db: Database) -> None:
    gone, kept, _ = stored(store, data_dir)
    gone.unlink()
    first = reconcile(data_dir, db)
    assert (first.newly_flagged, first.flagged) == (1, 1)
    assert problem_of(db, gone) == "missing" and problem_of(db, kept) == ""
    second = reconcile(data_dir, db)
    assert (second.newly_flagged, second.flagged, second.changed) == (0, 1, False)
    assert kinds(db) == ["instance_file_missing"]
    assert count_file_problems(db) == 1 and file_problems(db, limit=0) == []
    [problem] = file_problems(db)
    assert problem == FileProblem(
        sop_instance_uid=gone.stem,
        study_uid=gone.parent.parent.name,
        series_uid=gone.parent.name,
        path=str(gone),
        problem="missing",
    )


def test_truncated_file_is_flagged_with_its_sizes(store: InstanceStore, data_dir: Path, db: Database) -> None:
    path = stored(store, data_dir, 1)[0]
    size = path.stat().st_size
    with open(path, "r+b") as fp:
        fp.truncate(size - 10)
    report = reconcile(data_dir, db)
    assert report.newly_flagged == 1
    assert problem_of(db, path) == f"size {size - 10} != recorded {size}"
    [(kind, uid, detail)] = events(db)
    assert (kind, uid) == ("instance_file_unreadable", path.stem) and "size" in detail
    assert path.exists()  # a damaged image is kept for whoever investigates


def test_file_without_dicm_prefix_is_flagged_unreadable(store: InstanceStore, data_dir: Path, db: Database) -> None:
    path = stored(store, data_dir, 1)[0]
    data = bytearray(path.read_bytes())
    data[128:132] = b"XXXX"
    path.write_bytes(bytes(data))
    reconcile(data_dir, db)
    assert problem_of(db, path).startswith("unreadable: no DICM prefix")
    assert kinds(db) == ["instance_file_unreadable"]


def test_flag_is_cleared_when_the_file_comes_back(store: InstanceStore, data_dir: Path, db: Database) -> None:
    path = stored(store, data_dir, 1)[0]
    data = path.read_bytes()
    path.unlink()
    reconcile(data_dir, db)
    path.write_bytes(data)  # restored from a backup
    report = reconcile(data_dir, db)
    assert (report.restored, report.flagged) == (1, 0)
    assert problem_of(db, path) == ""
    assert kinds(db) == ["instance_file_missing", "instance_file_restored"]
    assert file_problems(db) == []


def test_a_changed_problem_is_a_new_event(store: InstanceStore, data_dir: Path, db: Database) -> None:
    path = stored(store, data_dir, 1)[0]
    data = path.read_bytes()
    path.unlink()
    reconcile(data_dir, db)
    path.write_bytes(data[:200])
    reconcile(data_dir, db)
    assert kinds(db) == ["instance_file_missing", "instance_file_unreadable"]
    assert problem_of(db, path) == f"size 200 != recorded {len(data)}"


def test_files_deleted_by_retention_are_not_problems(store: InstanceStore, data_dir: Path, db: Database) -> None:
    paths = stored(store, data_dir, 2)
    for path in paths:
        path.unlink()
    with db.session.begin() as session:
        session.execute(update(Series).values(images_deleted_at=utcnow()))
    report = reconcile(data_dir, db)
    assert (report.newly_flagged, report.flagged) == (0, 0)
    assert events(db) == []


def test_relative_paths_in_rows_are_understood(store: InstanceStore, data_dir: Path, db: Database) -> None:
    """Rows may record paths relative to data_dir (a later migration): neither orphans nor missing."""
    paths = stored(store, data_dir, 2)
    with db.session.begin() as session:
        for path in paths:
            session.execute(
                update(Instance).where(Instance.path == str(path)).values(path=str(path.relative_to(data_dir)))
            )
    paths[0].unlink()
    report = reconcile(data_dir, db)
    assert (report.orphans_adopted, report.orphans_quarantined, report.newly_flagged) == (0, 0, 1)
    assert kinds(db) == ["instance_file_missing"]


def test_file_of_a_uid_recorded_under_another_path_is_left_alone(
    store: InstanceStore, data_dir: Path, db: Database
) -> None:
    path = stored(store, data_dir, 1)[0]
    copy = data_dir / "studies" / path.parent.parent.name / generate_uid() / path.name
    copy.parent.mkdir(parents=True)
    copy.write_bytes(path.read_bytes())
    report = reconcile(data_dir, db)
    assert (report.orphans_adopted, report.orphans_quarantined, report.orphans_left) == (0, 0, 1)
    assert copy.exists() and events(db) == []


def test_files_changed_after_the_receiver_started_are_left_to_it(
    store: InstanceStore, data_dir: Path, db: Database
) -> None:
    """Beside a listening receiver: a temp file, a new file and a replaced file of stores in flight are not judged."""
    since = time.time() - 5  # the receiver started listening five seconds ago
    path = stored(store, data_dir, 1)[0]
    with open(path, "r+b") as fp:  # being replaced right now
        fp.truncate(300)
    plant_orphan(data_dir, mr_slice(generate_uid(), generate_uid(), 0))  # renamed, its commit not yet done
    temp = data_dir / "incoming" / f"{'b' * 32}.tmp"
    temp.write_bytes(b"in flight")
    report = reconcile(data_dir, db, since=since)
    assert report.in_flight == 3
    assert temp.exists() and len(files_under(data_dir / "studies")) == 2
    assert events(db) == [] and rows(db, Instance)[0].file_problem == ""


def test_a_row_committed_meanwhile_wins_over_adoption(
    data_dir: Path, db: Database, store: InstanceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that lands between the scan and the adoption: the unique UID decides, nothing is recorded twice."""
    ds = mr_slice(generate_uid(), generate_uid(), 0)
    plant_orphan(data_dir, ds)
    from node.receiver import reconcile as module

    real = module._recorded_uids
    calls = []

    def racing(db_: Database, uids: list[str]) -> set[str]:
        calls.append(uids)
        if len(calls) == 1:  # the look-up before adopting finds nothing; then the C-STORE commits
            found = real(db_, uids)
            put(store, ds)
            return found
        return real(db_, uids)

    monkeypatch.setattr(module, "_recorded_uids", racing)
    report = reconcile(data_dir, db)
    assert (report.orphans_adopted, report.orphans_left) == (0, 1)
    [row] = rows(db, Instance)
    assert row.calling_host == "127.0.0.1"  # the C-STORE's row
    assert events(db) == []


def test_a_file_replaced_while_judged_is_not_quarantined(
    data_dir: Path, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken orphan re-sent while it is examined: the store's new file lands at its path; it stays."""
    ds = mr_slice(generate_uid(), generate_uid(), 0)
    path = plant_orphan(data_dir, ds, b"broken")
    good = part10_bytes(ds)
    from node.receiver import reconcile as module

    real = module._check_orphan

    def racing(key: str, data: bytes, *args: set[str]) -> object:
        temp = data_dir / "incoming" / "racing.tmp"
        temp.parent.mkdir(parents=True, exist_ok=True)
        temp.write_bytes(good)
        os.replace(temp, path)  # the C-STORE's rename
        return real(key, data, *args)

    monkeypatch.setattr(module, "_check_orphan", racing)
    report = reconcile(data_dir, db)
    assert (report.orphans_quarantined, report.in_flight) == (0, 1)
    assert path.read_bytes() == good and events(db) == []


def test_rows_and_events_commit_in_batches(
    store: InstanceStore, data_dir: Path, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many changes at once (a volume not mounted): every row flagged, one event each."""
    paths = stored(store, data_dir, 12)
    for path in paths:
        path.unlink()
    from node.receiver import reconcile as module

    monkeypatch.setattr(module, "_BATCH", 5)
    report = reconcile(data_dir, db)
    assert (report.newly_flagged, report.flagged) == (12, 12)
    assert kinds(db) == ["instance_file_missing"] * 12


@pytest.mark.skipif(not os.environ.get("UAD_RECONCILE_BENCH"), reason="timing: set UAD_RECONCILE_BENCH=1")
def test_twenty_thousand_files_timing(data_dir: Path, db: Database) -> None:
    """20,000 recorded files (plus 5 orphans and 5 missing rows): print how long one reconciliation takes."""
    count = int(os.environ.get("UAD_RECONCILE_BENCH_FILES", "20000"))
    template = mr_slice(generate_uid(), generate_uid(), 0, size=64)
    dataset = encode(template)
    with db.engine.begin() as conn:
        study_id = conn.execute(insert(Study.__table__).values(study_uid=generate_uid())).inserted_primary_key[0]
    per_series = 200
    values = []
    for n in range(count):
        if n % per_series == 0:
            series_uid = generate_uid()
            with db.engine.begin() as conn:
                series_id = conn.execute(
                    insert(Series.__table__).values(study_id=study_id, series_uid=series_uid)
                ).inserted_primary_key[0]
            folder = data_dir / "studies" / "1.2.3" / series_uid
            folder.mkdir(parents=True)
        uid = generate_uid()
        data = file_meta(MR_IMAGE_STORAGE, uid, ExplicitVRLittleEndian, "SCANNER1") + dataset
        path = folder / f"{uid}.dcm"
        path.write_bytes(data)
        values.append(
            {
                "series_id": series_id,
                "sop_instance_uid": uid,
                "sop_class_uid": MR_IMAGE_STORAGE,
                "transfer_syntax_uid": ExplicitVRLittleEndian,
                "stored": True,
                "path": str(path),
                "size_bytes": len(data),
                "sha256": "0" * 64,
                "calling_ae": "SCANNER1",
                "calling_host": "127.0.0.1",
            }
        )
    with db.engine.begin() as conn:
        conn.execute(insert(Instance.__table__), values)
    for value in values[:5]:
        Path(value["path"]).unlink()
    for n in range(5):
        plant_orphan(data_dir, mr_slice(generate_uid(), generate_uid(), n))
    os.sync()
    started = time.perf_counter()
    report = reconcile(data_dir, db)
    seconds = time.perf_counter() - started
    print(f"\n{count} files: {seconds:.2f}s; {report.summary()}")
    assert (report.orphans_adopted, report.newly_flagged) == (5, 5)
    started = time.perf_counter()
    again = reconcile(data_dir, db)
    print(f"second run (nothing to change): {time.perf_counter() - started:.2f}s; {again.summary()}")
    assert not again.changed
