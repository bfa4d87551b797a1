"""The node's acceptor association: pynetdicom's, with a sender gate and less waiting.

Four changes to pynetdicom's acceptor, each small and local:

* Sender gate. pynetdicom can require calling AE titles but cannot tie a title
  to the host it calls from; the node's ``allowed_senders`` does both, so the
  check runs at A-ASSOCIATE-RQ, before any data is accepted.
* Latency. pynetdicom's acceptor loop sleeps 1 ms before every look at its
  DIMSE queue and its DUL thread sleeps 1 ms whenever it was idle, so each
  C-STORE waits 1-3 ms for nothing. On loopback that caps a single sender at
  a few hundred instances/s. Here the acceptor blocks on its queue, and the
  DUL thread blocks in select() on the socket and a wake-up socket that is
  poked whenever a PDU is queued for sending: no polling, no idle CPU.
* TLS handshakes run in each connection's thread, with a timeout, not in the
  accept loop, where one silent client would hold up every other sender.
* C-STORE responses are encoded directly: pynetdicom builds and encodes a pydicom
  dataset per reply, ~0.5 ms per image here.
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import select
import socket
import ssl
import struct
import time
from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from node.receiver.part10 import pad_text, pad_uid

log = logging.getLogger(__name__)

# How long the acceptor waits on its DIMSE queue, and the DUL thread in select(), before
# they look at release/abort/timers again. Work wakes them at once; this only bounds idling.
_IDLE_WAIT_S = 0.005

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class SenderGate:
    """Which (calling AE title, address) pairs may associate. No rules = everyone."""

    rules: tuple[tuple[str, tuple[Network, ...]], ...]

    @classmethod
    def from_rules(cls, rules: Sequence[tuple[str, Sequence[Network]]]) -> SenderGate:
        return cls(tuple((ae, tuple(nets)) for ae, nets in rules))

    def permits(self, calling_ae: str, host: str) -> bool:
        if not self.rules:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(
            calling_ae == ae and any(address in net for net in nets if net.version == address.version)
            for ae, nets in self.rules
        )

    def refusal(self, calling_ae: str, host: str) -> str | None:
        """None when the caller may associate, else why not (the audit detail; no patient data)."""
        if self.permits(calling_ae, host):
            return None
        if any(calling_ae == ae for ae, _ in self.rules):
            return f"host {host} not allowed for calling AE title {calling_ae!r}"
        return f"unknown calling AE title {calling_ae!r}"


# Why an association was refused, set on the association before EVT_REJECTED fires, for the audit
# (``ReceiverHandlers.on_rejected``); pynetdicom's own rejections leave it unset and are told by their
# (result, source, diagnostic).
REFUSAL_ATTRIBUTE = "uad_refusal"
SHUTTING_DOWN = "node shutting down"


class _GatedACSE(ACSE):
    """ACSE that rejects callers the gate does not permit (reason: calling AE not recognised), and
    everyone once the server is stopping (transient: the sender retries elsewhere or later)."""

    def __init__(self, assoc: Association, gate: SenderGate) -> None:
        super().__init__(assoc)
        self._gate = gate

    def _negotiate_as_acceptor(self) -> None:
        primitive = self.requestor.primitive
        calling = (primitive.calling_ae_title if primitive else "").strip()
        host = str(self.requestor.address)
        if getattr(getattr(self.assoc, "_server", None), "stopping", False):
            # rejected-transient, service-user, no-reason-given (PS3.8 9.3.4)
            self._reject(calling, SHUTTING_DOWN, (0x02, 0x01, 0x01))
            return
        if (reason := self._gate.refusal(calling, host)) is not None:
            # rejected-permanent, service-user, calling-AE-title-not-recognized (PS3.8 9.3.4)
            self._reject(calling, reason, (0x01, 0x01, 0x03))
            return
        super()._negotiate_as_acceptor()

    def _reject(self, calling: str, reason: str, rsd: tuple[int, int, int]) -> None:
        self.requestor.ae_title = calling
        setattr(self.assoc, REFUSAL_ATTRIBUTE, reason)
        self.send_reject(*rsd)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()


class _WakingDUL(DULServiceProvider):
    """pynetdicom's DUL thread, waiting in select() instead of napping between polls, and reading each
    PDU with a few recv_into() calls instead of one recv() per 4 KiB."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._run_loop_delay = 0  # the loop's own nap becomes a yield; the wait is below
        self._wake_rx, self._wake_tx = socket.socketpair()
        self._wake_rx.setblocking(False)
        self._wake_tx.setblocking(False)

    def _read_pdu_data(self) -> None:
        # pynetdicom's AssociationSocket.recv reads 4 KiB per recv() call: 130 calls for a 512x512 slice.
        # Give this association's transport a reader that takes what the socket has (same semantics).
        transport = self.socket
        if transport is not None and "recv" not in vars(transport):
            transport.recv = partial(_recv_available, transport)  # type: ignore[method-assign]
        super()._read_pdu_data()

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        try:
            self._wake_tx.send(b"\0")
        except OSError:
            pass  # buffer full (already awake) or the thread has ended

    def _process_recv_primitive(self) -> bool:
        # Called at the top of every loop pass: when nothing is queued either way, wait here.
        if self.to_provider_queue.empty() and self.event_queue.empty() and not self._kill_thread:
            self._wait_for_io()
        return super()._process_recv_primitive()

    def _wait_for_io(self) -> None:
        transport = self.socket
        sock = transport.socket if transport is not None and transport._is_connected else None
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # TLS may hold decrypted bytes that select() cannot see
        try:
            readable, _, _ = select.select([self._wake_rx] + ([sock] if sock else []), [], [], _IDLE_WAIT_S)
            if self._wake_rx in readable:
                self._wake_rx.recv(4096)
        except (OSError, ValueError):
            return  # socket closed under us: the regular transport check reports it

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            self._wake_rx.close()
            self._wake_tx.close()
            if not self.assoc.is_established:
                # The peer left before (or while) negotiating, e.g. a TCP port probe. pynetdicom's
                # acceptor would wait out the ACSE timeout for an A-ASSOCIATE-RQ that cannot come,
                # holding one of max_associations; end that wait now.
                self.to_user_queue.put(None)


