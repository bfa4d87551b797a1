"""``uad-node calibrate`` as a site runs it: healthy scans in, a checkpoint with the site threshold out, and the node
naming that calibration in report.json.

What two calibration scans can show, and what they cannot: the rule (false positives at most X mL on at least
95 % of the healthy scans, the smallest such threshold) is checked exactly on the calibration scans, and so is
its minimality (one float32 step lower breaks it). Whether the bound then holds for 95 % of a site's *future*
scans is a statistical claim that needs tens of scans; here one held-out scan (another seed: another pose and
gain of the same brain), analysed by ``uad-node analyze``, only shows that its false-positive volume is finite
and of the same order as the bound.

The model is the fast untrained one (``tests.tiny_model``): its figures mean nothing, but the rule works on the
distribution of its scores all the same. Those top out at exactly 0.5 on a few hundred voxels (about 4 mL), so
the bound is set above that step, where FP(t) moves smoothly. Registration dominates the cost (~13 s a scan on a
busy machine), so this module registers each image once (``memoised_preprocessing``); the command runs
in-process (``node.cli.main``) to share that, and the node runs as a subprocess.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from models.atlas import load_mni152_atlas
from models.checkpoint import load_checkpoint
from models.detector import AnomalyDetector
from models.evaluation.calibration import false_positive_ml, scans_needed, smallest_threshold
from models.evaluation.datasets import find_dataset, find_healthy, load_case
from models.evaluation.metrics import mean_dice_at
from models.evaluation.scoring import ScoredVolume, prepare_volume, score_volume
from models.preprocessing import Preprocessed, Preprocessor
from node.cli import main
from tests.eval_datasets import write_healthy, write_pairs
from tests.tiny_model import write_fast_checkpoint

pytestmark = pytest.mark.timeout(600)

MAX_FP_ML = 8.0
QUANTILE = 0.95
RECORD_KEYS = {
    "rule",
    "max_fp_ml",
    "quantile",
    "scans",
    "fp_ml",
    "lesion_cases",
    "lesion_dice",
    "date",
    "source_checkpoint",
    "source_hash",
    "previous_threshold",
}


@pytest.fixture(scope="module", autouse=True)
def memoised_preprocessing() -> Iterator[None]:
    """Register each distinct image once in this module (the command's path is otherwise unchanged)."""
    original = Preprocessor.__call__
    done: dict[str, Preprocessed] = {}

    def once(self: Preprocessor, image: sitk.Image) -> Preprocessed:
        key = hashlib.sha256(sitk.GetArrayViewFromImage(image).tobytes())
        key.update(repr((image.GetSpacing(), image.GetOrigin(), image.GetDirection())).encode())
        if key.hexdigest() not in done:
            done[key.hexdigest()] = original(self, image)
        return done[key.hexdigest()]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Preprocessor, "__call__", once)
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two healthy calibration scans and a corrupt file, one lesion case, and one held-out DICOM series."""
    root = tmp_path_factory.mktemp("calibrate")
    healthy = write_healthy(root / "healthy", 2, skull=False, seed=0)
    (healthy / "zz-corrupt.nii.gz").write_bytes(b"this is not a NIfTI file")
    return {
        "checkpoint": write_fast_checkpoint(root / "fast.pt"),
        "healthy": healthy,
        "lesions": write_pairs(root / "lesions", 1, skull=False, seed=0),
        "held_out": write_healthy(root / "held-out", 1, skull=False, seed=1, dicom=True),
        "root": root,
    }


@pytest.fixture(scope="module")
def scored(data: dict[str, Path]) -> list[ScoredVolume]:
    """The readable calibration scans through the model, in this process."""
    checkpoint = load_checkpoint(data["checkpoint"])
    preprocessor = checkpoint.preprocessor(load_mni152_atlas())
    detector = AnomalyDetector(checkpoint)
    cases = [case for case in find_healthy(data["healthy"]) if not case.id.startswith("zz-")]
    return [score_volume(detector.residual, prepare_volume(preprocessor, load_case(c)[0], None, c.id)) for c in cases]


def calibrate(*args: str) -> tuple[int, str, str]:
    """``uad-node calibrate ARGS --threads 1`` in this process: (exit code, stdout, stderr). The thread counts it
    sets are put back, so later tests in this process run as before."""
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["calibrate", *args, "--threads", "1"])
    finally:
        torch.set_num_threads(threads[0])
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads[1])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def calibrated(data: dict[str, Path]) -> tuple[Path, str, str]:
    out = data["root"] / "site.pt"
    code, stdout, stderr = calibrate(
        "--checkpoint", str(data["checkpoint"]), "--healthy", str(data["healthy"]),
        "--max-fp-ml", str(MAX_FP_ML), "--out", str(out),
    )  # fmt: skip
    assert code == 0, stderr
    return out, stdout, stderr


def fp_within(scans: list[ScoredVolume], threshold: float) -> int:
    return sum(false_positive_ml(s, threshold) <= MAX_FP_ML for s in scans)


def test_the_threshold_is_the_smallest_that_bounds_the_calibration_scans(
    calibrated: tuple[Path, str, str], scored: list[ScoredVolume]
) -> None:
    checkpoint = load_checkpoint(calibrated[0])
    threshold = checkpoint.threshold
    assert threshold is not None and threshold == smallest_threshold(scored, MAX_FP_ML, QUANTILE)
    needed = scans_needed(len(scored), QUANTILE)
    assert needed == 2  # 95 % of two scans: both
    assert fp_within(scored, threshold) >= needed
    lower = float(np.nextafter(np.float32(threshold), np.float32(0)))
    assert fp_within(scored, lower) < needed  # one float32 step lower breaks the bound
    recorded = checkpoint.calibration["fp_ml"]  # type: ignore[index]
    assert recorded == pytest.approx([false_positive_ml(s, threshold) for s in scored], abs=1e-4)
    assert 0 < max(recorded) <= MAX_FP_ML  # the bound binds: the model finds a few mL on healthy brains


def test_the_calibrated_checkpoint_keeps_the_model_and_records_the_calibration(
    calibrated: tuple[Path, str, str], data: dict[str, Path]
) -> None:
    source, site = load_checkpoint(data["checkpoint"]), load_checkpoint(calibrated[0])
    record = site.calibration
    assert record is not None and set(record) == RECORD_KEYS
    assert (record["max_fp_ml"], record["quantile"], record["scans"]) == (MAX_FP_ML, QUANTILE, 2)
    assert (record["lesion_cases"], record["lesion_dice"]) == (0, None)
    assert record["date"] == datetime.date.today().isoformat()
    assert record["source_checkpoint"] == str(data["checkpoint"])
    assert (record["source_hash"], record["previous_threshold"]) == (source.content_hash, source.threshold)
    assert record["rule"].startswith("the smallest threshold at which the false-positive volume")
    assert "at most 8 mL on at least 95 % of the 2 healthy scans" in record["rule"]
    assert site.content_hash != source.content_hash  # its own version in the DICOM objects
    assert site.config == source.config and site.training == source.training and site.state is None
    assert site.ema_weights.keys() == source.ema_weights.keys()
    assert all(w.dtype == source.ema_weights[k].dtype for k, w in site.ema_weights.items())  # fp16 as shipped
    assert all(np.array_equal(w.numpy(), source.ema_weights[k].numpy()) for k, w in site.ema_weights.items())
    assert site.calibration_label == f"site: FP <= 8 mL on 95 % of 2 healthy scans ({record['date']})"
    assert source.calibration is None and source.calibration_label == "shipped"


def test_the_command_prints_the_rule_the_figures_and_what_it_skipped(calibrated: tuple[Path, str, str]) -> None:
    out, stdout, stderr = calibrated
    site = load_checkpoint(out)
    assert "rule: the smallest threshold at which" in stdout
    assert f"threshold {site.threshold:.6g} (was 0.44" in stdout
    assert "2 of 2 scans within 8 mL (needed 2)" in stdout
    assert "healthy-000: " in stdout and "healthy-001: " in stdout
    assert "skipped zz-corrupt: " in stdout and "zz-corrupt.nii.gz" in stdout  # the reason names the file
    assert f"sha256 {site.content_hash[:12]}" in stdout and site.calibration_label in stdout
    assert "[3/3] healthy scan zz-corrupt: skipped" in stderr


def test_lesion_cases_pick_the_best_dice_at_or_above_the_bound(
    calibrated: tuple[Path, str, str], data: dict[str, Path], scored: list[ScoredVolume]
) -> None:
    out = data["root"] / "site-lesions.pt"
    code, stdout, stderr = calibrate(
        "--checkpoint", str(data["checkpoint"]), "--healthy", str(data["healthy"]), "--lesions", str(data["lesions"]),
        "--layout", "pairs", "--max-fp-ml", str(MAX_FP_ML), "--out", str(out),
    )  # fmt: skip
    assert code == 0, stderr
    floor, site = load_checkpoint(calibrated[0]).threshold, load_checkpoint(out)
    record = site.calibration
    assert record is not None and record["lesion_cases"] == 1 and site.threshold is not None
    assert site.threshold >= floor and fp_within(scored, site.threshold) == 2  # the bound still holds
    assert f"lesion cases: 1, mean model-grid Dice {record['lesion_dice']:.3f}" in stdout
    assert "best mean model-grid Dice on 1 lesion cases" in record["rule"]
    assert site.calibration_label.endswith(f", best Dice on 1 lesion cases ({record['date']})")
    checkpoint = load_checkpoint(data["checkpoint"])
    preprocessor = checkpoint.preprocessor(load_mni152_atlas())
    [lesion_case] = find_dataset(data["lesions"], "pairs")[1]
    image, label = load_case(lesion_case)
    case = score_volume(AnomalyDetector(checkpoint).residual, prepare_volume(preprocessor, image, label, "case"))
    assert record["lesion_dice"] == pytest.approx(mean_dice_at(site.threshold, [case.score], [case.volume.truth]))
    assert record["lesion_dice"] >= mean_dice_at(floor, [case.score], [case.volume.truth])  # type: ignore[arg-type]


def test_no_readable_scan_or_a_bad_bound_is_a_clear_error(data: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "scan.nii.gz").write_bytes(b"not an image")
    common = ["--checkpoint", str(data["checkpoint"]), "--out", str(tmp_path / "x.pt")]
    code, _, stderr = calibrate(*common, "--healthy", str(broken), "--max-fp-ml", "2")
    assert code == 2 and "cannot calibrate: " in stderr and "none of the 1 healthy scans could be read" in stderr
    assert "scan.nii.gz" in stderr
    code, _, stderr = calibrate(*common, "--healthy", str(data["healthy"]), "--max-fp-ml", "-1")
    assert code == 2 and "--max-fp-ml must be >= 0" in stderr
    code, _, stderr = calibrate(*common, "--healthy", str(tmp_path / "missing"), "--max-fp-ml", "2")
    assert code == 2 and "missing: not a folder" in stderr
    assert not (tmp_path / "x.pt").exists()


def test_the_node_names_the_calibration_and_a_held_out_scan_stays_near_the_bound(
    calibrated: tuple[Path, str, str], data: dict[str, Path], tmp_path: Path
) -> None:
    site = load_checkpoint(calibrated[0])
    config = tmp_path / "node.toml"
    config.write_text(f'[selection]\nmodels = {{ T1 = "{calibrated[0]}" }}\n')
    run = subprocess.run(
        [sys.executable, "-m", "node", "analyze", str(data["held_out"]), "--out", str(tmp_path / "out"),
         "--config", str(config)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    [entry] = json.loads((tmp_path / "out" / "report.json").read_text())["series"]
    assert entry["analysed"] is True, entry["reason"]
    assert entry["calibration"] == site.calibration_label and entry["calibration"].startswith("site: FP <= 8 mL")
    assert entry["threshold"] == pytest.approx(site.threshold, rel=1e-5)
    assert entry["model"].endswith(site.content_hash[:12])
    held_out_fp = entry["anomaly_volume_ml"]  # a healthy scan: everything segmented is a false positive
    assert math.isfinite(held_out_fp) and 0 <= held_out_fp <= 3 * MAX_FP_ML
