"""What the receiver reports about each C-STORE to whoever watches it (the HTTP interface's metrics).

A Protocol, so the receiver does not depend on any metrics library; ``None`` means nobody is watching.
"""

from __future__ import annotations

from typing import Protocol


class StoreObserver(Protocol):
    """Called once per C-STORE, after the answer is decided and before it is sent; must be fast and not raise."""

    def stored(self, sop_class_uid: str, seconds: float) -> None:
        """An instance was acknowledged with Success (stored, duplicate, replaced or ignored)."""

    def refused(self, status: int, seconds: float) -> None:
        """An instance was answered with the failure ``status`` (0xA700, 0xA900, 0xC000)."""
