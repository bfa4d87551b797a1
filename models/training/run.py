"""``uad-node train``: healthy volumes -> cached model-grid volumes -> augmented slices -> a checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path
from typing import Any

from models.checkpoint import Checkpoint, load_checkpoint
from models.data.augment import AugmentConfig
from models.data.sampler import SliceSampler
from models.data.volumes import OFFLINE, default_cache_dir, healthy_volumes
from models.diffusion.config import ModelConfig, named_config, unconditioned
from models.training.trainer import StopAt, TrainingOptions, train


def run_training(
    data: str,
    config_name: str,
    out: Path,
    stop: StopAt,
    options: TrainingOptions,
    resume: Path | None = None,
    without_encoder: bool = False,
    contrast: str = "t1",
    cache_dir: Path | None = None,
    snapshot_every: int | None = None,
    changes: dict[str, Any] | None = None,
) -> Checkpoint:
    """Build the data and train. With ``resume``, the run's own config, options and data seed continue,
    except the options named in ``changes`` (a deliberate change of course, e.g. the learning rate:
    the continuation is then no longer what an uninterrupted run would have done)."""
    previous = load_checkpoint(resume) if resume is not None else None
    config: ModelConfig = named_config(config_name)
    if without_encoder:
        config = unconditioned(config)
    if previous is not None:
        contrast = previous.training["data"]["contrast"]
        options = dataclasses.replace(TrainingOptions.from_dict(previous.training["options"]), **(changes or {}))
    volumes = healthy_volumes(data, cache_dir or default_cache_dir())
    if previous is not None and previous.training["data"]["volumes"] != [v.name for v in volumes]:
        raise ValueError(f"{resume} was trained on other data ({previous.training['data']['source']}); resume with it")
    augment = AugmentConfig()
    sampler = SliceSampler(volumes, augment, seed=options.seed, contrast=contrast)
    description: dict[str, Any] = {
        "source": data if data == OFFLINE else str(Path(data).resolve()),
        "volumes": [v.name for v in volumes],
        "contrast": contrast,
        "augment": asdict(augment),
    }
    return train(
        config,
        sampler,
        options,
        out,
        stop,
        description,
        resume=previous,
        progress=_print_now,
        snapshot_every=snapshot_every,
    )


def _print_now(line: str) -> None:
    print(line, flush=True)  # progress must reach a log file as it happens
