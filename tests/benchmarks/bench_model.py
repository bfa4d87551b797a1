"""Model benchmark on CPU: parameter counts, seconds per volume for inference, and training steps per second.

Inference: one volume = 50 slices of 96x96 as one batch, reconstructed with the config's ensemble (one UNet pass
per timestep, one encoder pass). Training: Adam steps on random batches (forward, L1 loss, backward, step).
Both in fp32 and under bf16 autocast, with channels_last on/off (training) and per thread count.

Run from the repository root::

    .venv/bin/python tests/benchmarks/bench_model.py [--config default|paper] [--unconditioned] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from models.diffusion import CONFIGS, DiffusionModel, named_config, simplex_noise, unconditioned  # noqa: E402


@dataclass(frozen=True)
class Row:
    """One measured setting."""

    what: str
    precision: str
    channels_last: bool
    threads: int
    value: float
    unit: str


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def autocast(precision: str) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def time_simplex(threads: int, repeat: int) -> float:
    """Median ms for a (32,1,96,96) batch of the paper's simplex noise."""
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    simplex_noise((32, 1, 96, 96), generator, 6, 0.8, 64.0)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        simplex_noise((32, 1, 96, 96), generator, 6, 0.8, 64.0)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def time_inference(model: DiffusionModel, slices: int, size: int, precision: str, threads: int, repeat: int) -> float:
    """Seconds to reconstruct one volume (all slices in one batch), best of ``repeat``."""
    torch.set_num_threads(threads)
    model.eval()
    volume = torch.rand(slices, 1, size, size, generator=torch.Generator().manual_seed(0))
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        with autocast(precision):
            model.reconstruct(volume, torch.Generator().manual_seed(1))
        best = min(best, time.perf_counter() - start)
    return best


def time_training(
    model: DiffusionModel, batch: int, size: int, precision: str, channels_last: bool, threads: int, steps: int
) -> float:
    """Adam steps per second after one warm-up step."""
    torch.set_num_threads(threads)
    model.train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(batch, 1, size, size, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        with autocast(precision):
            loss = model.training_loss(x, generator)
        loss.backward()
        optimiser.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    model.to(memory_format=torch.contiguous_format)
    return steps / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description="Parameters, inference seconds per volume and training steps/s.")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="default")
    parser.add_argument("--unconditioned", action="store_true", help="the plain DDPM baseline (no encoder)")
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="intra-op thread counts for inference")
    parser.add_argument("--batch", type=int, default=16, help="training batch size")
    parser.add_argument("--slices", type=int, default=50, help="slices per volume for inference")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per setting")
    parser.add_argument("--repeat", type=int, default=2, help="inference runs per setting (best is shown)")
    parser.add_argument("--quick", action="store_true", help="2 training steps, 1 inference run, fewer settings")
    args = parser.parse_args()
    steps, repeat = (2, 1) if args.quick else (args.steps, args.repeat)

    config = named_config(args.config)
    if args.unconditioned:
        config = unconditioned(config)
    torch.manual_seed(0)
    model = DiffusionModel(config)
    size = config.unet.image_size
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    unet_m, encoder_m = count(model.unet) / 1e6, count(model.encoder) / 1e6
    print(f"config {config.name}: UNet {unet_m:.2f} M parameters, encoder {encoder_m:.2f} M")
    print(f"ensemble timesteps {config.ensemble_timesteps}, image {size}x{size}", flush=True)

    rows: list[Row] = []
    for threads in args.threads:
        ms = time_simplex(threads, 3 if args.quick else 10)
        rows.append(Row("simplex (32,1,96,96)", "fp32", False, threads, ms, "ms"))
        print(rows[-1], flush=True)
    for threads in args.threads:
        for precision in ("fp32", "bf16"):
            seconds = time_inference(model, args.slices, size, precision, threads, repeat)
            rows.append(Row(f"inference s/volume ({args.slices} slices)", precision, False, threads, seconds, "s"))
            print(rows[-1], flush=True)
    settings = [(p, cl, n) for p in ("fp32", "bf16") for cl in (False, True) for n in (1, 2)]
    if args.quick:
        settings = [("fp32", False, 2), ("bf16", False, 2), ("fp32", True, 2), ("fp32", False, 1)]
    for precision, channels_last, threads in settings:
        rate = time_training(model, args.batch, size, precision, channels_last, threads, steps)
        rows.append(Row(f"training steps/s (batch {args.batch})", precision, channels_last, threads, rate, "1/s"))
        print(rows[-1], flush=True)

    print()
    header = f"{'measure':<34}{'precision':>10}{'ch_last':>9}{'threads':>9}{'value':>12}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.what:<34}{row.precision:>10}{str(row.channels_last):>9}{row.threads:>9}{row.value:>10.3f} {row.unit}"
        )
    print(f"peak RSS {peak_rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
