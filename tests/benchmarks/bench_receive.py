"""Receive-throughput benchmark: the node against dcmtk storescp and Orthanc.

Generates synthetic MR series, sends each with one dcmtk ``storescu``
association to every receiver on 127.0.0.1, and prints instances/s and MB/s
per receiver so the node's figures read against two well-known baselines.

Run from the repository root::

    .venv/bin/python tests/benchmarks/bench_receive.py [--quick]

Only synthetic data (fake patient "BENCH^PATIENT") and only loopback traffic.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shlex
import socket
import socketserver
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
NODE_COMMAND = REPO_ROOT / ".venv" / "bin" / "uad-node"
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


@dataclass(frozen=True)
class SendResult:
    """The outcome of sending one series to one receiver."""

    series: GeneratedSeries
    receiver: str
    seconds: float
    stored: int
    error: str = ""

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


def write_series(spec: SeriesSpec, directory: Path, rng: np.random.Generator) -> GeneratedSeries:
    """Write one series of unique instances; noise pixels so no layer can shortcut on content."""
    directory.mkdir(parents=True)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    total = 0
    for index in range(spec.slices):
        pixels = rng.integers(0, 4096, size=(spec.size, spec.size), dtype=np.uint16)
        path = directory / f"{index:05d}.dcm"
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


def wait_until(ready: Callable[[], bool], process: subprocess.Popen[bytes], log: Path, what: str) -> None:
    """Poll ``ready`` until it holds; fail early if the server exits, and after START_TIMEOUT_S."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ReceiverUnavailable(f"{what} exited with code {process.returncode}: {log_tail(log)}")
        if ready():
            return
        time.sleep(0.1)
    raise ReceiverUnavailable(f"{what} not ready after {START_TIMEOUT_S:.0f} s: {log_tail(log)}")


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


