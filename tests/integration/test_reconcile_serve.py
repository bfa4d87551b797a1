"""Start-up reconciliation through ``uad-node serve``: a data_dir left as crashes and outside hands leave it, a
restart, and the outcome in the events table, the files and ``status --json``. Plus the same states on
PostgreSQL (in-process, as tests/integration/test_postgres.py runs the store there)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.db.database import Database, open_database
from node.receiver.part10 import file_meta
from node.receiver.reconcile import file_problems, reconcile_storage
from node.receiver.storage import InstanceStore
from tests.integration.test_postgres import pg_url, postgres  # noqa: F401  (fixtures)
from tests.integration.test_receiver import send, series_counts, stored_files
from tests.mr_files import MR_IMAGE_STORAGE, mr_series, mr_slice
from tests.stored_instances import encode, put, rows, target_of


def part10_bytes(ds) -> bytes:  # type: ignore[no-untyped-def]
    return file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), ExplicitVRLittleEndian, "SCANNER3") + encode(ds)


def plant(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def events_of(data_dir: Path, timeout_s: float = 10.0, want: int = 0) -> list[tuple[str, str, str]]:
    """(kind, sop_instance_uid, detail) of the reconciliation's events (it runs before the scheduler starts, so
    they are there once the node listens; wait briefly anyway)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with closing(sqlite3.connect(data_dir / "uad-node.sqlite")) as db:
            found = db.execute(
                "SELECT kind, sop_instance_uid, detail FROM events"
                " WHERE kind LIKE 'orphan_%' OR kind LIKE 'instance_file_%' OR kind = 'partial_file_removed'"
                " ORDER BY id"
            ).fetchall()
        if len(found) >= want or time.monotonic() > deadline:
            return [tuple(row) for row in found]
        time.sleep(0.1)


def flags_of(data_dir: Path) -> dict[str, str]:
    with closing(sqlite3.connect(data_dir / "uad-node.sqlite")) as db:
        return dict(db.execute("SELECT sop_instance_uid, file_problem FROM instances WHERE file_problem != ''"))


def test_serve_reconciles_a_crashed_data_dir_at_start(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Planted: a temp file, a valid and a truncated file without rows, a deleted file. After the restart: the temp
    file gone, the valid one adopted (status counts it), the truncated one in quarantine/, the deleted one flagged
    with one event; the sender's re-send restores it and the next start clears the flag."""
    first = node_factory(folder=tmp_path)
    series = mr_series(3)
    assert send(first, series) == [0, 0, 0]
    assert first.stop() == 0
    data_dir = first.data_dir

    lost = target_of(data_dir, series[0])
    lost.unlink()
    orphan = mr_slice(series[0].StudyInstanceUID, series[0].SeriesInstanceUID, 3)
    adopted = plant(target_of(data_dir, orphan), part10_bytes(orphan))
    broken_ds = mr_slice(series[0].StudyInstanceUID, series[0].SeriesInstanceUID, 4)
    broken = plant(target_of(data_dir, broken_ds), part10_bytes(broken_ds)[:-64])
    partial = plant(data_dir / "incoming" / f"{'c' * 32}.tmp", b"\x00" * 200)
    time.sleep(0.2)  # files changed in the last ~60 ms before the process started would count as its own stores

    second = node_factory(folder=tmp_path)
    found = events_of(data_dir, want=4)
    assert ("orphan_file_adopted", orphan.SOPInstanceUID) in [(k, u) for k, u, _ in found]
    assert ("orphan_file_quarantined", broken_ds.SOPInstanceUID) in [(k, u) for k, u, _ in found]
    assert ("instance_file_missing", series[0].SOPInstanceUID) in [(k, u) for k, u, _ in found]
    assert ("partial_file_removed", "") in [(k, u) for k, u, _ in found] and not partial.exists()
    assert adopted.exists() and not broken.exists()
    assert (data_dir / "quarantine" / broken.relative_to(data_dir)).exists()
    assert flags_of(data_dir) == {series[0].SOPInstanceUID: "missing"}
    assert series_counts(second) == {series[0].SeriesInstanceUID: 4}  # 3 sent + 1 adopted
    problems = second.status()["file_problems"]
    assert problems["count"] == 1 and problems["instances"][0]["problem"] == "missing"
    assert problems["instances"][0]["sop_instance_uid"] == series[0].SOPInstanceUID
    assert "reconciled" in second.log() and "1 orphan(s) adopted, 1 quarantined, 1 row(s) newly flagged" in second.log()

    assert send(second, series[:1]) == [0]  # the sender still has it: the store puts the file back
    assert lost.exists() and len(stored_files(second)) == 4
    assert second.stop() == 0
    before = len(events_of(data_dir))

    third = node_factory(folder=tmp_path)
    after = events_of(data_dir, want=before + 1)
    assert [(k, u) for k, u, _ in after[before:]] == [("instance_file_restored", series[0].SOPInstanceUID)]
    assert flags_of(data_dir) == {} and third.status()["file_problems"] == {"count": 0, "instances": []}
    assert series_counts(third) == {series[0].SeriesInstanceUID: 4}


# -- PostgreSQL ----------------------------------------------------------------------------------------------


@pytest.fixture
def pg_db(pg_url: str) -> Iterator[Database]:  # noqa: F811
    database = open_database(pg_url)
    yield database
    database.close()


@pytest.mark.peers
def test_reconcile_on_postgresql(pg_db: Database, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    store = InstanceStore(data_dir=data_dir, database=pg_db, stored_sop_classes={MR_IMAGE_STORAGE}, min_free_bytes=0)
    series = mr_series(2)
    for ds in series:
        put(store, ds)
    target_of(data_dir, series[0]).unlink()
    orphan = mr_slice(generate_uid(), generate_uid(), 0)
    plant(target_of(data_dir, orphan), part10_bytes(orphan))
    broken = mr_slice(generate_uid(), generate_uid(), 0)
    plant(target_of(data_dir, broken), part10_bytes(broken)[:-10])

    report = reconcile_storage(data_dir, pg_db, {MR_IMAGE_STORAGE})
    assert (report.orphans_adopted, report.orphans_quarantined, report.newly_flagged) == (1, 1, 1)
    assert [p.sop_instance_uid for p in file_problems(pg_db)] == [series[0].SOPInstanceUID]
    again = reconcile_storage(data_dir, pg_db, {MR_IMAGE_STORAGE})
    assert not again.changed and again.flagged == 1
    from node.db import Event, Instance

    assert sorted(e.kind for e in rows(pg_db, Event)) == [
        "instance_file_missing",
        "orphan_file_adopted",
        "orphan_file_quarantined",
    ]
    [adopted] = [r for r in rows(pg_db, Instance) if r.sop_instance_uid == orphan.SOPInstanceUID]
    assert (adopted.calling_ae, adopted.calling_host, adopted.path) == (
        "SCANNER3",
        "reconciled",
        str(target_of(data_dir, orphan)),
    )
