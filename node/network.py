"""Socket options shared by the node's DICOM server and client sides.

Both sides need the same tuning; keeping it here means the sender does not
depend on the receiver's handlers (or the other way round).
"""

from __future__ import annotations

import socket

from pynetdicom.events import Event as NetEvent


def enable_tcp_nodelay(sock: socket.socket) -> None:
    """Without TCP_NODELAY, Nagle plus delayed ACKs cost 50-90 ms per small instance."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def set_tcp_nodelay(event: NetEvent) -> None:
    """``EVT_CONN_OPEN`` handler: turn Nagle off on the association's socket.

    pynetdicom fires ``EVT_CONN_OPEN`` once the TCP (and TLS) connection is up and before
    any PDU is written, on the accepting and on the requesting side alike, so one handler
    covers every socket the node opens or accepts.
    """
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        enable_tcp_nodelay(sock)
