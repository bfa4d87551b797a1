"""pynetdicom event handlers: what the node does when a peer connects, echoes or stores.

Kept apart from the AE set-up (``server.py``) as in pynetdicom's own apps, so
each handler can be read on its own: it receives an event and answers a status.
"""

from __future__ import annotations

import logging
import ssl
import time
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event as NetEvent
from pynetdicom.pdu_primitives import A_ABORT, A_RELEASE

from node.db.database import Database
from node.network import set_tcp_nodelay
from node.receiver.association import REFUSAL_ATTRIBUTE
from node.receiver.audit import AssociationTally, record_event, report_stored, safe_uid, take_last_outcome
from node.receiver.observer import StoreObserver
from node.receiver.part10 import InstanceHeader, read_header
from node.receiver.storage import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    Caller,
    InstanceStore,
    StoreRefused,
)

log = logging.getLogger(__name__)


def caller_of(event: NetEvent) -> Caller:
    """The calling AE title and peer address of the event's association."""
    requestor = event.assoc.requestor
    return Caller(ae_title=(requestor.ae_title or "").strip(), host=str(requestor.address))


@dataclass
class ReceiverHandlers:
    """The handlers of one running receiver, sharing its store and database."""

    store: InstanceStore
    db: Database
    log_patient_data: bool = False
    observer: StoreObserver | None = None  # metrics of each C-STORE (the HTTP interface), when enabled
    # Counters of each accepted association, from EVT_ACCEPTED until it ends (then one log line and one event).
    _tallies: dict[Association, AssociationTally] = field(default_factory=dict, init=False, repr=False)

    def bindings(self) -> list[tuple]:
        """The ``evt_handlers`` list for ``AE.make_server``."""
        return [
            (evt.EVT_CONN_OPEN, set_tcp_nodelay),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store_counted),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_ACSE_RECV, self.on_acse_recv),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_RELEASED, self.on_released),
            (evt.EVT_ABORTED, self.on_aborted),
            (evt.EVT_CONN_CLOSE, self.on_conn_close),
        ]

    def on_store_counted(self, event: NetEvent) -> Dataset:
        """``on_store`` plus the association's counters: memory only, the summary is written when it ends."""
        try:
            return self.on_store(event)
        finally:
            outcome = take_last_outcome()  # set by report_stored on this thread; None: refused
            tally = self._tallies.get(event.assoc)
            if tally is not None:
                tally.count(outcome, _data_set_size(event))

    def on_echo(self, event: NetEvent) -> int:
        """C-ECHO: Success (Verification says the node is reachable, not that it has room)."""
        return 0x0000

    def on_store(self, event: NetEvent) -> Dataset | int:
        """C-STORE: keep the instance durably, then answer; any failure answers a failure status.

        Success is answered as a bare status (pynetdicom accepts an int): no pydicom Dataset per image."""
        started = time.perf_counter()
        caller = caller_of(event)
        request = event.request
        header: InstanceHeader | None = None
        try:
            dataset = request.DataSet.getbuffer()
            header = read_header(dataset, str(event.context.transfer_syntax))
            _check_against_request(header, request)
            outcome = self.store.store(header, dataset, caller)
        except (StoreRefused, ValueError) as exc:
            refused = exc if isinstance(exc, StoreRefused) else StoreRefused(CANNOT_UNDERSTAND, str(exc))
            status = Dataset()
            status.Status = refused.status
            status.ErrorComment = refused.reason[:64]
            log.warning(
                "refused instance %s from %s@%s: %s (0x%04X)",
                safe_uid(request.AffectedSOPInstanceUID),
                caller.ae_title,
                caller.host,
                refused.reason,
                refused.status,
            )
            self.record(
                "store_refused",
                caller,
                header,
                f"0x{refused.status:04X} {refused.reason}",
                sop_instance_uid=safe_uid(request.AffectedSOPInstanceUID),
            )
            if self.observer is not None:
                self.observer.refused(refused.status, time.perf_counter() - started)
            return status
        report_stored(header, outcome, caller, time.perf_counter() - started, self.observer, self.log_patient_data)
        return 0x0000

    # Association audit: one ``events`` row per attempt (association_accepted / association_refused) and one
    # per accepted association's end (association_ended), each with a log line. AE titles, hosts and counts only.

    def on_accepted(self, event: NetEvent) -> None:
        caller = caller_of(event)
        assoc = event.assoc
        if not assoc.accepted_contexts:  # pynetdicom accepts; the requestor then aborts (PS3.8 7.1.1.13)
            self.refused(caller, "no acceptable presentation context", rejected=False)
            return
        self._tallies[assoc] = AssociationTally(caller)
        detail = _accepted_detail(event)
        log.info("association accepted from %s@%s: %s", caller.ae_title, caller.host, detail)
        self.record("association_accepted", caller, None, detail)

    def on_rejected(self, event: NetEvent) -> None:
        self.refused(caller_of(event), _rejection_reason(event))

    def on_tls_refused(self, host: str, reason: str) -> None:
        """A failed TLS handshake: no DICOM was spoken, so no calling AE title is known."""
        self.refused(Caller(ae_title="", host=host), reason, rejected=False)

    def refused(self, caller: Caller, reason: str, rejected: bool = True) -> None:
        """An association attempt that was not let in (``rejected``: with an A-ASSOCIATE-RJ)."""
        how = "rejected" if rejected else "refused"
        log.warning("association %s from %s@%s: %s", how, caller.ae_title or "?", caller.host, reason)
        self.record("association_refused", caller, None, reason)

    def on_acse_recv(self, event: NetEvent) -> None:
        """Note the peer's A-RELEASE-RQ: pynetdicom sends the reply before it marks the association released,
        so a peer that closes at once can make the connection close reach us first."""
        if _is_release_request(event.primitive) and (tally := self._tallies.get(event.assoc)):
            tally.release_requested = True

    def on_released(self, event: NetEvent) -> None:
        self._ended(event.assoc, "released")

    def on_aborted(self, event: NetEvent) -> None:
        self._ended(event.assoc, "aborted by node" if getattr(event.assoc, "_sent_abort", False) else "aborted by peer")

    def on_conn_close(self, event: NetEvent) -> None:
        """The connection closed before the acceptor loop saw why: a peer's A-RELEASE-RQ or A-ABORT is still
        queued for it or just being answered (the DUL closes first), or the peer went away without either."""
        assoc = event.assoc
        tally = self._tallies.get(assoc)
        queued = assoc.dul.peek_next_pdu()
        if assoc.is_released or (tally is not None and tally.release_requested) or _is_release_request(queued):
            how = "released"
        elif isinstance(queued, A_ABORT):
            how = "aborted by peer"
        else:
            how = "connection closed"
        self._ended(assoc, how)

    def _ended(self, assoc: Association, how: str) -> None:
        tally = self._tallies.pop(assoc, None)
        if tally is None:  # never accepted, or already summarised
            return
        summary = tally.summary(how)
        log.info("association ended with %s@%s: %s", tally.caller.ae_title, tally.caller.host, summary)
        self.record("association_ended", tally.caller, None, summary)

    def record(
        self,
        kind: str,
        caller: Caller,
        header: InstanceHeader | None,
        detail: str,
        sop_instance_uid: str = "",
    ) -> None:
        """Append to the audit trail; a database outage here must not break the association."""
        record_event(self.db, kind, caller, header, detail, sop_instance_uid)


