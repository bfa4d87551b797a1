"""The contract between the HTTP interface and a STOW-RS receiver (``node.dicomweb.stow_rs``): the web app
hands over the request body untouched and sends back whatever reply the receiver builds."""

from __future__ import annotations

from typing import Protocol


class StowReply(Protocol):
    """What a STOW-RS store answers: HTTP status, body and its content type."""

    status: int
    body: bytes
    content_type: str


class StowReceiver(Protocol):
    """Stores the instances of one STOW-RS request (blocking: the app calls it in a worker thread). ``sender``
    names the caller where a C-STORE's calling AE title is recorded; ``host`` is its address."""

    def receive(self, body: bytes, content_type: str, sender: str, *, host: str = "") -> StowReply: ...
