"""A local PACS on 127.0.0.1 for the demo (and the peer tests): a real Orthanc when installed, else a built-in SCP.

Both accept C-STORE only from one calling AE title (the node's) and only on the AE title they were
given, and both are always stopped when their ``with`` block ends. The built-in storage SCP keeps
every object it receives as a Part 10 file, ``<folder>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``,
written before it answers Success, so a machine with neither Orthanc nor a network still has a
PACS to send results to. ``LocalPacs.received()`` lists what arrived, the same way for both.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
ORTHANC = "Orthanc"
BUILT_IN = "built-in storage SCP"
STOP_TIMEOUT_S = 15.0
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_SUCCESS, _OUT_OF_RESOURCES, _CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


@dataclass(frozen=True)
class ReceivedObject:
    """One instance the PACS holds: enough to tell the source images from the node's SEG and SC results."""

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    modality: str
    path: Path | None  # the Part 10 file (built-in SCP); None for Orthanc, which keeps its own storage


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen | None = None, timeout_s: float = 20.0) -> None:
    """Block until 127.0.0.1:port accepts connections; fail early if the process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {HOST}:{port} after {timeout_s} s")


# ---------------------------------------------------------------------------------------------
# Orthanc


def find_orthanc() -> str | None:
    """The Orthanc program, or None. Debian installs it in /usr/sbin, which a user's PATH often lacks."""
    return shutil.which(ORTHANC) or (f"/usr/sbin/{ORTHANC}" if Path(f"/usr/sbin/{ORTHANC}").exists() else None)


@dataclass
class Orthanc:
    """A running Orthanc: DICOM and REST ports on 127.0.0.1."""

    dicom_port: int
    http_port: int
    process: subprocess.Popen[bytes]
    ae_title: str = "ORTHANC"
    _known: dict[str, ReceivedObject] = field(default_factory=dict, repr=False, compare=False)

    def get(self, path: str) -> Any:
        """GET a REST resource (``/instances``, ``/studies/{id}``) as parsed JSON."""
        with urllib.request.urlopen(f"http://{HOST}:{self.http_port}{path}", timeout=10) as response:
            return json.loads(response.read())

    def received(self) -> list[ReceivedObject]:
        """Every instance Orthanc stores; each one's tags are fetched once (a waiting demo polls this)."""
        ids = self.get("/instances")
        for orthanc_id in ids:
            if orthanc_id not in self._known:
                tags = self.get(f"/instances/{orthanc_id}/simplified-tags")
                self._known[orthanc_id] = ReceivedObject(
                    sop_instance_uid=str(tags.get("SOPInstanceUID", "")),
                    sop_class_uid=str(tags.get("SOPClassUID", "")),
                    series_uid=str(tags.get("SeriesInstanceUID", "")),
                    study_uid=str(tags.get("StudyInstanceUID", "")),
                    modality=str(tags.get("Modality", "")),
                    path=None,
                )
        return [self._known[orthanc_id] for orthanc_id in ids]


@contextmanager
def running_orthanc(
    folder: Path,
    modalities: dict[str, str],
    ae_title: str = "ORTHANC",
    binary: str | None = None,
    dicom_port: int | None = None,
    settings: dict[str, object] | None = None,
) -> Iterator[Orthanc]:
    """A real Orthanc PACS (AE ``ae_title``) storing under ``folder``; always stopped.

    It accepts C-STORE and C-ECHO only from ``modalities`` (name -> AE title, each on 127.0.0.1, host
    checked) and only when called ``ae_title``. Its REST API refuses remote clients
    (RemoteAccessAllowed false); Orthanc cannot bind DICOM to loopback only, so the AE title and
    host checks are what keep other machines out. ``binary`` defaults to :func:`find_orthanc`;
    ``settings`` are added to (or replace) its configuration's top-level keys.
    """
    binary = binary or find_orthanc()
    if binary is None:
        raise FileNotFoundError("Orthanc is not installed (apt-get install orthanc)")
    folder.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = dicom_port or free_port(), free_port()
    config = {
        "Name": "uad-node-local",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "DicomAet": ae_title,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowEcho": False,
        "DicomCheckModalityHost": True,
        "DicomModalities": {name: [ae, HOST, 104] for name, ae in modalities.items()},
        "MaximumPduLength": 131072,
        "DicomScpTimeout": 5,
        "Plugins": [],
        "SaveJobs": False,
        "StorageCompression": False,
        **(settings or {}),
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    log_path = folder / "orthanc.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [binary, str(folder / "orthanc.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
    try:
        try:
            wait_for_port(http_port, process)
            wait_for_port(dicom_port, process)
        except (RuntimeError, TimeoutError) as exc:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"Orthanc did not start: {exc}; its log ({log_path}) ends:\n" + "\n".join(tail)) from exc
        yield Orthanc(dicom_port=dicom_port, http_port=http_port, process=process, ae_title=ae_title)
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM, then SIGKILL if it has not exited in ``timeout_s``; returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
    return int(process.returncode)


# ---------------------------------------------------------------------------------------------
# built-in storage SCP


