"""Training, checkpoints and the detector on a tiny network: exact resume, the file format's guarantees,
deterministic inference. The shipped checkpoint's own behaviour is tested in test_shipped_checkpoint.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from models.detector import AnomalyDetector
from models.training.trainer import InitFrom, StopAt, TrainingOptions, train
from tests.tiny_model import SIZE, TINY

OPTIONS = TrainingOptions(
    batch_size=4, learning_rate=1e-3, validate_every=3, validation_batches=1, precision="fp32", channels_last=False
)


class Discs:
    """Bright discs of varying size and place on a dark disc 'brain': the batch of step s depends on s only."""

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        return self._discs(torch.Generator().manual_seed(step), batch_size)

    def validation_batches(self, count: int, batch_size: int) -> list[torch.Tensor]:
        return [self._discs(torch.Generator().manual_seed(10_000 + i), batch_size) for i in range(count)]

    @staticmethod
    def _discs(generator: torch.Generator, count: int) -> torch.Tensor:
        yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
        centre = 10 + 12 * torch.rand(count, 2, generator=generator)
        radius = 3 + 5 * torch.rand(count, generator=generator)
        inside = (yy - centre[:, :1, None]) ** 2 + (xx - centre[:, 1:, None]) ** 2 < radius[:, None, None] ** 2
        brain = (yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 < (SIZE / 2 - 2) ** 2
        return (0.4 * brain + 0.5 * inside).float().unsqueeze(1)


def _train(
    out: Path,
    steps: int,
    resume: Checkpoint | None = None,
    snapshot_every: int | None = None,
    options: TrainingOptions = OPTIONS,
    init: InitFrom | None = None,
) -> Checkpoint:
    torch.manual_seed(0)  # initial weights (overwritten by ``init``)
    return train(
        TINY,
        Discs(),
        options,
        out,
        StopAt(steps=steps),
        {"source": "discs"},
        resume=resume,
        progress=lambda line: None,
        device=torch.device("cpu"),
        snapshot_every=snapshot_every,
        init=init,
    )


def test_two_half_runs_equal_one_full_run(tmp_path: Path) -> None:
    full = _train(tmp_path / "full.pt", steps=6)
    _train(tmp_path / "half.pt", steps=3)
    resumed = _train(tmp_path / "resumed.pt", steps=6, resume=load_checkpoint(tmp_path / "half.pt"))
    assert resumed.training["steps"] == full.training["steps"] == 6
    for name, tensor in full.ema_weights.items():
        assert torch.equal(tensor, resumed.ema_weights[name]), name
    for name, tensor in full.state.weights.items():  # type: ignore[union-attr]
        assert torch.equal(tensor, resumed.state.weights[name]), name  # type: ignore[union-attr]
    assert [h["step"] for h in resumed.training["history"]] == [3, 6]


def test_resuming_with_another_learning_rate_uses_it(tmp_path: Path) -> None:
    _train(tmp_path / "half.pt", steps=3)
    half = load_checkpoint(tmp_path / "half.pt")
    same = _train(tmp_path / "same.pt", steps=4, resume=half)
    changed = _train(
        tmp_path / "changed.pt", steps=4, resume=half, options=dataclasses.replace(OPTIONS, learning_rate=1e-2)
    )
    assert changed.training["options"]["learning_rate"] == 1e-2
    assert changed.state.optimizer["param_groups"][0]["lr"] == 1e-2  # type: ignore[union-attr]
    name = next(iter(same.ema_weights))
    assert not torch.equal(same.state.weights[name], changed.state.weights[name])  # type: ignore[union-attr]


def test_warm_start_from_a_shipped_file_carries_on_from_its_ema_weights(tmp_path: Path) -> None:
    first = _train(tmp_path / "run.pt", steps=3)
    shipped = Checkpoint(config=first.config, ema_weights=first.ema_weights, training=first.training)
    save_checkpoint(shipped, tmp_path / "shipped.pt", half=True)
    warm = load_checkpoint(tmp_path / "shipped.pt")
    assert warm.state is None
    continued = _train(tmp_path / "continued.pt", steps=6, resume=warm)
    assert continued.training["steps"] == 6 and continued.training["warm_starts"] == [3]
    assert [h["step"] for h in continued.training["history"]] == [3, 6]
    assert continued.training["seconds"] > first.training["seconds"]


def test_training_lowers_the_validation_loss_and_keeps_snapshots(tmp_path: Path, one_torch_thread: None) -> None:
    trained = _train(tmp_path / "run.pt", steps=30, snapshot_every=10)
    history = trained.training["history"]
    assert history[-1]["validation_loss"] < history[0]["validation_loss"]
    assert set(history[-1]["validation_l1_at"]) == {"250", "500", "750"}
    assert (tmp_path / "run.pt").is_file()
    assert sorted(p.name for p in tmp_path.glob("run-step*.pt")) == ["run-step10.pt", "run-step20.pt", "run-step30.pt"]
    snapshot = load_checkpoint(tmp_path / "run-step20.pt")
    assert snapshot.state is None and snapshot.training["steps"] == 20


def test_checkpoint_round_trip_and_shipped_form(tmp_path: Path) -> None:
    trained = _train(tmp_path / "run.pt", steps=2)
    loaded = load_checkpoint(tmp_path / "run.pt")
    assert loaded.config == TINY
    assert loaded.state is not None and loaded.state.step == 2
    assert loaded.content_hash == trained.content_hash
    shipped = Checkpoint(config=loaded.config, ema_weights=loaded.ema_weights, training=loaded.training, threshold=0.1)
    digest = save_checkpoint(shipped, tmp_path / "shipped.pt", half=True)
    again = load_checkpoint(tmp_path / "shipped.pt")
    assert again.content_hash == digest and again.threshold == 0.1 and again.state is None
    assert all(t.dtype == torch.float16 for t in again.ema_weights.values() if t.is_floating_point())
    assert (tmp_path / "shipped.pt").stat().st_size < 0.7 * (tmp_path / "run.pt").stat().st_size


def test_corrupt_truncated_foreign_and_mismatched_checkpoints_are_refused(tmp_path: Path) -> None:
    _train(tmp_path / "run.pt", steps=1)
    data = (tmp_path / "run.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "truncated.pt")
    checkpoint = load_checkpoint(tmp_path / "run.pt")
    name = next(iter(checkpoint.ema_weights))
    checkpoint.ema_weights[name].view(-1)[0] += 1.0  # edit one weight behind the hash's back
    payload = torch.load(tmp_path / "run.pt", weights_only=True)
    payload["ema_weights"] = checkpoint.ema_weights
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "edited.pt")
    torch.save({"weights": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a uad-node checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    old = Checkpoint(config=TINY, ema_weights=checkpoint.ema_weights, training={}, preprocessing_version="0")
    save_checkpoint(old, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="preprocessing version 0"):
        load_checkpoint(tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_detector_is_deterministic_and_skips_slices_without_brain(tmp_path: Path) -> None:
    checkpoint = _train(tmp_path / "run.pt", steps=2)
    checkpoint = Checkpoint(config=checkpoint.config, ema_weights=checkpoint.ema_weights, training={}, threshold=0.05)
    detector = AnomalyDetector(checkpoint, device=torch.device("cpu"), precision="fp32", batch_size=3)
    volume = Discs().batch(0, 8).squeeze(1).numpy()
    mask = volume > 0
    mask[:2] = False
    first = detector.analyse(volume, mask)
    second = detector.analyse(volume, mask)
    assert np.array_equal(first.reconstruction, second.reconstruction)
    assert np.array_equal(first.reconstruction[:2], volume[:2])  # not run: no brain there
    assert not np.array_equal(first.reconstruction[2:], volume[2:])
    assert first.reconstruction.shape == volume.shape and first.reconstruction.dtype == np.float32
    assert first.mask.dtype == bool and first.threshold == 0.05
    no_threshold = Checkpoint(config=checkpoint.config, ema_weights=checkpoint.ema_weights, training={})
    with pytest.raises(CheckpointError, match="no calibrated threshold"):
        AnomalyDetector(no_threshold, device=torch.device("cpu")).analyse(volume, mask)
