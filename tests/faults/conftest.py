"""Harness shared by the fault-injection scenarios.

- ``FaultNode``: ``uad-node serve`` as a subprocess that can be killed with SIGKILL and restarted on
  the same data; its database (SQLite or PostgreSQL) is read directly to check what is stored.
- ``Streamer``: a sender (pynetdicom) that records exactly which SOP Instance UIDs were acknowledged
  with Success, re-associates after an abort and re-sends what was not acknowledged, as a scanner does.
- ``StoreScpPeer``: dcmtk ``storescp`` as PACS, one file per received object (``+uf``), so every
  C-STORE it accepted is counted, duplicates included; start, stop, flap and slow (``--sleep-after``).
- ``assert_stored``: acknowledged ⊆ stored-and-listed (row, file with that UID, ``status --json`` count).
- ``recovery_s``: seconds from the end of a fault to the first C-ECHO Success plus C-STORE Success.
- ``fault_table``: every scenario appends a row (fault, rounds, acknowledged, lost, duplicated
  deliveries, recovery seconds); the table is written as JSON and markdown to ``UAD_FAULT_TABLE``
  (default: ``fault-table.md`` in the pytest base temp dir) and printed in the terminal summary.

Rounds: ``UAD_FAULT_ROUNDS`` (default 1, the CI subset). Random points: ``random.Random`` seeded from
``UAD_FAULT_SEED`` (default: drawn and printed), per test, so a failing run is replayed with the same seed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage, Verification
from sqlalchemy import text

from node.db import open_database
from node.network import set_tcp_nodelay
from tests.mr_files import mr_series
from tests.peers import REPO, NodeProcess, free_port, node_config, require_tool, wait_for_port

ROUNDS = max(1, int(os.environ.get("UAD_FAULT_ROUNDS", "1")))
SEED = int(os.environ.get("UAD_FAULT_SEED") or random.SystemRandom().randrange(1, 10**6))
FULL = os.environ.get("UAD_FAULT_FULL") == "1"
FULL_ONLY = pytest.mark.skipif(not FULL, reason="full fault run only (UAD_FAULT_FULL=1)")
NODE_AE = "UADNODE"
SENDERS = ("SCANNER1", "SCANNER2", "SCANNER3", "SCANNER4")

_TABLE: list[dict] = []


# ---------------------------------------------------------------------------------------------
# seeds and the results table


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """A random source per test, from the printed session seed (replay: UAD_FAULT_SEED=<seed>)."""
    print(f"fault seed {SEED} (replay with UAD_FAULT_SEED={SEED})")
    return random.Random(f"{SEED}:{request.node.name}")


@dataclass
class FaultRow:
    fault: str
    rounds: int
    acknowledged: int
    lost: int
    duplicated: int
    recovery_s: float | None
    note: str = ""


def _table_path(config: pytest.Config) -> Path:
    configured = os.environ.get("UAD_FAULT_TABLE")
    if configured:
        return Path(configured)
    factory = getattr(config, "_tmp_path_factory", None)
    base = factory.getbasetemp() if factory is not None else Path("/tmp")
    return Path(base) / "fault-table.md"


@pytest.fixture
def fault_table() -> Iterator:
    """``record(FaultRow(...))`` appends one row for this scenario."""

    def record(row: FaultRow) -> None:
        _TABLE.append(row.__dict__ | {"seed": SEED})

    yield record


def render_table(rows: list[dict]) -> str:
    lines = [
        "| fault | rounds | images acknowledged | lost | duplicated deliveries | recovery (s) | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        recovery = "-" if r["recovery_s"] is None else f"{r['recovery_s']:.2f}"
        lines.append(
            f"| {r['fault']} | {r['rounds']} | {r['acknowledged']} | {r['lost']} | {r['duplicated']} "
            f"| {recovery} | {r['note']} |"
        )
    return "\n".join(lines)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not _TABLE:
        return
    path = _table_path(session.config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_table(_TABLE) + "\n")
    path.with_suffix(".json").write_text(json.dumps(_TABLE, indent=1))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    if not _TABLE:
        return
    terminalreporter.section(f"fault table (seed {SEED}, UAD_FAULT_ROUNDS={ROUNDS})")
    terminalreporter.write_line(render_table(_TABLE))
    terminalreporter.write_line(f"written to {_table_path(config)} (and .json)")


# ---------------------------------------------------------------------------------------------
# the node


@dataclass
class FaultNode(NodeProcess):
    """A node that can be SIGKILLed and restarted on the same config, and whose database is read directly."""

    database_url: str = ""
    kills: int = 0

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'uad-node.sqlite'}"

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=20)
        self.process = None
        self.kills += 1

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def rss_kb(self) -> int:
        """Resident memory of serve and its child processes (workers), from /proc (no psutil here)."""
        return sum(_rss_kb(pid) for pid in [self.pid(), *_children(self.pid())])

    def query(self, sql: str, **params: object) -> list:
        db = open_database(self.db_url, migrate=False)
        try:
            with db.engine.connect() as conn:
                return list(conn.execute(text(sql), params))
        finally:
            db.close()


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                found += [int(child), *_children(int(child))]
    except OSError:
        pass
    return found


def fault_config(
    folder: Path,
    port: int,
    *,
    checkpoint: Path | None = None,
    pacs_port: int | None = None,
    database_url: str = "",
    min_free_disk_mb: int = 1,
    extra_node: str = "",
    extra: str = "",
) -> Path:
    """A test node config (``tests.peers.node_config``), optionally with a model and a storescp destination."""
    node_lines = extra_node
    if database_url:
        node_lines += f'\ndatabase_url = "{database_url}"'
    sections = extra
    if checkpoint is not None:
        sections += f"""
