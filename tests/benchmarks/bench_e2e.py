"""End-to-end latency benchmark (issue 7): seconds from the last acknowledged image of a 150-slice T1 study
to its SEG stored in the PACS, with the node's per-stage breakdown.

The study: Colin27 with skull (Debian ``mricron-data``; else nilearn's MNI152) resampled to 192x224x150 at
1.0x1.0x1.2 mm, axial, one MR file per slice, named and timed as an MPRAGE ("T1 MPRAGE AX") so the node
selects it as T1; a fresh study (new UIDs) per run. The peers, all on 127.0.0.1: a real Orthanc (the
built-in storage SCP when Orthanc is missing, said in the output), ``python -m node serve`` with the
default shipped model, ``series_quiet_s`` = ``--quiet`` and ``poll_interval_s`` = 1, and dcmtk
``storescu`` as the scanner (pynetdicom when dcmtk is missing). The node is started once and left to load
its atlas and model (until its CPU time stops growing) before the first study, as a node in service
would be; every run then sends one study and waits for the SEG.

Printed per run: the end-to-end seconds (the SCU exits after the last C-STORE response -> the SEG is seen
in the PACS, polled every 0.2 s), the job's stage seconds (completion_wait, queued, preprocessing,
inferring, exporting; from the node's database, read-only) and the analysis timings (volume,
preprocessing, inference, objects; from the job's report), the send time, the load average before and
after. The machine may be shared (a training run, other tests): read the figures with the load average.

Run from the repository root::

    .venv/bin/python tests/benchmarks/bench_e2e.py [--runs 3] [--quiet 10] [--threads 0] [--json out.json]

The working folder (study files, node config, data and ``node.log``, the PACS's storage) is kept and its
path printed, unless ``--clean``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from node.db import open_database  # noqa: E402
from node.db.schema import as_utc  # noqa: E402
from node.demo import study as demo_study  # noqa: E402
from node.demo.pacs import BUILT_IN, HOST, LocalPacs, free_port, local_pacs, wait_for_port  # noqa: E402
from node.demo.series_writer import AXIAL, centred_grid, resample, write_mr_series  # noqa: E402
from node.jobs.states import JobState  # noqa: E402
from node.jobs.store import JobRecord, JobStore  # noqa: E402

NODE_AE = "UADNODE"
SCANNER_AE = "SCANNER1"
PACS_AE = "ORTHANC"
SPACING = (1.0, 1.0, 1.2)
SIZE = (192, 224, 150)  # columns, rows, slices
DESCRIPTION = "T1 MPRAGE AX"
WAIT_S = 600.0  # bound on every wait: the node's start, one send, one analysis
PACS_POLL_S = 0.2
DB_POLL_S = 1.0
SETTLE_S = 1.0  # warm-up: the node is ready once it used less than SETTLE_CPU_S of CPU in this long
SETTLE_CPU_S = 0.05
STOP_TIMEOUT_S = 120.0  # stopping lets a running stage finish (a model pass can take a minute under load)
STAGES = ("completion_wait", "queued", "preprocessing", "inferring", "exporting")
TIMINGS = ("volume", "preprocessing", "inference", "objects")
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # as bench_receive: Nagle off for dcmtk's network layer


@dataclass
class Run:
    """One study sent and its SEG found."""

    index: int
    study_uid: str
    series_uid: str
    slices: int
    send_s: float
    end_to_end_s: float  # SCU finished (last image acknowledged) -> SEG seen in the PACS
    node_end_to_end_s: float  # the node's last_received_at -> SEG seen in the PACS (same clock)
    job_state: str
    job_reason: str
    stages_s: dict[str, float]
    timings_s: dict[str, float]
    results_in_pacs: dict[str, int]  # modality -> instances of the study the PACS holds
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    training_running: bool
    anomaly_volume_ml: float | None = None
    extra: dict[str, object] = field(default_factory=dict)


# --- the study ---------------------------------------------------------------------------------


def brain() -> tuple[str, object]:
    """Colin27 with skull (a head, as scanners send) when installed, else nilearn's MNI152 template."""
    from models.data import brains

    if brains.COLIN27_HEAD.is_file():
        return "Colin27", brains.colin27(skull=True)
    return "MNI152", brains.mni152_t1()


