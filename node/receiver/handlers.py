"""pynetdicom event handlers: what the node does when a peer connects, echoes or stores.

Kept apart from the AE set-up (``server.py``) as in pynetdicom's own apps, so
each handler can be read on its own: it receives an event and answers a status.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.events import Event as NetEvent

from node.db.database import Database
from node.network import set_tcp_nodelay
from node.receiver.audit import record_event, report_stored, safe_uid
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

    def bindings(self) -> list[tuple]:
        """The ``evt_handlers`` list for ``AE.make_server``."""
        return [
            (evt.EVT_CONN_OPEN, set_tcp_nodelay),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_ABORTED, self.on_aborted),
        ]

    def on_echo(self, event: NetEvent) -> int:
        """C-ECHO: Success (Verification says the node is reachable, not that it has room)."""
        return 0x0000

    def on_store(self, event: NetEvent) -> Dataset:
        """C-STORE: keep the instance durably, then answer; any failure answers a failure status."""
        started = time.perf_counter()
        caller = caller_of(event)
        request = event.request
        status = Dataset()
        header: InstanceHeader | None = None
        try:
            dataset = request.DataSet.getbuffer()
            header = read_header(dataset, str(event.context.transfer_syntax))
            _check_against_request(header, request)
            outcome = self.store.store(header, dataset, caller)
        except (StoreRefused, ValueError) as exc:
            refused = exc if isinstance(exc, StoreRefused) else StoreRefused(CANNOT_UNDERSTAND, str(exc))
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
        status.Status = 0x0000
        report_stored(header, outcome, caller, time.perf_counter() - started, self.observer, self.log_patient_data)
        return status

    def on_accepted(self, event: NetEvent) -> None:
        caller = caller_of(event)
        log.info("association accepted from %s@%s", caller.ae_title, caller.host)

    def on_rejected(self, event: NetEvent) -> None:
        caller = caller_of(event)
        log.warning(
            "association rejected: calling %s@%s, called %s",
            caller.ae_title,
            caller.host,
            _called_ae(event),
        )
        self.record("association_rejected", caller, None, f"called AE {_called_ae(event)!r}")

    def on_aborted(self, event: NetEvent) -> None:
        caller = caller_of(event)
        log.warning("association aborted: %s@%s", caller.ae_title, caller.host)

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


def _check_against_request(header: InstanceHeader, request: object) -> None:
    """The data set must be the instance the C-STORE request announced."""
    if header.sop_instance_uid != str(getattr(request, "AffectedSOPInstanceUID", "")):
        raise StoreRefused(CANNOT_UNDERSTAND, "SOP Instance UID differs from the C-STORE request")
    if header.sop_class_uid != str(getattr(request, "AffectedSOPClassUID", "")):
        raise StoreRefused(DATASET_MISMATCH, "SOP Class UID differs from the C-STORE request")


def _called_ae(event: NetEvent) -> str:
    primitive = event.assoc.requestor.primitive
    return (primitive.called_ae_title if primitive else "").strip()