[selection]
models = {{ T1 = "{checkpoint}" }}

[completion]
series_quiet_s = 1
study_quiet_s = 2

[jobs]
threads = 1
poll_interval_s = 0.2
export_first_delay_s = 0.5
export_max_delay_s = 2
"""
    if pacs_port is not None:
        sections += f"""
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = {pacs_port}
"""
    return node_config(folder, port, min_free_disk_mb=min_free_disk_mb, extra_node=node_lines, extra=sections)


@pytest.fixture
def fault_node(tmp_path: Path) -> Iterator:
    """``make(folder=..., **fault_config options) -> FaultNode`` (not started); all are stopped at teardown."""
    made: list[FaultNode] = []

    def make(folder: Path | None = None, **options: object) -> FaultNode:
        folder = folder or tmp_path
        folder.mkdir(parents=True, exist_ok=True)
        port = free_port()
        config = fault_config(folder, port, **options)  # type: ignore[arg-type]
        node = FaultNode(
            config_path=config,
            data_dir=folder / "data",
            port=port,
            ae_title=NODE_AE,
            database_url=str(options.get("database_url", "")),
        )
        made.append(node)
        return node

    yield make
    for node in made:
        if node.alive():
            node.stop()


# ---------------------------------------------------------------------------------------------
# senders


def scu(ae_title: str = "SCANNER1", timeout_s: float = 10.0) -> AE:
    ae = AE(ae_title=ae_title)
    for context in (Verification, MRImageStorage, CTImageStorage, SecondaryCaptureImageStorage):
        ae.add_requested_context(context)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    return ae


def associate(port: int, ae_title: str = "SCANNER1", timeout_s: float = 10.0):  # type: ignore[no-untyped-def]
    return scu(ae_title, timeout_s).associate(
        "127.0.0.1", port, ae_title=NODE_AE, evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)]
    )


def store_statuses(port: int, datasets: list[Dataset], ae_title: str = "SCANNER1") -> list[int | None]:
    """C-STORE each data set on one association: the statuses (None: no response)."""
    assoc = associate(port, ae_title)
    assert assoc.is_established, f"association from {ae_title} not established"
    try:
        out: list[int | None] = []
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            out.append(int(rsp.Status) if rsp is not None and "Status" in rsp else None)
        return out
    finally:
        if assoc.is_established:
            assoc.release()


@dataclass
class Streamer:
    """A sender streaming ``datasets`` until all are acknowledged (or ``stop``), re-sending unacknowledged
    images on a new association after any abort or refusal. ``acked``: SOP Instance UIDs answered Success."""

    port: int
    datasets: list[Dataset]
    ae_title: str = "SCANNER1"
    pause_s: float = 0.0
    acked: set[str] = field(default_factory=set)
    statuses: Counter = field(default_factory=Counter)
    aborts: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Streamer:
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"stream-{self.ae_title}")
        self.thread.start()
        return self

    def _run(self) -> None:
        pending = list(self.datasets)
        while pending and not self.stop.is_set():
            try:
                assoc = associate(self.port, self.ae_title, timeout_s=5)
            except Exception:  # noqa: BLE001 - a refused connection is one more retry
                assoc = None
            if assoc is None or not assoc.is_established:
                self.statuses["no association"] += 1
                time.sleep(0.2)
                continue
            try:
                while pending and not self.stop.is_set():
                    ds = pending[0]
                    rsp = assoc.send_c_store(ds)
                    status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
                    self.statuses[status] += 1
                    if status == 0x0000:
                        self.acked.add(str(ds.SOPInstanceUID))
                        pending.pop(0)
                    elif status is None:
                        self.aborts += 1
                        break
                    elif 0xA700 <= status <= 0xA7FF:
                        time.sleep(0.3)  # out of resources: keep it, try again later
                        break
                    else:
                        pending.pop(0)  # a failure that re-sending will not change
                    if self.pause_s:
                        time.sleep(self.pause_s)
            except Exception:  # noqa: BLE001
                self.aborts += 1
            finally:
                try:
                    if assoc.is_established:
                        assoc.release()
                    else:
                        assoc.abort()
                except Exception:  # noqa: BLE001
                    pass

    def join(self, timeout_s: float = 120.0) -> None:
        assert self.thread is not None
        self.thread.join(timeout=timeout_s)
        assert not self.thread.is_alive(), f"{self.ae_title} still sending after {timeout_s} s"

    def done(self) -> bool:
        return len(self.acked) == len({str(d.SOPInstanceUID) for d in self.datasets})


def four_streams(
    port: int, images_each: int, rng: random.Random, size: int = 32, pause_s: float = 0.0
) -> list[Streamer]:
    """Four senders (SCANNER1..4), each streaming its own series. The series are named "localizer" so the
    node skips them instead of analysing noise (the scenarios that need an analysis send a real T1 too)."""
    streams = []
    for title in SENDERS:
        series = mr_series(images_each, size=size, seed=rng.randrange(10**6))
        for ds in series:
            ds.SeriesDescription = "localizer"
        streams.append(Streamer(port, series, ae_title=title, pause_s=pause_s))
    return streams


def orphan_files(node: FaultNode) -> int:
    """Files under studies/ without a row: renamed into place by a store that was killed before its row
    committed. Never acknowledged (the sender re-sends them), so not a loss; reported, not asserted."""
    known = {r[0] for r in node.query("SELECT path FROM instances WHERE path IS NOT NULL")}
    return sum(1 for p in (node.data_dir / "studies").rglob("*.dcm") if str(p) not in known)


# ---------------------------------------------------------------------------------------------
# checks


def assert_stored(node: FaultNode, acked: set[str]) -> int:
    """Every acknowledged UID has a row marked stored whose file exists and holds that UID, and ``status
    --json`` lists each series with as many instances as it has rows. Returns the number lost (asserted 0)."""
    rows = {r[0]: r for r in node.query("SELECT sop_instance_uid, stored, path FROM instances")}
    lost = []
    for uid in sorted(acked):
        row = rows.get(uid)
        if row is not None and not row[1] and row[2] is None:
            continue  # acknowledged and recorded as ignored: its SOP class is not kept (by configuration)
        if row is None or not row[1] or not row[2] or not Path(row[2]).is_file():
            lost.append(uid)
            continue
        if str(pydicom.dcmread(row[2], stop_before_pixels=True).SOPInstanceUID) != uid:
            lost.append(uid)
    per_series = dict(
        node.query(
            "SELECT s.series_uid, count(i.id) FROM series s JOIN instances i ON i.series_id = s.id "
            "GROUP BY s.series_uid"
        )
    )
    listed = {s["series_uid"]: s["instances"] for st in node.status()["studies"] for s in st["series"]}
    assert listed == per_series, f"status --json lists {listed}, the database holds {per_series}"
    assert not lost, f"{len(lost)} acknowledged image(s) lost: {lost[:5]}"
    return len(lost)


def recovery_s(node: FaultNode, since: float, timeout_s: float = 120.0) -> float:
    """Seconds from ``since`` (monotonic: the end of the fault) to a C-ECHO Success and a C-STORE Success."""
    probe = mr_series(1, seed=99)[0]
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            assoc = associate(node.port, "SCANNER1", timeout_s=5)
            if assoc.is_established:
                try:
                    echo = assoc.send_c_echo()
                    store = assoc.send_c_store(probe)
                    if echo and echo.Status == 0 and store and store.Status == 0:
                        elapsed = time.monotonic() - since
                        assoc.release()
                        return elapsed
                    last = f"echo {echo.get('Status')}, store {store.get('Status')}"
                finally:
                    if assoc.is_established:
                        assoc.release()
            else:
                last = "association not established"
        except Exception as exc:  # noqa: BLE001
            last = repr(exc)
        time.sleep(0.1)
    raise AssertionError(f"no C-ECHO + C-STORE Success within {timeout_s} s after the fault ({last})")


def new_uid() -> str:
    return str(generate_uid())


# ---------------------------------------------------------------------------------------------
# PACS peer


@dataclass
class StoreScpPeer:
    """dcmtk ``storescp`` (AE ``PACS``) on a fixed port; one new file per received object, so every accepted
    C-STORE is counted, duplicates too. ``slow_s``: ``--sleep-after`` each store (a slow PACS)."""

    port: int
    out: Path
    slow_s: int = 0
    process: subprocess.Popen | None = None

    def start(self) -> StoreScpPeer:
        self.out.mkdir(parents=True, exist_ok=True)
        args = ["--sleep-after", str(self.slow_s)] if self.slow_s else []
        self.process = subprocess.Popen(
            [require_tool("storescp"), "-aet", "PACS", "+uf", "-od", str(self.out), "-ta", "10", "-td", "30",
             *args, str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "TCP_NODELAY": "1"},
        )  # fmt: skip
        wait_for_port(self.port, self.process)
        return self

    def stop(self, kill: bool = False) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill() if kill else process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)

    def received(self) -> Counter:
        """SOP Instance UID -> how many times it was received."""
        counts: Counter = Counter()
        for path in self.out.iterdir():
            if path.is_file():
                try:
                    counts[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] += 1
                except Exception:  # noqa: BLE001 - a file being written right now
                    pass
        return counts


@pytest.fixture
def storescp_peer(tmp_path: Path) -> Iterator:
    made: list[StoreScpPeer] = []

    def make(slow_s: int = 0, port: int | None = None) -> StoreScpPeer:
        peer = StoreScpPeer(port or free_port(), tmp_path / f"pacs{len(made)}", slow_s)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.stop()


# ---------------------------------------------------------------------------------------------
# jobs and deliveries (read from the database, so SQLite and PostgreSQL alike)


def jobs(node: FaultNode) -> list:
    return node.query("SELECT id, series_uid, state, reason, attempts, version FROM jobs ORDER BY id")


FINISHED = {"done", "failed", "skipped", "cancelled"}


def wait_jobs(node: FaultNode, done, what: str, timeout_s: float = 240.0) -> list:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    rows: list = []
    while time.monotonic() < deadline:
        try:
            rows = jobs(node)
        except Exception:  # noqa: BLE001 - the database may be down in a fault
            rows = []
        if done(rows):
            return rows
        assert node.alive(), node.log()[-3000:]
        time.sleep(0.3)
    raise AssertionError(f"{what}: not after {timeout_s} s; jobs: {rows}\n{node.log()[-3000:]}")


def delivered_uids(node: FaultNode, series_uid: str) -> list[tuple[str, str, int]]:
    """(SOP Instance UID, state, attempts) of the deliveries of one analysed series."""
    return [
        (r[0], r[1], r[2])
        for r in node.query(
            "SELECT sop_instance_uid, state, attempts FROM deliveries WHERE source_series_uid = :s", s=series_uid
        )
    ]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_model import write_fast_checkpoint

    return write_fast_checkpoint(tmp_path_factory.mktemp("model") / "fast.pt")


@pytest.fixture(scope="session")
def t1_series(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    """One analysable T1 series (Colin27, 24 slices at 6 mm) as data sets, read once; each use gets new UIDs."""
    from tests import brains
    from tests.dicom_series import AXIAL, centred_grid, resample, write_mr_series

    colin = brains.colin27(skull=True)
    folder = tmp_path_factory.mktemp("t1")
    paths = write_mr_series(
        resample(colin, centred_grid(colin, AXIAL, (1.5, 1.5, 6.0), (120, 140, 24))), folder, description="T1 AX"
    )
    return [pydicom.dcmread(p) for p in paths]


def fresh_copy(series: list[Dataset]) -> list[Dataset]:
    """The same images as a new study and series with new SOP Instance UIDs."""
    study, series_uid, frame = new_uid(), new_uid(), new_uid()
    out = []
    for ds in series:
        copy = deepcopy(ds)
        copy.StudyInstanceUID, copy.SeriesInstanceUID = study, series_uid
        if "FrameOfReferenceUID" in copy:
            copy.FrameOfReferenceUID = frame
        copy.SOPInstanceUID = new_uid()
        copy.file_meta.MediaStorageSOPInstanceUID = copy.SOPInstanceUID
        out.append(copy)
    return out


def uad_node(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", *args], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )


def store_fresh_series(port: int, series: list[Dataset]) -> tuple[str, set[str]]:
    """Send a ``fresh_copy`` of ``series`` on one association; every image must be acknowledged. Returns the new
    Series Instance UID and the acknowledged SOP Instance UIDs."""
    copy = fresh_copy(series)
    assert store_statuses(port, copy) == [0] * len(copy)
    return str(copy[0].SeriesInstanceUID), {str(ds.SOPInstanceUID) for ds in copy}
