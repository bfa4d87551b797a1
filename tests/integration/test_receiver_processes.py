"""``[node] receiver_processes = 2``: serve runs its DICOM receiver as two child processes on one port
(SO_REUSEPORT). Real parts only: ``serve`` as a subprocess, dcmtk ``storescu``/``echoscu`` on loopback.

Each receiver process reports in its workers row how many instances it stored, which tells which processes
served the connections: 20 associations all going to one of two sockets would take odds of 2**-19.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from node.db import open_database
from node.jobs.registry import WorkerInfo, all_workers
from tests.dicomweb_bodies import part10, stow_body
from tests.integration.test_tls import Certs, certs, client_context, der, handshake  # noqa: F401 (a fixture)
from tests.mr_files import mr_series, write_series
from tests.peers import REPO, NodeProcess, echo_node, free_port, node_config, require_tool

pytestmark = [pytest.mark.peers, pytest.mark.timeout(120)]

WAIT_S = 30.0
# No analysis model: nothing here is analysed, and a worker loading one only slows the machine down.
LIGHT = "[selection]\nmodels = {}\n[jobs]\nthreads = 1\n"
TWO = "receiver_processes = 2"
NODELAY_ENV = {**os.environ, "TCP_NODELAY": "1"}
TOKEN = "receiver-processes-test-token"


def receivers(node: NodeProcess) -> list[WorkerInfo]:
    """The receiver rows of the workers table, oldest first."""
    db = open_database(f"sqlite:///{node.data_dir / 'uad-node.sqlite'}", migrate=False)
    try:
        return [w for w in all_workers(db) if w.role == "receiver"]
    finally:
        db.close()


def wait_until(node: NodeProcess, condition: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert node.process is not None and node.process.poll() is None, node.log()[-3000:]
        if result := condition():
            return result
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout_s} s\n{node.log()[-3000:]}")


def live_receivers(node: NodeProcess, count: int = 2) -> Callable[[], list[WorkerInfo]]:
    def live() -> list[WorkerInfo]:
        rows = [w for w in receivers(node) if w.live() and w.state == "ready"]
        return rows if len(rows) == count else []

    return live


def stored_by(row: WorkerInfo) -> int:
    """From the row's detail: "N instances stored, M refused"."""
    return int(row.detail.split(" instances stored")[0]) if " instances stored" in row.detail else 0


def storescu(folder: Path, port: int, calling_ae: str) -> subprocess.Popen[bytes]:
    tool = require_tool("storescu")
    return subprocess.Popen(
        [tool, "-aet", calling_ae, "-aec", "UADNODE", "+sd", "127.0.0.1", str(port), str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=NODELAY_ENV,
    )


def gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped has closed its sockets too)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