def write_study(head: object, folder: Path) -> tuple[str, str, list[Path]]:
    """A new 150-slice axial T1 study under ``folder``: (study UID, series UID, files)."""
    from pydicom.uid import generate_uid

    study_uid, series_uid = generate_uid(), generate_uid()
    files = write_mr_series(
        resample(head, centred_grid(head, AXIAL, SPACING, SIZE)),  # type: ignore[arg-type]
        folder,
        description=DESCRIPTION,
        study_uid=study_uid,
        series_uid=series_uid,
        # The demo study's patient, study and MPRAGE attributes: what makes the node classify it as T1.
        attributes={**demo_study.STUDY_ATTRIBUTES, **demo_study.T1_ATTRIBUTES, "SeriesTime": "120500"},
    )
    return study_uid, series_uid, files


# --- the node ----------------------------------------------------------------------------------


def write_config(folder: Path, port: int, pacs: LocalPacs, quiet_s: float, threads: int) -> Path:
    """The node's config: loopback, the scanner allowed, the default model, the PACS as destination."""
    path = folder / "node.toml"
    path.write_text(
        f"""
[node]
ae_title = "{NODE_AE}"
host = "{HOST}"
port = {port}
data_dir = "data"
allowed_senders = [ {{ ae_title = "{SCANNER_AE}", host = "{HOST}" }} ]

[completion]
series_quiet_s = {quiet_s:g}
study_quiet_s = {max(quiet_s, 60.0):g}

[jobs]
threads = {threads}
poll_interval_s = 1

[[destinations]]
name = "pacs"
ae_title = "{pacs.ae_title}"
host = "{pacs.host}"
port = {pacs.port}

[logging]
level = "INFO"
"""
    )
    return path


