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
from models.preprocessing import PREPROCESSING_VERSION
from models.training.trainer import InitFrom, StopAt, TrainingOptions, train

# Fine-tuning's default Adam rate: a tenth of the 2e-4 the shipped model was trained with (a fifth of the
# from-scratch default). The weights start near a good solution, and Adam's step is about the learning rate
# per weight whatever the gradient's size, at full size from its first (fresh) step; at the from-scratch
# rate the first few hundred steps would move the weights as far as early training does and wash out what
# the source model learned before a site's few scans could replace it. A small rate keeps the model near
# its source while it adapts to the site's scanners (and the campaign saw loss spikes at 2e-4 itself).
FINE_TUNING_LEARNING_RATE = 2e-5


def run_training(
    data: str,
    config_name: str | None,
    out: Path,
    stop: StopAt,
    options: TrainingOptions,
    resume: Path | None = None,
    without_encoder: bool = False,
    contrast: str | None = None,
    cache_dir: Path | None = None,
    snapshot_every: int | None = None,
    changes: dict[str, Any] | None = None,
    init: Path | None = None,
) -> Checkpoint:
    """Build the data and train. ``config_name`` and ``contrast`` None: "default" and "t1".

    With ``resume``, the run's own config, options and data seed continue, except the options named in
    ``changes`` (a deliberate change of course, e.g. the learning rate: the continuation is then no longer
    what an uninterrupted run would have done). With ``init``, a new run fine-tunes that checkpoint's model
    on ``data``: its config (a different ``config_name`` or ``without_encoder`` is an error rather than
    silently another model) and its contrast unless ``contrast`` names another (a transfer: the weights of a
    T1 model start a T2 or FLAIR one), a fresh optimiser and step 0, and the learning rate
    ``FINE_TUNING_LEARNING_RATE`` unless ``changes`` names one. The source's threshold is not carried
    over: fine-tuning changes the scores, so the result must be evaluated again before the node uses it.
    """
    if init is not None and resume is not None:
        raise ValueError("--init starts a new run from a trained model, --resume continues a run: give one")
    previous = load_checkpoint(resume) if resume is not None else None
    start: InitFrom | None = None
    if init is not None:
        start = InitFrom(str(init), load_checkpoint(init))
        config = _fine_tuned_config(start, config_name, without_encoder)
        contrast = _fine_tuned_contrast(start, contrast)
        if "learning_rate" not in (changes or {}):
            options = dataclasses.replace(options, learning_rate=FINE_TUNING_LEARNING_RATE)
    elif previous is not None:
        config = previous.config
        contrast = previous.training["data"]["contrast"]
        options = dataclasses.replace(TrainingOptions.from_dict(previous.training["options"]), **(changes or {}))
    else:
        config = named_config(config_name or "default")
        if without_encoder:
            config = unconditioned(config)
    contrast = contrast or "t1"
    # New runs preprocess with the current version; a run resumed or a model fine-tuned keeps its own.
    source = previous or (start.checkpoint if start is not None else None)
    version = source.preprocessing_version if source is not None else PREPROCESSING_VERSION
    volumes = healthy_volumes(data, cache_dir or default_cache_dir(), contrast, version)
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
    if start is not None:
        record = start.record()
        steps = "?" if record["steps"] is None else record["steps"]
        _print_now(
            f"fine-tuning {init} ({config.name}, {contrast}, {steps} steps, sha256 {record['content_hash'][:12]}) "
            f"on {len(volumes)} volumes at learning rate {options.learning_rate:g}"
        )
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
        init=start,
        preprocessing_version=version,
    )


def _fine_tuned_config(start: InitFrom, config_name: str | None, without_encoder: bool) -> ModelConfig:
    """The source's own config: its weights fit no other. A different one asked for is refused, not ignored."""
    config, path = start.checkpoint.config, start.source
    if config_name is not None and config_name != config.name:
        raise ValueError(f"{path} is a {config.name!r} model; --init fine-tunes it as it is (leave out --config)")
    if without_encoder and config.encoder is not None:
        raise ValueError(f"{path} is a conditioned model; --init fine-tunes it as it is (leave out --unconditioned)")
    return config


def _fine_tuned_contrast(start: InitFrom, contrast: str | None) -> str:
    """The source's contrast unless another is named: anatomy is shared across contrasts, so a model of one
    is a better start for another than random weights (the campaign's T2 and FLAIR models start this way)."""
    own = start.checkpoint.contrast
    if contrast is not None and contrast != own:
        _print_now(f"transfer: the {own} model {start.source} starts a {contrast} model")
        return contrast
    return own


def _print_now(line: str) -> None:
    print(line, flush=True)  # progress must reach a log file as it happens