def _is_release_request(primitive: object) -> bool:
    return isinstance(primitive, A_RELEASE) and primitive.result is None


def _check_against_request(header: InstanceHeader, request: object) -> None:
    """The data set must be the instance the C-STORE request announced."""
    if header.sop_instance_uid != str(getattr(request, "AffectedSOPInstanceUID", "")):
        raise StoreRefused(CANNOT_UNDERSTAND, "SOP Instance UID differs from the C-STORE request")
    if header.sop_class_uid != str(getattr(request, "AffectedSOPClassUID", "")):
        raise StoreRefused(DATASET_MISMATCH, "SOP Class UID differs from the C-STORE request")


def _called_ae(event: NetEvent) -> str:
    primitive = event.assoc.requestor.primitive
    return (primitive.called_ae_title if primitive else "").strip()


def _data_set_size(event: NetEvent) -> int:
    try:
        return event.request.DataSet.getbuffer().nbytes
    except (AttributeError, ValueError):
        return 0


def _accepted_detail(event: NetEvent) -> str:
    """The ``association_accepted`` detail: "called 'AE', N of M presentation contexts accepted[, TLSv1.3 SUITE]"."""
    assoc = event.assoc
    accepted = len(assoc.accepted_contexts)
    proposed = accepted + len(assoc.rejected_contexts)
    detail = f"called {_called_ae(event)!r}, {accepted} of {proposed} presentation contexts accepted"
    sock = getattr(assoc.dul.socket, "socket", None)
    if isinstance(sock, ssl.SSLSocket):
        cipher = sock.cipher()
        detail += f", {sock.version()} {cipher[0] if cipher else ''}".rstrip()
    return detail


def _rejection_reason(event: NetEvent) -> str:
    """Why an A-ASSOCIATE-RJ went out: the sender gate's reason, else told by pynetdicom's (result, source,
    diagnostic)."""
    assoc = event.assoc
    if reason := getattr(assoc, REFUSAL_ATTRIBUTE, None):
        return str(reason)
    rsp = assoc.acceptor.primitive
    rsd = tuple(int(getattr(rsp, name, 0) or 0) for name in ("result", "result_source", "diagnostic"))
    if rsd == (0x01, 0x01, 0x07):
        ours = assoc.acceptor.ae_title.strip()
        return f"called AE title {_called_ae(event)!r} not recognised (this node is {ours!r})"
    if rsd == (0x02, 0x03, 0x02):
        return f"too many associations (max_associations {assoc.ae.maximum_associations})"
    if rsd == (0x02, 0x02, 0x01):
        return "user identity not accepted"
    return "rejected: result 0x{:02X}, source 0x{:02X}, diagnostic 0x{:02X}".format(*rsd)
