"""The audit trail of the receiving paths (C-STORE and STOW-RS): one ``events`` row per refusal or rejection, per
association attempt and per association's end, and the report of each stored instance (metrics, log).

Shared so both paths record the same kinds with the same fields; a database outage here is logged and
never breaks the transfer that is being answered.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from sqlalchemy.exc import SQLAlchemyError

from node.db import Event
from node.db.database import Database
from node.receiver.observer import StoreObserver
from node.receiver.part10 import InstanceHeader
from node.receiver.storage import Caller, Outcome
from node.uids import is_valid_uid

log = logging.getLogger(__name__)

# The outcome of the last instance this thread reported: a C-STORE handler runs in its association's
# thread, so the association's counters read it after the handler returns (``take_last_outcome``).
_last_outcome = threading.local()


def record_event(
    db: Database,
    kind: str,
    caller: Caller,
    header: InstanceHeader | None,
    detail: str,
    sop_instance_uid: str = "",
) -> None:
    """Append one event; UIDs and the caller only, no patient data."""
    try:
        with db.session.begin() as session:
            session.add(
                Event(
                    kind=kind,
                    calling_ae=caller.ae_title[:64],
                    calling_host=caller.host[:64],
                    study_uid=safe_uid(header.study_uid) if header else "",
                    series_uid=safe_uid(header.series_uid) if header else "",
                    sop_instance_uid=sop_instance_uid,
                    detail=detail,
                )
            )
    except SQLAlchemyError as exc:
        log.error("cannot record %s event: %s", kind, exc)


def safe_uid(value: object) -> str:
    """A UID fit for logs and the database; anything malformed is shown escaped and cut short."""
    text = str(value or "")
    return text if is_valid_uid(text) else ascii(text)[:64]


def report_stored(
    header: InstanceHeader,
    outcome: Outcome,
    caller: Caller,
    seconds: float,
    observer: StoreObserver | None,
    log_patient_data: bool,
    via: str = "",
) -> None:
    """A stored instance to the metrics and the log (``via``: " by STOW-RS" for that path); a re-sent instance
    with different content, which replaced the stored one, is a warning."""
    _last_outcome.value = outcome
    if observer is not None:
        observer.stored(header.sop_class_uid, seconds)
    patient = f" patient {header.patient_id!r}" if log_patient_data else ""
    log.debug("%s %s from %s%s%s", outcome.value, header.sop_instance_uid, caller.ae_title, via, patient)
    if outcome is Outcome.REPLACED:
        log.warning("instance %s re-sent with different content: replaced", header.sop_instance_uid)


def take_last_outcome() -> Outcome | None:
    """The outcome ``report_stored`` last saw on this thread, cleared; None when nothing was stored since."""
    outcome = getattr(_last_outcome, "value", None)
    _last_outcome.value = None
    return outcome


@dataclass
class AssociationTally:
    """What one accepted association did, counted in memory per C-STORE and written once when it ends."""

    caller: Caller
    started: float = field(default_factory=time.monotonic)
    stored: int = 0  # stored or replaced
    duplicate: int = 0
    ignored: int = 0  # SOP class not kept: acknowledged, no file
    refused: int = 0  # answered with a failure status
    bytes: int = 0  # data set bytes received, refused ones included
    release_requested: bool = False  # the peer's A-RELEASE-RQ reached the acceptor loop

    def count(self, outcome: Outcome | None, size: int) -> None:
        self.bytes += size
        if outcome is None:
            self.refused += 1
        elif outcome is Outcome.DUPLICATE:
            self.duplicate += 1
        elif outcome is Outcome.IGNORED:
            self.ignored += 1
        else:
            self.stored += 1

    def summary(self, ended: str) -> str:
        """The ``association_ended`` detail: "<how>: N stored, N duplicate, N ignored, N refused, N bytes, S s"."""
        return (
            f"{ended}: {self.stored} stored, {self.duplicate} duplicate, {self.ignored} ignored, "
            f"{self.refused} refused, {self.bytes} bytes, {time.monotonic() - self.started:.2f} s"
        )
