"""The node's PDU reader (node/receiver/association.py ``_recv_available``): the same bytes and the same
end-of-connection behaviour as pynetdicom's ``AssociationSocket.recv``, in fewer system calls."""

from __future__ import annotations

import os
import socket
import threading
from types import SimpleNamespace

import pytest

import node.receiver.association as association
from node.receiver.association import _recv_available


def reader(sock: socket.socket) -> SimpleNamespace:
    return SimpleNamespace(socket=sock)  # what _recv_available uses of an AssociationSocket


def send_later(sock: socket.socket, data: bytes, close: bool = False) -> threading.Thread:
    def run() -> None:
        for start in range(0, len(data), 7001):  # odd pieces, so reads end mid-piece
            sock.sendall(data[start : start + 7001])
        if close:
            sock.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("preallocate", [4 << 20, 1000])
def test_reads_exactly_the_bytes_asked_for(monkeypatch: pytest.MonkeyPatch, preallocate: int) -> None:
    monkeypatch.setattr(association, "_RECV_PREALLOCATE", preallocate)
    a, b = socket.socketpair()
    with a, b:
        payload = os.urandom(300_000)
        thread = send_later(a, payload + b"NEXT")
        assert bytes(_recv_available(reader(b), 6)) == payload[:6]
        assert bytes(_recv_available(reader(b), len(payload) - 6)) == payload[6:]
        assert bytes(_recv_available(reader(b), 4)) == b"NEXT"
        assert _recv_available(reader(b), 0) == bytearray()
        thread.join()


def test_returns_what_arrived_when_the_peer_closes() -> None:
    a, b = socket.socketpair()
    with a, b:
        thread = send_later(a, b"x" * 20_000, close=True)
        assert bytes(_recv_available(reader(b), 50_000)) == b"x" * 20_000
        thread.join()


def test_timeouts_propagate() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(0.05)
        with pytest.raises(TimeoutError):
            _recv_available(reader(b), 10)
