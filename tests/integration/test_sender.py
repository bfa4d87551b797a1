"""The sender (C-STORE SCU) against real peers on 127.0.0.1: dcmtk storescp, Orthanc, and
pynetdicom SCPs whose handlers answer the statuses under test (no mocks).

Every server a test starts is stopped at teardown; every network wait is a few seconds at most.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts, build_context
from pynetdicom.sop_class import MRImageStorage, Verification
from sqlalchemy import inspect
from sqlalchemy.exc import IntegrityError

from node.config import Destination, NodeConfig, TlsSection
from node.db import open_database
from node.db.database import Database
from node.db.schema import Delivery
from node.network import set_tcp_nodelay
from node.sender import AssociationSettings, DeliveryState, RetryPolicy, Sender
from node.sender.scu import connect, read_file_header, requested_contexts
from tests.integration import test_postgres, test_tls
from tests.mr_files import mr_series, write_series
from tests.peers import Orthanc, free_port, require_tool, running_orthanc, wait_for_port

pytestmark = pytest.mark.peers

TIMEOUT_S = 5.0
NODE_AE = "UADNODE"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
FAST = RetryPolicy(max_attempts=12, first_delay_s=0.2, factor=1.5, max_delay_s=1.0)

# Fixtures shared with the other peer tests: the test PKI and the throwaway PostgreSQL cluster.
certs = test_tls.certs
postgres = test_postgres.postgres
pg_url = test_postgres.pg_url


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = open_database(f"sqlite:///{tmp_path / 'node.sqlite'}")
    yield database
    database.close()


def make_sender(db: Database, tls: TlsSection | None = None, timeout_s: float = TIMEOUT_S) -> Sender:
    config = NodeConfig.model_validate({"node": {"ae_title": NODE_AE}, "tls": tls or TlsSection()})
    settings = AssociationSettings(
        calling_ae=NODE_AE,
        connect_timeout_s=2.0,
        acse_timeout_s=timeout_s,
        dimse_timeout_s=timeout_s,
        network_timeout_s=timeout_s,
    )
    return Sender(config, db, settings=settings)


def destination(port: int, ae_title: str = "PACS", *, tls: bool = False, name: str = "pacs") -> Destination:
    return Destination(name=name, ae_title=ae_title, host="127.0.0.1", port=port, tls=tls)


def mr_files(folder: Path, count: int, study_uid: str | None = None) -> list[Path]:
    return write_series(mr_series(count, study_uid=study_uid), folder)


def sc_file(folder: Path, study_uid: str) -> Path:
    """A small RGB Secondary Capture in the given study, as the result writer makes them."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SC_STORAGE
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SC_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID = "TEST^PATIENT", "TEST-0001"
    ds.Modality, ds.ConversionType, ds.SeriesNumber, ds.InstanceNumber = "OT", "WSD", 901, 1
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.full((16, 16, 3), 200, dtype=np.uint8).tobytes()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def rle_file(folder: Path, study_uid: str) -> Path:
    """An RLE Lossless MR slice: a compressed transfer syntax gets its own presentation context."""
    [ds] = mr_series(1, study_uid=study_uid)
    ds.compress(RLELossless, encoding_plugin="pydicom")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def uids_of(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def states(sender: Sender, dest: Destination, files: list[Path]) -> dict[str, DeliveryState]:
    rows = sender.ledger.records(dest.name, [read_file_header(p).sop_instance_uid for p in files])
    return {r.sop_instance_uid: r.state for r in rows}


@dataclass
class StoreScp:
    """dcmtk ``storescp`` writing every received object under a unique name into ``out``."""

    port: int
    out: Path
    args: tuple[str, ...] = ()
    process: subprocess.Popen | None = None

    def start(self) -> StoreScp:
        self.out.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [require_tool("storescp"), "-aet", "PACS", "-pdu", "131072", "+uf", "-od", str(self.out),
             "-ta", "5", "-td", "5", *self.args, str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "TCP_NODELAY": "1"},
        )  # fmt: skip
        wait_for_port(self.port, self.process)
        return self

    def received(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., StoreScp]]:
    """Make (not yet started) storescp peers; all are stopped at teardown."""
    require_tool("storescp")
    made: list[StoreScp] = []

    def make(*args: str, port: int | None = None) -> StoreScp:
        peer = StoreScp(port=port or free_port(), out=tmp_path / f"storescp{len(made)}", args=args)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.stop()


