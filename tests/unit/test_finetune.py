"""Fine-tuning a trained model on a site's healthy scans (``uad-node train --init``): it starts from the source's
weights in the source's config and contrast, at the lower fine-tuning learning rate, records where it started, and
resumes exactly; the CLI refuses what it cannot do with one line and runs end to end on a NIfTI brain."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import models.training.run as run_module
from models.checkpoint import load_checkpoint, save_checkpoint
from models.data.volumes import TrainingVolume
from models.diffusion.model import DiffusionModel
from models.training.run import FINE_TUNING_LEARNING_RATE, run_training
from models.training.trainer import InitFrom, StopAt, TrainingOptions, _step_generator
from node.cli import _parser, main
from tests import brains
from tests.tiny_model import TINY, write_fast_checkpoint
from tests.unit.test_training import OPTIONS, Discs, _train

REPO = Path(__file__).resolve().parents[2]
FINE = dataclasses.replace(OPTIONS, learning_rate=FINE_TUNING_LEARNING_RATE)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained a little, in the shipped form: fp16 EMA weights, no training state, a threshold."""
    folder = tmp_path_factory.mktemp("shipped")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds synchronisation
    run = _train(folder / "run.pt", steps=12)
    torch.set_num_threads(threads)
    path = folder / "shipped.pt"
    save_checkpoint(dataclasses.replace(run, state=None, threshold=0.2), path, half=True)
    return path


def test_fine_tuning_starts_from_the_source_weights_and_records_it(tmp_path: Path, shipped: Path) -> None:
    source = load_checkpoint(shipped)
    assert source.state is None and source.threshold == 0.2
    single = dataclasses.replace(FINE, validate_every=1)
    tuned = _train(tmp_path / "tuned.pt", steps=1, options=single, init=InitFrom(str(shipped), source))
    scratch = _train(tmp_path / "scratch.pt", steps=1, options=single)
    model = DiffusionModel(TINY)
    model.load_state_dict(source.ema_weights)
    with torch.no_grad():
        batch = Discs().batch(0, single.batch_size)
        expected = float(model.training_loss(batch, _step_generator(single.seed, 0, torch.device("cpu"))))
    first = tuned.training["history"][0]["train_loss"]
    assert first == pytest.approx(expected, rel=1e-4)  # the first step is the source model's, on the same batch
    assert first < scratch.training["history"][0]["train_loss"]
    record = {"checkpoint": str(shipped), "content_hash": source.content_hash, "steps": 12, "data": "discs"}
    assert tuned.training["init"] == record
    assert tuned.training["steps"] == 1 and tuned.training["warm_starts"] == []
    assert tuned.training["options"]["learning_rate"] == FINE_TUNING_LEARNING_RATE
    assert tuned.threshold is None  # fine-tuning changes the scores: evaluate again


def test_a_fine_tuned_run_resumes_exactly(tmp_path: Path, shipped: Path) -> None:
    init = InitFrom(str(shipped), load_checkpoint(shipped))
    full = _train(tmp_path / "full.pt", steps=4, options=FINE, init=init)
    _train(tmp_path / "half.pt", steps=2, options=FINE, init=init)
    half = load_checkpoint(tmp_path / "half.pt")
    assert half.state is not None and half.training["init"] == full.training["init"]
    resumed = _train(tmp_path / "resumed.pt", steps=4, options=FINE, resume=half)
    assert resumed.training["init"] == full.training["init"]
    for name, tensor in full.ema_weights.items():
        assert torch.equal(tensor, resumed.ema_weights[name]), name
    for name, tensor in full.state.weights.items():  # type: ignore[union-attr]
        assert torch.equal(tensor, resumed.state.weights[name]), name  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="not both"):
        _train(tmp_path / "both.pt", steps=1, init=init, resume=half)


# --- run_training: what --init decides, without the data or the training ---------------------------------


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """``run_training``'s call of ``train``, on one blank model-grid volume instead of preprocessed scans."""
    calls: dict[str, Any] = {}
    volume = TrainingVolume("blank.nii.gz", np.zeros((50, 96, 96), np.float32), np.ones((50, 96, 96), bool), None)

    def fake_volumes(data: str, cache: Path, contrast: str, version: str) -> list[TrainingVolume]:
        calls.update(data_contrast=contrast, data_version=version)
        return [volume]

    monkeypatch.setattr(run_module, "healthy_volumes", fake_volumes)

    def fake_train(config: Any, sampler: Any, options: TrainingOptions, *args: Any, **kwargs: Any) -> str:
        calls.update(config=config, options=options, description=args[2], **kwargs)
        return "trained"

    monkeypatch.setattr(run_module, "train", fake_train)
    return calls


