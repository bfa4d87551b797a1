"""What the job machinery reports to whoever watches it (the HTTP interface's metrics): how long each stage
took, how each export attempt ended, and how long each model took to load.

A Protocol, so the jobs do not depend on any metrics library; ``None`` means nobody is watching.
"""

from __future__ import annotations

from typing import Protocol


class JobObserver(Protocol):
    """Called from the scheduler's threads; must be fast and not raise."""

    def stage_finished(self, stage: str, seconds: float) -> None:
        """A job left ``stage`` (queued, preprocessing, inferring, exporting) after ``seconds`` in it."""

    def export_finished(self, destination: str, outcome: str) -> None:
        """One export attempt to ``destination`` ended ``delivered``, ``retry`` or ``failed``."""

    def model_loaded(self, model: str, seconds: float) -> None:
        """The model for contrast class ``model`` was loaded (atlas included) in ``seconds``."""
