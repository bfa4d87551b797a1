"""``uad-node serve`` as a subprocess against real SCUs (pynetdicom and dcmtk) on loopback."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from node.network import set_tcp_nodelay
from tests.mr_files import CT_IMAGE_STORAGE, mr_series, mr_slice, write_series
from tests.peers import NodeProcess, node_config, require_tool

NODELAY_ENV = {**os.environ, "TCP_NODELAY": "1"}


def scu(ae_title: str = "SCANNER1") -> AE:
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(CTImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    return ae


def send(node: NodeProcess, datasets: list, ae_title: str = "SCANNER1", bind: str | None = None) -> list[int]:
    """C-STORE each data set over one association; returns the response statuses."""
    assoc = scu(ae_title).associate(
        "127.0.0.1",
        node.port,
        ae_title=node.ae_title,
        bind_address=(bind, 0) if bind else None,
        evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)],
    )
    assert assoc.is_established, f"association from {ae_title} was not established"
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def stored_files(node: NodeProcess) -> list[Path]:
    return sorted((node.data_dir / "studies").rglob("*.dcm"))


def rejections_audited(node: NodeProcess, timeout_s: float = 5.0) -> list[tuple[str, str]]:
    """(calling AE, host) of rejected associations in the events table; the row is written just
    after the rejection goes out, so wait for it briefly."""
    deadline = time.monotonic() + timeout_s
    while True:
        with closing(sqlite3.connect(node.data_dir / "uad-node.sqlite")) as db:
            rows = db.execute("SELECT calling_ae, calling_host FROM events WHERE kind = 'association_refused'")
            audited = [tuple(row) for row in rows]
        if audited or time.monotonic() > deadline:
            return audited
        time.sleep(0.05)


def series_counts(node: NodeProcess) -> dict[str, int]:
    return {s["series_uid"]: s["instances"] for st in node.status()["studies"] for s in st["series"]}


def test_echo_from_pynetdicom_and_dcmtk(node: NodeProcess) -> None:
    """Both a Python and a C++ SCU get C-ECHO Success."""
    assoc = scu().associate("127.0.0.1", node.port, ae_title="UADNODE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    echoscu = require_tool("echoscu")
    result = subprocess.run(
        [echoscu, "-aet", "SCANNER1", "-aec", "UADNODE", "127.0.0.1", str(node.port)],
        capture_output=True,
        timeout=30,
        env=NODELAY_ENV,
    )
    assert result.returncode == 0, result.stderr


def test_store_from_pynetdicom_is_on_disk_and_in_database(node: NodeProcess) -> None:
    """Every acknowledged instance is a file with the sent content, filed by UIDs, and counted."""
    series = mr_series(5)
    assert send(node, series) == [0] * 5
    files = stored_files(node)
    assert len(files) == 5
    for ds in series:
        path = node.data_dir / "studies" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        back = pydicom.dcmread(path)
        assert back.PixelData == ds.PixelData
        assert back.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
    status = node.status()
    assert status["studies"][0]["study_uid"] == series[0].StudyInstanceUID
    [entry] = status["studies"][0]["series"]
    assert entry == entry | {"series_uid": series[0].SeriesInstanceUID, "modality": "MR", "instances": 5}
    assert entry["state"] == "receiving"


@pytest.mark.parametrize("log_patient_data", [False, True])
def test_logs_carry_patient_data_only_when_asked(node_factory, log_patient_data: bool) -> None:  # type: ignore[no-untyped-def]
    """Even at DEBUG, logs hold UIDs and AE titles but no patient ID unless log_patient_data is on."""
    node = node_factory(log_patient_data=log_patient_data)
    series = mr_series(2)
    assert send(node, series) == [0, 0]
    log = node.log()
    assert series[0].SOPInstanceUID in log and "SCANNER1" in log
    assert ("TEST-0001" in log) is log_patient_data
    assert "TEST^PATIENT" not in log


def test_store_from_dcmtk_storescu(node: NodeProcess, tmp_path: Path) -> None:
    """dcmtk storescu sends a folder; all files arrive byte-for-byte in their data set."""
    storescu = require_tool("storescu")
    series = mr_series(12, size=64)
    write_series(series, tmp_path / "send")
    result = subprocess.run(
        [storescu, "-aet", "SCANNER1", "-aec", "UADNODE", "+sd", "127.0.0.1", str(node.port), str(tmp_path / "send")],
        capture_output=True,
        timeout=60,
        env=NODELAY_ENV,
    )
    assert result.returncode == 0, result.stderr
    assert series_counts(node) == {series[0].SeriesInstanceUID: 12}
    sent = {ds.SOPInstanceUID: ds.PixelData for ds in series}
    received = {p.stem: pydicom.dcmread(p).PixelData for p in stored_files(node)}
    assert received == sent


@pytest.mark.parametrize(
    ("calling", "called", "bind"),
    [
        ("INTRUDER", "UADNODE", None),  # unknown calling AE title
        ("SCANNER1", "OTHERNODE", None),  # wrong called AE title
        ("SCANNER1", "UADNODE", "127.0.0.2"),  # known title from an address it is not allowed
    ],
)
def test_unknown_callers_are_rejected(node: NodeProcess, calling: str, called: str, bind: str | None) -> None:
    """Associations are refused before any data is accepted, and the refusal is audited."""
    assoc = scu(calling).associate("127.0.0.1", node.port, ae_title=called, bind_address=(bind, 0) if bind else None)
    assert assoc.is_rejected
    assert stored_files(node) == []
    assert rejections_audited(node) == [(calling, bind or "127.0.0.1")]  # waits: written after the rejection
    assert "association rejected" in node.log()


@pytest.mark.parametrize(
    ("calling", "bind"), [("SCANNER2", "127.0.0.2"), ("SCANNER3", "127.0.0.3"), ("SCANNER4", None)]
)
def test_sender_rules_by_network_any_host_and_hostname(node: NodeProcess, calling: str, bind: str | None) -> None:
    """A CIDR rule, a rule without host, and a host-name rule each let their sender in."""
    assert send(node, mr_series(1), ae_title=calling, bind=bind) == [0]


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("SOPInstanceUID", "1.2.3/../../../../tmp/evil"),
        ("StudyInstanceUID", "../../outside"),
        ("SeriesInstanceUID", "1.2.840.abc"),
        ("StudyInstanceUID", None),
    ],
)
def test_bad_or_missing_uids_fail_and_write_nothing(node: NodeProcess, attribute: str, value: str | None) -> None:
    """A UID that breaks the grammar never becomes a path: failure status, no file, no row."""
    ds = mr_series(1)[0]
    if value is None:
        delattr(ds, attribute)
    else:
        setattr(ds, attribute, value)
        if attribute == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = value
    statuses = send(node, [ds])
    assert statuses[0] not in (0x0000, 0xB000, 0xB007, 0xB006)
    assert 0xA000 <= statuses[0] <= 0xCFFF
    assert stored_files(node) == []
    assert node.status()["studies"] == []
    assert not list(node.data_dir.parent.rglob("evil*")) and not (node.data_dir / "outside").exists()


def test_duplicates_are_idempotent_and_changes_are_recorded(node: NodeProcess) -> None:
    """Same bytes twice: one file, Success. Same UID with new bytes: Success, newest kept, replacement audited."""
    [ds] = mr_series(1)
    assert send(node, [ds, ds]) == [0, 0]
    assert len(stored_files(node)) == 1
    changed = mr_slice(ds.StudyInstanceUID, ds.SeriesInstanceUID, 0, sop_instance_uid=ds.SOPInstanceUID, seed=99)
    assert changed.PixelData != ds.PixelData
    assert send(node, [changed]) == [0]
    [path] = stored_files(node)
    assert pydicom.dcmread(path).PixelData == changed.PixelData
    assert series_counts(node) == {ds.SeriesInstanceUID: 1}
    assert "re-sent with different content" in node.log()


def test_four_senders_at_once(node: NodeProcess) -> None:
    """Four concurrent associations, each its own study, all stored completely."""
    batches = {f"SCANNER{i}": mr_series(15, seed=i) for i in (1, 2, 3, 4)}
    results: dict[str, list[int]] = {}

    def run(title: str) -> None:
        results[title] = send(node, batches[title], ae_title=title)

    threads = [threading.Thread(target=run, args=(title,)) for title in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == {title: [0] * 15 for title in batches}
    assert sorted(series_counts(node).values()) == [15, 15, 15, 15]
    assert len(stored_files(node)) == 60


def test_restart_on_the_same_data_dir_keeps_everything(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM exits 0; a new process on the same data dir sees all earlier studies and adds to them."""
    first = node_factory(folder=tmp_path)
    series = mr_series(6)
    assert send(first, series[:3]) == [0, 0, 0]
    assert first.stop() == 0
    second = node_factory(folder=tmp_path)
    assert series_counts(second) == {series[0].SeriesInstanceUID: 3}
    assert send(second, series) == [0] * 6  # three duplicates, three new
    assert series_counts(second) == {series[0].SeriesInstanceUID: 6}
    assert len(stored_files(second)) == 6


