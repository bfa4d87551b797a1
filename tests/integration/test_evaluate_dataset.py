"""``uad-node evaluate --dataset DIR`` as a researcher runs it: labelled datasets in each layout (written by
``tests.eval_datasets`` from the offline brains with simulated lesions), the JSON contract, prediction files
whose Dice is the reported Dice, and clear per-case errors that do not stop the run.

The model is the fast untrained one (``tests.tiny_model``): every stage runs for real; its figures mean nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from models.atlas import load_mni152_atlas
from models.checkpoint import load_checkpoint
from models.detector import AnomalyDetector
from models.evaluation.baselines import intensity_baseline
from models.evaluation.dataset_evaluation import DatasetEvaluation, Protocol, evaluate_dataset
from models.evaluation.metrics import dice
from models.preprocessing import Preprocessor
from tests.eval_datasets import write_brats, write_dicom, write_healthy, write_pairs
from tests.tiny_model import write_fast_checkpoint

pytestmark = pytest.mark.timeout(900)

CASE_KEYS = {"id", "split", "dice", "auprc", "auroc", "lesion_ml", "predicted_ml"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fast_checkpoint(tmp_path_factory.mktemp("model") / "fast.pt")


@pytest.fixture(scope="module")
def preprocessor() -> Preprocessor:
    return Preprocessor(load_mni152_atlas())


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four good skull-on cases, then three broken ones: a missing label, a label on another grid, a corrupt
    image."""
    folder = write_pairs(tmp_path_factory.mktemp("pairs") / "data", 4, skull=True)
    images, labels = folder / "images", folder / "labels"
    good = sorted(images.iterdir())
    shutil.copy(good[0], images / "zz-nolabel.nii.gz")
    label = sitk.ReadImage(str(next(labels.iterdir())))
    shutil.copy(good[1], images / "zz-othergrid.nii.gz")
    sitk.WriteImage(sitk.Shrink(label, [2, 2, 2]), str(labels / "zz-othergrid.nii.gz"))
    (images / "zz-corrupt.nii.gz").write_bytes(b"this is not a NIfTI file")
    shutil.copy(next(labels.iterdir()), labels / "zz-corrupt.nii.gz")
    return folder


