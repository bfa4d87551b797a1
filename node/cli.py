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
from node.status import (
    FileProblemsStatus,
    NodeStatus,
    collect_file_problems,
    collect_jobs,
    collect_status,
    collect_workers,
    disk_status,
    status_json,
    status_text,
)

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

    train = commands.add_parser(
        "train",
        help="train the diffusion model on healthy scans",
        description="Train a new model, continue a run (--resume), or fine-tune a trained model on a site's healthy "
        "scans (--init).",
    )
    train.add_argument("--data", required=True, help='a folder of NIfTI files / DICOM series, or "offline"')
    train.add_argument(
        "--config",
        help="model configuration of a new model: default or paper (default: default); ignored with --resume; with "
        "--init the checkpoint's own, and naming another is an error",
    )
    train.add_argument("--out", type=Path, required=True, help="checkpoint to write (rewritten periodically)")
    start = train.add_mutually_exclusive_group()
    start.add_argument(
        "--resume",
        type=Path,
        help="continue from this checkpoint: exactly from a run file (options given here change the run), "
        "warm from a shipped one",
    )
    start.add_argument(
        "--init",
        type=Path,
        metavar="CHECKPOINT",
        help="fine-tune this trained model (e.g. models/checkpoints/default-t1.pt) on --data: a new run from its "
        "weights, in its config and contrast, with a fresh optimiser from step 0 at learning rate 2e-5 unless "
        "--learning-rate is given; its threshold is not carried over (run `evaluate --ship` on the result)",
    )
    train.add_argument("--minutes", type=float, help="stop after this many minutes")
    train.add_argument("--steps", type=int, help="stop at this total step count (with --init: counted from 0)")
    train.add_argument("--unconditioned", action="store_true", help="no image encoder: the plain DDPM baseline")
    train.add_argument(
        "--contrast",
        choices=("t1", "t2", "flair"),
        help="default t1; with --resume the run's; with --init the checkpoint's, or another to transfer its weights "
        "to a new contrast (e.g. a T2 model started from the T1 one)",
    )
    train.add_argument("--batch-size", type=int, help="slices per step (default 16)")
    train.add_argument(
        "--learning-rate", type=float, help="Adam learning rate (default 1e-4, the paper's; with --init 2e-5)"
    )
    train.add_argument("--seed", type=int, help="data and noise seed (default 0)")
    train.add_argument("--max-timestep", type=int, help="train on noise levels t < this only (default: all 1000)")
    train.add_argument("--precision", choices=("auto", "bf16", "fp32"), help="auto: bf16 where the hardware has it")
    train.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    train.add_argument("--cache", type=Path, help="where preprocessed volumes are cached")
    train.add_argument("--snapshot-every", type=int, help="also keep the EMA weights every N steps (learning curves)")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser(
        "evaluate",
        help="a checkpoint on a labelled dataset (--dataset DIR), or against the baselines on Colin27 with lesions",
    )
    evaluate.add_argument("--checkpoint", type=Path, required=True)
    evaluate.add_argument("--dataset", type=Path, help="a labelled dataset folder (layouts: brats, pairs, dicom)")
    evaluate.add_argument("--layout", default="auto", choices=("auto", "brats", "pairs", "dicom"))
    evaluate.add_argument("--modality", choices=("t1", "t2", "flair"), help="default: the checkpoint's contrast")
    evaluate.add_argument("--folds", type=int, help="--dataset: K-fold thresholds instead of a validation split")
    evaluate.add_argument("--threshold", type=float, help="--dataset: this threshold, no search (all cases test)")
    evaluate.add_argument("--predictions", type=Path, help="--dataset: write <id>_pred/_score.nii.gz here")
    evaluate.add_argument("--baselines", action="store_true", help="--dataset: add atlas-mean and intensity rows")
    evaluate.add_argument("--unconditioned", type=Path, help="an unconditioned DDPM checkpoint to compare with")
    evaluate.add_argument("--data", default="offline", help="the model's training data, for the atlas-mean baseline")
    evaluate.add_argument(
        "--validation", type=int, help="cases that tune each threshold (default 10 simulated; a fifth of --dataset)"
    )
    evaluate.add_argument("--test", type=int, default=20, help="simulated lesion cases reported")
    evaluate.add_argument(
        "--healthy", help="lesion-free scans for false positives: a folder with --dataset, else a count (default 2)"
    )
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the simulated cases / the dataset's split")
    evaluate.add_argument("--json", type=Path, help="write the figures as JSON here")
    evaluate.add_argument("--ship", type=Path, help="write the deployable checkpoint (fp16, tuned threshold) here")
    evaluate.add_argument("--timesteps", help="noise ensemble to use instead of the checkpoint's, e.g. 250 or 250,500")
    evaluate.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    evaluate.add_argument("--cache", type=Path, help="where preprocessed volumes are cached")
    evaluate.set_defaults(run=_evaluate)

    calibrate = commands.add_parser(
        "calibrate",
        help="set a checkpoint's threshold on the site's own healthy scans (bounded false positives)",
        description="Write a copy of --checkpoint whose threshold is the SMALLEST at which the false-positive volume "
        "of the segmentation, measured on each healthy scan's own grid exactly as the node's SEG, is at most "
        "--max-fp-ml mL on at least --quantile of the healthy scans. With --lesions, the threshold at or above that "
        "one with the best mean model-grid Dice on the lesion cases. The rule and its figures are recorded in the "
        "new file (its own content hash) and named in report.json.",
    )
    calibrate.add_argument("--checkpoint", type=Path, required=True, metavar="CKPT", help="the model to calibrate")
    calibrate.add_argument(
        "--healthy",
        type=Path,
        required=True,
        metavar="DIR",
        help="the site's healthy scans (ideally 10-50): NIfTI/MHA/NRRD files or DICOM series",
    )
    calibrate.add_argument(
        "--lesions", type=Path, metavar="DIR", help="a labelled dataset: the best Dice at or above the bound"
    )
    calibrate.add_argument("--layout", default="auto", choices=("auto", "brats", "pairs", "dicom"), help="of --lesions")
    calibrate.add_argument(
        "--max-fp-ml", type=float, required=True, metavar="X", help="false-positive volume bound per healthy scan, mL"
    )
    calibrate.add_argument(
        "--quantile", type=float, default=0.95, help="share of healthy scans within the bound (default 0.95)"
    )
    calibrate.add_argument(
        "--out", type=Path, required=True, metavar="CKPT2", help="the calibrated checkpoint to write"
    )
    calibrate.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: all cores)")
    calibrate.set_defaults(run=_calibrate)
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
    print(json.dumps(config.shown(), indent=2))  # secrets masked
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
                workers = collect_workers(db) if tables.has_table("workers") else []
                # instances.file_problem came with the workers table (revision 0004)
                problems = collect_file_problems(db) if tables.has_table("workers") else FileProblemsStatus()
                status = NodeStatus(status.disk, collect_status(db), jobs, workers, problems)
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
            init=args.init,
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
    if args.init:  # the node refuses a checkpoint without a threshold; say what comes next
        print(f"{args.out}: no threshold yet (fine-tuning changes the scores); set one with `uad-node evaluate --ship`")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    if args.dataset is not None:
        return _evaluate_dataset(args)
    from models.checkpoint import CheckpointError, load_checkpoint
    from models.data.volumes import DataError, default_cache_dir
    from models.evaluation.harness import format_table, results_json
    from models.evaluation.run import EvaluationSize, run_evaluation, ship

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        checkpoint = load_checkpoint(args.checkpoint)
        baseline = load_checkpoint(args.unconditioned) if args.unconditioned else None
        healthy = int(args.healthy) if args.healthy is not None else 2
        size = EvaluationSize(validation=args.validation or 10, test=args.test, healthy=healthy, seed=args.seed)
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


