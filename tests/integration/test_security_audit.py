"""Every association attempt is audited: ``uad-node serve`` writes one ``events`` row per attempt
(``association_accepted`` or ``association_refused`` with the reason) and one per accepted association's end
(``association_ended`` with what it did), each with a log line. TLS refusals: ``test_tls.py``.
"""

from __future__ import annotations

import re
import socket
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from pynetdicom import AE, evt
from pynetdicom.sop_class import MRImageStorage, PatientRootQueryRetrieveInformationModelFind, Verification

from node.config import load_config
from node.db.database import open_database
from node.network import set_tcp_nodelay
from node.receiver import Receiver
from tests.mr_files import mr_series
from tests.peers import NodeProcess, free_port, node_config

TIMEOUT_S = 10
ENDED = re.compile(r"^(released|aborted by peer|aborted by node|connection closed): (\d+) stored, (\d+) duplicate, "
                   r"(\d+) ignored, (\d+) refused, (\d+) bytes, \d+\.\d\d s$")  # fmt: skip


def scu(ae_title: str = "SCANNER1", *contexts: str) -> AE:
    ae = AE(ae_title=ae_title)
    for context in contexts or (Verification, MRImageStorage):
        ae.add_requested_context(context)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
    return ae


def associate(port: int, ae_title: str = "SCANNER1", called: str = "UADNODE", *contexts: str, bind: str | None = None):  # type: ignore[no-untyped-def]
    return scu(ae_title, *contexts).associate(
        "127.0.0.1",
        port,
        ae_title=called,
        bind_address=(bind, 0) if bind else None,
        evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)],
    )


def events(data_dir: Path, kind: str | None = None) -> list[tuple[str, str, str, str]]:
    """(kind, calling AE, host, detail) of the association events, oldest first."""
    with closing(sqlite3.connect(data_dir / "uad-node.sqlite")) as db:
        rows = db.execute(
            "SELECT kind, calling_ae, calling_host, detail FROM events WHERE kind LIKE 'association%' ORDER BY id"
        ).fetchall()
    return [tuple(row) for row in rows if kind is None or row[0] == kind]  # type: ignore[misc]


