"""Helpers for tests of the instance store: data sets as the receiver hands them over, and
looking at what the store left in the database and on disk. Shared by the SQLite unit tests and
the PostgreSQL integration tests."""

from __future__ import annotations

import copy
import struct
import threading
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import func, select

from node.db.database import Database
from node.receiver.part10 import InstanceHeader
from node.receiver.storage import Caller, InstanceStore, Outcome

CALLER = Caller(ae_title="SCANNER1", host="127.0.0.1")
TIMEOUT_S = 30


def encode(ds: Dataset) -> bytes:
    """The data set alone (no preamble, no group 0002), explicit VR little endian, as pydicom writes it."""
    ds = copy.deepcopy(ds)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    raw = buffer.getvalue()
    (group_length,) = struct.unpack("<I", raw[140:144])
    return raw[144 + group_length :]


def header_of(ds: Dataset, **changes: str) -> InstanceHeader:
    values = {
        "sop_class_uid": str(ds.SOPClassUID),
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "study_uid": str(ds.StudyInstanceUID),
        "series_uid": str(ds.SeriesInstanceUID),
        "transfer_syntax_uid": ExplicitVRLittleEndian,
        "modality": str(ds.Modality),
        "series_number": int(ds.SeriesNumber),
        "series_description": str(ds.SeriesDescription),
        "instance_number": int(ds.InstanceNumber),
    }
    return InstanceHeader(**(values | changes))


def target_of(data_dir: Path, ds: Dataset) -> Path:
    return data_dir / "studies" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def rows(db: Database, model: type) -> list:
    with db.session() as session:
        return list(session.scalars(select(model).order_by(model.id)))


def count(db: Database, model: type) -> int:
    with db.session() as session:
        return int(session.scalar(select(func.count()).select_from(model)))


def run_concurrently(jobs: list) -> list:  # type: ignore[type-arg]
    """Run the callables at once (released by one barrier); return results or exceptions, in order."""
    barrier = threading.Barrier(len(jobs))
    results: list = [None] * len(jobs)

    def run(i: int) -> None:
        barrier.wait(timeout=TIMEOUT_S)
        try:
            results[i] = jobs[i]()
        except Exception as exc:  # reported to the test as a value
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=TIMEOUT_S)
    assert not any(thread.is_alive() for thread in threads), "a store did not finish"
    return results


def put(store: InstanceStore, ds: Dataset, caller: Caller = CALLER) -> Outcome:
    return store.store(header_of(ds), encode(ds), caller)


def store_at_once(store: InstanceStore, datasets: list[Dataset]) -> list:
    """Store each data set from its own thread, all released together; outcomes (or exceptions) in order."""
    payloads = [(header_of(ds), encode(ds)) for ds in datasets]
    return run_concurrently([lambda h=h, d=d: store.store(h, d, CALLER) for h, d in payloads])