def _evaluate_dataset(args: argparse.Namespace) -> int:
    import torch

    from models.atlas import load_mni152_atlas
    from models.checkpoint import CheckpointError, load_checkpoint
    from models.data.volumes import DataError, default_cache_dir
    from models.detector import AnomalyDetector
    from models.evaluation.baselines import intensity_baseline, training_atlas_mean
    from models.evaluation.dataset_evaluation import Protocol, evaluate_dataset, format_dataset_table
    from models.evaluation.datasets import DatasetError

    if args.threads:
        torch.set_num_threads(args.threads)
    progress = functools.partial(print, file=sys.stderr, flush=True)
    try:
        checkpoint = load_checkpoint(args.checkpoint)
        model = AnomalyDetector(checkpoint)
        methods = [(f"cDDPM ({checkpoint.config.name})", model.residual)]
        if args.baselines:
            methods += [
                training_atlas_mean(checkpoint, args.data, args.cache or default_cache_dir()),
                ("intensity", intensity_baseline),
            ]
        evaluation = evaluate_dataset(
            args.dataset,
            methods,
            checkpoint.preprocessor(load_mni152_atlas()),
            Protocol(validation=args.validation, folds=args.folds, threshold=args.threshold, seed=args.seed),
            checkpoint=str(args.checkpoint),
            layout=args.layout,
            modality=args.modality or checkpoint.contrast,
            healthy=Path(args.healthy) if args.healthy else None,
            predictions=args.predictions,
            progress=progress,
        )
    except (CheckpointError, DataError, DatasetError, FileNotFoundError, ValueError) as exc:
        print(f"cannot evaluate: {exc}", file=sys.stderr)
        return 2
    print(format_dataset_table(evaluation))
    report = evaluation.json()
    for entry in report["skipped"]:
        print(f"skipped {entry['id']}: {entry['reason']}")
    print(f"{evaluation.volumes} volumes in {evaluation.seconds:.0f} s ({report['volumes_per_minute']:.1f} per minute)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import SimpleITK as sitk
    import torch

    from models.atlas import load_mni152_atlas
    from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from models.detector import AnomalyDetector
    from models.evaluation.calibration import calibrate, calibrated_checkpoint, calibration_text
    from models.evaluation.datasets import DatasetError

    if args.threads:
        torch.set_num_threads(args.threads)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    progress = functools.partial(print, file=sys.stderr, flush=True)
    try:
        checkpoint = load_checkpoint(args.checkpoint)
        calibration = calibrate(
            args.healthy,
            AnomalyDetector(checkpoint).residual,
            checkpoint.preprocessor(load_mni152_atlas()),
            max_fp_ml=args.max_fp_ml,
            quantile=args.quantile,
            lesions=args.lesions,
            layout=args.layout,
            modality=checkpoint.contrast,
            progress=progress,
        )
    except (CheckpointError, DatasetError, FileNotFoundError, ValueError) as exc:
        print(f"cannot calibrate: {exc}", file=sys.stderr)
        return 2
    print(calibration_text(calibration, checkpoint.threshold))
    calibrated = calibrated_checkpoint(checkpoint, args.checkpoint, calibration)
    digest = save_checkpoint(calibrated, args.out, half=True)
    print(f"{args.out}: threshold {calibration.threshold:.6g}, sha256 {digest[:12]}, {calibrated.calibration_label}")
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
    from node.receiver.server import reload_tls_files

    # SIGHUP: read the TLS certificate, key and CA files again (on a thread: not inside the signal handler).
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=reload_tls_files, name="sighup").start())
    return run_node(config, stop)