@contextmanager
def node_receiver(workdir: Path) -> Iterator[Receiver]:
    """The uad-node under test, with a throwaway config and data directory."""
    if not NODE_COMMAND.exists():
        raise ReceiverUnavailable(f"{NODE_COMMAND} does not exist")
    port = free_port()
    data_dir = workdir / "node-data"
    config = workdir / "node.toml"
    config.write_text(
        "[node]\n"
        'ae_title = "UADNODE"\n'
        f'host = "{LOOPBACK}"\n'
        f"port = {port}\n"
        f"data_dir = {json.dumps(str(data_dir))}\n"
        "allowed_senders = []\n"
        "min_free_disk_mb = 100\n"
    )
    command = [str(NODE_COMMAND), "serve", "--config", str(config)]
    log = workdir / "node.log"
    with server(command, log) as process:
        wait_until(accepts_tcp(port), process, log, "uad-node")
        count = partial(count_files, data_dir / "studies", "*.dcm")
        yield Receiver("node", "UADNODE", port, count, shlex.join(command))


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
    """One association, every file of the series, explicit VR little endian proposed first."""
    return [
        "storescu",
        "-aet", CALLING_AET,
        "-aec", called_ae,
        "--propose-little",
        "--scan-directories",
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


def send_series(receiver: Receiver, series: GeneratedSeries) -> SendResult:
    """Time one storescu run (wall clock) and check the receiver kept every instance."""
    before = receiver.count_stored()
    command = storescu_command(receiver.ae_title, str(receiver.port), str(series.directory))
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=DCMTK_ENV, capture_output=True, text=True, timeout=SEND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return SendResult(series, receiver.name, SEND_TIMEOUT_S, 0, f"storescu timed out after {SEND_TIMEOUT_S:.0f} s")
    seconds = time.perf_counter() - start
    stored = wait_for_count(receiver, before + series.spec.slices) - before
    error = ""
    if done.returncode != 0:
        error = f"storescu exited {done.returncode}: {' | '.join(done.stderr.strip().splitlines()[-3:])}"
    elif stored != series.spec.slices:
        error = f"receiver stored {stored} of {series.spec.slices} instances"
    return SendResult(series, receiver.name, seconds, stored, error)


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


def _median_run(group: list[SendResult]) -> SendResult:
    """The run with the median time among the successful ones (the first failure if none)."""
    ok = sorted((r for r in group if not r.error), key=lambda r: r.seconds)
    return ok[(len(ok) - 1) // 2] if ok else group[0]


def format_table(results: list[SendResult], unavailable: dict[str, str], series: list[GeneratedSeries]) -> str:
    """Per series and receiver throughput, then the node's ratios to each baseline."""
    lines = [
        f"{'set':<22} {'receiver':<15} {'instances':>9} {'seconds':>8} {'inst/s':>9} {'MB/s':>8}  status",
        "-" * 84,
    ]
    order = {name: rank for rank, name in enumerate(RECEIVERS)}
    runs: dict[tuple[str, str], list[SendResult]] = {}
    for result in results:
        runs.setdefault((result.series.spec.name, result.receiver), []).append(result)
    failed_runs = sum(1 for r in results if r.error)
    results = [_median_run(group) for group in runs.values()]
    for result in sorted(results, key=lambda r: (r.series.spec.name, order[r.receiver])):
        spec = result.series.spec
        label = f"{spec.name} {spec.slices}x{spec.size}^2"
        status = f"FAILED: {result.error}" if result.error else "ok"
        lines.append(
            f"{label:<22} {result.receiver:<15} {result.stored:>9} {result.seconds:>8.2f} "
            f"{result.instances_per_s:>9.1f} {result.mb_per_s:>8.1f}  {status}"
        )
    for name, reason in unavailable.items():
        lines.append(f"{name}: not available ({reason})")
    if failed_runs:
        lines.append(f"{failed_runs} run(s) failed; see the lines printed while sending")
    lines.append("")
    lines.append("ratios of the node's throughput (instances/s; MB/s ratios are identical):")
    by_key = {(r.series.spec.name, r.receiver): r for r in results if not r.error}
    for generated in series:
        name = generated.spec.name
        node = by_key.get((name, "node"))
        for baseline in ("node-noop", "pynetdicom-noop", "storescp", "Orthanc", "Orthanc-default"):
            other = by_key.get((name, baseline))
            ratio = f"{node.instances_per_s / other.instances_per_s:.2f}" if node and other else "n/a"
            lines.append(f"  {name}: node/{baseline} = {ratio}")
    return "\n".join(lines)


RECEIVERS = {
    "node": node_receiver,
    "node-noop": noop_receiver,
    "pynetdicom-noop": partial(noop_receiver, stock=True),
    "storescp": storescp_receiver,
    "Orthanc": orthanc_receiver,
    "Orthanc-default": orthanc_default_receiver,
}


def main() -> int:
    """Generate the sets, send each to every receiver in turn (one running at a time), report."""
    parser = argparse.ArgumentParser(description="Receive throughput: uad-node vs storescp vs Orthanc.")
    parser.add_argument("--quick", action="store_true", help="100 and 400 slices instead of 500 and 2000")
    parser.add_argument("--repeat", type=int, default=1, help="runs per receiver; the table shows the median")
    args = parser.parse_args()

    specs = [
        SeriesSpec("A", 100 if args.quick else 500, 512),
        SeriesSpec("B", 400 if args.quick else 2000, 64),
    ]
    results: list[SendResult] = []
    unavailable: dict[str, str] = {}
    commands: list[str] = []

    with tempfile.TemporaryDirectory(prefix="uad-bench-") as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(20240101)
        series: list[GeneratedSeries] = []
        for spec in specs:
            start = time.perf_counter()
            series.append(write_series(spec, root / "input" / spec.name, rng))
            print(
                f"generated set {spec.name}: {spec.slices} x {spec.size}x{spec.size}, "
                f"{series[-1].total_bytes / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s",
                flush=True,
            )

        for run, (name, start_receiver) in itertools.product(range(args.repeat), RECEIVERS.items()):
            if name in unavailable:
                continue
            workdir = root / f"{name}-{run}"  # a fresh receiver per run: re-sent images would be duplicates
            workdir.mkdir()
            try:
                with start_receiver(workdir) as receiver:
                    if run == 0:
                        commands.append(f"{name}: {receiver.command}")
                    for generated in series:
                        result = send_series(receiver, generated)
                        results.append(result)
                        print(
                            f"{name} set {generated.spec.name}: {result.seconds:.2f} s"
                            + (f" FAILED: {result.error}" if result.error else ""),
                            flush=True,
                        )
            except ReceiverUnavailable as exc:
                unavailable[name] = str(exc)
                print(f"{name}: not available ({exc})", flush=True)

    print()
    print("machine:")
    for fact in machine_facts():
        print(f"  {fact}")
    print("commands:")
    for line in commands:
        print(f"  {line}")
    print(f"  send: TCP_NODELAY=1 {' '.join(storescu_command('<AE>', '<port>', '<set dir>'))}")
    print("  MB = 10^6 bytes of DICOM files sent; times are the wall clock of one storescu run")
    print(f"  each receiver started fresh for each of {args.repeat} run(s); the table shows the median run")
    print()
    print(format_table(results, unavailable, series))
    return 1 if any(result.error for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
