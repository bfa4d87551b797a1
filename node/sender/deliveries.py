"""The ``deliveries`` table: which result instance went where, and how it went.

This is what makes sending idempotent: an instance recorded as delivered to a destination
is never sent there again, and a re-run after a partial failure sends only the rest.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from node.db.database import Database
from node.db.schema import Delivery, utcnow
from node.sender.outcomes import DeliveryState, Verdict
from node.sender.scu import FileHeader


@dataclass(frozen=True)
class DeliveryRecord:
    """A read-only copy of one row, for callers that should not hold ORM objects."""

    destination: str
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    source_series_uid: str
    path: str
    state: DeliveryState
    last_status: int | None
    attempts: int
    last_error: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Plan:
    """What one attempt has to send, and what it leaves alone."""

    to_send: list[FileHeader]
    already_delivered: int
    already_failed_permanent: int


@dataclass(frozen=True)
class Outcome:
    """One instance's result from an attempt, to be written in a batch."""

    sop_instance_uid: str
    verdict: Verdict
    status: int | None


class DeliveryLedger:
    """Reads and writes ``deliveries`` rows for the sender; one short transaction per call."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def plan(
        self,
        destination: str,
        headers: Sequence[FileHeader],
        source_series_uid: str,
        *,
        resend_failed_permanent: bool = False,
    ) -> Plan:
        """Create missing rows (pending) and pick the instances still to send.

        Delivered instances are skipped; permanently failed ones too, unless an admin asks
        to resend them (after fixing the destination), so a rejection never becomes a loop.
        """
        by_uid = {h.sop_instance_uid: h for h in headers}
        for _ in range(2):  # a concurrent sender may insert the same row; the second pass sees it
            try:
                return self._plan_once(destination, by_uid, source_series_uid, resend_failed_permanent)
            except IntegrityError:
                continue
        return self._plan_once(destination, by_uid, source_series_uid, resend_failed_permanent)

    def _plan_once(
        self,
        destination: str,
        by_uid: dict[str, FileHeader],
        source_series_uid: str,
        resend_failed_permanent: bool,
    ) -> Plan:
        to_send: list[FileHeader] = []
        delivered = failed = 0
        with self._db.session.begin() as session:
            existing = {row.sop_instance_uid: row for row in self._rows(session, destination, list(by_uid))}
            for uid, header in by_uid.items():
                row = existing.get(uid)
                if row is None:
                    session.add(
                        Delivery(
                            destination=destination,
                            sop_instance_uid=uid,
                            sop_class_uid=header.sop_class_uid,
                            series_uid=header.series_uid,
                            source_series_uid=source_series_uid,
                            path=str(header.path),
                            state=DeliveryState.PENDING.value,
                            attempts=0,
                            last_error="",
                        )
                    )
                    to_send.append(header)
                elif row.state == DeliveryState.DELIVERED:
                    delivered += 1
                elif row.state == DeliveryState.FAILED_PERMANENT and not resend_failed_permanent:
                    failed += 1
                else:
                    row.path = str(header.path)  # the file may have been regenerated elsewhere
                    to_send.append(header)
        return Plan(to_send=to_send, already_delivered=delivered, already_failed_permanent=failed)

    def record(self, destination: str, outcomes: Sequence[Outcome]) -> None:
        """Write the results of sent (or unsendable) instances: state, status, one more attempt."""
        if not outcomes:
            return
        by_uid = {o.sop_instance_uid: o for o in outcomes}
        now = utcnow()
        with self._db.session.begin() as session:
            for row in self._rows(session, destination, list(by_uid)):
                outcome = by_uid[row.sop_instance_uid]
                row.state = outcome.verdict.state.value
                row.last_status = outcome.status
                row.last_error = outcome.verdict.reason
                row.attempts = row.attempts + 1
                row.updated_at = now

    def records(self, destination: str, sop_instance_uids: Sequence[str]) -> list[DeliveryRecord]:
        """Rows of these instances at this destination, in no particular order."""
        with self._db.session() as session:
            return [_record(row) for row in self._rows(session, destination, list(sop_instance_uids))]

    def for_source_series(self, source_series_uid: str) -> list[DeliveryRecord]:
        """Every delivery made for one analysed series, to any destination."""
        with self._db.session() as session:
            rows = session.scalars(
                select(Delivery).where(Delivery.source_series_uid == source_series_uid).order_by(Delivery.id)
            )
            return [_record(row) for row in rows]

    def state_counts(self) -> dict[str, dict[str, int]]:
        """``{destination: {state: count}}``, for status displays."""
        counts: dict[str, Counter[str]] = {}
        with self._db.session() as session:
            query = select(Delivery.destination, Delivery.state, func.count()).group_by(
                Delivery.destination, Delivery.state
            )
            for destination, state, n in session.execute(query):
                counts.setdefault(destination, Counter())[state] = int(n)
        return {name: dict(c) for name, c in counts.items()}

    @staticmethod
    def _rows(session: Session, destination: str, uids: list[str]) -> list[Delivery]:
        rows: list[Delivery] = []
        for start in range(0, len(uids), 500):  # stay under bound-parameter limits
            chunk = uids[start : start + 500]
            rows.extend(
                session.scalars(
                    select(Delivery).where(Delivery.destination == destination, Delivery.sop_instance_uid.in_(chunk))
                )
            )
        return rows


def _record(row: Delivery) -> DeliveryRecord:
    return DeliveryRecord(
        destination=row.destination,
        sop_instance_uid=row.sop_instance_uid,
        sop_class_uid=row.sop_class_uid,
        series_uid=row.series_uid,
        source_series_uid=row.source_series_uid,
        path=row.path,
        state=DeliveryState(row.state),
        last_status=row.last_status,
        attempts=row.attempts,
        last_error=row.last_error,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )
