"""The C-STORE SCU: AE set-up, presentation contexts, TLS and one association to a destination.

Network only: no database here. Every wait is bounded (connection, ACSE, DIMSE, idle) so a
peer that hangs costs one timeout, never a stuck sender.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.events import Event as NetEvent
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT
from pynetdicom.presentation import PresentationContext

from node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node.config import TLS12_CIPHERS, Destination, NodeConfig, TlsSection
from node.network import set_tcp_nodelay
from node.sender.outcomes import DeliveryState, Verdict, classify_rejection, classify_store_status

log = logging.getLogger(__name__)

# PS3.8 9.3.2.2: context IDs are odd numbers 1..255, so one association has at most 128.
MAX_CONTEXTS = 128
UNCOMPRESSED_FALLBACKS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True)
class AssociationSettings:
    """Identity, PDU size and timeouts for outgoing associations."""

    calling_ae: str
    max_pdu: int = 1_048_576  # what we accept; what we send is bounded by the destination's own maximum
    connect_timeout_s: float = 10.0
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0

    @classmethod
    def from_config(cls, config: NodeConfig) -> AssociationSettings:
        """The node's own limits apply to its outgoing associations too."""
        node = config.node
        return cls(
            calling_ae=node.ae_title,
            max_pdu=node.max_pdu_size,
            connect_timeout_s=min(node.acse_timeout_s, 10.0),
            acse_timeout_s=node.acse_timeout_s,
            dimse_timeout_s=node.dimse_timeout_s,
            network_timeout_s=node.network_timeout_s,
        )


@dataclass(frozen=True)
class FileHeader:
    """What the sender needs to know about a Part 10 file before opening an association."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    transfer_syntax_uid: str


def read_file_header(path: Path) -> FileHeader:
    """Read the identifying attributes without the pixel data; ValueError if it is not usable."""
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except (OSError, InvalidDicomError) as exc:
        raise ValueError(f"{path.name}: not a readable DICOM file ({exc.__class__.__name__})") from exc
    meta = getattr(ds, "file_meta", None)
    transfer_syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
    sop_class = str(ds.get("SOPClassUID", "") or getattr(meta, "MediaStorageSOPClassUID", "") or "")
    sop_instance = str(ds.get("SOPInstanceUID", "") or getattr(meta, "MediaStorageSOPInstanceUID", "") or "")
    if not (transfer_syntax and sop_class and sop_instance):
        raise ValueError(f"{path.name}: no transfer syntax, SOP class or SOP instance UID (not a Part 10 file?)")
    return FileHeader(
        path=path,
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        transfer_syntax_uid=transfer_syntax,
    )


def requested_contexts(headers: Iterable[FileHeader]) -> list[PresentationContext]:
    """One context per SOP class with the file's own uncompressed syntax first plus the
    Explicit/Implicit VR Little Endian fallbacks, and one per compressed syntax in use, so
    compressed files go as they are and everything else goes whatever the peer prefers."""
    syntaxes: dict[str, list[str]] = {}
    for header in headers:
        syntaxes.setdefault(header.sop_class_uid, [])
        if header.transfer_syntax_uid not in syntaxes[header.sop_class_uid]:
            syntaxes[header.sop_class_uid].append(header.transfer_syntax_uid)
    contexts: list[PresentationContext] = []
    for sop_class, used in syntaxes.items():
        uncompressed = [ts for ts in used if not UID(ts).is_compressed]
        plain = list(dict.fromkeys([*uncompressed, *UNCOMPRESSED_FALLBACKS]))
        contexts.append(build_context(sop_class, plain))
        contexts.extend(build_context(sop_class, ts) for ts in used if UID(ts).is_compressed)
    if len(contexts) > MAX_CONTEXTS:
        raise ValueError(f"{len(contexts)} presentation contexts needed, one association allows {MAX_CONTEXTS}")
    return contexts


def tls_client_context(tls: TlsSection) -> ssl.SSLContext:
    """Client-side TLS: verify the destination against the node's CA bundle (or the system
    store) and its host name, and present the node's certificate when it has one, since
    DICOM TLS peers usually require a client certificate (PS3.15 B.1). TLS 1.2+ with ``TLS12_CIPHERS``
    for TLS 1.2, as the receiver. Built per association, so renewed files are used without a restart."""
    cafile = str(tls.ca_certificates) if tls.ca_certificates is not None else None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    if tls.certificate is not None and tls.private_key is not None:
        context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    return context


@dataclass
class _ConnectionWatch:
    """Remembers whether TCP (and TLS) came up and whether the peer aborted: pynetdicom's
    flags do not tell "refused" from "TLS failed", nor a peer's abort from its own timeout."""

    connected: bool = False
    peer_aborted: bool = False

    def on_open(self, event: NetEvent) -> None:
        self.connected = True

    def on_acse(self, event: NetEvent) -> None:
        if isinstance(event.primitive, (A_ABORT, A_P_ABORT)):
            self.peer_aborted = True


