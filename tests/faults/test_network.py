"""Slow and stalled senders, association floods beyond ``max_associations``, senders that disconnect
mid-PDU. The node runs with short timeouts (3 s) and few association slots (3), so a stalled peer that is
never dropped would show as a slot taken for good.

Raw PDUs are built with pynetdicom's own message classes (``C_STORE_RQ.encode_msg``) and written straight
to the association's socket, so the node sees exactly the bytes a broken sender would put on the wire.
"""

from __future__ import annotations

import socket
import threading
import time
from io import BytesIO

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import MRImageStorage, Verification

from tests.faults.conftest import (
    FULL_ONLY,
    NODE_AE,
    ROUNDS,
    FaultRow,
    Streamer,
    assert_stored,
    recovery_s,
    store_statuses,
)
from tests.mr_files import mr_series
from tests.stored_instances import encode

pytestmark = [pytest.mark.peers, pytest.mark.timeout(600)]

TIMEOUT_S = 3
SLOTS = 3
SHORT = f"acse_timeout_s = {TIMEOUT_S}\ndimse_timeout_s = {TIMEOUT_S}\nmax_associations = {SLOTS}"


@pytest.fixture
def node(fault_node):  # type: ignore[no-untyped-def]
    made = fault_node(extra_node=SHORT)
    # network_timeout_s is set to 20 by tests.peers.node_config; override it in place.
    text = made.config_path.read_text().replace("network_timeout_s = 20", f"network_timeout_s = {TIMEOUT_S}")
    made.config_path.write_text(text)
    return made.start()


def raw_assoc(port: int, ae_title: str = "SCANNER1", timeout_s: float = 10):  # type: ignore[no-untyped-def]
    """An association offering MR in explicit VR little endian only (the raw PDUs are encoded that way).
    ``timeout_s``: this side's own timeouts (long for a stalled peer, so that only the node can end it)."""
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established
    return assoc


