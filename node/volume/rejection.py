"""The one way building a volume fails: a series that cannot be a volume, with the reason."""

from __future__ import annotations


class VolumeRejected(Exception):
    """The instances do not form one regular 3D image; ``reason`` says why, in words an admin can act on.

    Raised for bad input only (never for a bug): the caller records the reason against the
    series and moves on, so a reason must name what is wrong and where, without patient data.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
