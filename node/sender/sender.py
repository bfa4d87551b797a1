"""Sending result files to a destination: one attempt, or a blocking retry loop, recorded per instance.

A destination's ``type`` picks the transport in ``Sender._send`` (C-STORE via ``scu``, STOW-RS via
``node.dicomweb.stow_client``); planning, recording, backoff and giving up are the same for both.

``send_once`` is the unit the node's scheduler calls and reschedules from ``retry_after_s``;
``deliver`` wraps it in a backoff loop for ``uad-node analyze``-style use and tests.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sqlalchemy.exc import SQLAlchemyError

from node.config import Destination, NodeConfig
from node.db.database import Database
from node.dicomweb import stow_client  # a module, not its names: stow_client imports node.sender too
from node.sender.deliveries import DeliveryLedger, Outcome
from node.sender.outcomes import DeliveryState, Verdict
from node.sender.retry import RetryPolicy
from node.sender.scu import AssociationSettings, FileHeader, connect, read_file_header, requested_contexts

log = logging.getLogger(__name__)

SendOutcome = Literal["delivered", "retry", "failed"]


@dataclass(frozen=True)
class SendResult:
    """Where the given files stand at one destination after a call.

    ``delivered`` / ``failed_*`` count the distinct instances in each state after the call
    (instances delivered by an earlier call included); ``sent`` is the number of C-STORE
    requests the destination answered in this call, 0 when everything had been delivered before. ``outcome`` is
    "retry" while transient failures remain and attempts are left (wait ``retry_after_s``),
    "failed" when something failed permanently or attempts are exhausted.
    """

    destination: str
    delivered: int
    failed_transient: int
    failed_permanent: int
    outcome: SendOutcome
    error: str
    retry_after_s: float | None
    sent: int = 0
    attempts: int = 1


@dataclass(frozen=True)
class _Attempt:
    """Counts of one attempt before an outcome is decided (which depends on who is counting attempts)."""

    delivered: int
    failed_transient: int
    failed_permanent: int
    sent: int
    error: str
    most_attempts: int  # the highest attempt count among instances still failing transiently


@dataclass
class Sender:
    """C-STORE SCU for the node's configured destinations, with per-instance state in the database."""

    config: NodeConfig
    db: Database
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    settings: AssociationSettings | None = None
    rng: random.Random = field(default_factory=random.Random)
    _ledger: DeliveryLedger = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.settings is None:
            self.settings = AssociationSettings.from_config(self.config)
        self._ledger = DeliveryLedger(self.db)

    @property
    def ledger(self) -> DeliveryLedger:
        """The deliveries table, for status displays and tests."""
        return self._ledger

    def send_once(
        self,
        destination: Destination,
        files: Sequence[Path],
        source_series_uid: str,
        *,
        resend_failed_permanent: bool = False,
    ) -> SendResult:
        """One attempt over one association; records every instance's state.

        Instances already delivered to ``destination`` are not sent again. Whether a
        transient failure is worth another attempt is judged by ``self.policy`` against the
        attempts recorded per instance, so a scheduler can call this repeatedly.
        """
        attempt = self._attempt(destination, files, source_series_uid, resend_failed_permanent)
        return _decide(destination, attempt, self.policy, attempt.most_attempts, self.rng, attempts=1)

    def deliver(
        self,
        destination: Destination,
        files: Sequence[Path],
        source_series_uid: str,
        policy: RetryPolicy,
        stop: threading.Event | None = None,
    ) -> SendResult:
        """Blocking: attempt, wait, attempt again until delivered, failed permanently, out of
        attempts (``policy.max_attempts`` in this call) or ``stop`` is set."""
        stop = stop or threading.Event()
        attempts = 0
        while True:
            attempts += 1
            attempt = self._attempt(destination, files, source_series_uid, resend_failed_permanent=False)
            result = _decide(destination, attempt, policy, attempts, self.rng, attempts=attempts)
            if result.outcome != "retry" or result.retry_after_s is None:
                return result
            if stop.wait(result.retry_after_s):
                log.info("delivery to %s of series %s stopped while waiting", destination.name, source_series_uid)
                return result

    def _attempt(
        self,
        destination: Destination,
        files: Sequence[Path],
        source_series_uid: str,
        resend_failed_permanent: bool,
    ) -> _Attempt:
        started = time.monotonic()
        headers: list[FileHeader] = []
        unreadable: list[str] = []
        for path in files:
            try:
                headers.append(read_file_header(Path(path)))
            except ValueError as exc:
                unreadable.append(str(exc))
        plan = self._ledger.plan(
            destination.name, headers, source_series_uid, resend_failed_permanent=resend_failed_permanent
        )
        outcomes, association_error = self._send(destination, plan.to_send)
        states = [o.verdict.state for o in outcomes]
        transient = [o.sop_instance_uid for o in outcomes if o.verdict.state is DeliveryState.FAILED_TRANSIENT]
        most = max((r.attempts for r in self._ledger.records(destination.name, transient)), default=0)
        attempt = _Attempt(
            delivered=plan.already_delivered + states.count(DeliveryState.DELIVERED),
            failed_transient=len(transient),
            failed_permanent=plan.already_failed_permanent
            + states.count(DeliveryState.FAILED_PERMANENT)
            + len(unreadable),
            sent=sum(1 for o in outcomes if o.status is not None),
            error=association_error or _first_error(outcomes, unreadable, plan.already_failed_permanent),
            most_attempts=most,
        )
        log.log(
            logging.WARNING if attempt.failed_transient or attempt.failed_permanent else logging.INFO,
            "send to %s (%s) for series %s: %d to send, %d sent, %d delivered, %d transient, "
            "%d permanent failures in %.2f s%s",
            destination.name,
            destination.where(),
            source_series_uid,
            len(plan.to_send),
            attempt.sent,
            attempt.delivered,
            attempt.failed_transient,
            attempt.failed_permanent,
            time.monotonic() - started,
            f": {attempt.error}" if attempt.error else "",
        )
        return attempt

    def _send(self, destination: Destination, headers: list[FileHeader]) -> tuple[list[Outcome], str]:
        """Send each header by the destination's transport; outcomes are written to the database in
        batches as they come, so an interrupted attempt keeps what it achieved. The second value is
        why the destination could not be reached at all (empty when it could)."""
        if not headers:
            return [], ""
        outcomes: list[Outcome] = []
        recorded = 0

        def emit(outcome: Outcome) -> None:
            """Record each outcome as it comes (one small transaction per result object), so a crash mid-export
            re-sends at most the object in flight: batches of 64 re-sent every result the PACS had acknowledged
            since the last write, duplicates at the PACS after a kill -9 (tests/faults/test_kill9.py)."""
            nonlocal recorded
            outcomes.append(outcome)
            try:
                self._ledger.record(destination.name, outcomes[recorded:])
            except SQLAlchemyError as exc:  # the database is away: written with the rest at the end
                log.warning("delivery outcome not recorded yet (database error: %s)", exc)
                return
            recorded = len(outcomes)

        # The one place that picks a transport; retry, backoff and the ledger are the same for both.
        transport = self._send_stow if destination.type == "dicomweb" else self._send_dimse
        try:
            return outcomes, transport(destination, headers, emit)
        finally:
            self._ledger.record(destination.name, outcomes[recorded:])

    def _send_dimse(self, destination: Destination, headers: list[FileHeader], emit: Callable[[Outcome], None]) -> str:
        """C-STORE each file over one association."""
        try:
            contexts = requested_contexts(headers)
        except ValueError as exc:
            return _fail_all(headers, Verdict(DeliveryState.FAILED_PERMANENT, str(exc)), emit)
        assert self.settings is not None
        with connect(destination, self.settings, contexts, self.config.tls) as connection:
            if connection.verdict is not None:
                return _fail_all(headers, connection.verdict, emit)
            for header in headers:
                verdict, status = connection.store(header)
                emit(Outcome(header.sop_instance_uid, verdict, status))
        return ""

    def _send_stow(self, destination: Destination, headers: list[FileHeader], emit: Callable[[Outcome], None]) -> str:
        """STOW-RS the files in batches over one connection pool; stop at the first batch that finds the
        destination unreachable or unwell (the rest fail transiently with the same reason)."""
        assert self.settings is not None
        with stow_client.StowClient(destination, self.settings, self.config.tls) as client:
            sent = 0
            for batch in stow_client.batches(headers):
                result = client.store(batch)
                sent += len(batch)
                for outcome in result.outcomes:
                    emit(outcome)
                if result.unreachable is not None:
                    _fail_all(headers[sent:], result.unreachable, emit)
                    return result.unreachable.reason
        return ""