@dataclass
class PynetdicomScp:
    """A real pynetdicom storage SCP whose C-STORE answer is chosen by the test."""

    answer: Callable[[str, int], int]  # (SOP Instance UID, how often it was seen before) -> status
    received: list[str] = field(default_factory=list)  # every C-STORE, in order
    tls_peers: list[dict] = field(default_factory=list)

    def on_store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        status = self.answer(uid, self.received.count(uid))
        self.received.append(uid)
        sock = event.assoc.dul.socket.socket
        if isinstance(sock, ssl.SSLSocket):
            self.tls_peers.append(sock.getpeercert())
        return status


@contextmanager
def pynetdicom_scp(
    answer: Callable[[str, int], int] = lambda uid, seen: 0x0000,
    *,
    contexts: list | None = None,
    ssl_context: ssl.SSLContext | None = None,
    max_associations: int = 10,
) -> Iterator[tuple[int, PynetdicomScp]]:
    """Serve on a free loopback port for the ``with`` block; every association is aborted after."""
    scp = PynetdicomScp(answer)
    ae = AE(ae_title="PACS")
    ae.supported_contexts = contexts if contexts is not None else StoragePresentationContexts
    ae.add_supported_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
    ae.maximum_associations = max_associations
    port = free_port()
    ae.start_server(
        ("127.0.0.1", port),
        block=False,
        ssl_context=ssl_context,
        evt_handlers=[(evt.EVT_C_STORE, scp.on_store), (evt.EVT_CONN_OPEN, set_tcp_nodelay)],
    )
    try:
        yield port, scp
    finally:
        ae.shutdown()


# ---------------------------------------------------------------------------------------------
# dcmtk storescp


def test_storescp_receives_everything_once_and_a_resend_sends_nothing(
    db: Database, storescp: Callable[..., StoreScp], tmp_path: Path
) -> None:
    peer = storescp().start()
    files = mr_files(tmp_path / "out", 20)
    sender = make_sender(db)
    dest = destination(peer.port)

    result = sender.send_once(dest, files, "1.2.3.4")
    assert (result.outcome, result.delivered, result.sent, result.failed_transient, result.failed_permanent) == (
        "delivered", 20, 20, 0, 0,
    )  # fmt: skip
    assert result.retry_after_s is None and result.error == ""
    assert uids_of(peer.received()) == uids_of(files)
    assert len(peer.received()) == 20
    rows = sender.ledger.for_source_series("1.2.3.4")
    assert len(rows) == 20
    assert {(r.state, r.last_status, r.attempts, r.destination) for r in rows} == {
        (DeliveryState.DELIVERED, 0x0000, 1, "pacs")
    }
    assert all(r.created_at.tzinfo is not None for r in rows)

    again = sender.send_once(dest, files, "1.2.3.4")
    assert (again.outcome, again.sent, again.delivered) == ("delivered", 0, 20)
    assert len(peer.received()) == 20  # nothing duplicated
    assert sender.ledger.for_source_series("1.2.3.4") == rows  # rows unchanged, timestamps included


def test_partial_earlier_delivery_sends_only_the_rest(
    db: Database, storescp: Callable[..., StoreScp], tmp_path: Path
) -> None:
    peer = storescp().start()
    files = mr_files(tmp_path / "out", 6)
    sender = make_sender(db)
    dest = destination(peer.port)
    assert sender.send_once(dest, files[:2], "1.2.3.5").sent == 2
    result = sender.send_once(dest, files, "1.2.3.5")
    assert (result.outcome, result.sent, result.delivered) == ("delivered", 4, 6)
    assert len(peer.received()) == 6
    assert uids_of(peer.received()) == uids_of(files)


