"""The ``[completion]``, ``[jobs]`` and ``[retention]`` tables: when a series is complete, how jobs run
and retry, and when received images are deleted.

Kept beside the code they configure; ``node.config`` embeds them (this module does not import it, so it
repeats the section base's two settings, as ``node.selection.config`` does).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CompletionSection(_Section):
    """When a series is complete: after a quiet period with no new image (mercure's rule, and the
    Informatics Gateway's), or at the latest ``max_wait_s`` after its first image, so a sender that
    trickles images forever still gets an answer."""

    scope: Literal["series", "study"] = Field(
        "series", description="series = each series on its own quiet period; study = when the whole study is quiet"
    )
    series_quiet_s: float = Field(10.0, ge=0)
    study_quiet_s: float = Field(60.0, ge=0)
    max_wait_s: float = Field(900.0, gt=0)
    late_images: Literal["new-version", "ignore"] = Field(
        "new-version",
        description="images after a job started: new-version = analyse again once quiet, results as new series; "
        "ignore = keep the images, count them in status, no new job",
    )

    @model_validator(mode="after")
    def _ordered(self) -> CompletionSection:
        if self.study_quiet_s < self.series_quiet_s:
            raise ValueError("study_quiet_s must not be shorter than series_quiet_s")
        quiet = self.study_quiet_s if self.scope == "study" else self.series_quiet_s
        if self.max_wait_s < quiet:
            raise ValueError(f"max_wait_s ({self.max_wait_s:g}) must not be shorter than the quiet period ({quiet:g})")
        return self


class JobsSection(_Section):
    """Workers and retries. One worker holds the models once; more run analyses side by side."""

    workers: int = Field(1, ge=1, le=16)
    threads: int = Field(
        0,
        ge=0,
        le=256,
        description="CPU threads for the model; 0 = all cores. Fewer when other work shares the machine",
    )
    poll_interval_s: float = Field(1.0, gt=0, le=60, description="how often completion and due work are checked")
    worker_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="how much lower than the receiver's the CPU priority of analysis worker processes is "
        "(os.nice), so C-STORE keeps its speed while an analysis runs; 0 = the same priority",
    )
    worker_memory_mb: int = Field(
        0,
        ge=0,
        description="address-space limit of each analysis worker process in MiB (RLIMIT_AS); 0 = none. It bounds "
        "virtual memory, not resident memory: PyTorch maps far more than it touches, so leave ample headroom "
        "(a few GB with the default model); an analysis that exceeds it fails or kills its worker",
    )
    analysis_attempts: int = Field(3, ge=1, description="tries of an analysis that fails transiently (disk, memory)")
    analysis_retry_delay_s: float = Field(60.0, ge=0, description="first wait before another try; doubles each time")
    export_attempts: int = Field(10, ge=1, description="tries per destination before a job fails")
    export_first_delay_s: float = Field(10.0, ge=0)
    export_max_delay_s: float = Field(600.0, ge=0)


class RetentionSection(_Section):
    """Deleting received images some days after their results were delivered (the database keeps the record)."""

    delete_images_after_days: float = Field(0, ge=0, description="0 = never delete")
    check_interval_min: float = Field(60, gt=0)
