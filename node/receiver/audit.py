"""The audit trail of the receiving paths (C-STORE and STOW-RS): one ``events`` row per refusal or rejection, and
the report of each stored instance (metrics, log).

Shared so both paths record the same kinds with the same fields; a database outage here is logged and
never breaks the transfer that is being answered.
"""

from __future__ import annotations

import logging

from sqlalchemy.exc import SQLAlchemyError

from node.db import Event
from node.db.database import Database
from node.receiver.observer import StoreObserver
from node.receiver.part10 import InstanceHeader
from node.receiver.storage import Caller, Outcome
from node.uids import is_valid_uid

log = logging.getLogger(__name__)


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
    if observer is not None:
        observer.stored(header.sop_class_uid, seconds)
    patient = f" patient {header.patient_id!r}" if log_patient_data else ""
    log.debug("%s %s from %s%s%s", outcome.value, header.sop_instance_uid, caller.ae_title, via, patient)
    if outcome is Outcome.REPLACED:
        log.warning("instance %s re-sent with different content: replaced", header.sop_instance_uid)
