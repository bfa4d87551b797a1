"""What a destination's answer means for delivery: delivered, try again later, or give up.

The split matters more than anything else in the sender: a transient failure treated as
permanent loses results, and a permanent one treated as transient is the export loop that
users of other gateways hit when a PACS rejects data (the same bytes can never succeed).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pynetdicom.status import STATUS_WARNING, code_to_category


class DeliveryState(StrEnum):
    """The ``deliveries.state`` values."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED_TRANSIENT = "failed-transient"
    FAILED_PERMANENT = "failed-permanent"


@dataclass(frozen=True)
class Verdict:
    """How one instance (or a whole association attempt) ended, and why, for the database."""

    state: DeliveryState
    reason: str

    @property
    def delivered(self) -> bool:
        return self.state is DeliveryState.DELIVERED


# Failures a later attempt can cure: the destination is busy, full or restarting.
_TRANSIENT_CODES = {
    0x0110: "processing failure",
    0x0213: "resource limitation",
    0xFE00: "cancelled",
}
_PERMANENT_CODES = {
    0x0117: "invalid SOP instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0x0210: "duplicate invocation",
    0x0211: "unrecognized operation",
    0x0212: "mistyped argument",
}


def classify_store_status(status: int | None) -> Verdict:
    """C-STORE response status -> verdict (PS3.4 B.2.3 plus the general PS3.7 C codes).

    ``None`` means no usable response (DIMSE timeout, association lost mid-way): the
    instance may or may not have arrived, so it is sent again later; PACS accept a
    re-sent identical instance.
    """
    if status is None:
        return Verdict(DeliveryState.FAILED_TRANSIENT, "no C-STORE response (timeout or association lost)")
    code = f"0x{status:04X}"
    if status == 0x0000:
        return Verdict(DeliveryState.DELIVERED, "")
    if code_to_category(status) == STATUS_WARNING:
        return Verdict(DeliveryState.DELIVERED, f"stored with warning {code}")
    if 0xA700 <= status <= 0xA7FF:
        return Verdict(DeliveryState.FAILED_TRANSIENT, f"{code}: refused, out of resources")
    if status in _TRANSIENT_CODES:
        return Verdict(DeliveryState.FAILED_TRANSIENT, f"{code}: {_TRANSIENT_CODES[status]}")
    if 0xA900 <= status <= 0xA9FF:
        return Verdict(DeliveryState.FAILED_PERMANENT, f"{code}: data set does not match SOP class")
    if 0xC000 <= status <= 0xCFFF:
        return Verdict(DeliveryState.FAILED_PERMANENT, f"{code}: cannot understand")
    if status in _PERMANENT_CODES:
        return Verdict(DeliveryState.FAILED_PERMANENT, f"{code}: {_PERMANENT_CODES[status]}")
    # Unknown failure codes: resending identical bytes is unlikely to help, and looping is worse.
    return Verdict(DeliveryState.FAILED_PERMANENT, f"{code}: unrecognised failure status")


def classify_rejection(result: int, source: str, reason: str) -> Verdict:
    """A-ASSOCIATE-RJ -> verdict: result 2 is "rejected-transient" (PS3.8 9.3.4), all else permanent."""
    detail = f"association rejected ({source}: {reason})"
    if result == 0x02:
        return Verdict(DeliveryState.FAILED_TRANSIENT, f"{detail}, transient")
    return Verdict(DeliveryState.FAILED_PERMANENT, f"{detail}, permanent")
