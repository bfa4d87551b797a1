"""Results back to PACS: a C-STORE SCU (or STOW-RS client) with per-instance delivery state and retry with backoff.

``scu`` talks DICOM (``node.dicomweb.stow_client`` DICOMweb), ``outcomes`` says what an answer means,
``retry`` says when to try again, ``deliveries`` keeps the record, ``sender`` ties them together.
"""

from node.sender.deliveries import DeliveryLedger, DeliveryRecord
from node.sender.outcomes import DeliveryState, Verdict, classify_rejection, classify_store_status
from node.sender.retry import RetryPolicy
from node.sender.scu import AssociationSettings
from node.sender.sender import Sender, SendResult

__all__ = [
    "AssociationSettings",
    "DeliveryLedger",
    "DeliveryRecord",
    "DeliveryState",
    "RetryPolicy",
    "SendResult",
    "Sender",
    "Verdict",
    "classify_rejection",
    "classify_store_status",
]