def wait_for_events(data_dir: Path, kind: str, count: int = 1) -> list[tuple[str, str, str, str]]:
    """The rows are written as the association ends, just after the peer saw its answer: wait briefly."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        rows = events(data_dir, kind)
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_accepted_association_is_audited_with_a_summary_of_what_it_did(node: NodeProcess) -> None:
    """Accepted, three images stored and one re-sent, released: one row each for the start and the end."""
    series = mr_series(3)
    assoc = associate(node.port)
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(ds).Status) for ds in [*series, series[0]]]
    finally:
        assoc.release()
    assert statuses == [0, 0, 0, 0]
    [ended] = wait_for_events(node.data_dir, "association_ended")
    [accepted] = events(node.data_dir, "association_accepted")
    assert accepted[:3] == ("association_accepted", "SCANNER1", "127.0.0.1")
    assert accepted[3] == "called 'UADNODE', 2 of 2 presentation contexts accepted"
    assert ended[:3] == ("association_ended", "SCANNER1", "127.0.0.1")
    match = ENDED.match(ended[3])
    assert match, ended[3]
    assert match.groups()[:5] == ("released", "3", "1", "0", "0")
    assert int(match.group(6)) >= 4 * len(series[0].PixelData)
    assert events(node.data_dir, "association_refused") == []
    log = node.log()
    assert "association accepted from SCANNER1@127.0.0.1" in log
    assert f"association ended with SCANNER1@127.0.0.1: {ended[3]}" in log


def test_aborted_association_and_refused_images_are_in_the_summary(node: NodeProcess) -> None:
    [ds, bad] = mr_series(2)
    bad.StudyInstanceUID = "1.2.abc"  # refused: a UID that breaks the grammar
    assoc = associate(node.port)
    assert assoc.is_established
    assert [int(assoc.send_c_store(x).Status) for x in (ds, bad)][0] == 0
    assoc.abort()
    [ended] = wait_for_events(node.data_dir, "association_ended")
    match = ENDED.match(ended[3])
    assert match and match.groups()[:5] == ("aborted by peer", "1", "0", "0", "1"), ended


def test_echo_only_association_is_summarised_too(node: NodeProcess) -> None:
    assoc = associate(node.port)
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()
    [ended] = wait_for_events(node.data_dir, "association_ended")
    assert ended[3].startswith("released: 0 stored, 0 duplicate, 0 ignored, 0 refused, 0 bytes, ")


def test_refusals_are_audited_with_their_reason(node: NodeProcess) -> None:
    """Unknown calling AE, known AE from a host it may not call from, wrong called AE, no usable context."""
    attempts = [
        (dict(ae_title="INTRUDER"), "INTRUDER", "127.0.0.1", "unknown calling AE title 'INTRUDER'"),
        (dict(bind="127.0.0.2"), "SCANNER1", "127.0.0.2", "host 127.0.0.2 not allowed for calling AE title 'SCANNER1'"),
        (dict(called="OTHERNODE"), "SCANNER1", "127.0.0.1",
         "called AE title 'OTHERNODE' not recognised (this node is 'UADNODE')"),
    ]  # fmt: skip
    for count, (how, calling, host, reason) in enumerate(attempts, start=1):
        assoc = associate(node.port, **how)  # type: ignore[arg-type]
        assert assoc.is_rejected, how
        rows = wait_for_events(node.data_dir, "association_refused", count)
        assert rows[-1] == ("association_refused", calling, host, reason)
        assert f"association rejected from {calling}@{host}: {reason}" in node.log()
    # Every proposed context refused: pynetdicom accepts with none, the requestor aborts; audited as refused.
    assoc = associate(node.port, "SCANNER1", "UADNODE", PatientRootQueryRetrieveInformationModelFind)
    assert not assoc.is_established
    rows = wait_for_events(node.data_dir, "association_refused", 4)
    assert rows[-1] == ("association_refused", "SCANNER1", "127.0.0.1", "no acceptable presentation context")
    assert events(node.data_dir, "association_accepted") == events(node.data_dir, "association_ended") == []


def test_too_many_associations_is_audited(node_factory) -> None:  # type: ignore[no-untyped-def]
    node = node_factory(extra_node="max_associations = 1")
    # The start-up wait's port probe holds the only slot until the node sees it close: retry briefly.
    deadline = time.monotonic() + TIMEOUT_S
    while not (first := associate(node.port)).is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.is_established
    try:
        second = associate(node.port, "SCANNER2")
        assert second.is_rejected
    finally:
        first.release()
    wait_for_events(node.data_dir, "association_ended")
    rows = [row for row in events(node.data_dir) if row[:2] != ("association_refused", "SCANNER1")]  # the retries
    too_many = "too many associations (max_associations 1)"
    assert [row[:2] for row in rows] == [
        ("association_accepted", "SCANNER1"),
        ("association_refused", "SCANNER2"),
        ("association_ended", "SCANNER1"),
    ]
    assert rows[1] == ("association_refused", "SCANNER2", "127.0.0.1", too_many)


def test_association_request_while_stopping_is_refused_and_audited(tmp_path: Path) -> None:
    """In process: once the receiver stops, an association still negotiating is rejected (transient)."""
    config = load_config(node_config(tmp_path, free_port()))
    db = open_database(config.node.effective_database_url())
    receiver = Receiver(config=config, db=db)
    receiver.start()
    try:
        receiver._server.stopping = True  # type: ignore[union-attr]  # the first thing stop() does
        assoc = associate(config.node.port)
        assert assoc.is_rejected
        assert assoc.acceptor.primitive.result == 0x02  # transient: the sender may retry
        rows = wait_for_events(config.node.data_dir, "association_refused")
        assert rows == [("association_refused", "SCANNER1", "127.0.0.1", "node shutting down")]
    finally:
        receiver.stop(1.0)
        db.close()


def test_association_open_at_stop_is_aborted_by_the_node_and_summarised(tmp_path: Path) -> None:
    """In process: an association still open when the grace period ends is aborted, and its summary says so."""
    config = load_config(node_config(tmp_path, free_port()))
    db = open_database(config.node.effective_database_url())
    receiver = Receiver(config=config, db=db)
    receiver.start()
    try:
        assoc = associate(config.node.port)
        assert assoc.is_established
        assert int(assoc.send_c_store(mr_series(1)[0]).Status) == 0
        receiver.stop(grace_s=0.2)
        [ended] = wait_for_events(config.node.data_dir, "association_ended")
        match = ENDED.match(ended[3])
        assert match and match.groups()[:5] == ("aborted by node", "1", "0", "0", "0"), ended
    finally:
        receiver.stop(1.0)
        db.close()


def test_a_release_answered_after_the_peer_closed_is_still_a_release(node: NodeProcess) -> None:
    """A peer that sends A-RELEASE-RQ and closes without waiting for the reply (or closes the moment the reply
    arrives, before pynetdicom marks the association released): the connection close reaches the audit first."""
    for attempt in range(5):
        assoc = associate(node.port)
        assert assoc.is_established
        transport = assoc.dul.socket.socket
        transport.sendall(bytes.fromhex("05000000000400000000"))  # A-RELEASE-RQ (PS3.8 9.3.6)
        transport.shutdown(socket.SHUT_RDWR)
        assoc.kill()
        rows = wait_for_events(node.data_dir, "association_ended", attempt + 1)
        assert rows[-1][3].startswith("released: 0 stored"), rows[-1]