def test_low_disk_answers_out_of_resources(node_factory) -> None:  # type: ignore[no-untyped-def]
    """Below min_free_disk_mb the sender gets 0xA700 (it keeps the image and retries); nothing is written."""
    node = node_factory(min_free_disk_mb=10**9)
    assert send(node, mr_series(2)) == [0xA700, 0xA700]
    assert stored_files(node) == []
    assert list((node.data_dir / "incoming").iterdir()) == []


def test_other_sop_classes_ignored_by_default(node: NodeProcess) -> None:
    """A CT slice is acknowledged, not stored, and its series shows as ignored with a reason."""
    ct = mr_slice(generate_uid(), generate_uid(), 0, sop_class_uid=CT_IMAGE_STORAGE)
    assert send(node, [ct]) == [0]
    assert stored_files(node) == []
    [study] = node.status()["studies"]
    [series] = study["series"]
    assert series["state"] == "ignored" and series["instances"] == 1
    assert CT_IMAGE_STORAGE in series["reason"]


def test_other_sop_classes_rejected_when_configured(node_factory) -> None:  # type: ignore[no-untyped-def]
    """With other_sop_classes = "reject", CT is not negotiated while MR still is."""
    node = node_factory(extra='[storage]\nother_sop_classes = "reject"')
    assoc = scu().associate("127.0.0.1", node.port, ae_title="UADNODE")
    assert assoc.is_established
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    assoc.release()
    assert MRImageStorage in accepted
    assert CTImageStorage not in accepted