# How long a timed-out association's A-ABORT may take to go out before its socket is shut down.
_ABORT_GRACE_S = 1.0

# Bytes allocated ahead of their arrival: a peer's PDU length is not trusted further than this.
_RECV_PREALLOCATE = 4 << 20


def _recv_available(transport: AssociationSocket, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` in fewer system calls and copies (recv_into a buffer that takes what the
    socket has): read until ``nr_bytes`` have arrived, or return what arrived before the peer closed the
    connection; socket errors and timeouts propagate as there."""
    sock = transport.socket
    assert sock is not None
    data = bytearray(min(nr_bytes, _RECV_PREALLOCATE))
    received = 0
    while received < nr_bytes:
        if received == len(data):  # more than preallocated: grow as the data arrives
            data.extend(bytes(min(nr_bytes - received, len(data))))
        view = memoryview(data)[received:]
        try:
            count = sock.recv_into(view)
        finally:
            view.release()
        if not count:
            break
        received += count
    del data[received:]
    return data


class _DirectStoreReplies(DIMSEServiceProvider):
    """Sends C-STORE responses encoded by ``encode_store_reply`` rather than through pydicom
    datasets, which cost about as much as the rest of the reply path together."""

    def send_msg(self, primitive: Any, context_id: int) -> None:
        command = encode_store_reply(primitive)
        if command is None:
            return super().send_msg(primitive, context_id)
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))  # last command fragment
        self.dul.send_pdu(pdata)


def encode_store_reply(primitive: Any) -> bytes | None:
    """The command set of a C-STORE-RSP (PS3.7 9.3.1.2) in implicit VR little endian, or None for
    anything else (other messages, replies naming an offending element: pynetdicom's way)."""
    if not isinstance(primitive, C_STORE) or primitive.MessageIDBeingRespondedTo is None:
        return None
    if primitive.OffendingElement is not None or not primitive.AffectedSOPClassUID:
        return None
    elements = [
        _command_element(0x0002, pad_uid(primitive.AffectedSOPClassUID)),
        _command_element(0x0100, struct.pack("<H", 0x8001)),  # C-STORE-RSP
        _command_element(0x0120, struct.pack("<H", primitive.MessageIDBeingRespondedTo)),
        _command_element(0x0800, struct.pack("<H", 0x0101)),  # no data set follows
        _command_element(0x0900, struct.pack("<H", primitive.Status)),
    ]
    if primitive.ErrorComment:
        elements.append(_command_element(0x0902, pad_text(primitive.ErrorComment)))
    if primitive.AffectedSOPInstanceUID:
        elements.append(_command_element(0x1000, pad_uid(primitive.AffectedSOPInstanceUID)))
    body = b"".join(elements)
    return _command_element(0x0000, struct.pack("<I", len(body))) + body


def _command_element(element: int, value: bytes) -> bytes:
    """Group 0000 is always implicit VR little endian: tag, 32-bit length, value."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


class NodeAssociation(Association):
    """An acceptor association with the sender gate and the low-latency loops."""

    def __init__(self, ae: Any, gate: SenderGate) -> None:
        super().__init__(ae, MODE_ACCEPTOR)
        self.acse = _GatedACSE(self, gate)
        self.dul = _WakingDUL(self)
        self.dimse = _DirectStoreReplies(self)
        # pynetdicom set the AE's timeouts on the layers just replaced: set them again on the new ones, or its
        # defaults (30 s ARTIM, 60 s idle) would hold a silent sender's slot whatever the config says.
        self.acse_timeout, self.network_timeout = ae.acse_timeout, ae.network_timeout

    def _run_reactor(self) -> None:
        """pynetdicom's acceptor loop (MIT licence), with the fixed 1 ms sleep replaced by a
        blocking wait on the DIMSE message queue."""
        self._is_paused = False
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            try:
                context_id, msg = self.dimse.msg_queue.get(timeout=_IDLE_WAIT_S)
            except queue.Empty:
                context_id, msg = None, None
            if msg:
                self._serve_request(msg, int(context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # lets EVT_ACSE_RECV fire
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                log.error("network timeout: aborting association with %s", self.requestor.ae_title)
                self._abort_stalled()
                return

    def _abort_stalled(self) -> None:
        """A-ABORT a peer gone silent. pynetdicom's blocking abort waits for the DUL thread, which a peer that
        stopped half way through a PDU keeps inside recv() forever: give the A-ABORT a moment to go out, then
        shut the socket down under it (the recv returns, the thread ends) and end the association."""
        self.abort(block=False)  # queues the A-ABORT and reports EVT_ABORTED
        deadline = time.monotonic() + _ABORT_GRACE_S
        while self.dul.is_alive() and not self.dul.stop_dul() and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.dul.socket is not None:
            self.dul.socket._shutdown_socket()
        self.kill()


class NodeServer(ThreadedAssociationServer):
    """Accepts connections without the TLS handshake, which pynetdicom does in its single accept
    thread with no timeout (one silent client would stall everyone); the handshake runs in the
    connection's own thread instead (``NodeRequestHandler``). ``ssl_context`` is read per connection,
    so replacing it (SIGHUP) applies to the next one; ``stopping`` makes new associations be refused."""

    stopping = False
    reuse_port = False  # SO_REUSEPORT before bind: see SharedPortNodeServer

    def server_bind(self) -> None:
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        return self.socket.accept()


class SharedPortNodeServer(NodeServer):
    """A ``NodeServer`` that several processes can bind to the same address (SO_REUSEPORT, set before bind):
    the kernel spreads incoming connections over them (``[node] receiver_processes``). All of them must set it,
    so a port held by anything else still cannot be bound."""

    reuse_port = True


def tls_failure(exc: BaseException, handshake_timeout_s: float) -> str:
    """Why a TLS handshake failed, in OpenSSL's words where it has them (the audit detail)."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"client certificate rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return (exc.reason or str(exc)).replace("_", " ").lower()
    if isinstance(exc, TimeoutError):
        return f"no handshake within {handshake_timeout_s:g} s"
    return getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__


def request_handler_for(
    gate: SenderGate,
    handshake_timeout_s: float,
    on_tls_refused: Callable[[str, str], None] | None = None,
) -> type[RequestHandler]:
    """A pynetdicom request handler class whose associations are ``NodeAssociation``.

    Mirrors ``RequestHandler._create_association``, which hard-codes the class. A failed TLS
    handshake (before pynetdicom sees any association) goes to ``on_tls_refused(host, reason)``.
    """

    class NodeRequestHandler(RequestHandler):
        def handle(self) -> None:
            context = self.server.ssl_context
            if context is not None:
                try:
                    self.request.settimeout(handshake_timeout_s)
                    if not self.request.recv(1, socket.MSG_PEEK):
                        # Closed without sending a byte: a port probe (readiness check), not an association attempt.
                        log.debug("connection from %s closed before a TLS handshake", self.client_address[0])
                        self.request.close()
                        return
                    self.request = context.wrap_socket(self.request, server_side=True)
                    self.request.settimeout(None)
                except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                    self.request.close()
                    reason = f"TLS handshake failed: {tls_failure(exc, handshake_timeout_s)}"
                    if on_tls_refused is not None:
                        on_tls_refused(str(self.client_address[0]), reason)
                    else:
                        log.warning("association refused from %s: %s", self.client_address[0], reason)
                    return
            super().handle()

        def _create_association(self) -> Association:
            assoc = NodeAssociation(self.ae, gate)
            assoc._server = self.server
            assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
            assoc.set_socket(AssociationSocket(assoc, client_socket=self.request))
            assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
            assoc.acceptor.ae_title = self.server.ae_title
            assoc.acceptor.address_info = self.local
            assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
            assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
            assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)
            assoc.requestor.address_info = self.remote
            for event, handlers in self.server._handlers.items():
                if event.is_intervention and handlers:
                    assoc.bind(event, *handlers)
                elif isinstance(event, evt.NotificationEvent):
                    for handler, args in handlers:
                        assoc.bind(event, handler, args)
            return assoc

    return NodeRequestHandler