def _fail_all(headers: Sequence[FileHeader], verdict: Verdict, emit: Callable[[Outcome], None]) -> str:
    """Every instance ends with the same verdict (no connection, no usable context); returns its reason."""
    for header in headers:
        emit(Outcome(header.sop_instance_uid, verdict, None))
    return verdict.reason


def _decide(
    destination: Destination,
    attempt: _Attempt,
    policy: RetryPolicy,
    attempts_made: int,
    rng: random.Random,
    *,
    attempts: int,
) -> SendResult:
    """Turn counts into an outcome: retry only transient failures, and only while attempts remain.

    ``attempts_made`` is what the policy is judged against (per-instance attempts for
    ``send_once``, this call's attempts for ``deliver``); ``attempts`` is reported.
    """
    outcome: SendOutcome
    retry_after: float | None = None
    error = attempt.error
    if attempt.failed_transient:
        if policy.exhausted(attempts_made):
            outcome = "failed"
            error = f"gave up after {attempts_made} attempts: {error}"
        else:
            outcome = "retry"
            retry_after = policy.delay(max(attempts_made, 1), rng)
    elif attempt.failed_permanent:
        outcome = "failed"
    else:
        outcome = "delivered"
    return SendResult(
        destination=destination.name,
        delivered=attempt.delivered,
        failed_transient=attempt.failed_transient,
        failed_permanent=attempt.failed_permanent,
        outcome=outcome,
        error=error,
        retry_after_s=retry_after,
        sent=attempt.sent,
        attempts=attempts,
    )


def _first_error(outcomes: list[Outcome], unreadable: list[str], earlier_permanent: int) -> str:
    """The reason an admin most needs: a permanent one first, since it will not fix itself."""
    permanent = [o for o in outcomes if o.verdict.state is DeliveryState.FAILED_PERMANENT]
    transient = [o for o in outcomes if o.verdict.state is DeliveryState.FAILED_TRANSIENT]
    if permanent:
        return _describe(permanent)
    if unreadable:
        return unreadable[0]
    if transient:
        return _describe(transient)
    if earlier_permanent:
        return f"{earlier_permanent} instance(s) failed permanently before and are not resent"
    return ""


def _describe(failed: list[Outcome]) -> str:
    more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    return f"{failed[0].sop_instance_uid}: {failed[0].verdict.reason}{more}"
