"""``uad-node``: the admin's commands. Exit codes: 0 ok, 1 runtime failure, 2 bad input/config."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from node import __version__
from node.config import ConfigError, NodeConfig, load_config
from node.db.database import open_database
from node.jobs.store import JobError, JobRecord, JobStore
from node.status import NodeStatus, collect_jobs, collect_status, disk_status, status_json, status_text

DEFAULT_CONFIG = Path("config/node.toml")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    return int(args.run(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uad-node", description=__doc__)
    parser.add_argument("--version", action="version", version=f"uad-node {__version__}")
    commands = parser.add_subparsers(metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the DICOM receiver until SIGTERM/SIGINT")
    serve.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    serve.set_defaults(run=_serve)

    config = commands.add_parser("config", help="config file tools")
    config_commands = config.add_subparsers(metavar="ACTION", required=True)
    check = config_commands.add_parser("check", help="validate a config file and print the effective config")
    check.add_argument("file", type=Path)
    check.set_defaults(run=_config_check)

    status = commands.add_parser("status", help="studies and series the node holds")
    status.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(run=_status)

    retry = commands.add_parser("retry", help="run a failed job again (or a done/skipped one as a new version)")
    retry.add_argument("job", nargs="?", type=int, help="job id (see `uad-node status`)")
    retry.add_argument("--failed", action="store_true", help="every failed job")
    retry.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    retry.set_defaults(run=_retry)

    cancel = commands.add_parser("cancel", help="stop a queued, running or exporting job")
    cancel.add_argument("job", type=int, help="job id (see `uad-node status`)")
    cancel.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    cancel.set_defaults(run=_cancel)

    demo = commands.add_parser(
        "demo", help="the whole node on this machine: sample study -> node -> SEG and overlays in a local PACS"
    )
    demo.add_argument("--out", type=Path, default=Path("demo-output"), help="where summary.png and report.json go")
    demo.add_argument("--quiet", type=float, default=3.0, help="series quiet period in seconds (node default: 10)")
    demo.add_argument("--no-orthanc", action="store_true", help="use the built-in storage SCP even if Orthanc is here")
    demo.add_argument("--seed", type=int, default=0, help="which simulated lesion")
    demo.add_argument("--threads", type=int, default=0, help="model threads (default: all cores)")
    demo.add_argument("--keep", action="store_true", help="keep the node's data and the PACS storage")
    demo.set_defaults(run=_demo)

    analyze = commands.add_parser("analyze", help="the whole pipeline on a folder of DICOM files, offline")
    analyze.add_argument("input", type=Path, help="a folder with a series or a whole study (searched recursively)")
    analyze.add_argument("--out", type=Path, required=True, help="where SEG, overlays, summary.png and report.json go")
    analyze.add_argument("--config", type=Path, help="config file (default: the embedded defaults, shipped T1 model)")
    analyze.set_defaults(run=_analyze)

    train = commands.add_parser("train", help="train the diffusion model on healthy scans")
    train.add_argument("--data", required=True, help='a folder of NIfTI files / DICOM series, or "offline"')
    train.add_argument("--config", default="default", help="model configuration: default or paper")
    train.add_argument("--out", type=Path, required=True, help="checkpoint to write (rewritten periodically)")
    train.add_argument(
        "--resume",
        type=Path,
        help="continue from this checkpoint: exactly from a run file (options given here change the run), "
        "warm from a shipped one",
    )
    train.add_argument("--minutes", type=float, help="stop after this many minutes")
    train.add_argument("--steps", type=int, help="stop at this total step count")
    train.add_argument("--unconditioned", action="store_true", help="no image encoder: the plain DDPM baseline")
    train.add_argument("--contrast", choices=("t1", "t2", "flair"), default="t1")
    train.add_argument("--batch-size", type=int, help="slices per step (default 16)")
    train.add_argument("--learning-rate", type=float, help="Adam learning rate (default 1e-4, the paper's)")
    train.add_argument("--seed", type=int, help="data and noise seed (default 0)")
    train.add_argument("--max-timestep", type=int, help="train on noise levels t < this only (default: all 1000)")
    train.add_argument("--precision", choices=("auto", "bf16", "fp32"), help="auto: bf16 where the hardware has it")
    train.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    train.add_argument("--cache", type=Path, help="where preprocessed volumes are cached")
    train.add_argument("--snapshot-every", type=int, help="also keep the EMA weights every N steps (learning curves)")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("evaluate", help="a checkpoint against the baselines on Colin27 with lesions")
    evaluate.add_argument("--checkpoint", type=Path, required=True)
    evaluate.add_argument("--unconditioned", type=Path, help="an unconditioned DDPM checkpoint to compare with")
    evaluate.add_argument("--data", default="offline", help="the model's training data, for the atlas-mean baseline")
    evaluate.add_argument("--validation", type=int, default=10, help="lesion cases that tune each threshold")
    evaluate.add_argument("--test", type=int, default=20, help="lesion cases reported")
    evaluate.add_argument("--healthy", type=int, default=2, help="lesion-free cases for false positives")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the simulated cases")
    evaluate.add_argument("--json", type=Path, help="write the figures as JSON here")
    evaluate.add_argument("--ship", type=Path, help="write the deployable checkpoint (fp16, tuned threshold) here")
    evaluate.add_argument("--timesteps", help="noise ensemble to use instead of the checkpoint's, e.g. 250 or 250,500")
    evaluate.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    evaluate.add_argument("--cache", type=Path, help="where preprocessed volumes are cached")
    evaluate.set_defaults(run=_evaluate)
    return parser


def _load(path: Path) -> NodeConfig | None:
    """Load the config or print its errors (one per line, with key paths) to stderr."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{exc.path}: invalid config", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return None


