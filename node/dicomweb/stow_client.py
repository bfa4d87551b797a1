"""STOW-RS out: POST result files to a DICOMweb destination and say what happened to each.

Network only, no database, like ``node.sender.scu``: the sender owns the ledger, the batching of
records and the retry policy, and asks this module only for per-instance verdicts. The answer's
meaning follows PS3.18 10.5.3: each FailedSOPSequence item is judged by its FailureReason with the
same rules as a C-STORE status (out of resources and processing failure are worth another try,
everything else is permanent); instances not listed take the HTTP status's meaning.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import httpx

from node.config import Destination, TlsSection
from node.dicomweb.multipart import parse_media_type, related_body
from node.dicomweb.stow_status import DICOM_JSON, StowResponse, read_response
from node.sender.deliveries import Outcome
from node.sender.outcomes import DeliveryState, Verdict, classify_store_status
from node.sender.scu import AssociationSettings, FileHeader, tls_client_context

log = logging.getLogger(__name__)

MAX_BATCH_INSTANCES = 50
MAX_BATCH_BYTES = 64 * 1024 * 1024  # one file larger than this still goes, alone
_TRANSIENT_HTTP = frozenset({408, 425, 429})  # timeout, too early, too many requests: the server asks for later


@dataclass(frozen=True)
class BatchResult:
    """The outcomes of one request; ``unreachable`` is set when the destination should not be asked again
    in this attempt (no connection, a timeout, a 5xx): the caller then fails the rest transiently too."""

    outcomes: list[Outcome]
    unreachable: Verdict | None = None


class StowClient:
    """One HTTP connection pool to one destination for one attempt; use as a context manager."""

    def __init__(self, destination: Destination, settings: AssociationSettings, tls: TlsSection | None) -> None:
        self.destination = destination
        self.url = destination.url.rstrip("/") + "/studies"
        self._client: httpx.Client | None = None
        self._setup_error: Verdict | None = None
        try:
            verify: ssl.SSLContext | bool = (
                tls_client_context(tls or TlsSection()) if destination.url.startswith("https://") else True
            )
        except (OSError, ssl.SSLError) as exc:
            self._setup_error = Verdict(DeliveryState.FAILED_PERMANENT, f"TLS set-up failed: {exc}")
            return
        timeout = httpx.Timeout(
            connect=settings.connect_timeout_s,
            read=settings.dimse_timeout_s,
            write=settings.network_timeout_s,
            pool=settings.connect_timeout_s,
        )
        transport = httpx.HTTPTransport(
            verify=verify, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)], retries=0
        )
        self._client = httpx.Client(
            transport=transport,
            timeout=timeout,
            headers={"Accept": DICOM_JSON, **destination.headers},
            follow_redirects=False,
            trust_env=False,  # no proxy or certificate settings from the environment behind the config's back
        )

    def __enter__(self) -> StowClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def store(self, headers: Sequence[FileHeader]) -> BatchResult:
        """POST one batch as multipart/related and judge each instance."""
        if self._setup_error is not None or self._client is None:
            verdict = self._setup_error or Verdict(DeliveryState.FAILED_TRANSIENT, "client closed")
            return BatchResult([Outcome(h.sop_instance_uid, verdict, None) for h in headers])
        outcomes: list[Outcome] = []
        contents: list[bytes] = []
        sendable: list[FileHeader] = []
        for header in headers:
            try:
                contents.append(header.path.read_bytes())
                sendable.append(header)
            except OSError as exc:
                verdict = Verdict(DeliveryState.FAILED_PERMANENT, f"cannot read file: {exc.__class__.__name__}")
                outcomes.append(Outcome(header.sop_instance_uid, verdict, None))
        if not sendable:
            return BatchResult(outcomes)
        body, content_type = related_body(contents)
        del contents
        where = self.destination.where()
        try:
            response = self._client.post(self.url, content=body, headers={"Content-Type": content_type})
        except httpx.TimeoutException as exc:
            verdict = Verdict(DeliveryState.FAILED_TRANSIENT, f"no answer from {where} in time ({type(exc).__name__})")
            return BatchResult(outcomes + [Outcome(h.sop_instance_uid, verdict, None) for h in sendable], verdict)
        except httpx.HTTPError as exc:  # refused, reset, DNS, TLS handshake: nothing is known to have arrived
            verdict = Verdict(DeliveryState.FAILED_TRANSIENT, f"cannot reach {where} ({type(exc).__name__})")
            return BatchResult(outcomes + [Outcome(h.sop_instance_uid, verdict, None) for h in sendable], verdict)
        judged = judge_response(response.status_code, response.headers.get("content-type", ""), response.content, where)
        outcomes += [judged(h.sop_instance_uid) for h in sendable]
        unreachable = None
        if response.status_code >= 500 or response.status_code in _TRANSIENT_HTTP:
            unreachable = Verdict(DeliveryState.FAILED_TRANSIENT, _http_reason(response.status_code, where))
        return BatchResult(outcomes, unreachable)


class _Judge:
    """Per-instance verdicts from one response (a callable, so the response is parsed once)."""

    def __init__(self, status: int, parsed: StowResponse | None, where: str = "the destination") -> None:
        self.status = status
        self.parsed = parsed
        self.where = where

    def __call__(self, sop_instance_uid: str) -> Outcome:
        if self.parsed is not None and sop_instance_uid in self.parsed.failed:
            reason = self.parsed.failed[sop_instance_uid].failure_reason
            if reason is None:
                verdict = Verdict(DeliveryState.FAILED_PERMANENT, f"HTTP {self.status}: failed without a reason")
                return Outcome(sop_instance_uid, verdict, None)
            verdict = classify_store_status(reason)
            if verdict.delivered:  # a "failure" coded as success is not one we can trust either way
                verdict = Verdict(DeliveryState.FAILED_PERMANENT, f"HTTP {self.status}: failed with reason 0x0000")
            return Outcome(sop_instance_uid, Verdict(verdict.state, f"STOW-RS {verdict.reason}"), reason)
        if self.parsed is not None and sop_instance_uid in self.parsed.referenced:
            warning = self.parsed.referenced[sop_instance_uid].warning_reason
            note = f"stored with warning 0x{warning:04X}" if warning is not None else ""
            return Outcome(sop_instance_uid, Verdict(DeliveryState.DELIVERED, note), warning or 0)
        if self.status == 200:
            return Outcome(sop_instance_uid, Verdict(DeliveryState.DELIVERED, ""), 0)
        if self.status == 202:  # stored some, but not saying about this one: sending it again is harmless
            verdict = Verdict(DeliveryState.FAILED_TRANSIENT, "HTTP 202 without this instance in the response")
            return Outcome(sop_instance_uid, verdict, None)
        state = (
            DeliveryState.FAILED_TRANSIENT
            if self.status >= 500 or self.status in _TRANSIENT_HTTP
            else DeliveryState.FAILED_PERMANENT
        )
        return Outcome(sop_instance_uid, Verdict(state, _http_reason(self.status, self.where)), None)


def judge_response(status: int, content_type: str, body: bytes, where: str = "the destination") -> _Judge:
    """A function from SOP Instance UID to its outcome, for one STOW-RS response."""
    parsed: StowResponse | None = None
    essence = parse_media_type(content_type).essence if content_type else ""
    if body and essence in ("", DICOM_JSON, "application/json"):  # Orthanc leaves out some answers' type
        try:
            parsed = read_response(body)
        except ValueError as exc:
            if essence:
                log.warning("STOW-RS response (HTTP %d) from %s not understood: %s", status, where, exc)
    return _Judge(status, parsed, where)


def _http_reason(status: int, where: str) -> str:
    text = {
        301: "moved (redirects are not followed: check the url)",
        302: "redirect (not followed: check the url)",
        400: "bad request",
        401: "not authorized (check the destination's headers)",
        403: "forbidden (check the destination's headers)",
        404: "not found (check the url: the DICOMweb root, without /studies)",
        408: "request timeout",
        409: "conflict: no instance stored",
        413: "request too large",
        415: "unsupported media type",
        429: "too many requests",
        500: "internal server error",
        502: "bad gateway",
        503: "service unavailable",
        504: "gateway timeout",
    }.get(status, "")
    return f"HTTP {status}{': ' + text if text else ''} from {where}"


def batches(headers: Sequence[FileHeader]) -> Iterator[list[FileHeader]]:
    """Consecutive batches of at most MAX_BATCH_INSTANCES files and MAX_BATCH_BYTES (by file size)."""
    batch: list[FileHeader] = []
    size = 0
    for header in headers:
        try:
            length = header.path.stat().st_size
        except OSError:
            length = 0  # unreadable: the read fails it permanently
        if batch and (len(batch) >= MAX_BATCH_INSTANCES or size + length > MAX_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(header)
        size += length
    if batch:
        yield batch
