"""The ``[selection]`` table of the node's config file: which series are analysed, and by which model.

Kept beside the rules it configures; ``node.config`` embeds it. It does not
import ``node.config`` (that module imports this one), so it repeats the
section base's two settings.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from pydicom.uid import EnhancedMRImageStorage, MRImageStorage

from node.selection.contrast import Contrast
from node.uids import check_uids

# The T1 checkpoint the project ships (models/checkpoints/ sits beside this package, installed or not).
SHIPPED_T1_CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "checkpoints" / "default-t1.pt"

# ImageType values (any position) that mark localizers, derived images, reformats and projections.
DEFAULT_EXCLUDED_IMAGE_TYPES = ("DERIVED", "SECONDARY", "LOCALIZER", "MPR", "PROJECTION IMAGE", "REFORMATTED")


def _check_pattern(value: str) -> str:
    """A bad pattern must fail ``config check``, not the first series it meets."""
    try:
        re.compile(value, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
    return value


Pattern = Annotated[str, AfterValidator(_check_pattern)]


class SelectionSection(BaseModel):
    """Which received series are analysed, and the model for each contrast class."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modalities: list[str] = Field(default_factory=lambda: ["MR"])
    sop_classes: list[str] = Field(default_factory=lambda: [str(MRImageStorage), str(EnhancedMRImageStorage)])
    excluded_image_types: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDED_IMAGE_TYPES))
    include: list[Pattern] = Field(
        default_factory=list, description="empty = every series; otherwise one pattern must match a name"
    )
    exclude: list[Pattern] = Field(default_factory=list)
    min_slices: int = Field(20, ge=1)
    models: dict[Contrast, Path] = Field(
        default_factory=lambda: {Contrast.T1: SHIPPED_T1_CHECKPOINT}, description="contrast class -> checkpoint file"
    )

    @field_validator("modalities", "excluded_image_types")
    @classmethod
    def _code_strings(cls, values: list[str]) -> list[str]:
        """Code strings (CS) are upper case in DICOM; accept any case in the file."""
        cleaned = [value.strip().upper() for value in values]
        if any(not value for value in cleaned):
            raise ValueError("values must not be empty")
        return cleaned

    @field_validator("modalities", "sop_classes")
    @classmethod
    def _not_empty(cls, values: list[str]) -> list[str]:
        if not values:
            raise ValueError("at least one value is needed (an empty list would select nothing)")
        return values

    @field_validator("sop_classes")
    @classmethod
    def _check_uids(cls, values: list[str]) -> list[str]:
        return check_uids(values)

    @field_validator("models", mode="before")
    @classmethod
    def _check_models(cls, value: object) -> object:
        """Name the bad key in words (pydantic's own message for an enum key is cryptic)."""
        if isinstance(value, dict):
            known = [contrast.value for contrast in Contrast]
            for key, path in value.items():
                if key not in known:
                    raise ValueError(f"unknown contrast class {key!r}; the classes are {', '.join(known)}")
                if isinstance(path, str) and not path.strip():
                    raise ValueError(f"the model path for {key} is empty")
        return value