@contextmanager
def running_node(config: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m node serve`` with its output in ``node.log`` beside the config; always stopped."""
    with open(config.with_name("node.log"), "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "node", "serve", "--config", str(config)],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"node did not stop in {STOP_TIMEOUT_S:.0f} s; killed", flush=True)
                process.kill()
                process.wait(timeout=10)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until_idle(process: subprocess.Popen[bytes]) -> float:
    """Seconds until the node, listening, has loaded its atlas and model (its CPU time stops growing)."""
    start = time.monotonic()
    before = cpu_seconds(process.pid)
    while time.monotonic() - start < WAIT_S:
        time.sleep(SETTLE_S)
        alive(process)
        now = cpu_seconds(process.pid)
        if now - before < SETTLE_CPU_S:
            return time.monotonic() - start
        before = now
    raise TimeoutError(f"the node was still busy after {WAIT_S:.0f} s")


def alive(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        raise RuntimeError(f"the node exited with {process.returncode}; see node.log")


# --- sending -----------------------------------------------------------------------------------


def send(files: list[Path], folder: Path, port: int) -> None:
    """All files over one association, as the scanner: dcmtk storescu, else pynetdicom. Returns once the
    last C-STORE response is in."""
    if shutil.which("storescu"):
        command = ["storescu", "-aet", SCANNER_AE, "-aec", NODE_AE, "--propose-little", "+sd", "+r"]
        done = subprocess.run(
            [*command, HOST, str(port), str(folder)], env=DCMTK_ENV, capture_output=True, text=True, timeout=WAIT_S
        )
        if done.returncode != 0:
            raise RuntimeError(f"storescu failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage

    ae = AE(ae_title=SCANNER_AE)
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    association = ae.associate(HOST, port, ae_title=NODE_AE)
    if not association.is_established:
        raise RuntimeError("the node refused the association")
    try:
        for path in files:
            status = association.send_c_store(dcmread(path))
            if not status or status.Status != 0:
                raise RuntimeError(f"C-STORE of {path.name} failed: {status}")
    finally:
        association.release()


def sender_name() -> str:
    return "dcmtk storescu (TCP_NODELAY=1)" if shutil.which("storescu") else "pynetdicom"


# --- waiting -----------------------------------------------------------------------------------


def job_of(db_url: str, series_uid: str) -> JobRecord | None:
    """The newest job of the series, read from the node's database without migrating or writing it."""
    db = open_database(db_url, migrate=False)
    try:
        jobs = [job for job in JobStore(db).all() if job.series_uid == series_uid]
    finally:
        db.close()
    return max(jobs, key=lambda job: job.version) if jobs else None


def in_pacs(pacs: LocalPacs, study_uid: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for received in pacs.received():
        if received.study_uid == study_uid:
            counts[received.modality] = counts.get(received.modality, 0) + 1
    return counts


def wait(condition: Callable[[], bool], every_s: float, what: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        alive(process)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {WAIT_S:.0f} s")
        time.sleep(every_s)


def training_running() -> bool:
    found = subprocess.run(["pgrep", "-f", "uad-node train"], capture_output=True, text=True)
    return found.returncode == 0


# --- one run -----------------------------------------------------------------------------------


def one_run(
    index: int, head: object, folder: Path, port: int, db_url: str, pacs: LocalPacs, node: subprocess.Popen[bytes]
) -> Run:
    study_folder = folder / f"study-{index}"
    study_uid, series_uid, files = write_study(head, study_folder)
    load_before = os.getloadavg()
    training = training_running()

    start = time.perf_counter()
    send(files, study_folder, port)
    acked = time.perf_counter()
    acked_wall = datetime.now(UTC)

    # The SEG in the PACS is the end; the job turns done only after the delivery, so its record is read after.
    last_check = 0.0
    seg_seen = seg_wall = 0.0

    def seg_in_pacs() -> bool:
        nonlocal last_check, seg_seen, seg_wall
        if in_pacs(pacs, study_uid).get("SEG"):
            seg_seen, seg_wall = time.perf_counter(), time.time()
            return True
        if time.monotonic() - last_check >= DB_POLL_S:  # a failed or skipped job would never send a SEG
            last_check = time.monotonic()
            job = job_of(db_url, series_uid)
            if job is not None and job.state.finished and job.state is not JobState.DONE:
                raise RuntimeError(f"job {job.id} {job.state}: {job.reason}")
        return False

    wait(seg_in_pacs, PACS_POLL_S, "the SEG in the PACS", node)
    job: JobRecord | None = None

    def job_done() -> bool:
        nonlocal job
        job = job_of(db_url, series_uid)
        return job is not None and job.state.finished

    wait(job_done, 0.5, "the job finished", node)
    assert job is not None
    last_received = as_utc(job.last_received_at) if job.last_received_at else acked_wall
    report = job.report
    return Run(
        index=index,
        study_uid=study_uid,
        series_uid=series_uid,
        slices=len(files),
        send_s=round(acked - start, 3),
        end_to_end_s=round(seg_seen - acked, 3),
        node_end_to_end_s=round(seg_wall - last_received.timestamp(), 3),
        job_state=str(job.state),
        job_reason=job.reason,
        stages_s=job.stage_seconds(),
        timings_s=dict(report.get("timings_s", {})),
        results_in_pacs=in_pacs(pacs, study_uid),
        load_before=load_before,
        load_after=os.getloadavg(),
        training_running=training,
        anomaly_volume_ml=report.get("anomaly_volume_ml"),
        extra={"ack_minus_last_received_s": round((acked_wall - last_received).total_seconds(), 3)},
    )


# --- printing ----------------------------------------------------------------------------------


def load(values: tuple[float, float, float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def print_run(run: Run) -> None:
    print(
        f"run {run.index}: end-to-end {run.end_to_end_s:.1f} s (last ack -> SEG in PACS; node's last image -> SEG "
        f"{run.node_end_to_end_s:.1f} s), send {run.slices} images {run.send_s:.1f} s, job {run.job_state}"
    )
    print("  stages (s):   " + "  ".join(f"{name} {run.stages_s.get(name, float('nan')):.1f}" for name in STAGES))
    print("  analysis (s): " + "  ".join(f"{name} {run.timings_s.get(name, float('nan')):.1f}" for name in TIMINGS))
    volume = "?" if run.anomaly_volume_ml is None else f"{run.anomaly_volume_ml:.1f}"
    print(
        f"  in PACS: {run.results_in_pacs}; findings {volume} mL; load average {load(run.load_before)} -> "
        f"{load(run.load_after)}; training running: {'yes' if run.training_running else 'no'}"
    )


def median_of(runs: list[Run]) -> dict[str, float]:
    figures: dict[str, list[float]] = {
        "end_to_end_s": [r.end_to_end_s for r in runs],
        "send_s": [r.send_s for r in runs],
    }
    for name in STAGES:
        figures[f"stage.{name}"] = [r.stages_s[name] for r in runs if name in r.stages_s]
    for name in TIMINGS:
        figures[f"analysis.{name}"] = [r.timings_s[name] for r in runs if name in r.timings_s]
    return {name: round(statistics.median(values), 3) for name, values in figures.items() if values}


def torch_threads(configured: int) -> str:
    if configured:
        return f"{configured} (config [jobs] threads)"
    import torch

    return f"{torch.get_num_threads()} (config [jobs] threads = 0: torch's default)"


# --- main --------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="studies sent one after the other (fresh UIDs each)")
    parser.add_argument("--quiet", type=float, default=10.0, help="[completion] series_quiet_s, seconds")
    parser.add_argument("--threads", type=int, default=0, help="[jobs] threads; 0 = all cores")
    parser.add_argument("--json", type=Path, help="write the runs and their medians here")
    parser.add_argument("--clean", action="store_true", help="delete the working folder at the end")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="uad-bench-e2e-"))
    cores = len(os.sched_getaffinity(0))
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs ({cores} usable), load average "
        f"{load(os.getloadavg())}, training process running: {'yes' if training_running() else 'no'}"
    )
    print(f"working folder: {folder} (node log: {folder / 'node.log'})")
    name, head = brain()
    print(
        f"study: {name}, {SIZE[0]}x{SIZE[1]}x{SIZE[2]} at {'x'.join(f'{s:g}' for s in SPACING)} mm axial, "
        f'"{DESCRIPTION}"; sender: {sender_name()}'
    )
    threads = torch_threads(args.threads)  # before the node starts: importing torch takes CPU
    runs: list[Run] = []
    meta: dict[str, object] = {}
    try:
        with local_pacs(folder / "pacs", NODE_AE, ae_title=PACS_AE) as pacs:
            fallback = (
                " (Orthanc is not installed: FALLBACK to the built-in storage SCP)" if pacs.kind == BUILT_IN else ""
            )
            print(f"PACS: {pacs.kind} on {pacs.host}:{pacs.port}{fallback}")
            port = free_port()
            config = write_config(folder, port, pacs, args.quiet, args.threads)
            db_url = f"sqlite:///{folder / 'data' / 'uad-node.sqlite'}"
            started = time.monotonic()
            with running_node(config) as node:
                wait_for_port(port, node, timeout_s=WAIT_S)
                listening = time.monotonic() - started
                settled = wait_until_idle(node)
                meta = {
                    "cpu_count": os.cpu_count(),
                    "usable_cores": cores,
                    "torch_threads": threads,
                    "quiet_s": args.quiet,
                    "threads": args.threads,
                    "pacs": pacs.kind,
                    "sender": sender_name(),
                    "brain": name,
                    "folder": str(folder),
                }
                print(
                    f"node: default model, series_quiet_s {args.quiet:g}, poll 1 s, torch threads "
                    f"{threads}; listening after {listening:.1f} s, idle (model loaded) "
                    f"{settled:.1f} s later"
                )
                for index in range(1, args.runs + 1):
                    run = one_run(index, head, folder, port, db_url, pacs, node)
                    runs.append(run)
                    print_run(run)
    finally:
        print(f"node and PACS stopped; load average {load(os.getloadavg())}")
        if args.clean:
            shutil.rmtree(folder, ignore_errors=True)
    medians = median_of(runs)
    if len(runs) > 1:
        print(
            f"median of {len(runs)}: end-to-end {medians['end_to_end_s']:.1f} s; "
            + "  ".join(f"{key} {value:.1f}" for key, value in medians.items() if key != "end_to_end_s")
        )
    target = "met" if medians["end_to_end_s"] < 60 else "NOT met"
    print(f"target (< 60 s end to end): {target}")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "runs": [asdict(r) for r in runs], "median": medians}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