@pytest.fixture(scope="module")
def cli_run(pairs: Path, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    """The command line on the pairs dataset: (the JSON, the predictions folder, stdout)."""
    out = tmp_path_factory.mktemp("cli")
    healthy = write_healthy(out / "healthy", 2)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "node",
            "evaluate",
            "--checkpoint",
            str(checkpoint),
            "--dataset",
            str(pairs),
            "--validation",
            "1",
            "--healthy",
            str(healthy),
            "--json",
            str(out / "eval.json"),
            "--predictions",
            str(out / "pred"),
            "--threads",
            "1",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr
    return json.loads((out / "eval.json").read_text()), out / "pred", run.stdout


def test_the_json_contract(cli_run: tuple[dict, Path, str], checkpoint: Path) -> None:
    report, _, stdout = cli_run
    assert report["checkpoint"] == str(checkpoint) and report["layout"] == "pairs"
    assert isinstance(report["threshold"], float)
    assert [c["id"] for c in report["cases"]] == sorted(c["id"] for c in report["cases"])
    assert len(report["cases"]) == 4
    assert all(CASE_KEYS <= set(case) for case in report["cases"])
    assert sorted(c["split"] for c in report["cases"]) == ["test", "test", "test", "validation"]
    assert set(report["mean"]) == {"dice", "auprc", "auroc", "healthy_fp_ml"}
    test = [c for c in report["cases"] if c["split"] == "test"]
    assert report["mean"]["dice"] == pytest.approx(np.mean([c["dice"] for c in test]))
    assert report["mean"]["healthy_fp_ml"] >= 0 and len(report["healthy_fp_ml"]) == 2
    assert all(c["lesion_ml"] > 1 for c in report["cases"])  # the simulated lesions are there
    assert "| cDDPM (fast-test) |" in stdout and "volumes in" in stdout


def test_a_broken_case_is_skipped_with_its_reason_and_the_run_goes_on(cli_run: tuple[dict, Path, str]) -> None:
    report, _, stdout = cli_run
    skipped = {entry["id"]: entry["reason"] for entry in report["skipped"]}
    assert set(skipped) == {"zz-nolabel", "zz-othergrid", "zz-corrupt"}
    assert "zz-nolabel" in skipped["zz-nolabel"] and "label" in skipped["zz-nolabel"]
    assert "grid" in skipped["zz-othergrid"]
    assert "zz-corrupt" in skipped["zz-corrupt"]
    assert all(f"skipped {case}" in stdout for case in skipped)


def test_the_reported_dice_is_the_dice_of_the_prediction_file(cli_run: tuple[dict, Path, str], pairs: Path) -> None:
    report, predictions, _ = cli_run
    for case in report["cases"]:
        image = sitk.ReadImage(str(pairs / "images" / f"{case['id']}.nii.gz"))
        label = sitk.ReadImage(str(pairs / "labels" / f"{case['id']}.nii.gz"))
        prediction = sitk.ReadImage(str(predictions / f"{case['id']}_pred.nii.gz"))
        score = sitk.ReadImage(str(predictions / f"{case['id']}_score.nii.gz"))
        for written in (prediction, score):  # on the case's own grid
            assert written.GetSize() == image.GetSize()
            assert np.allclose(written.GetSpacing(), image.GetSpacing())
            assert np.allclose(written.GetOrigin(), image.GetOrigin())
            assert np.allclose(written.GetDirection(), image.GetDirection())
        truth = sitk.GetArrayFromImage(label) > 0
        assert dice(sitk.GetArrayFromImage(prediction) > 0, truth) == pytest.approx(case["dice"], abs=1e-12)


def evaluate(folder: Path, checkpoint: Path, preprocessor: Preprocessor, **options: object) -> DatasetEvaluation:
    protocol = options.pop("protocol", Protocol(validation=1))
    model = AnomalyDetector(load_checkpoint(checkpoint))
    return evaluate_dataset(
        folder,
        [("model", model.residual), ("intensity", intensity_baseline)],
        preprocessor,
        protocol,  # type: ignore[arg-type]
        checkpoint=str(checkpoint),
        progress=lambda line: None,
        **options,  # type: ignore[arg-type]
    )


def test_brats_skull_stripped_with_folds(tmp_path: Path, checkpoint: Path, preprocessor: Preprocessor) -> None:
    folder = write_brats(tmp_path / "brats", 3, skull=False)
    evaluation = evaluate(folder, checkpoint, preprocessor, protocol=Protocol(folds=3), modality="t1")
    report = evaluation.json()
    assert report["layout"] == "brats" and report["skipped"] == []
    assert [c["split"] for c in report["cases"]] == ["test"] * 3  # every case tested once, at its fold's threshold
    thresholds = [fold["threshold"] for fold in report["folds"]]
    assert len(thresholds) == 3 and report["threshold"] == pytest.approx(np.mean(thresholds))
    assert {c["fold"] for c in report["cases"]} == {0, 1, 2}
    [baseline] = report["baselines"]
    assert baseline["method"] == "intensity" and set(baseline["mean"]) == set(report["mean"])


def test_dicom_series_with_seg_ground_truth_and_a_fixed_threshold(
    tmp_path: Path, checkpoint: Path, preprocessor: Preprocessor
) -> None:
    folder = write_dicom(tmp_path / "dicom", 2)
    evaluation = evaluate(folder, checkpoint, preprocessor, protocol=Protocol(threshold=0.44))
    report = evaluation.json()
    assert report["layout"] == "dicom" and report["threshold"] == 0.44 and report["skipped"] == []
    assert [c["split"] for c in report["cases"]] == ["test", "test"]
    assert all(c["lesion_ml"] > 1 for c in report["cases"])  # the SEG landed on the series' grid