@dataclass
class Connection:
    """The outcome of asking for an association: ``assoc`` when established, else ``verdict``."""

    destination: Destination
    assoc: Association | None
    verdict: Verdict | None = None
    _accepted: dict[str, set[str]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.assoc is not None:
            for cx in self.assoc.accepted_contexts:
                self._accepted.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))

    def store(self, header: FileHeader) -> tuple[Verdict, int | None]:
        """Send one file; returns its verdict and the DIMSE status (None when none came back)."""
        assoc = self.assoc
        if assoc is None or not assoc.is_established:
            return Verdict(DeliveryState.FAILED_TRANSIENT, "association lost before this instance was sent"), None
        accepted = self._accepted.get(header.sop_class_uid)
        if not accepted:
            return Verdict(DeliveryState.FAILED_PERMANENT, f"SOP class {header.sop_class_uid} not accepted"), None
        try:
            dataset = dcmread(header.path)
        except (OSError, InvalidDicomError) as exc:
            return Verdict(DeliveryState.FAILED_PERMANENT, f"cannot read file: {exc.__class__.__name__}"), None
        refusal = _fit_to_accepted(dataset, header, accepted)
        if refusal is not None:
            return refusal, None
        try:
            response = assoc.send_c_store(dataset)
        except RuntimeError:  # the association ended between the check above and the send
            return classify_store_status(None), None
        except (ValueError, AttributeError) as exc:  # no usable context, or the data set cannot be encoded
            return Verdict(DeliveryState.FAILED_PERMANENT, f"cannot send: {exc}"), None
        status = response.get("Status") if response is not None else None
        code = int(status) if status is not None else None
        return classify_store_status(code), code

    def close(self) -> None:
        """Release politely; abort if the peer does not answer (release waits at most the ACSE timeout)."""
        assoc, self.assoc = self.assoc, None
        if assoc is None:
            return
        if assoc.is_established:
            assoc.release()
        if assoc.is_alive():
            assoc.abort()


def _fit_to_accepted(dataset: Dataset, header: FileHeader, accepted: set[str]) -> Verdict | None:
    """A compressed file whose syntax was not accepted is decompressed if the peer takes an
    uncompressed one; pynetdicom converts between uncompressed syntaxes by itself."""
    syntax = UID(header.transfer_syntax_uid)
    if not syntax.is_compressed or syntax in accepted:
        return None
    refused = f"transfer syntax {syntax} not accepted"
    if not any(not UID(ts).is_compressed for ts in accepted):
        return Verdict(DeliveryState.FAILED_PERMANENT, f"{refused}, nor any uncompressed one")
    try:
        dataset.decompress(generate_instance_uid=False)  # lossless: still the same instance
    except Exception as exc:  # pydicom raises many types for codecs it lacks
        return Verdict(DeliveryState.FAILED_PERMANENT, f"{refused}; cannot decompress: {exc}")
    return None


@contextmanager
def connect(
    destination: Destination,
    settings: AssociationSettings,
    contexts: list[PresentationContext],
    tls: TlsSection | None,
) -> Iterator[Connection]:
    """Open one association to ``destination``; always released or aborted on exit.

    The yielded connection's ``verdict`` says why there is no association (refused, timed
    out, rejected, aborted); its ``assoc`` is None then.
    """
    connection = _associate(destination, settings, contexts, tls)
    try:
        yield connection
    finally:
        connection.close()


def _associate(
    destination: Destination,
    settings: AssociationSettings,
    contexts: list[PresentationContext],
    tls: TlsSection | None,
) -> Connection:
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    tls_args = None
    if destination.tls:
        try:
            tls_args = (tls_client_context(tls or TlsSection()), destination.host)
        except (OSError, ssl.SSLError) as exc:
            return Connection(destination, None, Verdict(DeliveryState.FAILED_PERMANENT, f"TLS set-up failed: {exc}"))
    ae = AE(ae_title=settings.calling_ae)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.connection_timeout = settings.connect_timeout_s
    ae.acse_timeout = settings.acse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.network_timeout = settings.network_timeout_s
    watch = _ConnectionWatch()
    assoc = ae.associate(
        destination.host,
        destination.port,
        contexts=contexts,
        ae_title=destination.ae_title,
        max_pdu=settings.max_pdu,
        tls_args=tls_args,
        evt_handlers=[
            (evt.EVT_CONN_OPEN, set_tcp_nodelay),
            (evt.EVT_CONN_OPEN, watch.on_open),
            (evt.EVT_ACSE_RECV, watch.on_acse),
        ],
    )
    if assoc.is_established:
        return Connection(destination, assoc)
    verdict = _why_not_established(assoc, watch, where, destination.tls, settings.acse_timeout_s)
    if assoc.is_alive():
        assoc.abort()
    return Connection(destination, None, verdict)


def _why_not_established(
    assoc: Association, watch: _ConnectionWatch, where: str, tls: bool, acse_timeout_s: float
) -> Verdict:
    """Turn pynetdicom's flags into a verdict an admin can act on."""
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        result = int(getattr(rsp, "result", 0x01) or 0x01)
        return classify_rejection(result, str(getattr(rsp, "source_str", "?")), str(getattr(rsp, "reason_str", "?")))
    if not watch.connected:
        how = "refused, unreachable, timed out or TLS handshake failed" if tls else "refused, unreachable or timed out"
        return Verdict(DeliveryState.FAILED_TRANSIENT, f"cannot connect to {where} ({how})")
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        # pynetdicom itself aborts when the peer accepted none of the proposed contexts.
        classes = sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts})
        return Verdict(DeliveryState.FAILED_PERMANENT, f"{where} accepts none of the SOP classes {', '.join(classes)}")
    if watch.peer_aborted:
        return Verdict(DeliveryState.FAILED_TRANSIENT, f"{where} aborted the association request")
    return Verdict(
        DeliveryState.FAILED_TRANSIENT, f"no answer to the association request from {where} in {acse_timeout_s:g} s"
    )
