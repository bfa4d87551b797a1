"""StowReceiver (node/dicomweb/stow_rs.py) in-process: real multipart bodies, real files under tmp_path, a
real SQLite database, and the intake that turns stored series into jobs.

What it guards: a 200 means every instance is a Part 10 file on disk with its row (what a C-STORE
Success means); each bad part fails alone, with a PS3.18 FailureReason, and leaves nothing behind; the
request-level answers (400, 415); and that STOW-RS series complete and get jobs as C-STORE ones do.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select

from node.config import NodeConfig
from node.db import Event, Instance
from node.db.database import Database
from node.db.schema import utcnow
from node.dicomweb.stow_rs import StowReceiver
from node.jobs.config import CompletionSection
from node.jobs.intake import Intake
from node.jobs.states import JobState
from node.jobs.store import JobStore
from node.receiver.storage import InstanceStore
from node.selection import Contrast, SelectionSection
from tests.dicomweb_bodies import part10, stow_body
from tests.mr_files import CT_IMAGE_STORAGE, mr_series, mr_slice
from tests.stored_instances import target_of
from tests.unit.conftest import make_store

SENDER = "stow-client"
MPEG2 = "1.2.840.10008.1.2.4.100"  # a transfer syntax nothing decodes


def make_receiver(store: InstanceStore, db: Database, **storage: object) -> StowReceiver:
    config = NodeConfig.model_validate({"storage": storage} if storage else {})
    return StowReceiver(config, store, db)


@pytest.fixture
def receiver(store: InstanceStore, db: Database) -> StowReceiver:
    return make_receiver(store, db)


def answer(body: bytes) -> Dataset:
    """The dicom+json response, read by pydicom (not by the node's own reader)."""
    return Dataset.from_json(json.loads(body))


def referenced(body: bytes) -> set[str]:
    return {str(item.ReferencedSOPInstanceUID) for item in answer(body).get("ReferencedSOPSequence", [])}


def failures(body: bytes) -> list[tuple[str, int]]:
    """(SOP Instance UID or "" when the part had none worth naming, FailureReason), sorted."""
    return sorted(
        (str(item.get("ReferencedSOPInstanceUID", "")), int(item.FailureReason))
        for item in answer(body).get("FailedSOPSequence", [])
    )


def instance_rows(db: Database) -> dict[str, Instance]:
    with db.session() as session:
        return {row.sop_instance_uid: row for row in session.scalars(select(Instance))}


def refusals(db: Database) -> list[Event]:
    with db.session() as session:
        return list(session.scalars(select(Event).where(Event.kind == "store_refused")))


def test_all_stored_answers_200_after_files_and_rows_exist(
    receiver: StowReceiver, data_dir: Path, db: Database
) -> None:
    series = mr_series(3, size=8)
    body, content_type = stow_body([part10(ds) for ds in series])

    reply = receiver.receive(body, content_type, SENDER, host="127.0.0.1")

    assert (reply.status, reply.content_type) == (200, "application/dicom+json")
    uids = {str(ds.SOPInstanceUID) for ds in series}
    assert referenced(reply.body) == uids
    assert "FailedSOPSequence" not in answer(reply.body)
    rows = instance_rows(db)
    assert set(rows) == uids
    for ds in series:
        row = rows[str(ds.SOPInstanceUID)]
        assert row.stored and row.path == str(target_of(data_dir, ds))
        assert (row.calling_ae, row.calling_host) == (SENDER, "127.0.0.1")
        stored = pydicom.dcmread(row.path)
        assert stored.SOPInstanceUID == ds.SOPInstanceUID and stored.PixelData == ds.PixelData
        assert stored.file_meta.SourceApplicationEntityTitle == SENDER  # as C-STORE files name their caller


def test_bad_parts_fail_alone_with_reasons_and_leave_nothing(
    receiver: StowReceiver, data_dir: Path, db: Database
) -> None:
    good, bad_uid, mismatch, old_codec = mr_series(4, size=8)
    bad_uid.SOPInstanceUID = "1.2.x"  # invalid: it would become a path
    bad_uid.file_meta.MediaStorageSOPInstanceUID = "1.2.x"
    old_codec.file_meta.TransferSyntaxUID = MPEG2
    del old_codec.PixelData  # never read: the transfer syntax is refused first
    old_codec_file = part10(old_codec)
    uid = str(mismatch.SOPInstanceUID)
    other_uid = uid[:-1] + ("1" if uid[-1] != "1" else "2")
    mismatch_file = part10(mismatch).replace(uid.encode(), other_uid.encode(), 1)  # the file meta comes first
    body, content_type = stow_body([part10(good), b"not a dicom file", part10(bad_uid), mismatch_file, old_codec_file])

    reply = receiver.receive(body, content_type, SENDER)

    assert reply.status == 202
    assert referenced(reply.body) == {str(good.SOPInstanceUID)}
    assert failures(reply.body) == sorted(
        [
            ("", 0xC000),  # not a Part 10 file: no UID to name
            ("", 0xC000),  # a malformed UID is left out: the answer stays valid DICOM JSON
            (uid, 0xC000),  # named by its data set
            (str(old_codec.SOPInstanceUID), 0xC122),
        ]
    )
    assert set(instance_rows(db)) == {str(good.SOPInstanceUID)}
    assert [p.name for p in (data_dir / "studies").rglob("*.dcm")] == [f"{good.SOPInstanceUID}.dcm"]
    details = sorted(e.detail for e in refusals(db))
    assert len(details) == 4 and all(d.endswith("(STOW-RS)") for d in details)
    assert any("DICM" in d for d in details) and any("file meta" in d for d in details)


def test_all_failed_is_409_and_a_part_of_another_type_fails(receiver: StowReceiver, db: Database) -> None:
    [ds] = mr_series(1, size=8)
    body, content_type = stow_body([part10(ds)], part_type="application/octet-stream", related_type="application/dicom")
    reply = receiver.receive(body, content_type, SENDER)
    assert reply.status == 409
    assert failures(reply.body) == [("", 0xC000)]
    assert instance_rows(db) == {}


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/dicom", 415),
        ('multipart/related; type="application/dicom+xml"; boundary=x', 415),
        ("multipart/related; boundary=x", 400),  # no delimiter in the body
        ('multipart/related; type="application/dicom"', 400),  # no boundary
    ],
)
def test_request_level_errors(receiver: StowReceiver, db: Database, content_type: str, status: int) -> None:
    [ds] = mr_series(1, size=8)
    reply = receiver.receive(part10(ds), content_type, SENDER)
    assert reply.status == status
    assert reply.body  # a reason, for the admin reading the sender's log
    assert instance_rows(db) == {}


