"""The checkpoint the project ships: it loads, it is what the model card says, and it finds a lesion."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.anomaly_map import eroded_brain_mask
from models.checkpoint import load_checkpoint
from models.detector import AnomalyDetector
from models.evaluation import simulate_lesion
from models.preprocessing import PREPROCESSING_VERSION

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "checkpoints" / "default-t1.pt"


def test_shipped_checkpoint_loads_with_its_threshold_and_evaluation() -> None:
    checkpoint = load_checkpoint(SHIPPED)
    assert checkpoint.config.name == "default" and checkpoint.config.encoder is not None
    assert checkpoint.preprocessing_version == PREPROCESSING_VERSION
    assert checkpoint.state is None and checkpoint.threshold is not None and checkpoint.threshold > 0
    assert checkpoint.evaluation is not None and "uad-node evaluate" in checkpoint.evaluation["command"]
    assert SHIPPED.stat().st_size <= 20 * 2**20


def test_shipped_checkpoint_scores_a_dark_lesion_above_healthy_tissue(colin: tuple[np.ndarray, np.ndarray]) -> None:
    volume, brain = colin
    lesion = simulate_lesion(volume, brain, "tumour", "dark", np.random.default_rng(3))
    result = AnomalyDetector.from_file(SHIPPED).analyse(lesion.image, brain)
    healthy = eroded_brain_mask(brain) & ~lesion.mask
    inside, outside = result.score[lesion.mask].mean(), result.score[healthy].mean()
    print(f"mean score inside the lesion {inside:.3f}, healthy tissue {outside:.3f}")
    assert inside > 1.25 * outside  # the first checkpoint measured 0.157 vs 0.111