def test_destination_down_is_retried_and_delivered_once_it_is_up(
    db: Database, storescp: Callable[..., StoreScp], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    files = mr_files(tmp_path / "out", 8)
    sender = make_sender(db)
    dest = destination(port)

    result = sender.send_once(dest, files, "1.2.3.6")
    assert result.outcome == "retry"
    assert result.retry_after_s is not None and 0 < result.retry_after_s <= 10
    assert "cannot connect" in result.error
    assert (result.failed_transient, result.delivered, result.sent) == (8, 0, 0)
    assert set(states(sender, dest, files).values()) == {DeliveryState.FAILED_TRANSIENT}

    peer = storescp(port=port)
    timer = threading.Timer(0.6, peer.start)
    timer.start()
    try:
        started = time.monotonic()
        result = sender.deliver(dest, files, "1.2.3.6", FAST)
    finally:
        timer.cancel()
        timer.join()
    assert result.outcome == "delivered", result
    assert result.attempts >= 2  # at least one more failure before the peer was up
    assert time.monotonic() - started < 10
    assert uids_of(peer.received()) == uids_of(files)
    # Exactly once, unless a response was lost (a peer slow to answer on a loaded machine): DICOM then
    # resends, and the destination sees the same SOP Instance UID twice, as it must be able to.
    assert len(peer.received()) == 8 or "no C-STORE response" in caplog.text
    rows = sender.ledger.for_source_series("1.2.3.6")
    assert {r.state for r in rows} == {DeliveryState.DELIVERED}
    assert min(r.attempts for r in rows) >= 3  # the send_once above, at least one refused retry, the success


def test_permanent_rejection_is_recorded_and_not_looped(
    db: Database, storescp: Callable[..., StoreScp], tmp_path: Path
) -> None:
    """dcmtk ``--refuse`` answers A-ASSOCIATE-RJ with result 1 (rejected-permanent)."""
    peer = storescp("--refuse").start()
    files = mr_files(tmp_path / "out", 3)
    sender = make_sender(db)
    dest = destination(peer.port)

    started = time.monotonic()
    result = sender.deliver(dest, files, "1.2.3.7", FAST)
    # storescp --refuse sometimes drops a connection before answering (seen up to twice in a row), which is
    # rightly a transient failure; the first permanent rejection must then end delivery at once.
    assert (result.outcome, result.failed_permanent, result.sent) == ("failed", 3, 0)
    assert result.attempts < FAST.max_attempts
    assert "rejected" in result.error and "permanent" in result.error
    assert result.retry_after_s is None
    assert time.monotonic() - started < FAST.max_delay_s * result.attempts + 2  # no further backoff wait
    rows = sender.ledger.for_source_series("1.2.3.7")
    assert {r.state for r in rows} == {DeliveryState.FAILED_PERMANENT}
    assert {r.attempts for r in rows} == {result.attempts}

    # A scheduler calling again does not contact the destination for them ...
    again = sender.send_once(dest, files, "1.2.3.7")
    assert (again.outcome, again.sent, again.failed_permanent) == ("failed", 0, 3)
    assert {r.attempts for r in sender.ledger.for_source_series("1.2.3.7")} == {result.attempts}
    # ... until an admin asks for it explicitly.
    forced = sender.send_once(dest, files, "1.2.3.7", resend_failed_permanent=True)
    assert (forced.outcome, forced.sent) in {("failed", 0), ("retry", 0)}  # "retry" when storescp drops it
    assert {r.attempts for r in sender.ledger.for_source_series("1.2.3.7")} == {result.attempts + 1}


# ---------------------------------------------------------------------------------------------
# pynetdicom SCPs answering chosen statuses


def test_a900_fails_one_instance_permanently_and_the_others_are_delivered(db: Database, tmp_path: Path) -> None:
    files = mr_files(tmp_path / "out", 4)
    bad = read_file_header(files[1]).sop_instance_uid
    sender = make_sender(db)
    with pynetdicom_scp(lambda uid, seen: 0xA900 if uid == bad else 0x0000) as (port, scp):
        dest = destination(port)
        result = sender.deliver(dest, files, "1.2.3.8", FAST)
        assert (result.outcome, result.attempts, result.delivered, result.failed_permanent) == ("failed", 1, 3, 1)
        assert bad in result.error and "0xA900" in result.error
        rows = {r.sop_instance_uid: r for r in sender.ledger.for_source_series("1.2.3.8")}
        assert rows[bad].state is DeliveryState.FAILED_PERMANENT and rows[bad].last_status == 0xA900
        assert [r.state for uid, r in rows.items() if uid != bad] == [DeliveryState.DELIVERED] * 3
        assert sender.send_once(dest, files, "1.2.3.8").sent == 0  # neither resent nor duplicated
        assert sorted(scp.received) == sorted(uids_of(files))


def test_a700_is_retried_and_then_delivered(db: Database, tmp_path: Path) -> None:
    files = mr_files(tmp_path / "out", 3)
    sender = make_sender(db)
    # Out of resources the first time each instance arrives, then fine.
    with pynetdicom_scp(lambda uid, seen: 0xA700 if seen == 0 else 0x0000) as (port, scp):
        dest = destination(port)
        first = sender.send_once(dest, files, "1.2.3.9")
        assert (first.outcome, first.failed_transient, first.sent) == ("retry", 3, 3)
        assert "0xA700" in first.error
        result = sender.deliver(dest, files, "1.2.3.9", FAST)
        assert (result.outcome, result.delivered, result.attempts) == ("delivered", 3, 1)
        rows = sender.ledger.for_source_series("1.2.3.9")
        assert {(r.state, r.attempts, r.last_status) for r in rows} == {(DeliveryState.DELIVERED, 2, 0)}
        assert len(scp.received) == 6


def test_warning_status_counts_as_delivered_with_the_status_recorded(db: Database, tmp_path: Path) -> None:
    files = mr_files(tmp_path / "out", 2)
    sender = make_sender(db)
    with pynetdicom_scp(lambda uid, seen: 0xB000) as (port, _):
        result = sender.send_once(destination(port), files, "1.2.3.10")
    assert (result.outcome, result.delivered) == ("delivered", 2)
    assert {(r.state, r.last_status) for r in sender.ledger.for_source_series("1.2.3.10")} == {
        (DeliveryState.DELIVERED, 0xB000)
    }


def test_transient_association_rejection_is_retried(db: Database, tmp_path: Path) -> None:
    """pynetdicom rejects with result 2 (rejected-transient) above its association limit."""
    files = mr_files(tmp_path / "out", 2)
    sender = make_sender(db)
    with pynetdicom_scp(max_associations=1) as (port, scp):
        blocker_ae = AE(ae_title="OTHER")
        blocker_ae.add_requested_context(Verification)
        blocker_ae.acse_timeout = blocker_ae.network_timeout = TIMEOUT_S
        blocker = blocker_ae.associate("127.0.0.1", port, ae_title="PACS")
        assert blocker.is_established
        try:
            dest = destination(port)
            result = sender.send_once(dest, files, "1.2.3.11")
            assert result.outcome == "retry", result
            assert "rejected" in result.error and "transient" in result.error
            timer = threading.Timer(0.5, blocker.release)
            timer.start()
            result = sender.deliver(dest, files, "1.2.3.11", FAST)
            timer.join()
        finally:
            if blocker.is_established:
                blocker.release()
        assert result.outcome == "delivered"
        assert sorted(scp.received) == sorted(uids_of(files))


def test_sop_class_the_destination_does_not_accept_is_permanent(db: Database, tmp_path: Path) -> None:
    """MR only at the destination: the SC fails permanently, the MR files go, the RLE one decompressed."""
    study = generate_uid()
    mr = mr_files(tmp_path / "out", 2, study)
    rle = rle_file(tmp_path / "rle", study)
    sc = sc_file(tmp_path / "sc", study)
    files = [*mr, rle, sc]
    # Requested contexts: one uncompressed per SOP class, plus RLE for MR.
    contexts = requested_contexts([read_file_header(p) for p in files])
    assert [(str(cx.abstract_syntax), len(cx.transfer_syntax)) for cx in contexts] == [
        (MRImageStorage, 2), (MRImageStorage, 1), (SC_STORAGE, 2),
    ]  # fmt: skip
    sender = make_sender(db)
    with pynetdicom_scp(contexts=[build_context(MRImageStorage)]) as (port, scp):
        dest = destination(port)
        result = sender.deliver(dest, files, "1.2.3.12", FAST)
        assert (result.outcome, result.attempts, result.delivered, result.failed_permanent) == ("failed", 1, 3, 1)
        assert "not accepted" in result.error
        assert sorted(scp.received) == sorted(uids_of([*mr, rle]))
        assert states(sender, dest, [sc]) == {read_file_header(sc).sop_instance_uid: DeliveryState.FAILED_PERMANENT}

        # A destination that accepts none of the classes: pynetdicom aborts; permanent, one attempt.
        only_sc = sender.deliver(destination(port, name="other"), [sc], "1.2.3.12", FAST)
        assert (only_sc.outcome, only_sc.attempts, only_sc.failed_permanent) == ("failed", 1, 1)
        assert "accepts none" in only_sc.error


def test_peer_that_never_answers_the_association_request_costs_one_acse_timeout(db: Database, tmp_path: Path) -> None:
    """A listening socket that nobody serves: TCP connects, the A-ASSOCIATE-RQ is never answered."""
    files = mr_files(tmp_path / "out", 2)
    sender = make_sender(db, timeout_s=1.0)
    with socket.create_server(("127.0.0.1", 0)) as silent:
        started = time.monotonic()
        result = sender.send_once(destination(silent.getsockname()[1]), files, "1.2.3.17")
        elapsed = time.monotonic() - started
    assert result.outcome == "retry" and result.failed_transient == 2, result
    assert "no answer" in result.error
    assert elapsed < 4


def test_store_that_is_never_answered_costs_one_dimse_timeout(db: Database, tmp_path: Path) -> None:
    files = mr_files(tmp_path / "out", 3)
    sender = make_sender(db, timeout_s=1.0)
    release = threading.Event()

    def hang(uid: str, seen: int) -> int:
        release.wait(10)
        return 0x0000

    with pynetdicom_scp(hang) as (port, scp):
        try:
            started = time.monotonic()
            result = sender.send_once(destination(port), files, "1.2.3.18")
            elapsed = time.monotonic() - started
        finally:
            release.set()
    assert (result.outcome, result.failed_transient, result.sent) == ("retry", 3, 0), result
    assert "no C-STORE response" in result.error or "association lost" in result.error
    assert elapsed < 5
    assert len(scp.received) == 1  # the rest were not sent into a dead association


def test_unreadable_file_fails_permanently_and_the_rest_are_sent(db: Database, tmp_path: Path) -> None:
    files = mr_files(tmp_path / "out", 2)
    junk = tmp_path / "out" / "junk.dcm"
    junk.write_bytes(b"not DICOM at all")
    sender = make_sender(db)
    with pynetdicom_scp() as (port, scp):
        result = sender.send_once(destination(port), [*files, junk], "1.2.3.19")
    assert (result.outcome, result.delivered, result.failed_permanent) == ("failed", 2, 1)
    assert "junk.dcm" in result.error
    assert sorted(scp.received) == sorted(uids_of(files))


def test_sender_socket_has_tcp_nodelay(tmp_path: Path) -> None:
    [path] = mr_files(tmp_path / "out", 1)
    settings = AssociationSettings(calling_ae=NODE_AE, connect_timeout_s=2, acse_timeout_s=TIMEOUT_S)
    with pynetdicom_scp() as (port, _):
        contexts = requested_contexts([read_file_header(path)])
        with connect(destination(port), settings, contexts, None) as connection:
            assert connection.assoc is not None and connection.assoc.is_established
            sock = connection.assoc.dul.socket.socket
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert connection.assoc.acceptor.maximum_length > 0


def test_tls_destination_gets_the_files_with_the_node_client_certificate(
    db: Database, tmp_path: Path, certs: test_tls.Certs
) -> None:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs.ca))
    server.load_cert_chain(str(certs.server_cert), str(certs.server_key))
    server.verify_mode = ssl.CERT_REQUIRED
    node_tls = TlsSection(
        enabled=True, certificate=certs.client_cert, private_key=certs.client_key, ca_certificates=certs.ca
    )
    files = mr_files(tmp_path / "out", 3)
    sender = make_sender(db, node_tls)
    with pynetdicom_scp(ssl_context=server) as (port, scp):
        result = sender.send_once(destination(port, tls=True), files, "1.2.3.13")
        assert result.outcome == "delivered", result
        assert sorted(scp.received) == sorted(uids_of(files))
        assert scp.tls_peers and dict(x[0] for x in scp.tls_peers[0]["subject"])["commonName"] == "SCANNER1"

    # A destination whose certificate the node does not trust: no association, retried later.
    rogue = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    rogue.load_cert_chain(str(certs.rogue_cert), str(certs.rogue_key))
    other = mr_files(tmp_path / "other", 1)
    with pynetdicom_scp(ssl_context=rogue) as (port, scp):
        result = sender.send_once(destination(port, tls=True, name="rogue"), other, "1.2.3.14")
        assert result.outcome == "retry" and "TLS" in result.error
        assert scp.received == []