def test_sigterm_finishes_stores_in_flight(node: NodeProcess) -> None:
    """Stop mid-transfer: exit 0, and every instance acknowledged with Success is on disk."""
    series = mr_series(200, size=128)
    acknowledged: list[str] = []
    started = threading.Event()

    def run() -> None:
        assoc = scu().associate("127.0.0.1", node.port, ae_title="UADNODE")
        try:
            for i, ds in enumerate(series):
                status = assoc.send_c_store(ds)
                if status and status.Status == 0:
                    acknowledged.append(ds.SOPInstanceUID)
                if i == 20:
                    started.set()
            assoc.release()
        except Exception:  # the node may close the association once stopped
            pass
        finally:
            started.set()

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(timeout=60)
    assert node.stop() == 0
    thread.join(timeout=60)
    on_disk = {p.stem for p in stored_files(node)}
    assert len(acknowledged) >= 20
    assert set(acknowledged) <= on_disk


def test_associations_beyond_the_limit_are_rejected_transiently(node_factory) -> None:  # type: ignore[no-untyped-def]
    """With max_associations = 1 a second caller is told to come back later, and the first keeps working."""
    node = node_factory(extra_node="max_associations = 1")
    deadline = time.monotonic() + 5  # the start-up port probe's slot is freed within milliseconds
    while not (first := scu().associate("127.0.0.1", node.port, ae_title="UADNODE")).is_established:
        assert time.monotonic() < deadline, "the only association slot stayed taken"
        time.sleep(0.05)
    try:
        second = scu("SCANNER2").associate("127.0.0.1", node.port, ae_title="UADNODE")
        assert second.is_rejected
        assert first.send_c_store(mr_series(1)[0]).Status == 0x0000
    finally:
        first.release()
    assert send(node, mr_series(1), ae_title="SCANNER2") == [0]


def test_serve_on_a_busy_port_exits_1_with_a_reason(node: NodeProcess, tmp_path: Path) -> None:
    """A second node on the same port fails at once with a readable reason, not a traceback."""
    (tmp_path / "second").mkdir()
    config = node_config(tmp_path / "second", node.port)
    result = subprocess.run(
        [sys.executable, "-m", "node", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{node.port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_dcmtk_reads_the_nodes_failure_replies(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """dcmtk decodes the node's directly encoded failure reply (bytes are checked in test_store_reply)."""
    storescu = require_tool("storescu")
    node = node_factory(min_free_disk_mb=10**9)
    write_series(mr_series(1), tmp_path / "send")
    result = subprocess.run(
        [
            storescu,
            "-v",
            "-aet",
            "SCANNER1",
            "-aec",
            "UADNODE",
            "+sd",
            "127.0.0.1",
            str(node.port),
            str(tmp_path / "send"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=NODELAY_ENV,
    )
    output = result.stdout + result.stderr
    assert "Received Store Response (Refused: OutOfResources)" in output, output
    assert stored_files(node) == []
