"""``uad-node evaluate``: a checkpoint against the baselines on held-out Colin27 with simulated lesions.

Every method goes through the same post-processing and the same threshold search on the validation
cases (models/evaluation/harness.py), so the table compares what each method's residual is worth.
The checkpoint decides the evaluation set: Colin27 in its contrast, every case scaled with its preprocessing
version (models/evaluation/cases.py). The atlas-mean baseline averages the *training* brains of the evaluated
model (the unaugmented volumes of ``--data``; models/evaluation/baselines.py), which is exactly the knowledge a
model trained on them could have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from models.checkpoint import Checkpoint, save_checkpoint
from models.detector import AnomalyDetector
from models.evaluation.baselines import Scorer, intensity_baseline, training_atlas_mean
from models.evaluation.cases import EvaluationSet, build_evaluation_set, evaluation_brain
from models.evaluation.harness import MethodResult, evaluate_method, results_json
from models.preprocessing import ModelGridSpec


@dataclass(frozen=True)
class EvaluationSize:
    validation: int = 10
    test: int = 20
    healthy: int = 2
    seed: int = 0


def evaluation_set(
    size: EvaluationSize, cache_dir: Path, *, contrast: str, version: str, spec: ModelGridSpec | None = None
) -> EvaluationSet:
    """Colin27 (never trained on, never the atlas) on the model grid in ``contrast``, with simulated lesions,
    scaled by preprocessing ``version``: what a model of that contrast and version is evaluated on."""
    from models.atlas import load_mni152_atlas
    from models.preprocessing import Preprocessor

    brain = evaluation_brain(Preprocessor(load_mni152_atlas(), spec, contrast="t1"), cache_dir, contrast)
    return build_evaluation_set(
        brain.volume,
        brain.brain_mask,
        seed=size.seed,
        validation=size.validation,
        test=size.test,
        healthy=size.healthy,
        contrast=contrast,
        version=version,
    )


def checkpoint_evaluation_set(checkpoint: Checkpoint, size: EvaluationSize, cache_dir: Path) -> EvaluationSet:
    """The evaluation set ``checkpoint`` decides: its contrast, its preprocessing version, its grid."""
    return evaluation_set(
        size,
        cache_dir,
        contrast=checkpoint.contrast,
        version=checkpoint.preprocessing_version,
        spec=checkpoint.grid_spec,
    )


def run_evaluation(
    checkpoint: Checkpoint,
    data: str,
    cache_dir: Path,
    size: EvaluationSize,
    unconditioned: Checkpoint | None = None,
    progress: Callable[[str], None] = print,
    timesteps: Sequence[int] | None = None,
) -> list[MethodResult]:
    """The model, the unconditioned DDPM (when given), atlas-mean and intensity baselines, in that order.

    ``timesteps`` replaces both diffusion models' noise ensemble (an inference-time ablation). The set is
    the one ``checkpoint`` decides; ``unconditioned`` must share its contrast, preprocessing version and grid
    (ValueError otherwise), or it would be judged on cases scaled for another model."""
    if unconditioned is not None:
        _check_comparable(checkpoint, unconditioned)
    evaluation = checkpoint_evaluation_set(checkpoint, size, cache_dir)
    atlas_name, atlas_mean = training_atlas_mean(checkpoint, data, cache_dir)
    model = AnomalyDetector(checkpoint, timesteps=timesteps)
    methods: list[tuple[str, Scorer]] = [(f"cDDPM ({checkpoint.config.name}) t={_ts(model)}", model.residual)]
    if unconditioned is not None:
        plain = AnomalyDetector(unconditioned, timesteps=timesteps)
        methods.append((f"DDPM ({unconditioned.config.name}) t={_ts(plain)}", plain.residual))
    methods += [
        (atlas_name, atlas_mean),
        ("intensity", intensity_baseline),
    ]
    results = []
    for name, scorer in methods:
        results.append(evaluate_method(name, scorer, evaluation))
        progress(f"{name}: Dice {results[-1].dice:.3f}, AUPRC {results[-1].auprc:.3f}")
    return results


def ship(
    checkpoint: Checkpoint,
    results: list[MethodResult],
    out: Path,
    command: str,
    timesteps: Sequence[int] | None = None,
) -> str:
    """The deployable file: fp16 EMA weights, no training state, the model's validation-tuned threshold,
    the noise ensemble it was evaluated with and the evaluation itself. Returns the content hash."""
    config = checkpoint.config
    if timesteps is not None:
        config = dataclasses.replace(config, ensemble_timesteps=tuple(timesteps))
    shipped = Checkpoint(
        config=config,
        ema_weights=checkpoint.ema_weights,
        training=checkpoint.training,
        threshold=float(results[0].threshold),
        evaluation={"command": command, **results_json(results)},
        preprocessing_version=checkpoint.preprocessing_version,
        grid_spec=checkpoint.grid_spec,
    )
    return save_checkpoint(shipped, out, half=True)


def _check_comparable(checkpoint: Checkpoint, other: Checkpoint) -> None:
    mine = (checkpoint.contrast, checkpoint.preprocessing_version, checkpoint.grid_spec)
    theirs = (other.contrast, other.preprocessing_version, other.grid_spec)
    if mine != theirs:
        raise ValueError(
            f"the unconditioned model (contrast, preprocessing version, grid) {theirs} differs from the model's "
            f"{mine}: they would not be evaluated on the same cases"
        )


def _ts(detector: AnomalyDetector) -> str:
    return ",".join(str(t) for t in detector.timesteps)
