"""Site calibration without scans: the checkpoint's calibration record (saved, loaded, hashed, described; older
files unchanged), how many scans the quantile asks for, the Dice search above the false-positive bound, and
the rule in ``--help``.
The command on real scans is tested in tests/integration/test_calibrate.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from models.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from models.diffusion.model import DiffusionModel
from models.evaluation.calibration import best_dice_threshold, scans_needed
from models.evaluation.metrics import mean_dice_at
from models.evaluation.scoring import PreparedVolume, ScoredVolume
from node.cli import main
from tests.tiny_model import TINY

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "checkpoints" / "default-t1.pt"
RECORD = {
    "rule": "the smallest threshold at which ...",
    "max_fp_ml": 2.0,
    "quantile": 0.95,
    "scans": 12,
    "fp_ml": [0.5, 1.25],
    "lesion_cases": 0,
    "lesion_dice": None,
    "date": "2026-12-07",
    "source_checkpoint": "models/checkpoints/default-t1.pt",
    "source_hash": "ab" * 32,
    "previous_threshold": 0.44,
}


@pytest.fixture(scope="module")
def plain() -> Checkpoint:
    torch.manual_seed(0)
    return Checkpoint(config=TINY, ema_weights=DiffusionModel(TINY).state_dict(), training={}, threshold=0.44)


def test_a_calibrated_checkpoint_round_trips_and_the_record_is_part_of_its_hash(
    plain: Checkpoint, tmp_path: Path
) -> None:
    site = dataclasses.replace(plain, threshold=0.47, calibration=RECORD)
    digest = save_checkpoint(site, tmp_path / "site.pt", half=True)
    loaded = load_checkpoint(tmp_path / "site.pt")
    assert loaded.calibration == RECORD and loaded.threshold == 0.47 and loaded.content_hash == digest
    other = dataclasses.replace(site, calibration={**RECORD, "scans": 13})
    assert other.content_hash != site.content_hash  # every figure of the record is covered
    payload = torch.load(tmp_path / "site.pt", weights_only=True)
    metadata = json.loads(payload["metadata"])
    metadata["calibration"]["max_fp_ml"] = 20.0  # an edited bound is a corrupt file, not a silent change
    payload["metadata"] = json.dumps(metadata, sort_keys=True)
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="content hash mismatch"):
        load_checkpoint(tmp_path / "edited.pt")


def test_files_without_a_calibration_load_as_before_with_their_hash(plain: Checkpoint, tmp_path: Path) -> None:
    digest = save_checkpoint(plain, tmp_path / "plain.pt", half=True)
    assert "calibration" not in json.loads(torch.load(tmp_path / "plain.pt", weights_only=True)["metadata"])
    loaded = load_checkpoint(tmp_path / "plain.pt")
    assert loaded.calibration is None and loaded.content_hash == digest
    shipped = load_checkpoint(SHIPPED)  # written before calibration existed: same hash, same version
    assert shipped.calibration is None and shipped.calibration_label == "shipped"
    assert shipped.content_hash == torch.load(SHIPPED, weights_only=True)["sha256"]


def test_the_label_says_the_bound_the_scans_and_the_date(plain: Checkpoint) -> None:
    site = dataclasses.replace(plain, calibration=RECORD)
    assert site.calibration_label == "site: FP <= 2 mL on 95 % of 12 healthy scans (2026-12-07)"
    lesions = dataclasses.replace(plain, calibration={**RECORD, "lesion_cases": 8, "quantile": 0.9})
    assert (
        lesions.calibration_label
        == "site: FP <= 2 mL on 90 % of 12 healthy scans, best Dice on 8 lesion cases (2026-12-07)"
    )


@pytest.mark.parametrize(
    ("scans", "quantile", "needed"),
    [(2, 0.95, 2), (12, 0.95, 12), (20, 0.95, 19), (3, 0.5, 2), (40, 0.9, 36), (1, 0.1, 1)],
)
def test_the_quantile_counts_scans_rounding_up(scans: int, quantile: float, needed: int) -> None:
    assert scans_needed(scans, quantile) == needed


def lesion_case(seed: int) -> ScoredVolume:
    """A model-grid case: healthy scores up to 0.5, a 4x4x4 lesion scoring 0.6, inside a brain mask."""
    rng = np.random.default_rng(seed)
    brain = np.zeros((12, 16, 16), bool)
    brain[1:-1, 1:-1, 1:-1] = True
    truth = np.zeros_like(brain)
    truth[4:8, 5:9, 5:9] = True
    score = np.where(brain, rng.uniform(0, 0.5, brain.shape), 0).astype(np.float32)
    score[truth] = 0.6
    prepared = SimpleNamespace(brain_mask=brain)  # all the Dice search reads of a preprocessed volume
    return ScoredVolume(PreparedVolume("case", prepared, truth, None), score)  # type: ignore[arg-type]


@pytest.mark.parametrize(("floor", "low", "high"), [(0.3, 0.5, 0.6), (0.55, 0.55, 0.6), (0.7, 0.7, 0.7)])
def test_the_dice_search_stays_at_or_above_the_floor(floor: float, low: float, high: float) -> None:
    cases = [lesion_case(0), lesion_case(1)]
    chosen = best_dice_threshold(floor, cases)
    assert low <= chosen <= high and chosen >= floor
    dice = mean_dice_at(chosen, [c.score for c in cases], [c.volume.truth for c in cases])  # type: ignore[misc]
    assert dice == (1.0 if floor < 0.6 else 0.0)


def test_help_states_the_rule(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "threshold is the SMALLEST at which the false-positive volume" in text
    assert "at most --max-fp-ml mL on at least --quantile of the healthy scans" in text
    assert "--max-fp-ml X" in text and "--out CKPT2" in text
