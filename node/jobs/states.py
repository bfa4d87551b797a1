"""The job state machine.

::

    queued -> preprocessing -> inferring -> exporting -> done
       |            |              |            |
       +------------+--------------+------------+---> failed(reason) | skipped(reason) | cancelled

``preprocessing`` covers reading the series, registering it to the atlas and the quality gate, ``inferring``
the diffusion model, ``exporting`` building the DICOM objects, writing them durably and sending them. A job
interrupted in ``preprocessing`` or ``inferring`` goes back to ``queued`` (nothing durable was produced); one
interrupted in ``exporting`` resumes sending the results already on disk. A selected series that cannot be
analysed goes from ``preprocessing`` or ``inferring`` to ``exporting`` with a NOT SCREENED notice for results,
and ends ``failed`` once that is delivered.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    PREPROCESSING = "preprocessing"
    INFERRING = "inferring"
    EXPORTING = "exporting"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def analysing(self) -> bool:
        """A worker holds the job (or held it when the node stopped)."""
        return self in (JobState.PREPROCESSING, JobState.INFERRING)


_FINISHED = frozenset({JobState.DONE, JobState.FAILED, JobState.SKIPPED, JobState.CANCELLED})

# The column that records when a job entered each state (queued: ``created_at``, set once).
ENTERED_AT = {
    JobState.PREPROCESSING: "preprocessing_at",
    JobState.INFERRING: "inferring_at",
    JobState.EXPORTING: "exporting_at",
    JobState.DONE: "finished_at",
    JobState.FAILED: "finished_at",
    JobState.SKIPPED: "finished_at",
    JobState.CANCELLED: "finished_at",
}