def _run(init: Path | None, changes: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    options = TrainingOptions(**(changes or {}))
    return run_training(
        "site",
        kwargs.pop("config_name", None),
        Path("out.pt"),
        StopAt(steps=1),
        options,
        init=init,
        changes=changes,
        **kwargs,
    )


def test_init_takes_the_source_config_and_contrast_at_the_fine_tuning_rate(
    shipped: Path, captured: dict[str, Any], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert FINE_TUNING_LEARNING_RATE < TrainingOptions().learning_rate
    assert _run(shipped) == "trained"
    assert captured["config"] == TINY and captured["description"]["contrast"] == "t1"
    assert captured["options"].learning_rate == FINE_TUNING_LEARNING_RATE
    assert captured["init"].source == str(shipped) and captured["resume"] is None
    assert "fine-tuning" in capsys.readouterr().out
    # the source's own preprocessing, for the data and for the new checkpoint
    version = load_checkpoint(shipped).preprocessing_version
    assert captured["data_version"] == captured["preprocessing_version"] == version
    old = tmp_path / "version-1.pt"
    save_checkpoint(dataclasses.replace(load_checkpoint(shipped), preprocessing_version="1"), old)
    _run(old)
    assert captured["data_version"] == captured["preprocessing_version"] == "1"  # a v1 model keeps its scaling
    _run(shipped, changes={"learning_rate": 3e-4, "batch_size": 2}, config_name="tiny", contrast="t1")
    assert captured["options"].learning_rate == 3e-4 and captured["options"].batch_size == 2


def test_init_with_another_contrast_transfers_the_weights(
    shipped: Path, captured: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """A T1 model starts a FLAIR model: FLAIR data, the FLAIR label on the new run, the source recorded."""
    _run(shipped, contrast="flair")
    assert captured["data_contrast"] == captured["description"]["contrast"] == "flair"
    assert captured["init"].source == str(shipped) and captured["config"] == TINY
    assert "transfer: the t1 model" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"config_name": "default"}, "is a 'tiny' model.*leave out --config"),
        ({"without_encoder": True}, "conditioned model.*leave out --unconditioned"),
        ({"resume": Path("run.pt")}, "--init .* --resume"),
    ],
)
def test_init_refuses_another_model(shipped: Path, captured: dict[str, Any], kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _run(shipped, **kwargs)
    assert not captured


# --- the CLI --------------------------------------------------------------------------------------------------


def _cli(tmp_path: Path, *extra: str) -> int:
    return main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "out.pt"), "--steps", "1", *extra])


def test_cli_refuses_init_with_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        _cli(tmp_path, "--init", "a.pt", "--resume", "b.pt")
    assert exit_.value.code == 2
    assert "--resume: not allowed with argument --init" in capsys.readouterr().err


def test_cli_help_documents_init() -> None:
    commands = next(action for action in _parser()._actions if isinstance(action, argparse._SubParsersAction))
    text = " ".join(commands.choices["train"].format_help().split())
    assert "--init CHECKPOINT" in text and "learning rate 2e-5" in text and "with --init 2e-5" in text
    assert FINE_TUNING_LEARNING_RATE == 2e-5


def test_cli_bad_init_checkpoints_are_one_line_errors(
    tmp_path: Path, shipped: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "truncated.pt").write_bytes(shipped.read_bytes()[:1000])
    old = dataclasses.replace(load_checkpoint(shipped), preprocessing_version="0")
    save_checkpoint(old, tmp_path / "old.pt")
    cases = [
        (["--init", str(tmp_path / "missing.pt")], "no such checkpoint file"),
        (["--init", str(tmp_path / "truncated.pt")], "not a readable checkpoint"),
        (["--init", str(tmp_path / "old.pt")], "preprocessing version 0"),
        (["--init", str(shipped), "--config", "paper"], "leave out --config"),
    ]
    for extra, message in cases:
        assert _cli(tmp_path, *extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("cannot train: ") and message in err and err.count("\n") == 1, err


def test_cli_fine_tunes_on_a_folder_of_nifti_brains(tmp_path: Path) -> None:
    """``uad-node train --data DIR --init CKPT --out OUT --steps 2`` as the admin runs it, on one real head."""
    head = brains.itk_head()  # skips when the Debian data is missing
    site = tmp_path / "site"
    site.mkdir()
    sitk.WriteImage(head, str(site / "head.nii.gz"))
    fast = load_checkpoint(write_fast_checkpoint(tmp_path / "fast.pt"))
    source = tmp_path / "source.pt"
    training = {"steps": 7, "data": {"source": "offline", "contrast": "t1"}}
    save_checkpoint(dataclasses.replace(fast, training=training), source, half=True)
    out = tmp_path / "site.pt"
    command = [
        sys.executable,
        "-m",
        "node",
        "train",
        "--data",
        str(site),
        "--init",
        str(source),
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--threads",
        "1",
        "--cache",
        str(tmp_path / "cache"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"fine-tuning {source} (fast-test, t1, 7 steps, sha256 ")
    assert lines[0].endswith("on 1 volumes at learning rate 2e-05")
    assert lines[-2].startswith(f"{out}: step 2, ") and "no threshold yet" in lines[-1]
    tuned = load_checkpoint(out)
    assert tuned.config == fast.config and tuned.threshold is None and tuned.state is not None
    digest = load_checkpoint(source).content_hash
    assert tuned.training["init"] == {"checkpoint": str(source), "content_hash": digest, "steps": 7, "data": "offline"}
    assert tuned.training["options"]["learning_rate"] == FINE_TUNING_LEARNING_RATE
    assert tuned.training["data"]["volumes"] == ["head.nii.gz"] and tuned.training["steps"] == 2
    moved = [float((tuned.ema_weights[k] - w.float()).abs().max()) for k, w in fast.ema_weights.items()]
    assert 0 < max(moved) < 0.01  # two small steps away from the source, not a new model