def test_two_receiver_processes_take_four_senders_and_share_the_connections(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    web_port = free_port()
    web = f'[web]\nenabled = true\nport = {web_port}\ntoken = "{TOKEN}"\n'
    node = node_factory(extra_node=TWO, extra=LIGHT + web)
    first = wait_until(node, live_receivers(node), "two live receiver processes")
    assert len({w.pid for w in first}) == 2 and node.process.pid not in {w.pid for w in first}  # type: ignore[union-attr]

    # 5 rounds of 4 storescu at once (one association each, 2 images): 20 associations, 40 images.
    callers = ["SCANNER1", "SCANNER2", "SCANNER3", "SCANNER1"]
    series = [mr_series(2, seed=i) for i in range(20)]
    for index, datasets in enumerate(series):
        write_series(datasets, tmp_path / "send" / str(index))
    for round_ in range(5):
        senders = [storescu(tmp_path / "send" / str(4 * round_ + i), node.port, callers[i]) for i in range(4)]
        for sender in senders:
            _, err = sender.communicate(timeout=60)
            assert sender.returncode == 0, err.decode(errors="replace")

    # Every image acknowledged is a file and a row.
    files = sorted((node.data_dir / "studies").rglob("*.dcm"))
    assert {f.stem for f in files} == {ds.SOPInstanceUID for datasets in series for ds in datasets}
    status = node.status()
    counts = {s["series_uid"]: s["instances"] for st in status["studies"] for s in st["series"]}
    assert counts == {datasets[0].SeriesInstanceUID: 2 for datasets in series}

    # Both processes served some of them (each counts what it stored; its next heartbeat reports it).
    rows = wait_until(
        node,
        lambda: (rows := live_receivers(node)()) and sum(stored_by(w) for w in rows) == 40 and rows,
        "the receivers' counts adding up to 40",
    )
    assert all(stored_by(w) > 0 for w in rows), [w.detail for w in rows]  # type: ignore[union-attr]
    shown = [w for w in status["workers"] if w["role"] == "receiver"]
    assert len(shown) == 2 and all(w["live"] and w["state"] == "ready" for w in shown), shown
    assert {"name", "host", "pid", "state", "heartbeat_at"} <= set(shown[0])

    # The children's C-STORE observations reach serve's metrics; /readyz sees both listening; STOW-RS is
    # received by serve itself, into the same data directory and database.
    with httpx.Client(base_url=f"http://127.0.0.1:{web_port}", timeout=10) as http:
        received = 'uad_instances_received_total{sop_class="MRImageStorage"} 40.0'
        wait_until(node, lambda: received in http.get("/metrics").text, "40 instances in /metrics", timeout_s=10)
        ready = http.get("/readyz")
        assert ready.status_code == 200, ready.text
        [ds] = mr_series(1, seed=99)
        body, content_type = stow_body([part10(ds)])
        headers = {"Content-Type": content_type, "Authorization": f"Bearer {TOKEN}"}
        assert http.post("/dicomweb/studies", content=body, headers=headers).status_code == 200
        assert (
            node.data_dir / "studies" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        ).is_file()
        assert 'uad_instances_received_total{sop_class="MRImageStorage"} 41.0' in http.get("/metrics").text


def test_a_killed_receiver_process_is_restarted_while_the_other_keeps_serving(node_factory) -> None:  # type: ignore[no-untyped-def]
    web_port = free_port()
    node = node_factory(extra_node=TWO, extra=LIGHT + f"[web]\nenabled = true\nport = {web_port}\n")
    [victim, survivor] = wait_until(node, live_receivers(node), "two live receiver processes")  # type: ignore[misc]
    http = httpx.Client(base_url=f"http://127.0.0.1:{web_port}", timeout=10)
    scp_ready = lambda: http.get("/readyz").json()["parts"]["scp"]["ok"]  # noqa: E731
    assert scp_ready()
    os.kill(victim.pid, signal.SIGKILL)
    wait_until(node, lambda: gone(victim.pid), "the killed receiver process gone")
    wait_until(node, lambda: not scp_ready(), "/readyz: scp not ready while a receiver process is missing")

    echoes = 0

    def replaced() -> list[WorkerInfo]:
        nonlocal echoes
        echo_node(node.port)  # the port answers throughout: the other process takes every connection
        echoes += 1
        rows = live_receivers(node)()
        return rows if rows and victim.pid not in {w.pid for w in rows} else []

    rows = wait_until(node, replaced, "a new receiver process after the kill")
    assert survivor.pid in {w.pid for w in rows} and echoes >= 1
    wait_until(node, scp_ready, "/readyz: scp ready again")
    http.close()
    [dead] = [w for w in receivers(node) if w.pid == victim.pid]
    assert (dead.state, dead.detail) == ("exited", "killed by SIGKILL")
    assert f"receiver process {victim.name} killed by SIGKILL" in node.log()
    echo_node(node.port)
    assert node.process is not None and node.process.poll() is None


def test_sigterm_stops_serve_and_every_receiver_process(node_factory) -> None:  # type: ignore[no-untyped-def]
    node = node_factory(extra_node=TWO, extra=LIGHT)
    rows = wait_until(node, live_receivers(node), "two live receiver processes")
    pids = [w.pid for w in rows]  # type: ignore[union-attr]
    started = time.monotonic()
    assert node.stop(timeout_s=20) == 0
    assert time.monotonic() - started < 20
    assert all(gone(pid) for pid in pids)
    stopped = [w for w in receivers(node) if w.pid in pids]
    assert {w.state for w in stopped} == {"stopped"}, [(w.state, w.detail) for w in stopped]
    assert "receiver stopped" in node.log()


def test_sighup_reaches_every_receiver_process(node_factory, certs: Certs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """Each child reads its TLS files again (one log line each); new connections, whichever process takes
    them, get the renewed certificate."""
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "server.pem", live / "server.key"
    shutil.copy(certs.server_cert, cert)
    shutil.copy(certs.server_key, key)
    tls = f'[tls]\nenabled = true\ncertificate = "{cert}"\nprivate_key = "{key}"\nca_certificates = "{certs.ca}"\n'
    node = node_factory(extra_node=TWO, extra=LIGHT + tls)
    wait_until(node, live_receivers(node), "two live receiver processes")
    context = client_context(certs, (certs.client_cert, certs.client_key))
    assert handshake(node, context)[2] == der(certs.server_cert)
    shutil.copy(certs.renewed_server_cert, cert)
    shutil.copy(certs.renewed_server_key, key)
    node.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_until(node, lambda: node.log().count("TLS certificate, key and CA files reloaded") == 2, "both reloads")
    assert {handshake(node, context)[2] for _ in range(12)} == {der(certs.renewed_server_cert)}


def test_serve_exits_1_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:  # listening without SO_REUSEPORT: no receiver process can join it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = node_config(tmp_path, port, extra_node=TWO, extra=LIGHT)
        result = subprocess.run(
            [sys.executable, "-m", "node", "serve", "--config", str(config)],
            cwd=REPO, capture_output=True, text=True, timeout=90,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    expected = f"ERROR node: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert expected in result.stderr, result.stderr[-3000:]
    assert "reconciled" not in result.stderr  # it gave up before reconciliation and the scheduler


@pytest.mark.parametrize("value", [0, 33])
def test_config_check_refuses_receiver_processes_out_of_range(tmp_path: Path, value: int) -> None:
    config = node_config(tmp_path, free_port(), extra_node=f"receiver_processes = {value}")
    result = subprocess.run(
        [sys.executable, "-m", "node", "config", "check", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout
    assert "node.receiver_processes" in result.stderr, result.stderr
