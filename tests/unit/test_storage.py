"""InstanceStore (node/receiver/storage.py) in-process: real files under tmp_path, a real SQLite database.

What it guards: a Success-worthy outcome means a complete Part 10 file plus its row; every refusal
leaves nothing behind; duplicates, replacements and concurrent senders are decided consistently.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select, text

from node import IMPLEMENTATION_CLASS_UID
from node.db import Event, Instance, Series, Study
from node.db.database import Database
from node.receiver.storage import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    Caller,
    InstanceStore,
    Outcome,
    StoreRefused,
)
from tests.mr_files import CT_IMAGE_STORAGE, MR_IMAGE_STORAGE, mr_slice
from tests.stored_instances import (
    CALLER,
    count,
    encode,
    files_under,
    header_of,
    rows,
    run_concurrently,
    store_at_once,
    target_of,
)
from tests.unit.conftest import make_store


def new_slice(index: int = 0, *, study: str | None = None, series: str | None = None, **kwargs: str) -> Dataset:
    """A slice of a new study/series unless given; ``kwargs`` go to ``mr_slice``."""
    return mr_slice(study or generate_uid(), series or generate_uid(), index, **kwargs)  # type: ignore[arg-type]


def test_stored_instance_is_a_part10_file_with_a_matching_row(
    store: InstanceStore, data_dir: Path, db: Database
) -> None:
    """STORED: studies/<study>/<series>/<sop>.dcm is a valid Part 10 file naming the caller; the row matches it."""
    ds = new_slice(3)
    dataset = encode(ds)
    assert store.store(header_of(ds), dataset, CALLER) is Outcome.STORED
    path = target_of(data_dir, ds)
    assert files_under(data_dir) == [path]
    back = pydicom.dcmread(path)  # no force=True: preamble and DICM prefix must be there
    fm = back.file_meta
    assert fm.MediaStorageSOPClassUID == MR_IMAGE_STORAGE
    assert fm.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert fm.TransferSyntaxUID == ExplicitVRLittleEndian
    assert fm.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert fm.SourceApplicationEntityTitle == CALLER.ae_title
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert back.PixelData == ds.PixelData
    assert path.read_bytes().endswith(dataset)  # the data set is kept byte for byte
    [row] = rows(db, Instance)
    assert row.sop_instance_uid == ds.SOPInstanceUID
    assert row.stored is True and row.path == str(path)
    assert row.size_bytes == path.stat().st_size
    assert row.sha256 == hashlib.sha256(dataset).hexdigest()
    assert (row.calling_ae, row.calling_host) == (CALLER.ae_title, CALLER.host)
    assert (row.instance_number, row.transfer_syntax_uid, row.replaced_count) == (4, ExplicitVRLittleEndian, 0)
    [series] = rows(db, Series)
    assert (series.series_uid, series.modality, series.series_number, series.state) == (
        ds.SeriesInstanceUID,
        "MR",
        1,
        "receiving",
    )
    assert [s.study_uid for s in rows(db, Study)] == [ds.StudyInstanceUID]
    assert files_under(data_dir / "incoming") == []


def test_identical_restore_is_a_duplicate_and_touches_nothing(
    store: InstanceStore, data_dir: Path, db: Database
) -> None:
    """DUPLICATE: same bytes again leave the file (and its mtime) and the single row as they were."""
    ds = new_slice()
    dataset = encode(ds)
    assert store.store(header_of(ds), dataset, CALLER) is Outcome.STORED
    path = target_of(data_dir, ds)
    before = (path.stat().st_mtime_ns, path.stat().st_ino, path.read_bytes())
    [row_before] = rows(db, Instance)
    assert store.store(header_of(ds), dataset, Caller("SCANNER2", "127.0.0.2")) is Outcome.DUPLICATE
    assert (path.stat().st_mtime_ns, path.stat().st_ino, path.read_bytes()) == before
    [row_after] = rows(db, Instance)
    assert (row_after.received_at, row_after.calling_ae, row_after.replaced_count) == (
        row_before.received_at,
        "SCANNER1",
        0,
    )
    assert files_under(data_dir) == [path]


def test_duplicate_whose_file_was_lost_is_restored(store: InstanceStore, data_dir: Path, db: Database) -> None:
    """An instance acknowledged earlier whose file vanished is written again when re-sent."""
    ds = new_slice()
    dataset = encode(ds)
    store.store(header_of(ds), dataset, CALLER)
    path = target_of(data_dir, ds)
    path.unlink()
    assert store.store(header_of(ds), dataset, CALLER) is Outcome.DUPLICATE
    assert path.read_bytes().endswith(dataset)
    assert count(db, Instance) == 1


def test_same_uid_with_new_content_replaces_and_is_audited(store: InstanceStore, data_dir: Path, db: Database) -> None:
    """REPLACED: the newest content is on disk, the row follows it, and an instance_replaced event is recorded."""
    ds = new_slice()
    first = encode(ds)
    store.store(header_of(ds), first, CALLER)
    changed = mr_slice(ds.StudyInstanceUID, ds.SeriesInstanceUID, 0, sop_instance_uid=ds.SOPInstanceUID, seed=7)
    assert changed.PixelData != ds.PixelData
    second = encode(changed)
    caller2 = Caller("SCANNER2", "127.0.0.2")
    assert store.store(header_of(changed), second, caller2) is Outcome.REPLACED
    path = target_of(data_dir, ds)
    assert pydicom.dcmread(path).PixelData == changed.PixelData
    assert pydicom.dcmread(path).file_meta.SourceApplicationEntityTitle == "SCANNER2"
    [row] = rows(db, Instance)
    assert row.replaced_count == 1
    assert row.sha256 == hashlib.sha256(second).hexdigest()
    assert row.size_bytes == path.stat().st_size
    assert (row.calling_ae, row.calling_host) == ("SCANNER2", "127.0.0.2")
    [event] = rows(db, Event)
    assert event.kind == "instance_replaced"
    assert (event.sop_instance_uid, event.series_uid, event.study_uid) == (
        ds.SOPInstanceUID,
        ds.SeriesInstanceUID,
        ds.StudyInstanceUID,
    )
    assert hashlib.sha256(first).hexdigest() in event.detail and row.sha256 in event.detail
    assert files_under(data_dir) == [path]


def test_sop_class_not_kept_is_ignored_without_a_file(store: InstanceStore, data_dir: Path, db: Database) -> None:
    """IGNORED: a CT slice gets a row with stored=False and no path; its series is 'ignored' with the reason."""
    ct = new_slice(sop_class_uid=CT_IMAGE_STORAGE)
    assert store.store(header_of(ct), encode(ct), CALLER) is Outcome.IGNORED
    assert files_under(data_dir) == []
    [row] = rows(db, Instance)
    assert (row.stored, row.path, row.sop_class_uid) == (False, None, CT_IMAGE_STORAGE)
    [series] = rows(db, Series)
    assert series.state == "ignored"
    assert CT_IMAGE_STORAGE in series.state_reason
    # Sent again: still ignored, still one row.
    assert store.store(header_of(ct), encode(ct), CALLER) is Outcome.IGNORED
    assert count(db, Instance) == 1


@pytest.mark.parametrize(
    "changes",
    [
        {"sop_instance_uid": "../x"},
        {"study_uid": "../x"},
        {"series_uid": "../x"},
        {"sop_instance_uid": ""},
        {"study_uid": ""},
        {"sop_class_uid": ""},
        {"transfer_syntax_uid": ""},
    ],
    ids=lambda c: "-".join(f"{k}={v!r}" for k, v in c.items()),
)
def test_invalid_uids_are_refused_and_write_nothing(
    store: InstanceStore, tmp_path: Path, data_dir: Path, db: Database, changes: dict[str, str]
) -> None:
    """A malformed UID never becomes a path: 0xC000, no file anywhere, no row."""
    ds = new_slice()
    with pytest.raises(StoreRefused) as refused:
        store.store(header_of(ds, **changes), encode(ds), CALLER)
    assert refused.value.status == CANNOT_UNDERSTAND
    assert [p for p in files_under(tmp_path) if p.parent.name != "db"] == []
    assert (count(db, Instance), count(db, Series), count(db, Study)) == (0, 0, 0)


def assert_refused_retryably(store: InstanceStore, data_dir: Path, db: Database) -> None:
    """A new instance gets 0xA700 (the sender retries later) and nothing is written or recorded."""
    ds = new_slice()
    with pytest.raises(StoreRefused) as refused:
        store.store(header_of(ds), encode(ds), CALLER)
    assert refused.value.status == OUT_OF_RESOURCES
    assert files_under(data_dir) == []
    assert count(db, Instance) == 0


def test_low_disk_space_refuses_with_out_of_resources(data_dir: Path, db: Database) -> None:
    """Free space below min_free_bytes: 0xA700 (the sender retries later), nothing written or recorded."""
    assert_refused_retryably(make_store(data_dir, db, min_free_bytes=2**62), data_dir, db)


def _break_instances_table(db: Database) -> None:
    with db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE instances RENAME TO broken"))


def test_database_failure_refuses_with_out_of_resources(store: InstanceStore, data_dir: Path, db: Database) -> None:
    """The INSERT failing answers 0xA700; no temp file, no study/series rows (their transaction rolled back)."""
    _break_instances_table(db)
    ds = new_slice()
    with pytest.raises(StoreRefused) as refused:
        store.store(header_of(ds), encode(ds), CALLER)
    assert refused.value.status == OUT_OF_RESOURCES
    assert files_under(data_dir / "incoming") == []
    assert (count(db, Series), count(db, Study)) == (0, 0)


def test_database_failure_leaves_no_file_in_studies(store: InstanceStore, data_dir: Path, db: Database) -> None:
    """A refused store removes the file it wrote, as the module docstring promises."""
    _break_instances_table(db)
    ds = new_slice()
    with pytest.raises(StoreRefused):
        store.store(header_of(ds), encode(ds), CALLER)
    assert files_under(data_dir / "studies") == []


def test_closed_store_refuses_with_out_of_resources(store: InstanceStore, data_dir: Path, db: Database) -> None:
    """After close() (node shutting down) every store is a retryable 0xA700 and nothing is written."""
    store.close()
    assert_refused_retryably(store, data_dir, db)


def test_opening_a_store_leaves_temp_files_alone(store: InstanceStore, data_dir: Path, db: Database) -> None:
    """Another receiver on the same data_dir may be writing its .tmp right now: only start-up reconciliation,
    which knows when its process started, removes leftovers (tests/unit/test_reconcile.py)."""
    in_flight = data_dir / "incoming" / "0123abcd.tmp"
    in_flight.write_bytes(b"half an image")
    make_store(data_dir, db)
    assert in_flight.exists()


def test_same_new_instance_stored_twice_at_once(store: InstanceStore, data_dir: Path, db: Database) -> None:
    """Two threads storing one new SOP instance: one STORED, one DUPLICATE, one row, one file."""
    ds = new_slice()
    dataset = encode(ds)
    results = run_concurrently([lambda: store.store(header_of(ds), dataset, CALLER)] * 2)
    assert sorted(r.value for r in results) == ["duplicate", "stored"], results
    assert count(db, Instance) == 1
    assert files_under(data_dir) == [target_of(data_dir, ds)]
    assert target_of(data_dir, ds).read_bytes().endswith(dataset)


def test_eight_instances_of_a_new_series_at_once(store: InstanceStore, data_dir: Path, db: Database) -> None:
    """Eight threads, eight instances of one series nobody has seen: all STORED, one study and one series row.

    Three rounds, each a new study and series, so the creation race is hit in most runs."""
    all_slices = []
    for _ in range(3):
        study, series = generate_uid(), generate_uid()
        slices = [new_slice(i, study=study, series=series) for i in range(8)]
        results = store_at_once(store, slices)
        assert results == [Outcome.STORED] * 8, results
        with db.session() as session:
            series_row = session.scalars(select(Series).where(Series.series_uid == series)).one()
            assert series_row.study.study_uid == study
            assert {i.sop_instance_uid for i in series_row.instances} == {ds.SOPInstanceUID for ds in slices}
        all_slices += slices
    assert (count(db, Study), count(db, Series), count(db, Instance)) == (3, 3, 24)
    assert files_under(data_dir) == sorted(target_of(data_dir, ds) for ds in all_slices)