def test_truncated_body_is_400_and_stores_nothing(receiver: StowReceiver, db: Database) -> None:
    body, content_type = stow_body([part10(ds) for ds in mr_series(2, size=8)])
    assert receiver.receive(body[: len(body) // 2], content_type, SENDER).status == 400
    assert (
        receiver.receive(b"--" + content_type.rsplit("=", 1)[1].encode() + b"--\r\n", content_type, SENDER).status
        == 400
    )
    assert instance_rows(db) == {}


def test_resent_instances_are_idempotent(receiver: StowReceiver, db: Database) -> None:
    series = mr_series(2, size=8)
    body, content_type = stow_body([part10(ds) for ds in series])
    assert receiver.receive(body, content_type, SENDER).status == 200
    again = receiver.receive(body, content_type, SENDER)
    assert again.status == 200 and referenced(again.body) == {str(ds.SOPInstanceUID) for ds in series}
    assert len(instance_rows(db)) == 2


def test_other_sop_classes_follow_the_storage_policy(store: InstanceStore, data_dir: Path, db: Database) -> None:
    ct = mr_slice(generate_uid(), generate_uid(), 0, size=8, sop_class_uid=CT_IMAGE_STORAGE)
    body, content_type = stow_body([part10(ct)])

    ignored = make_receiver(store, db).receive(body, content_type, SENDER)
    assert ignored.status == 200  # acknowledged and recorded without a file, as over C-STORE
    assert not instance_rows(db)[str(ct.SOPInstanceUID)].stored

    other = mr_slice(generate_uid(), generate_uid(), 0, size=8, sop_class_uid=CT_IMAGE_STORAGE)
    body, content_type = stow_body([part10(other)])
    rejected = make_receiver(store, db, other_sop_classes="reject").receive(body, content_type, SENDER)
    assert rejected.status == 409
    assert failures(rejected.body) == [(str(other.SOPInstanceUID), 0x0122)]
    assert list((data_dir / "studies").rglob("*.dcm")) == []  # neither kept a file


def test_closed_store_answers_out_of_resources(data_dir: Path, db: Database) -> None:
    store = make_store(data_dir, db)
    store.close()  # the node is shutting down
    [ds] = mr_series(1, size=8)
    body, content_type = stow_body([part10(ds)])
    reply = make_receiver(store, db).receive(body, content_type, SENDER)
    assert reply.status == 409
    assert failures(reply.body) == [(str(ds.SOPInstanceUID), 0xA700)]  # a sender retries this one


def test_a_stow_series_completes_and_gets_a_job(receiver: StowReceiver, db: Database) -> None:
    series = mr_series(3, size=8)
    body, content_type = stow_body([part10(ds) for ds in series])
    assert receiver.receive(body, content_type, SENDER).status == 200
    selection = SelectionSection(min_slices=3, models=dict.fromkeys(Contrast, Path("/nowhere/model.pt")))
    intake = Intake(db, CompletionSection(series_quiet_s=10), selection, JobStore(db))

    assert intake.poll(utcnow() + timedelta(seconds=5)) == []  # still within the quiet period
    [job] = intake.poll(utcnow() + timedelta(seconds=11))
    assert job.series_uid == str(series[0].SeriesInstanceUID)
    assert job.state is JobState.QUEUED
