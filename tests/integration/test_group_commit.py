"""Group commit in InstanceStore (node/receiver/storage.py): concurrent C-STORE handlers share one
directory fsync and one database commit, and every guarantee of a lone store still holds.

Real files, real threads, real SQLite (WAL, synchronous=FULL) and, where installed, a real PostgreSQL
server (the throwaway cluster of ``test_postgres.py``); one test runs whole associations through an
in-process receiver. To make batches certain rather than likely, some tests slow the first directory
fsync a little: handlers that arrive meanwhile queue up behind the leader, as they do under load.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import MRImageStorage
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

import node.receiver.storage as storage
from node.config import NodeConfig
from node.db import Instance, Series, Study, open_database
from node.db.database import Database
from node.network import set_tcp_nodelay
from node.receiver.server import Receiver
from node.receiver.storage import OUT_OF_RESOURCES, InstanceStore, Outcome, StoreRefused, _PendingRow
from tests.integration.test_postgres import pg_url, postgres  # noqa: F401  (fixtures)
from tests.mr_files import MR_IMAGE_STORAGE, mr_slice
from tests.peers import free_port
from tests.stored_instances import CALLER, count, encode, files_under, header_of, run_concurrently, target_of

THREADS = 8


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        database = open_database(f"sqlite:///{tmp_path / 'node.sqlite'}")
    else:
        database = open_database(request.getfixturevalue("pg_url"))
    yield database
    database.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def new_store(data_dir: Path, db: Database) -> InstanceStore:
    return InstanceStore(data_dir=data_dir, database=db, stored_sop_classes={MR_IMAGE_STORAGE}, min_free_bytes=0)


@pytest.fixture
def store(data_dir: Path, db: Database) -> InstanceStore:
    return new_store(data_dir, db)


@pytest.fixture
def slow_first_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first directory fsync of the committer takes 0.3 s, so the other handlers queue behind it."""
    real = storage._fsync_dir
    first = threading.Event()

    def fsync_dir(directory: Path) -> None:
        if not first.is_set():
            first.set()
            time.sleep(0.3)
        real(directory)

    monkeypatch.setattr(storage, "_fsync_dir", fsync_dir)


def slices(n: int, series_count: int = 2) -> list:
    study = generate_uid()
    series = [generate_uid() for _ in range(series_count)]
    return [mr_slice(study, series[i % series_count], i) for i in range(n)]


def store_each(store: InstanceStore, datasets: list) -> list:
    payloads = [(header_of(ds), encode(ds)) for ds in datasets]
    return run_concurrently([lambda h=h, d=d: store.store(h, d, CALLER) for h, d in payloads])


def test_concurrent_stores_share_commits_and_all_are_durable(
    store: InstanceStore, data_dir: Path, db: Database, slow_first_fsync: None
) -> None:
    """Eight handlers at once: every instance STORED, with its file and row; fewer commits than rows."""
    datasets = slices(THREADS)
    assert store_each(store, datasets) == [Outcome.STORED] * THREADS
    assert count(db, Instance) == THREADS
    assert (count(db, Study), count(db, Series)) == (1, 2)
    assert files_under(data_dir / "studies") == sorted(target_of(data_dir, ds) for ds in datasets)
    assert files_under(data_dir / "incoming") == []
    stats = store.commit_stats()
    assert stats["rows"] == THREADS
    assert stats["largest_batch"] > 1, stats
    assert stats["commits"] < THREADS, stats


def test_lone_store_commits_at_once(store: InstanceStore, db: Database) -> None:
    """One handler is its own leader: one commit per row, no waiting for company."""
    for ds in slices(3, series_count=1):
        started = time.perf_counter()
        assert store.store(header_of(ds), encode(ds), CALLER) is Outcome.STORED
        assert time.perf_counter() - started < 2.0
    assert store.commit_stats() == {"commits": 3, "rows": 3, "largest_batch": 1, "split": 0}


def test_duplicate_uid_inside_one_batch_fails_only_that_row(store: InstanceStore, data_dir: Path, db: Database) -> None:
    """A batch holding the same SOP Instance UID twice is retried row by row: the other rows commit,
    the first copy commits, the second gets IntegrityError (its handler then decides duplicate/replace)."""
    first, other = slices(2, series_count=1)
    rows = []
    for ds in (first, other, first):
        header = header_of(ds)
        path = store._write_file(target_of(data_dir, ds), b"", encode(ds))
        rows.append(_PendingRow(header, path, storage.instance_values(header, CALLER, path, 1, "0" * 64)))
    store._commit_batch(rows)
    assert [row.error for row in rows[:2]] == [None, None]
    assert isinstance(rows[2].error, IntegrityError)
    assert count(db, Instance) == 2
    assert store.commit_stats()["split"] == 1