def _config_check(args: argparse.Namespace) -> int:
    config = _load(args.file)
    if config is None:
        return 2
    print(json.dumps(config.model_dump(mode="json"), indent=2))
    print(f"{args.file}: OK", file=sys.stderr)
    return 0


def _status(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 2
    url = make_url(config.node.effective_database_url())
    status = NodeStatus(disk=disk_status(config.node))
    # A SQLite file that does not exist yet means nothing was received; do not create it here.
    if url.get_backend_name() != "sqlite" or Path(url.database or "").exists():
        db = open_database(str(url), migrate=False)
        try:
            tables = inspect(db.engine)
            if tables.has_table("series"):
                jobs = collect_jobs(db) if tables.has_table("jobs") else []
                status = NodeStatus(disk=status.disk, studies=collect_status(db), jobs=jobs)
        except SQLAlchemyError as exc:
            print(f"cannot read the database: {exc}", file=sys.stderr)
            return 1
        finally:
            db.close()
    print(json.dumps(status_json(status), indent=2) if args.json else status_text(status))
    return 0


def _retry(args: argparse.Namespace) -> int:
    if (args.job is None) == (not args.failed):
        print("give a job id or --failed", file=sys.stderr)
        return 2
    return _on_jobs(
        args.config, lambda store: [store.retry(i) for i in ([args.job] if args.job else store.failed_ids())]
    )


def _cancel(args: argparse.Namespace) -> int:
    return _on_jobs(args.config, lambda store: [store.cancel(args.job)])


def _on_jobs(config_path: Path, action: Callable[[JobStore], list[JobRecord]]) -> int:
    """Change jobs in the node's database; a running ``serve`` picks the change up on its next poll."""
    config = _load(config_path)
    if config is None:
        return 2
    try:
        db = open_database(config.node.effective_database_url())
    except (OSError, SQLAlchemyError) as exc:
        print(f"cannot open the database: {exc}", file=sys.stderr)
        return 1
    try:
        jobs = action(JobStore(db))
    except JobError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    finally:
        db.close()
    for job in jobs:
        flag = " (stops after the running stage)" if job.cancel_requested else ""
        print(f"job {job.id}: {job.state}{flag}  series {job.series_uid}  {job.reason}".rstrip())
    if not jobs:
        print("no failed jobs")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from node.demo.run import DemoOptions, main

    options = DemoOptions(
        out=args.out, quiet_s=args.quiet, prefer_orthanc=not args.no_orthanc, seed=args.seed, threads=args.threads,
        keep=args.keep,
    )  # fmt: skip
    return main(options)


def _analyze(args: argparse.Namespace) -> int:
    from node.analyze_folder import InputError, analyze_folder

    config = _load(args.config) if args.config else NodeConfig()
    if config is None:
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # it narrates every attribute it copies
    try:
        entries = analyze_folder(args.input, args.out, config)
    except InputError as exc:
        print(f"cannot analyze: {exc}", file=sys.stderr)
        return 2
    analysed = sum(1 for entry in entries if entry["analysed"])
    print(f"{args.out / 'report.json'}: {len(entries)} series, {analysed} analysed")
    for entry in entries:
        if not entry["analysed"]:
            verdict = "NOT SCREENED" if entry["selected"] else "skipped"
            print(f"  {entry['series_uid']}: {verdict}: {entry['reason']}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch  # slow to import; only the model commands need it

    from models.checkpoint import CheckpointError
    from models.data.volumes import DataError
    from models.training.run import run_training
    from models.training.trainer import StopAt, TrainingOptions

    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = {
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "precision": args.precision,
        "max_timestep": args.max_timestep,
    }
    given = {name: value for name, value in chosen.items() if value is not None}
    options = TrainingOptions(**given)
    stop = StopAt(steps=args.steps, seconds=args.minutes * 60 if args.minutes else None)
    if stop.steps is None and stop.seconds is None:
        print("give --minutes or --steps", file=sys.stderr)
        return 2
    try:
        checkpoint = run_training(
            args.data,
            args.config,
            args.out,
            stop,
            options,
            resume=args.resume,
            without_encoder=args.unconditioned,
            contrast=args.contrast,
            cache_dir=args.cache,
            snapshot_every=args.snapshot_every,
            changes=given,
        )
    except (CheckpointError, DataError, ValueError, FileNotFoundError) as exc:
        print(f"cannot train: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: step {checkpoint.training['steps']}, {checkpoint.training['seconds'] / 60:.1f} min in all")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from models.checkpoint import CheckpointError, load_checkpoint
    from models.data.volumes import DataError, default_cache_dir
    from models.evaluation.harness import format_table, results_json
    from models.evaluation.run import EvaluationSize, run_evaluation, ship

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        checkpoint = load_checkpoint(args.checkpoint)
        baseline = load_checkpoint(args.unconditioned) if args.unconditioned else None
        size = EvaluationSize(validation=args.validation, test=args.test, healthy=args.healthy, seed=args.seed)
        progress = functools.partial(print, file=sys.stderr, flush=True)
        timesteps = [int(t) for t in args.timesteps.split(",")] if args.timesteps else None
        results = run_evaluation(
            checkpoint, args.data, args.cache or default_cache_dir(), size, baseline, progress, timesteps
        )
    except (CheckpointError, DataError, FileNotFoundError, ValueError) as exc:
        print(f"cannot evaluate: {exc}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps(results_json(results), indent=2) + "\n")
    if args.ship:
        digest = ship(checkpoint, results, args.ship, "uad-node " + " ".join(sys.argv[1:]), timesteps)
        print(f"{args.ship}: threshold {results[0].threshold:.4g}, sha256 {digest}", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 2
    from node.service import configure_logging, run_node

    configure_logging(config.logging.level, logging.StreamHandler(sys.stderr))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return run_node(config, stop)
