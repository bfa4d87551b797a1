"""The STOW-RS response body (PS3.18 10.5.3): which instances were stored and which failed, and why.

Both directions use it: the receiver writes it (``response_body``) and the sender reads a destination's
(``read_response``). Written and read as application/dicom+json through pydicom's DICOM JSON model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

DICOM_JSON = "application/dicom+json"

# PS3.18 Table 10.5.3-2 failure reasons (the C-STORE codes, plus transfer syntax not supported).
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122


@dataclass(frozen=True)
class InstanceStatus:
    """One instance in a STOW-RS response: ``failure_reason`` None = stored (``warning_reason`` if any)."""

    sop_class_uid: str
    sop_instance_uid: str
    failure_reason: int | None = None
    warning_reason: int | None = None


@dataclass(frozen=True)
class StowResponse:
    """A parsed response: instances by SOP Instance UID, stored and failed."""

    referenced: dict[str, InstanceStatus]
    failed: dict[str, InstanceStatus]


def response_body(instances: Sequence[InstanceStatus], retrieve_url: str = "") -> bytes:
    """The dicom+json body: ReferencedSOPSequence (0008,1199) for stored instances, FailedSOPSequence
    (0008,1198) with FailureReason (0008,1197) for the others; empty sequences are left out."""
    ds = Dataset()
    if retrieve_url:
        ds.RetrieveURL = retrieve_url
    failed = [_item(i) for i in instances if i.failure_reason is not None]
    stored = [_item(i) for i in instances if i.failure_reason is None]
    if failed:
        ds.FailedSOPSequence = failed
    if stored:
        ds.ReferencedSOPSequence = stored
    return json.dumps(ds.to_json_dict(), separators=(",", ":")).encode("utf-8")


def _item(instance: InstanceStatus) -> Dataset:
    item = Dataset()
    if instance.sop_class_uid:
        item.ReferencedSOPClassUID = instance.sop_class_uid
    if instance.sop_instance_uid:
        item.ReferencedSOPInstanceUID = instance.sop_instance_uid
    if instance.failure_reason is not None:
        item.FailureReason = instance.failure_reason
    elif instance.warning_reason is not None:
        item.WarningReason = instance.warning_reason
    return item


def read_response(body: bytes) -> StowResponse:
    """Parse a dicom+json STOW-RS response; ValueError if it is not one (the caller falls back to the
    HTTP status alone). Items without a SOP Instance UID cannot be matched and are dropped."""
    try:
        document = json.loads(body)
        if isinstance(document, list):  # some servers wrap the one data set in an array
            document = document[0] if document else {}
        ds = Dataset.from_json(document)
    except Exception as exc:  # json and pydicom raise many types on malformed input
        raise ValueError(f"not a dicom+json STOW-RS response ({type(exc).__name__})") from exc
    return StowResponse(
        referenced=_statuses(ds.get("ReferencedSOPSequence", [])),
        failed=_statuses(ds.get("FailedSOPSequence", [])),
    )


def _statuses(items: Sequence[Dataset]) -> dict[str, InstanceStatus]:
    found: dict[str, InstanceStatus] = {}
    for item in items:
        uid = str(item.get("ReferencedSOPInstanceUID", "") or "")
        if uid:
            found[uid] = InstanceStatus(
                sop_class_uid=str(item.get("ReferencedSOPClassUID", "") or ""),
                sop_instance_uid=uid,
                failure_reason=_int(item.get("FailureReason")),
                warning_reason=_int(item.get("WarningReason")),
            )
    return found


def _int(value: object) -> int | None:
    try:
        return int(value) if value is not None and value != "" else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
