"""Checkpoint files: a model's weights with everything needed to trust and use them.

A checkpoint carries its model configuration, the preprocessing version and model grid it was
trained on (a model fed a differently preprocessed volume gives meaningless maps, so it is always
preprocessed with its own version, and a version this code no longer has is refused), a description of
its training data and run, the calibrated anomaly threshold (for a
site-calibrated file also the rule and figures that set it), the EMA weights used for inference and,
for a run that can be resumed, the full training state. A SHA-256 over the metadata and every tensor
is stored alongside and checked on load, so a truncated or edited file is an error rather than a
silently wrong model; the hash is also the model's version in the DICOM objects the node writes.

Files are written with ``torch.save`` and read with ``weights_only=True``: only tensors and plain
containers are unpickled, never code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from models.diffusion.config import ModelConfig
from models.preprocessing import PREPROCESSING_VERSION, SUPPORTED_VERSIONS, ModelGridSpec, Preprocessor

if TYPE_CHECKING:
    from models.atlas import Atlas

FORMAT = "uad-node-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, corrupt, or made for other preprocessing."""


@dataclass(frozen=True)
class TrainingState:
    """What exact resumption needs besides the EMA weights. The data order and the noise of every step
    are pure functions of (seed, step), so the step *is* the random state."""

    step: int
    weights: dict[str, torch.Tensor]  # the raw (non-EMA) weights the optimiser updates
    optimizer: dict[str, Any]
    seconds: float  # training wall time so far


@dataclass(frozen=True)
class Checkpoint:
    config: ModelConfig
    ema_weights: dict[str, torch.Tensor]
    training: dict[str, Any]  # data description, hyper-parameters, steps, wall time, hardware
    threshold: float | None = None  # anomaly-score threshold tuned on a validation split (``uad-node evaluate``)
    evaluation: dict[str, Any] | None = None  # the evaluation that set the threshold, for the model card
    preprocessing_version: str = PREPROCESSING_VERSION
    grid_spec: ModelGridSpec = field(default_factory=ModelGridSpec)
    state: TrainingState | None = None  # present only in checkpoints that can be resumed
    # ``uad-node calibrate``: the site rule that set ``threshold`` and its figures (models/evaluation/calibration.py)
    calibration: dict[str, Any] | None = None

    @property
    def content_hash(self) -> str:
        return _content_hash(self._metadata(), self.ema_weights)

    @property
    def contrast(self) -> str:
        """The contrast the model was trained on (t1, t2, flair): what it can judge. T1 when unrecorded."""
        return str(self.training.get("data", {}).get("contrast", "t1"))

    def preprocessor(self, atlas: Atlas) -> Preprocessor:
        """The preprocessing this model was trained with: its grid, its contrast's registration template and
        its preprocessing version (a version-1 model keeps its clipping intensity scaling)."""
        return Preprocessor(atlas, self.grid_spec, contrast=self.contrast, version=self.preprocessing_version)

    @property
    def calibration_label(self) -> str:
        """Where the threshold comes from, in one short line for report.json and the summary image: "shipped"
        (the threshold the checkpoint came with) or the site calibration's bound, scans and date."""
        c = self.calibration
        if not c:
            return "shipped"
        label = f"site: FP <= {c['max_fp_ml']:g} mL on {100 * c['quantile']:g} % of {c['scans']} healthy scans"
        if c.get("lesion_cases"):
            label += f", best Dice on {c['lesion_cases']} lesion cases"
        return f"{label} ({c['date']})"

    def _metadata(self) -> dict[str, Any]:
        metadata = {
            "config": self.config.to_dict(),
            "training": self.training,
            "threshold": self.threshold,
            "evaluation": self.evaluation,
            "preprocessing_version": self.preprocessing_version,
            "grid_spec": dataclasses.asdict(self.grid_spec),
        }
        if self.calibration is not None:  # absent rather than null: files from before it keep their hash
            metadata["calibration"] = self.calibration
        return metadata


def save_checkpoint(checkpoint: Checkpoint, path: Path, half: bool = False) -> str:
    """Write atomically (temp file, fsync, rename) so a crash mid-save leaves the previous file intact.

    ``half`` stores the EMA weights as float16 (the shipped files), which halves the size; loading
    casts them back to float32. Returns the content hash.
    """
    weights = {
        name: tensor.detach().to("cpu", torch.float16 if half and tensor.is_floating_point() else tensor.dtype)
        for name, tensor in checkpoint.ema_weights.items()
    }
    metadata = checkpoint._metadata()
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "metadata": json.dumps(metadata, sort_keys=True),
        "ema_weights": weights,
        "sha256": _content_hash(metadata, weights),
    }
    if checkpoint.state is not None:
        payload["state"] = {
            "step": checkpoint.state.step,
            "weights": {k: v.detach().cpu() for k, v in checkpoint.state.weights.items()},
            "optimizer": checkpoint.state.optimizer,
            "seconds": checkpoint.state.seconds,
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return payload["sha256"]


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and verify a checkpoint; CheckpointError with one line saying what is wrong."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a uad-node checkpoint")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {payload.get('format_version')}, this version reads {FORMAT_VERSION}"
        )
    try:
        metadata = json.loads(payload["metadata"])
        weights = payload["ema_weights"]
        stored_hash = payload["sha256"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: checkpoint is incomplete ({exc})") from exc
    if _content_hash(metadata, weights) != stored_hash:
        raise CheckpointError(f"{path}: checkpoint is corrupt (content hash mismatch)")
    if metadata["preprocessing_version"] not in SUPPORTED_VERSIONS:
        raise CheckpointError(
            f"{path}: trained with preprocessing version {metadata['preprocessing_version']}, this node "
            f"preprocesses with versions {', '.join(SUPPORTED_VERSIONS)}; retrain or use a matching release"
        )
    grid_spec = ModelGridSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in metadata["grid_spec"].items()})
    try:
        config = ModelConfig.from_dict(metadata["config"])
    except ValueError as exc:
        raise CheckpointError(f"{path}: model configuration not understood ({exc})") from exc
    state = None
    if "state" in payload:
        raw = payload["state"]
        state = TrainingState(
            step=raw["step"], weights=raw["weights"], optimizer=raw["optimizer"], seconds=raw["seconds"]
        )
    return Checkpoint(
        config=config,
        ema_weights=weights,  # as stored (float16 in shipped files); load_state_dict casts to the model's dtype
        training=metadata["training"],
        threshold=metadata["threshold"],
        evaluation=metadata["evaluation"],
        preprocessing_version=metadata["preprocessing_version"],
        grid_spec=grid_spec,
        state=state,
        calibration=metadata.get("calibration"),
    )


def _content_hash(metadata: dict[str, Any], weights: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
