"""Receive-throughput benchmark: the node against dcmtk storescp and Orthanc.

Generates synthetic MR series and sends each, with dcmtk ``storescu`` on
127.0.0.1, to every receiver over one association and over 4 concurrent ones
(the set split in four), and prints instances/s and MB/s per receiver and
number of senders, so the node's figures read against two well-known baselines.
The node runs three ways: idle (start-up finished), during an analysis (the
shipped T1 model analysing a sample brain series started just before), and
from a cold start (the rate in the first second after it starts listening);
"node x2" is the idle node with ``[node] receiver_processes = 2``.
For the node it also prints rows/commits of its group commit (rows > commits:
concurrent handlers shared commits).

Run from the repository root::

    .venv/bin/python tests/benchmarks/bench_receive.py [--quick] [--repeat N] [--all]

Only synthetic data (fake patient "BENCH^PATIENT") and only loopback traffic.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import signal
import socket
import socketserver
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_COMMAND = REPO_ROOT / ".venv" / "bin" / "uad-node"  # else this interpreter's ``-m node`` (a git worktree)
ORTHANC_COMMAND = "/usr/sbin/Orthanc"
LOOPBACK = "127.0.0.1"
CALLING_AET = "BENCH"

START_TIMEOUT_S = 30.0  # a receiver that is not listening by then counts as failed to start
STOP_GRACE_S = 10.0  # SIGTERM first, SIGKILL after this
SEND_TIMEOUT_S = 600.0  # far above any expected send; only guards against a hung association
STORED_TIMEOUT_S = 10.0  # lets a receiver that files asynchronously finish before counting
# storescu, storescp and Orthanc all use DCMTK's network layer; with Nagle left on, Orthanc measured
# ~45 ms per instance whatever its size, i.e. delayed-ACK stalls, not receive work.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@dataclass(frozen=True)
class SeriesSpec:
    """One synthetic series: how many slices of what matrix size."""

    name: str
    slices: int
    size: int


@dataclass(frozen=True)
class GeneratedSeries:
    """A series written to disk, with what is needed to compute throughput."""

    spec: SeriesSpec
    directory: Path
    total_bytes: int


@dataclass
class Receiver:
    """A running storage SCP: where to send, and how to count what it kept."""

    name: str
    ae_title: str
    port: int
    count_stored: Callable[[], int]
    command: str  # as a shell line, with its environment, for the report
    log: Path | None = None  # the node's log: its group-commit line is read from it after the stop
    analysing: Callable[[], bool] | None = None  # node+analysis: is the analysis still running?


@dataclass(frozen=True)
class SendResult:
    """The outcome of sending one series to one receiver."""

    series: GeneratedSeries
    receiver: str
    seconds: float
    stored: int
    error: str = ""
    senders: int = 1
    note: str = ""  # e.g. the analysis ended before the send did

    @property
    def instances_per_s(self) -> float:
        return self.series.spec.slices / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.series.total_bytes / 1e6 / self.seconds


class ReceiverUnavailable(Exception):
    """A receiver could not be started; the benchmark reports it and goes on."""


# --- synthetic data ---------------------------------------------------------------------------


def mr_slice(study_uid: str, series_uid: str, frame_uid: str, index: int, size: int, pixels: np.ndarray) -> Dataset:
    """One axial MR slice with the attributes a receiver files and indexes on (PS3.3 A.4)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = "BENCH0001"
    ds.Modality = "MR"
    ds.Manufacturer = "UAD-NODE BENCHMARK"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = f"BENCH {size}x{size}"
    ds.BodyPartExamined = "BRAIN"
    ds.PatientPosition = "HFS"
    ds.PatientName = "BENCH^PATIENT"
    ds.PatientID = "BENCH-0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.SliceThickness = "1.0"
    ds.RepetitionTime = "500"
    ds.EchoTime = "15"
    ds.EchoTrainLength = "1"
    ds.MagneticFieldStrength = "3"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = index + 1
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.ImagePositionPatient = [-size / 2, -size / 2, float(index)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation = float(index)
    ds.PixelSpacing = [1, 1]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return ds


PARTS = 4  # the concurrent senders: each sends one part of the set


def write_series(spec: SeriesSpec, directory: Path, rng: np.random.Generator) -> GeneratedSeries:
    """Write one series of unique instances; noise pixels so no layer can shortcut on content.

    Slice i goes to ``part{i % PARTS}/``: one sender sends the whole folder, four send a part each."""
    for part in range(PARTS):
        (directory / f"part{part}").mkdir(parents=True)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    total = 0
    for index in range(spec.slices):
        pixels = rng.integers(0, 4096, size=(spec.size, spec.size), dtype=np.uint16)
        path = directory / f"part{index % PARTS}" / f"{index:05d}.dcm"
        dcmwrite(path, mr_slice(study_uid, series_uid, frame_uid, index, spec.size, pixels), enforce_file_format=True)
        total += path.stat().st_size
    return GeneratedSeries(spec, directory, total)


# --- process and network helpers --------------------------------------------------------------


def free_port() -> int:
    """A port the kernel just handed out on loopback (free at the time of asking)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def count_files(directory: Path, pattern: str = "*") -> int:
    """Regular files under ``directory`` matching ``pattern``, at any depth."""
    if not directory.is_dir():
        return 0
    return sum(1 for path in directory.rglob(pattern) if path.is_file())


def log_tail(log: Path, lines: int = 5) -> str:
    """The end of a server's log, to say why it did not come up."""
    text = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return " | ".join(text[-lines:]) or "(no output)"


def wait_until(
    ready: Callable[[], bool],
    process: subprocess.Popen[bytes],
    log: Path,
    what: str,
    timeout_s: float = START_TIMEOUT_S,
) -> None:
    """Poll ``ready`` until it holds; fail early if the server exits, and after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ReceiverUnavailable(f"{what} exited with code {process.returncode}: {log_tail(log)}")
        if ready():
            return
        time.sleep(0.1)
    raise ReceiverUnavailable(f"{what} not ready after {timeout_s:.0f} s: {log_tail(log)}")


def accepts_tcp(port: int) -> Callable[[], bool]:
    """Readiness probe: something accepts connections on the loopback port."""

    def probe() -> bool:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1.0):
                return True
        except OSError:
            return False

    return probe


def http_json(url: str) -> dict[str, Any]:
    """GET a JSON object (Orthanc's REST API), with a short timeout."""
    with urllib.request.urlopen(url, timeout=5.0) as response:
        document: dict[str, Any] = json.loads(response.read())
        return document


@contextmanager
def server(command: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server for the duration of the block; always stop it (SIGTERM, then SIGKILL)."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        try:
            yield process
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=STOP_GRACE_S)


# --- receivers --------------------------------------------------------------------------------


SHIPPED_MODEL = REPO_ROOT / "models" / "checkpoints" / "default-t1.pt"  # config/node.toml's T1 model
QUIET_CPU_FRACTION = 0.15  # "start-up finished": the node's process tree uses less than this of a core
QUIET_TIMEOUT_S = 60.0
ANALYSING = ("preprocessing", "inferring")  # job states while the model and the atlas work
ANALYSIS_START_TIMEOUT_S = 400.0  # the worker loads the model and the atlas first


def node_command() -> list[str]:
    """``uad-node`` of the repository's virtual environment; without one (a git worktree), ``python -m node``
    with this interpreter, which imports the ``node`` package of the current directory (the repository root)."""
    return [str(NODE_COMMAND)] if NODE_COMMAND.exists() else [sys.executable, "-m", "node"]


def node_config(port: int, data_dir: Path, quiet_s: float = 10.0, receiver_processes: int = 1) -> str:
    """The embedded defaults (the shipped T1 model included), loopback, anyone may send; the benchmark's own
    series are excluded from analysis so that only the sample brain series is ever analysed."""
    return (
        "[node]\n"
        f"receiver_processes = {receiver_processes}\n"
        'ae_title = "UADNODE"\n'
        f'host = "{LOOPBACK}"\n'
        f"port = {port}\n"
        f"data_dir = {json.dumps(str(data_dir))}\n"
        "allowed_senders = []\n"
        "min_free_disk_mb = 100\n"
        "[selection]\n"
        'exclude = ["^BENCH "]\n'
        f"models = {{ T1 = {json.dumps(str(SHIPPED_MODEL))} }}\n"
        "[completion]\n"
        f"series_quiet_s = {quiet_s}\n"
    )


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and all its descendants (the node's worker processes)."""
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += cpu.get(current, 0.0)
        todo += children.get(current, [])
    return total


def wait_quiet(pid: int) -> float:
    """Wait until the node's start-up work (model loading, migrations) is over; returns the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < QUIET_TIMEOUT_S:
        before = tree_cpu_seconds(pid)
        time.sleep(0.5)
        if (tree_cpu_seconds(pid) - before) / 0.5 < QUIET_CPU_FRACTION:
            break
    return time.monotonic() - start


def count_rows(database: Path, query: str = "SELECT count(*) FROM instances") -> int:
    """A count from the node's SQLite database (WAL: reading never blocks the receiver); 0 before it exists."""
    if not database.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)) as db:
            return int(db.execute(query).fetchone()[0])
    except sqlite3.Error:
        return 0


def sample_series(root: Path) -> Path:
    """The demo's T1 brain series (a simulated tumour), written once per benchmark run."""
    folder = root / "sample-study"
    if not (folder / "t1").is_dir():
        sys.path.insert(0, str(REPO_ROOT))
        from node.demo.study import build_sample_study

        build_sample_study(folder)
    return folder / "t1"


@contextmanager
def node_receiver(workdir: Path, analysis: bool = False, processes: int = 1) -> Iterator[Receiver]:
    """The uad-node under test, with a throwaway config and data directory, once its start-up is over.

    ``analysis``: first send the sample T1 brain series and wait until the shipped model is analysing it,
    so the measurement runs beside a real analysis (``Receiver.analysing`` says whether it still is).
    ``processes``: ``[node] receiver_processes`` (the row "node xN")."""
    port = free_port()
    data_dir = workdir / "node-data"
    config = workdir / "node.toml"
    config.write_text(node_config(port, data_dir, quiet_s=1.0 if analysis else 10.0, receiver_processes=processes))
    command = [*node_command(), "serve", "--config", str(config)]
    log = workdir / "node.log"
    database = data_dir / "uad-node.sqlite"
    with server(command, log) as process:
        wait_until(accepts_tcp(port), process, log, "uad-node")
        analysing: Callable[[], bool] | None = None
        if analysis:
            sample = sample_series(workdir.parent)
            sent = subprocess.run(
                storescu_command("UADNODE", str(port), str(sample)), env=DCMTK_ENV, capture_output=True, text=True
            )
            if sent.returncode != 0:
                raise ReceiverUnavailable(f"sending the sample series failed: {sent.stderr.strip()[-200:]}")
            states = ", ".join(f"'{state}'" for state in ANALYSING)
            query = f"SELECT count(*) FROM jobs WHERE state IN ({states})"
            analysing = partial(lambda: count_rows(database, query) > 0)
            wait_until(analysing, process, log, "an analysis of the sample series", ANALYSIS_START_TIMEOUT_S)
        else:
            wait_quiet(process.pid)
        count = partial(count_files, data_dir / "studies", "*.dcm")
        name = "node+analysis" if analysis else "node" if processes == 1 else f"node x{processes}"
        yield Receiver(name, "UADNODE", port, count, shlex.join(command), log=log, analysing=analysing)


def node_analysis_receiver(workdir: Path) -> contextlib.AbstractContextManager[Receiver]:
    return node_receiver(workdir, analysis=True)


def group_commit_stats(log: Path) -> tuple[int, int, int] | None:
    """(rows, commits, largest batch) from the node's "group commit: ..." lines, written when it stops (one per
    receiver process: summed, the largest batch of all)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    found = [tuple(int(v) for v in line) for line in re.findall(GROUP_COMMIT_LINE, text)]
    if not found:
        return None
    return sum(f[0] for f in found), sum(f[1] for f in found), max(f[2] for f in found)


GROUP_COMMIT_LINE = r"group commit: (\d+) rows in (\d+) commits \(largest batch (\d+)"


@dataclass(frozen=True)
class StartProbe:
    """A node sent a set the moment it starts listening: what it acknowledged in its first seconds."""

    series: GeneratedSeries
    first_second: int  # instances committed within 1 s of the port accepting connections
    second_second: int  # ... within 2 s
    seconds: float  # the whole send
    error: str = ""


def node_start_probe(workdir: Path, series: GeneratedSeries) -> StartProbe:
    """Start the node, and at the first accepted connection start one storescu with the whole set."""
    port = free_port()
    data_dir = workdir / "node-data"
    config = workdir / "node.toml"
    config.write_text(node_config(port, data_dir))
    log = workdir / "node.log"
    database = data_dir / "uad-node.sqlite"
    probe = accepts_tcp(port)
    with server([*node_command(), "serve", "--config", str(config)], log) as process:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not probe():
            if process.poll() is not None or time.monotonic() > deadline:
                raise ReceiverUnavailable(f"uad-node did not start: {log_tail(log)}")
            time.sleep(0.005)
        listening = time.perf_counter()
        sender = subprocess.Popen(
            storescu_command("UADNODE", str(port), str(series.directory)),
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        counts = []
        for mark in (1.0, 2.0):
            time.sleep(max(0.0, listening + mark - time.perf_counter()))
            counts.append(count_rows(database))
        _, stderr = sender.communicate(timeout=SEND_TIMEOUT_S)
        seconds = time.perf_counter() - listening
        error = "" if sender.returncode == 0 else f"storescu exited {sender.returncode}: {stderr.strip()[-200:]}"
    return StartProbe(series, counts[0], counts[1], seconds, error)


@contextmanager
def storescp_receiver(workdir: Path) -> Iterator[Receiver]:
    """dcmtk storescp: the plain file-writing baseline, no database."""
    port = free_port()
    output = workdir / "storescp-data"
    output.mkdir()
    command = ["storescp", "-aet", "STORESCP", "--output-directory", str(output), str(port)]
    log = workdir / "storescp.log"
    with server(command, log, env=DCMTK_ENV) as process:
        wait_until(accepts_tcp(port), process, log, "storescp")
        count = partial(count_files, output)
        yield Receiver("storescp", "STORESCP", port, count, f"TCP_NODELAY=1 {shlex.join(command)}")


def count_orthanc_instances(base_url: str) -> int:
    """Instances in Orthanc's index, which it updates before answering each C-STORE."""
    return int(http_json(f"{base_url}/statistics")["CountInstances"])


@contextmanager
def orthanc_receiver(workdir: Path, env: dict[str, str] = DCMTK_ENV) -> Iterator[Receiver]:
    """Orthanc: a full archive (files plus an SQLite index) as the second baseline."""
    dicom_port, http_port = free_port(), free_port()
    storage = workdir / "orthanc-data"
    config = workdir / "orthanc.json"
    config.write_text(
        json.dumps(
            {
                "Name": "BENCH-ORTHANC",
                "StorageDirectory": str(storage),
                "IndexDirectory": str(storage),
                "DicomAet": "ORTHANC",
                "DicomPort": dicom_port,
                "HttpPort": http_port,
                "DicomCheckCalledAet": False,
                "DicomAlwaysAllowStore": True,
                "RemoteAccessAllowed": False,
                "AuthenticationEnabled": False,
                "Plugins": [],
            },
            indent=2,
        )
    )
    command = [ORTHANC_COMMAND, str(config)]
    base_url = f"http://{LOOPBACK}:{http_port}"

    def answers_http() -> bool:
        try:
            http_json(f"{base_url}/system")
            return True
        except (OSError, ValueError):
            return False

    log = workdir / "orthanc.log"
    nodelay = env.get("TCP_NODELAY") == "1"
    with server(command, log, env=env) as process:
        wait_until(answers_http, process, log, "Orthanc")
        wait_until(accepts_tcp(dicom_port), process, log, "Orthanc DICOM port")
        count = partial(count_orthanc_instances, base_url)
        name = "Orthanc" if nodelay else "Orthanc-default"
        yield Receiver(
            name, "ORTHANC", dicom_port, count, f"{'TCP_NODELAY=1 ' if nodelay else ''}{shlex.join(command)}"
        )


def orthanc_default_receiver(workdir: Path) -> contextlib.AbstractContextManager[Receiver]:
    """Orthanc as installed (Nagle on): the configuration the issue's ~23/s figure came from."""
    return orthanc_receiver(workdir, env={k: v for k, v in os.environ.items() if k != "TCP_NODELAY"})


@contextmanager
def noop_receiver(workdir: Path, stock: bool = False) -> Iterator[Receiver]:
    """A pynetdicom SCP whose C-STORE handler keeps nothing: with the node's association classes
    (``node-noop``) or pynetdicom's own (``pynetdicom-noop``).

    Not receivers anyone should run: they show how much of the node's time per image is the
    pynetdicom transport (PDU decode, DIMSE encode, thread hand-offs) rather than storage, and
    what the node's association loops changed.
    """
    sys.path.insert(0, str(REPO_ROOT))
    from pynetdicom import AE, evt
    from pynetdicom.transport import ThreadedAssociationServer

    from node.config import NodeConfig
    from node.network import set_tcp_nodelay
    from node.receiver.association import NodeServer, SenderGate, request_handler_for
    from node.receiver.server import presentation_contexts

    received = [0]

    def on_store(event: Any) -> int:
        received[0] += 1
        return 0x0000

    ae = AE(ae_title="UADNODE")
    ae.maximum_pdu_size = NodeConfig().node.max_pdu_size
    ae.supported_contexts = presentation_contexts(NodeConfig())
    port = free_port()
    node_classes = {
        "server_class": NodeServer,
        "request_handler": request_handler_for(SenderGate(()), handshake_timeout_s=30.0),
    }
    scp = ae.make_server(
        (LOOPBACK, port),
        evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, set_tcp_nodelay)],
        **({"server_class": ThreadedAssociationServer} if stock else node_classes),
    )
    thread = threading.Thread(target=scp.serve_forever, daemon=True)
    thread.start()
    try:
        name, how = ("pynetdicom-noop", "stock") if stock else ("node-noop", "the node's")
        yield Receiver(name, "UADNODE", port, lambda: received[0], f"in-process SCP, {how} association classes, no-op")
    finally:
        socketserver.BaseServer.shutdown(scp)
        scp.server_close()
        thread.join(timeout=STOP_GRACE_S)


