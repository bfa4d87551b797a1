"""The training loop: Adam on the L1 x0 loss, an EMA copy of the weights, validation, periodic checkpoints.

Exact resumption is by construction rather than by saving random-number generators: the batch of
step s is ``sampler.batch(s)`` (a pure function of the data seed and s) and the diffusion noise and
timesteps of step s come from a generator seeded with (seed, s). A checkpoint therefore needs only
the weights, the EMA weights, the optimiser state and the step; two half runs equal one full run
bit for bit on the same machine and thread count.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from models.checkpoint import Checkpoint, TrainingState, save_checkpoint
from models.diffusion.config import ModelConfig
from models.diffusion.model import DiffusionModel
from models.precision import Precision, autocast, autocast_dtype, default_device
from models.preprocessing import PREPROCESSING_VERSION

VALIDATION_SEED = 7_919  # validation noise is fixed for the whole run so validation losses compare


class BatchSource(Protocol):
    def batch(self, step: int, batch_size: int) -> torch.Tensor: ...
    def validation_batches(self, count: int, batch_size: int) -> list[torch.Tensor]: ...


@dataclass(frozen=True)
class TrainingOptions:
    batch_size: int = 16
    learning_rate: float = 1e-4  # the paper's Adam learning rate
    ema_decay: float = 0.999  # with a warm-up, (1 + step) / (10 + step), so early EMA weights are not stale
    seed: int = 0
    precision: Precision = "auto"
    channels_last: bool = False  # measured slower with bf16 autocast on these CPUs (bench_model.py)
    checkpoint_every_s: float = 300.0
    validate_every: int = 250
    validation_batches: int = 4
    max_timestep: int | None = None  # train on t < this only (None: all T); inference uses t <= 750

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingOptions:
        return cls(**data)


@dataclass(frozen=True)
class InitFrom:
    """A trained model to fine-tune (``uad-node train --init``) and where it was read from, for the record."""

    source: str
    checkpoint: Checkpoint

    def record(self) -> dict[str, Any]:
        """``training["init"]`` of the new run: enough to find the model it started from and verify it is that one."""
        training = self.checkpoint.training
        return {
            "checkpoint": self.source,
            "content_hash": self.checkpoint.content_hash,
            "steps": training.get("steps"),
            "data": training.get("data", {}).get("source"),
        }


@dataclass(frozen=True)
class StopAt:
    """Train until the first of these is reached (both None: one step)."""

    steps: int | None = None  # total steps, counting those of the run resumed
    seconds: float | None = None  # wall time of this invocation


def train(
    config: ModelConfig,
    data: BatchSource,
    options: TrainingOptions,
    out: Path,
    stop: StopAt,
    data_description: dict[str, Any],
    resume: Checkpoint | None = None,
    progress: Callable[[str], None] = print,
    device: torch.device | None = None,
    snapshot_every: int | None = None,
    init: InitFrom | None = None,
    preprocessing_version: str = PREPROCESSING_VERSION,
) -> Checkpoint:
    """Train (or resume, or fine-tune) and write ``out`` every ``options.checkpoint_every_s`` and at the end.

    When resuming, the model configuration stored in ``resume`` wins (``config`` is ignored); exactness
    also needs ``options`` equal to the stored ones (``TrainingOptions.from_dict(resume.training["options"])``),
    which is what ``run_training`` passes unless told to change them. A
    checkpoint without training state (a shipped or committed file) is a *warm start*: both the
    weights and the EMA start from its EMA weights, Adam starts afresh, and the step count, the
    data stream and the history carry on; ``training["warm_starts"]`` records where.
    ``init`` fine-tunes another model: a new run (step 0, fresh Adam, its own history, this data stream)
    whose weights and EMA both start from ``init``'s EMA weights, in ``init``'s config (``config`` is
    ignored); ``training["init"]`` records the source and carries over when the run is resumed. It is not
    a warm start: those continue one run (its step count and data), ``init`` begins another.
    ``snapshot_every`` also keeps the EMA weights every that many steps as ``<out>-step<N>.pt``
    (fp16, no training state) for learning curves. ``preprocessing_version`` is the one ``data`` was made with.
    """
    device = device or default_device()
    if init is not None and resume is not None:
        raise ValueError("fine-tune another model (init) or resume a run, not both")
    step, seconds_before, history, warm_starts = 0, 0.0, [], []
    init_record: dict[str, Any] | None = init.record() if init is not None else None
    if init is not None:
        config = init.checkpoint.config
    if resume is not None:
        config = resume.config
        step, seconds_before = resume.training["steps"], resume.training["seconds"]
        history = list(resume.training.get("history", []))
        warm_starts = list(resume.training.get("warm_starts", [])) + ([step] if resume.state is None else [])
        init_record = resume.training.get("init")
    model = DiffusionModel(config).to(device)
    ema = DiffusionModel(config).to(device).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=options.learning_rate)
    if resume is not None and resume.state is not None:
        model.load_state_dict(resume.state.weights)
        ema.load_state_dict(resume.ema_weights)
        optimizer.load_state_dict(resume.state.optimizer)
        for group in optimizer.param_groups:  # the saved state carries its own rate; ``options`` decides
            group["lr"] = options.learning_rate
    elif resume is not None:  # a warm start: no raw weights or Adam state to take
        model.load_state_dict(resume.ema_weights)
        ema.load_state_dict(resume.ema_weights)
    elif init is not None:  # likewise; only inference weights are shipped
        model.load_state_dict(init.checkpoint.ema_weights)
        ema.load_state_dict(init.checkpoint.ema_weights)
    else:
        ema.load_state_dict(model.state_dict())
    if options.channels_last:
        model.to(memory_format=torch.channels_last)
    dtype = autocast_dtype(device, options.precision)
    validation = [b.to(device) for b in data.validation_batches(options.validation_batches, options.batch_size)]

    first_step = step
    started = time.monotonic()
    last_save = last_report = started
    losses: list[float] = []

    def elapsed() -> float:
        return time.monotonic() - started

    def checkpoint() -> Checkpoint:
        training = {
            "data": data_description,
            "options": dataclasses.asdict(options),
            "steps": step,
            "seconds": seconds_before + elapsed(),
            "hardware": _hardware(device, dtype),
            "history": history,
            "warm_starts": warm_starts,
        }
        if init_record is not None:
            training["init"] = init_record
        state = TrainingState(
            step=step, weights=model.state_dict(), optimizer=optimizer.state_dict(), seconds=seconds_before + elapsed()
        )
        return Checkpoint(
            config=config,
            ema_weights=ema.state_dict(),
            training=training,
            state=state,
            preprocessing_version=preprocessing_version,
        )

    while True:
        batch = data.batch(step, options.batch_size).to(device)
        if options.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        generator = _step_generator(options.seed, step, device)
        with autocast(device, dtype):
            loss = model.training_loss(batch, generator, options.max_timestep)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _update_ema(ema, model, options.ema_decay, step)
        step += 1
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"training loss is {losses[-1]} at step {step}; lower the learning rate")

        finished = _finished(stop, step, elapsed())
        if step % options.validate_every == 0 or finished:
            val, at_levels = _validation_loss(ema, validation, device, dtype)
            history.append(
                {
                    "step": step,
                    "train_loss": sum(losses) / len(losses),
                    "validation_loss": val,
                    "validation_l1_at": at_levels,
                    "seconds": round(seconds_before + elapsed(), 1),
                }
            )
            progress(_line(step, step - first_step, losses, val, elapsed(), seconds_before + elapsed()))
            losses.clear()
            last_report = time.monotonic()
        elif time.monotonic() - last_report > 60:
            progress(_line(step, step - first_step, losses, None, elapsed(), seconds_before + elapsed()))
            last_report = time.monotonic()
        if snapshot_every and step % snapshot_every == 0:
            snapshot = dataclasses.replace(checkpoint(), state=None)
            save_checkpoint(snapshot, out.with_name(f"{out.stem}-step{step}{out.suffix}"), half=True)
        if finished or time.monotonic() - last_save > options.checkpoint_every_s:
            latest = checkpoint()
            save_checkpoint(latest, out)
            last_save = time.monotonic()
            if finished:
                return latest


def _finished(stop: StopAt, step: int, seconds: float) -> bool:
    if stop.steps is None and stop.seconds is None:
        return True
    return (stop.steps is not None and step >= stop.steps) or (stop.seconds is not None and seconds >= stop.seconds)


def _step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    rate = min(decay, (1 + step) / (10 + step))
    for target, source in zip(ema.parameters(), model.parameters(), strict=True):
        target.lerp_(source.detach(), 1 - rate)


@torch.no_grad()
def _validation_loss(
    model: DiffusionModel, batches: list[torch.Tensor], device: torch.device, dtype: torch.dtype | None
) -> tuple[float, dict[str, float]]:
    """The L1 loss over all timesteps (comparable between runs whatever their ``max_timestep``) and the L1
    of the one-shot x0 prediction at each ensemble level (what the anomaly map is made of); fixed noise."""
    levels = model.config.ensemble_timesteps
    total, at_levels = 0.0, dict.fromkeys(levels, 0.0)
    for index, batch in enumerate(batches):
        with autocast(device, dtype):
            total += float(model.training_loss(batch, _step_generator(VALIDATION_SEED, index, device)))
            for level in levels:
                t = torch.full((batch.shape[0],), level, dtype=torch.long, device=device)
                generator = _step_generator(VALIDATION_SEED + level, index, device)
                at_levels[level] += float(model.loss_at(batch, t, generator))
    count = max(len(batches), 1)
    return total / count, {str(level): round(value / count, 5) for level, value in at_levels.items()}


def _line(step: int, steps_this_run: int, losses: list[float], val: float | None, seconds: float, total: float) -> str:
    mean = sum(losses) / len(losses) if losses else float("nan")
    parts = [f"step {step}", f"loss {mean:.4f}"]
    if val is not None:
        parts.append(f"validation {val:.4f}")
    parts += [
        f"{steps_this_run / max(seconds, 1e-9):.2f} steps/s",
        f"{seconds / 60:.1f} min this run",
        f"{total / 3600:.2f} h in all",
    ]
    return " | ".join(parts)


def _hardware(device: torch.device, dtype: torch.dtype | None) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": name,
        "threads": torch.get_num_threads(),
        "autocast": str(dtype).removeprefix("torch.") if dtype else "fp32",
        "torch": torch.__version__,
    }


def _cpu_name() -> str:
    """The CPU model as Linux names it (platform.processor() is empty there), with the core count."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.machine()
    return f"{model}, {os.cpu_count()} cores"