# ---------------------------------------------------------------------------------------------
# Orthanc


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """A real Orthanc PACS, AE ORTHANC, that knows the node as a modality and checks called AE titles."""
    with running_orthanc(tmp_path_factory.mktemp("orthanc"), {"uadnode": NODE_AE}) as pacs:
        yield pacs


def test_orthanc_receives_results_in_the_source_study(db: Database, orthanc: Orthanc, tmp_path: Path) -> None:
    study = generate_uid()
    files = [*mr_files(tmp_path / "mr", 5, study), rle_file(tmp_path / "rle", study), sc_file(tmp_path / "sc", study)]
    sender = make_sender(db)
    dest = destination(orthanc.dicom_port, "ORTHANC", name="orthanc")
    result = sender.send_once(dest, files, "1.2.3.15")
    assert (result.outcome, result.delivered, result.sent) == ("delivered", 7, 7), result

    by_uid: dict[str, str] = {}
    for orthanc_id in orthanc.get("/instances"):
        instance = orthanc.get(f"/instances/{orthanc_id}")
        by_uid[instance["MainDicomTags"]["SOPInstanceUID"]] = instance["ParentSeries"]
    assert uids_of(files) <= set(by_uid)
    headers = [read_file_header(p) for p in files]
    for series_uid in {h.series_uid for h in headers}:
        expected = {h.sop_instance_uid for h in headers if h.series_uid == series_uid}
        [orthanc_series] = {by_uid[uid] for uid in expected}
        series = orthanc.get(f"/series/{orthanc_series}")
        assert series["MainDicomTags"]["SeriesInstanceUID"] == series_uid
        assert len(series["Instances"]) == len(expected)
        parent = orthanc.get(f"/studies/{series['ParentStudy']}")
        assert parent["MainDicomTags"]["StudyInstanceUID"] == study

    again = sender.send_once(dest, files, "1.2.3.15")
    assert (again.outcome, again.sent) == ("delivered", 0)