def store_pdus(assoc, ds, max_pdu: int = 4096) -> list[bytes]:  # type: ignore[no-untyped-def]
    """The encoded P-DATA-TF PDUs of one C-STORE-RQ of ``ds`` (command, then data set fragments)."""
    [context] = [c for c in assoc.accepted_contexts if c.abstract_syntax == MRImageStorage]
    primitive = C_STORE()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = ds.SOPClassUID
    primitive.AffectedSOPInstanceUID = ds.SOPInstanceUID
    primitive.Priority = 2
    primitive.DataSet = BytesIO(encode(ds))
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    pdus = []
    for p_data in message.encode_msg(context.context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        pdus.append(pdu.encode())
    return pdus


def not_stored(node, uid: str) -> None:  # type: ignore[no-untyped-def]
    assert node.query("SELECT id FROM instances WHERE sop_instance_uid = :u", u=uid) == []
    assert not list((node.data_dir / "studies").rglob(f"{uid}.dcm"))
    assert list((node.data_dir / "incoming").glob("*.tmp")) == []


@pytest.mark.parametrize(
    "cut", [pytest.param("mid-header", marks=FULL_ONLY), "mid-pdu", pytest.param("between-pdus", marks=FULL_ONLY)]
)
def test_sender_disconnects_mid_pdu(node, fault_table, cut: str) -> None:  # type: ignore[no-untyped-def]
    """The socket closes inside a PDU header, inside a P-DATA-TF PDU, or after whole PDUs but before the
    last fragment: the instance was never acknowledged, so nothing of it may be stored; the node goes on."""
    acked: set[str] = set()
    recoveries = []
    for _ in range(ROUNDS):
        [ds] = mr_series(1, size=128)
        assoc = raw_assoc(node.port)
        pdus = store_pdus(assoc, ds)
        assert len(pdus) >= 4
        sock = assoc.dul.socket.socket
        half = len(pdus) // 2
        tail = {"mid-header": pdus[half][:3], "mid-pdu": pdus[half][: len(pdus[half]) // 2], "between-pdus": b""}
        sock.sendall(b"".join(pdus[:half]) + tail[cut])
        time.sleep(0.2)
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        cut_at = time.monotonic()
        assoc.abort()
        recoveries.append(recovery_s(node, cut_at))
        not_stored(node, ds.SOPInstanceUID)
        statuses = store_statuses(node.port, [ds])  # the sender sends it again: now it is stored
        assert statuses == [0]
        acked.add(ds.SOPInstanceUID)
    lost = assert_stored(node, acked)
    fault_table(FaultRow(f"sender disconnects mid-PDU ({cut})", ROUNDS, len(acked), lost, 0, max(recoveries)))


@pytest.mark.parametrize(
    "stall",
    [
        pytest.param("tcp-only"),
        pytest.param("after-association", marks=FULL_ONLY),
        pytest.param("inside-pdu", marks=FULL_ONLY),
    ],
)
def test_stalled_senders_are_dropped_and_free_their_slots(node, fault_table, stall: str) -> None:  # type: ignore[no-untyped-def]
    """All association slots taken by stalled peers (a TCP connection that never sends A-ASSOCIATE-RQ, an
    association that goes silent, a PDU that stops half way): within the timeouts the node drops them and a
    real sender stores again. Recovery is measured from the start of the stall."""
    acked: set[str] = set()
    recoveries = []
    for _ in range(ROUNDS):
        held: list = []
        started = time.monotonic()
        for _ in range(SLOTS):
            if stall == "tcp-only":
                held.append(socket.create_connection(("127.0.0.1", node.port)))
            else:
                assoc = raw_assoc(node.port, timeout_s=600)
                if stall == "inside-pdu":
                    [ds] = mr_series(1, size=128)
                    pdus = store_pdus(assoc, ds)
                    assoc.dul.socket.socket.sendall(pdus[0] + pdus[1][:100])
                held.append(assoc)
        # Right now the slots are (or were) all taken; the node must free them by itself.
        try:
            recoveries.append(recovery_s(node, started, timeout_s=90))
        except AssertionError:
            fault_table(
                FaultRow(f"stalled sender ({stall}) x{SLOTS} slots, timeouts {TIMEOUT_S} s", ROUNDS, len(acked), 0,
                         0, None, "slots not freed within 90 s (bug)")
            )  # fmt: skip
            raise
        series = mr_series(5)
        assert store_statuses(node.port, series) == [0] * 5
        acked |= {ds.SOPInstanceUID for ds in series}
        for item in held:
            try:
                item.close() if isinstance(item, socket.socket) else item.abort()
            except Exception:  # noqa: BLE001
                pass
    assert node.alive()
    lost = assert_stored(node, acked)
    fault_table(
        FaultRow(
            f"stalled sender ({stall}) x{SLOTS} slots, timeouts {TIMEOUT_S} s",
            ROUNDS,
            len(acked),
            lost,
            0,
            max(recoveries),
            "slots freed late" if max(recoveries) > TIMEOUT_S * 4 else "",
        )
    )
    assert all(r <= TIMEOUT_S * 4 for r in recoveries), f"slots freed only after {recoveries} s"


@FULL_ONLY
def test_slow_sender_within_the_timeouts_is_served(node, fault_table) -> None:  # type: ignore[no-untyped-def]
    """Pauses shorter than the timeouts between stores (and a trickled PDU) keep the association alive."""
    series = mr_series(4 * ROUNDS, size=64)
    slow = Streamer(node.port, series, pause_s=TIMEOUT_S * 0.5).start()
    # A trickled C-STORE: each PDU in 512-byte pieces with short pauses.
    [ds] = mr_series(1, size=64)
    assoc = raw_assoc(node.port, "SCANNER2")
    replies: list[int] = []
    assoc.bind(evt.EVT_DIMSE_RECV, lambda event: replies.append(int(event.message.command_set.Status)))
    sock = assoc.dul.socket.socket
    for pdu in store_pdus(assoc, ds):
        for i in range(0, len(pdu), 512):
            sock.sendall(pdu[i : i + 512])
            time.sleep(0.05)
    deadline = time.monotonic() + 10
    while not replies and time.monotonic() < deadline:
        time.sleep(0.05)
    assoc.release()
    assert replies == [0]
    slow.join(timeout_s=120)
    assert slow.done() and slow.aborts == 0, slow.statuses
    acked = slow.acked | {ds.SOPInstanceUID}
    lost = assert_stored(node, acked)
    fault_table(FaultRow("slow sender (pauses < timeouts, trickled PDU)", ROUNDS, len(acked), lost, 0, None))


def test_association_flood_beyond_max_associations(node, fault_table) -> None:  # type: ignore[no-untyped-def]
    """8x the slots ask at once: at most ``max_associations`` are served at a time, the rest are rejected
    (transient: the senders come back), every sender gets all its images stored, the node stays up."""
    rejections: list[tuple[int, int, int]] = []
    lock = threading.Lock()

    def on_acse(event) -> None:  # type: ignore[no-untyped-def]
        primitive = event.primitive
        if getattr(primitive, "result", None) not in (None, 0x00):
            with lock:
                rejections.append((primitive.result, primitive.result_source, primitive.diagnostic))

    acked: set[str] = set()
    recoveries = []
    for _ in range(ROUNDS):
        streams = [Streamer(node.port, mr_series(6), ae_title=f"SCANNER{1 + i % 4}") for i in range(SLOTS * 8)]
        for stream in streams:
            stream.start()
        for stream in streams:
            stream.join(timeout_s=240)
        recoveries.append(recovery_s(node, time.monotonic()))
        assert all(s.done() for s in streams), [s.statuses for s in streams]
        assert sum(s.statuses["no association"] for s in streams) > 0, "the flood never hit the limit"
        acked |= set().union(*(s.acked for s in streams))
    # Count the rejections' kind with one more flood of bare associations.
    ae = AE(ae_title="SCANNER1")
    ae.add_requested_context(Verification)
    assocs = []
    for _ in range(SLOTS * 3):
        a = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE, evt_handlers=[(evt.EVT_ACSE_RECV, on_acse)])
        assocs.append(a)
    established = [a for a in assocs if a.is_established]
    assert len(established) <= SLOTS
    for a in established:
        a.release()
    assert rejections and all(r[0] == 0x02 for r in rejections), f"rejections not transient: {rejections}"
    lost = assert_stored(node, acked)
    fault_table(
        FaultRow(
            f"association flood: {SLOTS * 8} senders, max_associations={SLOTS}",
            ROUNDS,
            len(acked),
            lost,
            0,
            max(recoveries),
            f"{len(rejections)} of {len(assocs)} extra associations rejected transiently",
        )
    )