@dataclass(frozen=True)
class StorageScp:
    """The built-in storage SCP while it runs: where it listens and where it writes."""

    ae_title: str
    port: int
    folder: Path

    def received(self) -> list[ReceivedObject]:
        """Every object written so far (files are renamed into place whole, so none is half-read)."""
        return received_files(self.folder)


@contextmanager
def running_storage_scp(folder: Path, ae_title: str, calling_ae: str) -> Iterator[StorageScp]:
    """A pynetdicom storage SCP on 127.0.0.1 (a port the OS picks, so none is raced for); always stopped.

    It accepts every storage SOP class (SEG and Secondary Capture included) in every transfer syntax,
    and Verification, from ``calling_ae`` when called ``ae_title``; each object is written to
    ``<folder>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` exactly as received before Success is answered.
    """
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification

    from node.network import set_tcp_nodelay

    folder.mkdir(parents=True, exist_ok=True)
    ae = AE(ae_title=ae_title)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    ae.require_called_aet = True
    ae.require_calling_aet = [calling_ae]
    ae.acse_timeout = ae.dimse_timeout = 30
    ae.network_timeout = 60
    ae.maximum_pdu_size = 131072
    handlers = [
        (evt.EVT_C_STORE, _store_handler(folder)),
        (evt.EVT_CONN_OPEN, set_tcp_nodelay),
    ]
    server = ae.start_server((HOST, 0), block=False, evt_handlers=handlers)
    try:
        yield StorageScp(ae_title=ae_title, port=int(server.server_address[1]), folder=folder)
    finally:
        ae.shutdown()  # stops the server and aborts any association still open


def _store_handler(folder: Path) -> Any:
    """The C-STORE handler: the object as a Part 10 file, renamed into place once complete."""

    def on_store(event: Any) -> int:
        try:
            ds = event.dataset
            series_uid, sop_uid = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        except Exception:  # an undecodable dataset is the sender's problem, not a reason to stop serving
            return _CANNOT_UNDERSTAND
        if not all(_UID.fullmatch(uid) and len(uid) <= 64 for uid in (series_uid, sop_uid)):
            return _CANNOT_UNDERSTAND  # also keeps the UIDs safe to use as file names
        target = folder / series_uid / f"{sop_uid}.dcm"
        partial = target.with_suffix(".part")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            partial.write_bytes(event.encoded_dataset(include_meta=True))
            os.replace(partial, target)
        except OSError:
            return _OUT_OF_RESOURCES
        return _SUCCESS

    return on_store


def received_files(folder: Path) -> list[ReceivedObject]:
    """The objects the built-in SCP wrote under ``folder``, read back from their files (headers only)."""
    from pydicom import dcmread

    objects = []
    for path in sorted(folder.glob("*/*.dcm")):
        ds = dcmread(path, stop_before_pixels=True)
        objects.append(
            ReceivedObject(
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                series_uid=str(ds.SeriesInstanceUID),
                study_uid=str(ds.get("StudyInstanceUID", "")),
                modality=str(ds.get("Modality", "")),
                path=path,
            )
        )
    return objects


# ---------------------------------------------------------------------------------------------
# one interface for both


@dataclass(frozen=True)
class LocalPacs:
    """A running local PACS, whichever kind: what the node needs to send to it, and what it holds."""

    kind: str  # ORTHANC or BUILT_IN
    ae_title: str
    host: str
    port: int
    folder: Path
    web_url: str | None  # Orthanc's web UI, to look at the results in a browser; None for the built-in SCP
    _server: Orthanc | StorageScp = field(repr=False, compare=False)

    def received(self) -> list[ReceivedObject]:
        """Every instance the PACS holds now."""
        return self._server.received()


@contextmanager
def local_pacs(
    folder: Path,
    calling_ae: str,
    prefer_orthanc: bool = True,
    *,
    ae_title: str = "DEMOPACS",
    orthanc_binary: str | None = None,
) -> Iterator[LocalPacs]:
    """A PACS on 127.0.0.1 that accepts C-STORE from ``calling_ae``, keeping its data under ``folder``.

    Orthanc when ``prefer_orthanc`` and it is installed (``orthanc_binary`` or :func:`find_orthanc`),
    otherwise the built-in storage SCP. Always stopped when the block ends.
    """
    binary = (orthanc_binary or find_orthanc()) if prefer_orthanc else None
    if binary is not None:
        with running_orthanc(folder / "orthanc", {"node": calling_ae}, ae_title, binary) as orthanc:
            yield LocalPacs(
                kind=ORTHANC,
                ae_title=ae_title,
                host=HOST,
                port=orthanc.dicom_port,
                folder=folder / "orthanc",
                web_url=f"http://{HOST}:{orthanc.http_port}/app/explorer.html",
                _server=orthanc,
            )
    else:
        with running_storage_scp(folder / "received", ae_title, calling_ae) as scp:
            yield LocalPacs(
                kind=BUILT_IN,
                ae_title=ae_title,
                host=HOST,
                port=scp.port,
                folder=scp.folder,
                web_url=None,
                _server=scp,
            )