def test_orthanc_rejects_a_wrong_called_ae_title_permanently(db: Database, orthanc: Orthanc, tmp_path: Path) -> None:
    files = mr_files(tmp_path / "mr", 2)
    sender = make_sender(db)
    result = sender.deliver(destination(orthanc.dicom_port, "NOT-ORTHANC", name="wrong"), files, "1.2.3.16", FAST)
    assert (result.outcome, result.attempts, result.failed_permanent) == ("failed", 1, 2), result
    assert "permanent" in result.error
    assert not uids_of(files) & {orthanc.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]
                                 for i in orthanc.get("/instances")}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# schema


def _check_deliveries_table(database: Database) -> None:
    inspector = inspect(database.engine)
    assert "deliveries" in inspector.get_table_names()
    unique = [set(u["column_names"]) for u in inspector.get_unique_constraints("deliveries")]
    assert {"destination", "sop_instance_uid"} in unique

    def row(path: str) -> Delivery:
        return Delivery(
            destination="a", sop_instance_uid="1.2", sop_class_uid="1.3", series_uid="1.4",
            source_series_uid="1.5", path=path, state="pending", attempts=0, last_error="",
        )  # fmt: skip

    with database.session.begin() as session:
        session.add(row("x.dcm"))
    with pytest.raises(IntegrityError), database.session.begin() as session:
        session.add(row("y.dcm"))


def test_fresh_sqlite_gets_the_deliveries_table(db: Database) -> None:
    _check_deliveries_table(db)


def test_deliveries_migration_applies_on_postgresql(pg_url: str) -> None:
    database = open_database(pg_url)
    try:
        _check_deliveries_table(database)
    finally:
        database.close()