def test_same_uids_from_two_stores_at_once(data_dir: Path, db: Database, slow_first_fsync: None) -> None:
    """Two stores (two processes' worth of locks) receive the same instances at once: one row and one
    file each, every answer a Success (STORED once, DUPLICATE otherwise)."""
    a, b = new_store(data_dir, db), new_store(data_dir, db)
    datasets = slices(THREADS // 2)
    payloads = [(header_of(ds), encode(ds)) for ds in datasets]
    jobs = [lambda s=s, h=h, d=d: s.store(h, d, CALLER) for h, d in payloads for s in (a, b)]
    results = run_concurrently(jobs)
    for pair in zip(results[::2], results[1::2], strict=True):
        assert sorted(r.value for r in pair) == ["duplicate", "stored"], results
    assert count(db, Instance) == len(datasets)
    assert files_under(data_dir / "studies") == sorted(target_of(data_dir, ds) for ds in datasets)


def test_database_failure_refuses_the_whole_batch_and_removes_its_files(
    store: InstanceStore, data_dir: Path, db: Database, slow_first_fsync: None
) -> None:
    """The database failing under a batch: every handler in it answers 0xA700, no file stays behind,
    no study or series row is left from the rolled-back transaction."""
    with db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE instances RENAME TO broken"))
    results = store_each(store, slices(THREADS))
    assert all(isinstance(r, StoreRefused) and r.status == OUT_OF_RESOURCES for r in results), results
    assert files_under(data_dir / "studies") == []
    assert files_under(data_dir / "incoming") == []
    assert (count(db, Study), count(db, Series)) == (0, 0)
    assert store.commit_stats()["rows"] == 0


def test_failed_directory_fsync_refuses_its_rows_only(
    store: InstanceStore, data_dir: Path, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory that cannot be fsynced refuses the rows filed in it (0xA700, file removed); rows of
    other directories in the same batch commit."""
    good, bad = slices(2, series_count=2)
    bad_dir = target_of(data_dir, bad).parent
    real = storage._fsync_dir

    def fsync_dir(directory: Path) -> None:
        if directory == bad_dir:
            raise OSError(5, "Input/output error")
        real(directory)

    rows = []
    for ds in (good, bad):
        header = header_of(ds)
        path = store._write_file(target_of(data_dir, ds), b"", encode(ds))
        rows.append(_PendingRow(header, path, storage.instance_values(header, CALLER, path, 1, "0" * 64)))
    monkeypatch.setattr(storage, "_fsync_dir", fsync_dir)
    store._commit_batch(rows)
    assert rows[0].error is None
    assert isinstance(rows[1].error, StoreRefused) and rows[1].error.status == OUT_OF_RESOURCES
    assert count(db, Instance) == 1
    # Through store(): the refused handler removes its file.
    ds = slices(1)[0]
    monkeypatch.setattr(storage, "_fsync_dir", lambda d: fsync_dir(bad_dir))
    with pytest.raises(StoreRefused):
        store.store(header_of(ds), encode(ds), CALLER)
    assert not target_of(data_dir, ds).exists()


def test_four_associations_through_the_receiver(tmp_path: Path, slow_first_fsync: None) -> None:
    """Four pynetdicom associations send 25 instances each to an in-process receiver (SQLite): every
    C-STORE answers Success, every instance has its file and row, and commits were shared."""
    config = NodeConfig.model_validate(
        {
            "node": {
                "ae_title": "UADNODE",
                "host": "127.0.0.1",
                "port": free_port(),
                "data_dir": str(tmp_path / "data"),
                "allowed_senders": [],
                "min_free_disk_mb": 1,
            }
        }
    )
    db = open_database(config.node.effective_database_url())
    receiver = Receiver(config, db)
    _, port = receiver.start()
    senders, per_sender = 4, 25
    statuses: list[list[int]] = [[] for _ in range(senders)]
    series = [slices(per_sender, series_count=1) for _ in range(senders)]

    def send(index: int) -> None:
        ae = AE(ae_title=f"SCANNER{index}")
        ae.add_requested_context(MRImageStorage)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        assoc = ae.associate("127.0.0.1", port, ae_title="UADNODE", evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)])
        assert assoc.is_established
        try:
            statuses[index] = [int(assoc.send_c_store(ds).Status) for ds in series[index]]
        finally:
            assoc.release()

    try:
        threads = [threading.Thread(target=send, args=(i,)) for i in range(senders)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        stats = receiver.store.commit_stats()
    finally:
        receiver.stop()
        db.close()
    assert statuses == [[0] * per_sender] * senders
    db = open_database(config.node.effective_database_url())
    try:
        assert count(db, Instance) == senders * per_sender
    finally:
        db.close()
    data_dir = tmp_path / "data"
    assert files_under(data_dir / "studies") == sorted(target_of(data_dir, ds) for s in series for ds in s)
    assert stats["rows"] == senders * per_sender
    assert stats["commits"] < stats["rows"], stats
