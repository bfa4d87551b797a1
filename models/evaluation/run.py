"""``uad-node evaluate``: a checkpoint against the baselines on held-out Colin27 with simulated lesions.

Every method goes through the same post-processing and the same threshold search on the validation
cases (models/evaluation/harness.py), so the table compares what each method's residual is worth.
The atlas-mean baseline averages the *training* brains of the evaluated model (the unaugmented
volumes of ``--data``), which is exactly the knowledge a model trained on them could have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from models.checkpoint import Checkpoint, save_checkpoint
from models.data.volumes import healthy_volumes
from models.detector import AnomalyDetector
from models.evaluation.baselines import AtlasMeanBaseline, Scorer, intensity_baseline
from models.evaluation.cases import EvaluationSet, build_evaluation_set, colin27_model_grid
from models.evaluation.harness import MethodResult, evaluate_method, results_json


@dataclass(frozen=True)
class EvaluationSize:
    validation: int = 10
    test: int = 20
    healthy: int = 2
    seed: int = 0


def evaluation_set(size: EvaluationSize, cache_dir: Path) -> EvaluationSet:
    """Colin27 (never trained on, never the atlas) on the model grid, with simulated lesions."""
    from models.atlas import load_mni152_atlas
    from models.preprocessing import Preprocessor

    volume, brain_mask = colin27_model_grid(Preprocessor(load_mni152_atlas()), cache_dir)
    return build_evaluation_set(
        volume, brain_mask, seed=size.seed, validation=size.validation, test=size.test, healthy=size.healthy
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

    ``timesteps`` replaces both diffusion models' noise ensemble (an inference-time ablation)."""
    evaluation = evaluation_set(size, cache_dir)
    training = [v.volume for v in healthy_volumes(data, cache_dir)]
    model = AnomalyDetector(checkpoint, timesteps=timesteps)
    methods: list[tuple[str, Scorer]] = [(f"cDDPM ({checkpoint.config.name}) t={_ts(model)}", model.residual)]
    if unconditioned is not None:
        plain = AnomalyDetector(unconditioned, timesteps=timesteps)
        methods.append((f"DDPM ({unconditioned.config.name}) t={_ts(plain)}", plain.residual))
    methods += [
        (f"atlas-mean ({len(training)} training brains)", AtlasMeanBaseline(training)),
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


def _ts(detector: AnomalyDetector) -> str:
    return ",".join(str(t) for t in detector.timesteps)
