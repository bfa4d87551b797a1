"""The receiving AE: presentation contexts, TLS, the listening server and its orderly stop."""

from __future__ import annotations

import logging
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, StoragePresentationContexts
from pynetdicom.sop_class import Verification

from node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node.config import TLS12_CIPHERS, NodeConfig, TlsSection
from node.db.database import Database
from node.receiver.association import NodeServer, SenderGate, SharedPortNodeServer, request_handler_for
from node.receiver.codecs import decodable_transfer_syntaxes, missing_decoders
from node.receiver.handlers import ReceiverHandlers
from node.receiver.observer import StoreObserver
from node.receiver.storage import InstanceStore

log = logging.getLogger(__name__)


def presentation_contexts(config: NodeConfig) -> list[PresentationContext]:
    """Verification plus storage contexts, each accepting every transfer syntax this installation can
    decode, so compressed images are stored exactly as sent and an acknowledged image never fails at
    analysis for want of a decoder (the sender converts or sends uncompressed instead). With
    ``other_sop_classes = "reject"`` only the stored classes are negotiated, so a sender learns before it sends."""
    stored = list(config.storage.stored_sop_classes)
    if config.storage.other_sop_classes == "ignore":
        known = [str(cx.abstract_syntax) for cx in StoragePresentationContexts]
        stored += [uid for uid in known if uid not in stored]
    if missing := missing_decoders():
        log.info("not accepted, no decoder plugin installed: %s", ", ".join(missing))
    syntaxes = decodable_transfer_syntaxes()
    return [build_context(Verification, syntaxes)] + [build_context(uid, syntaxes) for uid in stored]


def tls_context(tls: TlsSection) -> ssl.SSLContext | None:
    """Server-side TLS context, or None when TLS is off: TLS 1.2+ with ``TLS12_CIPHERS`` for TLS 1.2, the
    certificate, key and CA files read now (OSError or ssl.SSLError when one is missing or bad)."""
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates is None:  # config validation allows this only without client certificates
        context.verify_mode = ssl.CERT_NONE
        return context
    context.load_verify_locations(cafile=str(tls.ca_certificates))
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return context


class TlsReloadable(Protocol):
    """Something serving TLS that can read its files again: a ``Receiver``, or the receiver processes
    (``node.receiver.processes``), which pass SIGHUP on to their children."""

    def reload_tls(self) -> bool: ...


def reload_tls_files() -> None:
    """SIGHUP: every receiver running in this process, and every receiver process it started, reads its TLS
    files again (``reload_tls``)."""
    with _running_lock:
        receivers = list(_running)
    for receiver in receivers:
        receiver.reload_tls()


def watch_for_tls_reload(target: TlsReloadable) -> None:
    """Have ``reload_tls_files`` (SIGHUP) reach ``target`` until ``unwatch_for_tls_reload``."""
    with _running_lock:
        _running.append(target)


def unwatch_for_tls_reload(target: TlsReloadable) -> None:
    with _running_lock:
        _running[:] = [running for running in _running if running is not target]


def sender_gate(config: NodeConfig) -> SenderGate:
    """Resolve ``allowed_senders`` once; an empty list lets anyone in (and is logged loudly)."""
    senders = config.node.allowed_senders
    if not senders:
        log.warning("allowed_senders is empty: any calling AE title from any address is accepted")
    return SenderGate.from_rules([(s.ae_title, s.networks()) for s in senders])


@dataclass
class Receiver:
    """A running C-ECHO/C-STORE SCP on the configured address."""

    config: NodeConfig
    db: Database
    observer: StoreObserver | None = None  # metrics of each C-STORE (the HTTP interface), when enabled
    reuse_port: bool = False  # share host:port with other processes' receivers (SO_REUSEPORT; receiver_processes)
    ae: AE = field(init=False)
    store: InstanceStore = field(init=False)
    _server: NodeServer | None = field(init=False, default=None)
    _thread: threading.Thread | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        node = self.config.node
        self.store = InstanceStore(
            data_dir=node.data_dir,
            database=self.db,
            stored_sop_classes=set(self.config.storage.stored_sop_classes),
            min_free_bytes=node.min_free_disk_mb * 1024 * 1024,
        )
        ae = AE(ae_title=node.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.maximum_associations = node.max_associations
        ae.maximum_pdu_size = node.max_pdu_size
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.network_timeout = node.network_timeout_s
        ae.require_called_aet = True
        ae.supported_contexts = presentation_contexts(self.config)
        self.ae = ae

    def start(self) -> tuple[str, int]:
        """Bind and serve in a background thread; returns the bound (host, port)."""
        node = self.config.node
        handlers = ReceiverHandlers(
            store=self.store, db=self.db, log_patient_data=self.config.logging.log_patient_data, observer=self.observer
        )
        self._server = self.ae.make_server(
            (node.host, node.port),
            ssl_context=tls_context(self.config.tls),
            evt_handlers=handlers.bindings(),
            server_class=SharedPortNodeServer if self.reuse_port else NodeServer,
            request_handler=request_handler_for(sender_gate(self.config), node.acse_timeout_s, handlers.on_tls_refused),
        )
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="uad-node-scp", daemon=True)
        self._thread.start()
        watch_for_tls_reload(self)
        host, port = self._server.server_address[:2]
        log.info("listening as %s on %s:%d%s", node.ae_title, host, port, " (TLS)" if self.config.tls.enabled else "")
        return str(host), int(port)

    def reload_tls(self) -> bool:
        """Read the certificate, key and CA files again (SIGHUP): new connections use them, those open keep
        theirs. A file that cannot be read or does not fit is logged and the current context kept; False then."""
        server = self._server
        if server is None or not self.config.tls.enabled:
            return False
        try:
            context = tls_context(self.config.tls)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.error("TLS files not reloaded, keeping the current ones: %s", exc)
            return False
        server.ssl_context = context
        log.info("TLS certificate, key and CA files reloaded (%s)", self.config.tls.certificate)
        return True

    @property
    def listening(self) -> bool:
        """True from a successful ``start`` until ``stop`` (readiness: the SCP accepts associations)."""
        return self._server is not None and self._thread is not None and self._thread.is_alive()

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting; stores in flight finish, later ones get a retryable 0xA700; then close.

        Associations still open after ``grace_s`` (or never negotiated, e.g. a port probe)
        are aborted: nothing they sent after the stop was acknowledged, so nothing is lost.
        """
        if self._server is None:
            return
        server, self._server = self._server, None
        unwatch_for_tls_reload(self)
        server.stopping = True  # an association still negotiating is refused ("node shutting down")
        self.store.close()
        # pynetdicom's own shutdown() expects start_server(); stop the serve loop and close here.
        socketserver.BaseServer.shutdown(server)
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        deadline = time.monotonic() + grace_s
        for assoc in server.active_associations:
            if assoc.is_established:
                assoc.join(timeout=max(0.0, deadline - time.monotonic()))
            if assoc.is_alive():
                _drop(assoc)
        log.info("receiver stopped")


# The receivers (and receiver process groups) started and not yet stopped in this process, for
# ``reload_tls_files`` (a signal handler cannot be handed one).
_running: list[TlsReloadable] = []
_running_lock = threading.Lock()


def _drop(assoc: Association) -> None:
    """Abort an association. One still waiting for its A-ASSOCIATE-RQ (a port probe, a peer
    that went away) would otherwise sit out the ACSE timeout: wake it as if that had expired."""
    if assoc.is_established:
        assoc.abort()
    else:
        assoc.dul.to_user_queue.put(None)
    assoc.join(timeout=5)
