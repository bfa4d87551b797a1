"""STOW-RS in (PS3.18 10.5): POST /dicomweb/studies stores each Part 10 file exactly as a C-STORE would.

Every part goes through the receiver's own :class:`~node.receiver.storage.InstanceStore` (fsynced file,
committed row), so a 200 means what a C-STORE Success means, and series completion and jobs follow from
the same instance rows. Only the framing differs: the multipart body, the file meta in front of each data
set, and a dicom+json answer that lists every instance as stored or failed with its reason.

HTTP concerns (routing, the bearer token, threads) belong to the web server; ``receive`` blocks while it
writes, so the server calls it from a worker thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass

from node.config import NodeConfig
from node.db.database import Database
from node.dicomweb.multipart import MultipartError, Part, parse_media_type, split_parts
from node.dicomweb.stow_status import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    DICOM_JSON,
    SOP_CLASS_NOT_SUPPORTED,
    TRANSFER_SYNTAX_NOT_SUPPORTED,
    InstanceStatus,
    response_body,
)
from node.receiver.audit import record_event, report_stored, safe_uid
from node.receiver.codecs import decodable_transfer_syntaxes
from node.receiver.observer import StoreObserver
from node.receiver.part10 import InstanceHeader, read_header, split_part10
from node.receiver.storage import Caller, InstanceStore, StoreRefused
from node.uids import is_valid_uid

log = logging.getLogger(__name__)

DICOM = "application/dicom"
_AE_LENGTH = 16  # the sender name is filed where a C-STORE caller's AE title goes


@dataclass(frozen=True)
class StowReply:
    """The HTTP answer to one STOW-RS request."""

    status: int
    body: bytes
    content_type: str


class StowReceiver:
    """Stores the instances of STOW-RS requests; thread-safe (the store is).

    ``store`` must be the running receiver's store (``Receiver.store``): sharing it shares the per-UID
    locks, the disk floor and the shutdown refusal with C-STORE. ``transfer_syntaxes`` defaults to the
    ones the C-STORE receiver negotiates, so both accept the same files.
    """

    def __init__(
        self,
        config: NodeConfig,
        store: InstanceStore,
        db: Database,
        *,
        observer: StoreObserver | None = None,
        transfer_syntaxes: Collection[str] | None = None,
    ) -> None:
        self.store = store
        self.db = db
        self.observer = observer
        self.stored_sop_classes = frozenset(config.storage.stored_sop_classes)
        self.reject_other_sop_classes = config.storage.other_sop_classes == "reject"
        self.log_patient_data = config.logging.log_patient_data
        self.transfer_syntaxes = frozenset(transfer_syntaxes or decodable_transfer_syntaxes())

    def receive(self, body: bytes, content_type: str, sender: str, *, host: str = "") -> StowReply:
        """Store every part of a multipart/related; type="application/dicom" body and say how each went.

        200: all stored; 202: some failed; 409: all failed (each failure with its FailureReason, the
        C-STORE failure code it would have got); 400: not a well-formed multipart body; 415: another
        media type. ``sender`` names the caller (token holder) in the instance rows and the audit trail,
        cut to an AE title's 16 characters; ``host`` is its address when the server knows it.
        """
        started = time.monotonic()
        media = parse_media_type(content_type)
        if media.essence != "multipart/related":
            return _error(415, f"expected multipart/related, got {media.essence or 'no media type'}")
        if media.params.get("type", DICOM).lower() != DICOM:
            return _error(415, f'only type="{DICOM}" parts are accepted, not {media.params["type"]}')
        boundary = media.params.get("boundary", "")
        try:
            parts = split_parts(body, boundary)
        except MultipartError as exc:
            return _error(400, f"malformed multipart/related body: {exc}")
        if not parts:
            return _error(400, "the multipart/related body has no parts")
        caller = Caller(ae_title=_ae_title_of(sender), host=host[:64])
        results = [self._store_part(part, caller) for part in parts]
        failed = sum(1 for r in results if r.failure_reason is not None)
        status = 200 if not failed else 409 if failed == len(results) else 202
        log.log(
            logging.WARNING if failed else logging.INFO,
            "STOW-RS from %s%s: %d instance(s), %d stored, %d failed in %.2f s",
            caller.ae_title,
            f"@{caller.host}" if caller.host else "",
            len(results),
            len(results) - failed,
            failed,
            time.monotonic() - started,
        )
        return StowReply(status=status, body=response_body(results), content_type=DICOM_JSON)

    def _store_part(self, part: Part, caller: Caller) -> InstanceStatus:
        """One part through the C-STORE path: the same header reading, checks, store and audit."""
        started = time.perf_counter()
        header: InstanceHeader | None = None
        sop_class = sop_instance = ""
        try:
            if part.media_type.essence != DICOM:
                raise StoreRefused(CANNOT_UNDERSTAND, f"part is {part.media_type.essence}, not {DICOM}")
            try:
                file = split_part10(part.content)
            except ValueError as exc:
                raise StoreRefused(CANNOT_UNDERSTAND, str(exc)) from exc
            sop_class, sop_instance = file.media_storage_sop_class_uid, file.media_storage_sop_instance_uid
            if file.transfer_syntax_uid not in self.transfer_syntaxes:
                raise StoreRefused(TRANSFER_SYNTAX_NOT_SUPPORTED, f"transfer syntax {file.transfer_syntax_uid}")
            try:
                header = read_header(file.dataset, file.transfer_syntax_uid)
            except ValueError as exc:
                raise StoreRefused(CANNOT_UNDERSTAND, str(exc)) from exc
            sop_class = header.sop_class_uid or sop_class
            sop_instance = header.sop_instance_uid or sop_instance
            _check_against_file_meta(header, file.media_storage_sop_class_uid, file.media_storage_sop_instance_uid)
            if self.reject_other_sop_classes and header.sop_class_uid not in self.stored_sop_classes:
                raise StoreRefused(SOP_CLASS_NOT_SUPPORTED, f"SOP class {header.sop_class_uid} is not accepted")
            outcome = self.store.store(header, file.dataset, caller)
        except StoreRefused as refused:
            self._refused(refused, caller, header, sop_instance, time.perf_counter() - started)
            return InstanceStatus(_valid(sop_class), _valid(sop_instance), failure_reason=refused.status)
        seconds = time.perf_counter() - started
        report_stored(header, outcome, caller, seconds, self.observer, self.log_patient_data, " by STOW-RS")
        return InstanceStatus(header.sop_class_uid, header.sop_instance_uid)

    def _refused(
        self, refused: StoreRefused, caller: Caller, header: InstanceHeader | None, sop_instance: str, seconds: float
    ) -> None:
        uid = safe_uid(sop_instance)
        log.warning(
            "refused instance %s from %s by STOW-RS: %s (0x%04X)", uid, caller.ae_title, refused.reason, refused.status
        )
        detail = f"0x{refused.status:04X} {refused.reason} (STOW-RS)"
        record_event(self.db, "store_refused", caller, header, detail, sop_instance_uid=uid)
        if self.observer is not None:
            self.observer.refused(refused.status, seconds)


def _check_against_file_meta(header: InstanceHeader, sop_class: str, sop_instance: str) -> None:
    """The data set must be the instance its file meta names (as a C-STORE's must match its request)."""
    if sop_instance and header.sop_instance_uid != sop_instance:
        raise StoreRefused(CANNOT_UNDERSTAND, "SOP Instance UID differs from the file meta")
    if sop_class and header.sop_class_uid != sop_class:
        raise StoreRefused(DATASET_MISMATCH, "SOP Class UID differs from the file meta")


def _valid(uid: str) -> str:
    """A UID for the response, or "" (left out) when it is malformed: the answer must stay valid DICOM JSON."""
    return uid if is_valid_uid(uid) else ""


def _ae_title_of(sender: str) -> str:
    """A sender name fit for the AE-title columns and the stored file's Source AE: printable ASCII, no
    backslash, at most 16 characters."""
    cleaned = "".join(ch for ch in sender if 0x20 <= ord(ch) < 0x7F and ch != "\\").strip()
    return cleaned[:_AE_LENGTH].strip() or "STOW-RS"


def _error(status: int, reason: str) -> StowReply:
    """A request-level failure: no instance was looked at. Plain text, since no per-instance answer exists."""
    log.warning("STOW-RS request refused (%d): %s", status, reason)
    return StowReply(status=status, body=reason.encode("utf-8"), content_type="text/plain; charset=utf-8")