# --- sending and reporting --------------------------------------------------------------------


def storescu_command(called_ae: str, port: str, directory: str) -> list[str]:
    """One association, every file under ``directory``, explicit VR little endian proposed first."""
    return [
        "storescu",
        "-aet", CALLING_AET,
        "-aec", called_ae,
        "--propose-little",
        "--scan-directories", "--recurse",
        LOOPBACK, port, directory,
    ]  # fmt: skip


def wait_for_count(receiver: Receiver, expected: int) -> int:
    """The receiver's stored count once it reaches ``expected`` or STORED_TIMEOUT_S passes."""
    deadline = time.monotonic() + STORED_TIMEOUT_S
    count = receiver.count_stored()
    while count < expected and time.monotonic() < deadline:
        time.sleep(0.2)
        count = receiver.count_stored()
    return count


def send_series(receiver: Receiver, series: GeneratedSeries, senders: int = 1) -> SendResult:
    """Time ``senders`` concurrent storescu runs (wall clock, first start to last exit) that together send
    the series once, and check the receiver kept every instance."""
    before = receiver.count_stored()
    folders = [series.directory] if senders == 1 else [series.directory / f"part{k}" for k in range(senders)]
    commands = [storescu_command(receiver.ae_title, str(receiver.port), str(folder)) for folder in folders]
    start = time.perf_counter()
    processes = [
        subprocess.Popen(command, env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for command in commands
    ]
    errors = []
    for process in processes:
        try:
            _, stderr = process.communicate(timeout=max(1.0, SEND_TIMEOUT_S - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            errors.append(f"storescu timed out after {SEND_TIMEOUT_S:.0f} s")
            continue
        if process.returncode != 0:
            errors.append(f"storescu exited {process.returncode}: {' | '.join(stderr.strip().splitlines()[-3:])}")
    seconds = time.perf_counter() - start
    note = ""
    if receiver.analysing is not None and not receiver.analysing():
        note = "analysis ended before this send did"
    stored = wait_for_count(receiver, before + series.spec.slices) - before
    error = "; ".join(errors)
    if not error and stored != series.spec.slices:
        error = f"receiver stored {stored} of {series.spec.slices} instances"
    return SendResult(series, receiver.name, seconds, stored, error, senders, note)


def machine_facts() -> list[str]:
    """What the figures depend on, so runs on different machines are not compared blindly."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    cpu_model = models[0] if models else platform.processor() or "unknown"
    dcmtk = subprocess.run(["storescu", "--version"], capture_output=True, text=True).stdout.splitlines()
    orthanc = subprocess.run([ORTHANC_COMMAND, "--version"], capture_output=True, text=True).stdout.splitlines()
    return [
        f"nproc: {len(os.sched_getaffinity(0))} (cpu_count {os.cpu_count()})",
        f"cpu: {cpu_model}",
        f"kernel: {platform.platform()}",
        f"python: {platform.python_version()}",
        f"dcmtk: {dcmtk[0].removeprefix('$dcmtk: ').rstrip(' $') if dcmtk else 'unknown'}",
        f"orthanc: {orthanc[0] if orthanc else 'unknown'}",
    ]


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _median_run(group: list[SendResult]) -> SendResult:
    """The run with the median time among the successful ones (the first failure if none)."""
    ok = sorted((r for r in group if not r.error), key=lambda r: r.seconds)
    return ok[(len(ok) - 1) // 2] if ok else group[0]


def format_table(
    results: list[SendResult],
    unavailable: dict[str, str],
    series: list[GeneratedSeries],
    commits: dict[tuple[str, str], list[tuple[int, int, int]]],
    probes: list[StartProbe],
) -> str:
    """Per series, receiver and number of senders: throughput; then the node's ratios, its group commit and
    its first seconds after a cold start."""
    lines = [
        f"{'set':<16} {'receiver':<15} {'senders':>7} {'instances':>9} {'seconds':>8} {'inst/s':>9} "
        f"{'MB/s':>8}  status",
        "-" * 92,
    ]
    order = {name: rank for rank, name in enumerate(RECEIVERS)}
    runs: dict[tuple[str, str, int], list[SendResult]] = {}
    for result in results:
        runs.setdefault((result.series.spec.name, result.receiver, result.senders), []).append(result)
    failed_runs = sum(1 for r in results if r.error)
    medians = [_median_run(group) for group in runs.values()]
    for result in sorted(medians, key=lambda r: (r.series.spec.name, r.senders, order[r.receiver])):
        spec = result.series.spec
        label = f"{spec.name} {spec.slices}x{spec.size}^2"
        status = f"FAILED: {result.error}" if result.error else "ok" + (f" ({result.note})" if result.note else "")
        lines.append(
            f"{label:<16} {result.receiver:<15} {result.senders:>7} {result.stored:>9} {result.seconds:>8.2f} "
            f"{result.instances_per_s:>9.1f} {result.mb_per_s:>8.1f}  {status}"
        )
    for name, reason in unavailable.items():
        lines.append(f"{name}: not available ({reason})")
    if failed_runs:
        lines.append(f"{failed_runs} run(s) failed; see the lines printed while sending")
    lines.append("")
    lines.append("ratios (instances/s; MB/s ratios are identical):")
    by_key = {(r.series.spec.name, r.receiver, r.senders): r for r in medians if not r.error}

    def ratio(a: tuple[str, str, int], b: tuple[str, str, int]) -> str:
        x, y = by_key.get(a), by_key.get(b)
        return f"{x.instances_per_s / y.instances_per_s:.2f}" if x and y else "n/a"

    for generated in series:
        name = generated.spec.name
        for senders in SENDERS:
            parts = [
                f"node/Orthanc = {ratio((name, 'node', senders), (name, 'Orthanc', senders))}",
                f"node/storescp = {ratio((name, 'node', senders), (name, 'storescp', senders))}",
                f"node+analysis/node = {ratio((name, 'node+analysis', senders), (name, 'node', senders))}",
                f"node+analysis/Orthanc = {ratio((name, 'node+analysis', senders), (name, 'Orthanc', senders))}",
                f"node x2/node = {ratio((name, 'node x2', senders), (name, 'node', senders))}",
                f"node x2/Orthanc = {ratio((name, 'node x2', senders), (name, 'Orthanc', senders))}",
            ]
            lines.append(f"  {name}, {senders} sender(s): " + ", ".join(parts))
        lines.append(f"  {name}: node 4 senders / 1 sender = {ratio((name, 'node', 4), (name, 'node', 1))}")
        for baseline in ("node-noop", "pynetdicom-noop", "Orthanc-default"):
            if (name, baseline, 1) in by_key:
                lines.append(f"  {name}, 1 sender: node/{baseline} = {ratio((name, 'node', 1), (name, baseline, 1))}")
    if commits:
        lines.append("")
        lines.append("group commit (all sets of one node run): rows / commits = rows per commit, largest batch")
        for (name, senders), stats in sorted(commits.items()):  # senders: "1", "4" or "1+4" (one run, both)
            shown = ", ".join(f"{r} / {c} = {r / c:.2f}, largest {big}" for r, c, big in stats if c)
            lines.append(f"  {name}, {senders} sender(s): {shown or 'no group-commit line in the log'}")
    if probes:
        lines.append("")
        lines.append("node cold start (storescu started the moment the port accepts; instances committed):")
        for probe in probes:
            idle = by_key.get((probe.series.spec.name, "node", 1))
            versus = f" = {probe.first_second / idle.instances_per_s:.2f}x the idle rate" if idle else ""
            rate = probe.series.spec.slices / probe.seconds
            status = f"  FAILED: {probe.error}" if probe.error else ""
            lines.append(
                f"  set {probe.series.spec.name}: first second {probe.first_second}/s{versus}; "
                f"second second {probe.second_second - probe.first_second}/s; "
                f"whole send {rate:.1f}/s in {probe.seconds:.2f} s{status}"
            )
    return "\n".join(lines)


RECEIVERS = {
    "node": node_receiver,
    "node x2": partial(node_receiver, processes=2),
    "node+analysis": node_analysis_receiver,
    "storescp": storescp_receiver,
    "Orthanc": orthanc_receiver,
    "node-noop": noop_receiver,
    "pynetdicom-noop": partial(noop_receiver, stock=True),
    "Orthanc-default": orthanc_default_receiver,
}
EXTRA = {"node-noop", "pynetdicom-noop", "Orthanc-default"}  # only with --all, one sender only
SENDERS = (1, PARTS)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _run_all(
    repeat: int,
    chosen: list[str],
    plan: list[tuple[str, tuple[int, ...]]],
    sets: dict[int, list[GeneratedSeries]],
    root: Path,
    results: list[SendResult],
    unavailable: dict[str, str],
    commands: list[str],
    commits: dict[tuple[str, str], list[tuple[int, int, int]]],
    probes: list[StartProbe],
) -> None:
    """Every receiver of ``plan`` in turn, ``repeat`` times; appends to the lists and dicts given."""
    series = sets[1]
    for run in range(repeat):
        if "node" in chosen:
            workdir = root / f"node-start-{run}"
            workdir.mkdir()
            try:
                probe = node_start_probe(workdir, series[-1])
                probes.append(probe)
                print(f"node cold start: {probe.first_second} instances in the first second", flush=True)
            except ReceiverUnavailable as exc:
                print(f"node cold start: not available ({exc})", flush=True)
        for name, sender_counts in plan:
            if name in unavailable:
                continue
            label = "+".join(str(n) for n in sender_counts)
            workdir = root / f"{name}-{label}-{run}"  # a fresh receiver: re-sent images would be duplicates
            workdir.mkdir()
            try:
                started = time.perf_counter()
                with RECEIVERS[name](workdir) as receiver:
                    print(f"{name}: ready after {time.perf_counter() - started:.1f} s", flush=True)
                    if run == 0 and 1 in sender_counts:
                        commands.append(f"{name}: {receiver.command}")
                    for senders in sender_counts:
                        for generated in sets[senders]:
                            result = send_series(receiver, generated, senders)
                            results.append(result)
                            print(
                                f"{name} x{senders} set {generated.spec.name}: {result.seconds:.2f} s "
                                f"({result.instances_per_s:.0f}/s)"
                                + (f" FAILED: {result.error}" if result.error else "")
                                + (f" [{result.note}]" if result.note else ""),
                                flush=True,
                            )
                if receiver.log is not None:
                    stats = group_commit_stats(receiver.log)
                    commits.setdefault((name, label), []).append(stats or (0, 0, 0))
            except ReceiverUnavailable as exc:
                unavailable[name] = str(exc)[:300]
                print(f"{name}: not available ({exc})", flush=True)


def main() -> int:
    """Generate the sets, send each to every receiver in turn (one running at a time), report."""
    parser = argparse.ArgumentParser(description="Receive throughput: uad-node vs storescp vs Orthanc.")
    parser.add_argument("--quick", action="store_true", help="100 and 400 slices instead of 500 and 2000")
    parser.add_argument("--repeat", type=int, default=1, help="runs per receiver; the table shows the median")
    parser.add_argument("--all", action="store_true", help="also the no-op SCPs and Orthanc as installed (slow)")
    parser.add_argument("--only", nargs="*", default=None, help="receivers to run (names as in the table)")
    args = parser.parse_args()
    load_at_start = load_average()

    specs = [
        SeriesSpec("A", 100 if args.quick else 500, 512),
        SeriesSpec("B", 400 if args.quick else 2000, 64),
    ]
    results: list[SendResult] = []
    unavailable: dict[str, str] = {}
    commands: list[str] = []
    commits: dict[tuple[str, str], list[tuple[int, int, int]]] = {}
    probes: list[StartProbe] = []
    chosen = [n for n in RECEIVERS if (args.all or n not in EXTRA) and (args.only is None or n in args.only)]

    with tempfile.TemporaryDirectory(prefix="uad-bench-") as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(20240101)
        series: list[GeneratedSeries] = []
        series4: list[GeneratedSeries] = []  # the same sets with other UIDs, for 4 senders
        for spec in specs:
            start = time.perf_counter()
            series.append(write_series(spec, root / "input" / spec.name, rng))
            series4.append(write_series(spec, root / "input4" / spec.name, rng))
            print(
                f"generated set {spec.name} (twice): {spec.slices} x {spec.size}x{spec.size}, "
                f"{series[-1].total_bytes / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s",
                flush=True,
            )
        sets = {1: series, PARTS: series4}
        # One fresh receiver per sender count; node+analysis, slow to get to an analysis, serves both in turn.
        plan: list[tuple[str, tuple[int, ...]]] = []
        for name in chosen:
            if name in EXTRA:
                plan.append((name, (1,)))
            elif name == "node+analysis":
                plan.append((name, SENDERS))
            else:
                plan += [(name, (senders,)) for senders in SENDERS]

        signal.signal(signal.SIGTERM, _interrupt)  # e.g. timeout(1): stop the receivers, print what was measured
        try:
            _run_all(args.repeat, chosen, plan, sets, root, results, unavailable, commands, commits, probes)
        except KeyboardInterrupt:
            print("interrupted: the table shows the runs finished so far", flush=True)

    print()
    print("machine:")
    for fact in machine_facts():
        print(f"  {fact}")
    print(f"  load average (1/5/15 min) at the start: {load_at_start}; at the end: {load_average()}")
    print("commands:")
    for line in commands:
        print(f"  {line}")
    print(f"  send: TCP_NODELAY=1 {' '.join(storescu_command('<AE>', '<port>', '<set dir>'))}")
    print(f"  {PARTS} senders: {PARTS} such storescu at once, each on a quarter of a copy of the set (new UIDs)")
    print("  MB = 10^6 bytes of DICOM files sent; times: wall clock from the first storescu start to the last exit")
    print(
        f"  a fresh receiver per run and sender count (node+analysis: one for both), {args.repeat} run(s), median shown"
    )
    print("  node: after its start-up work is over; node+analysis: while the shipped T1 model analyses a sample series")
    print("  node x2: as node, with [node] receiver_processes = 2 (two receiver processes on one port)")
    print()
    print(format_table(results, unavailable, series, commits, probes))
    return 1 if any(result.error for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
