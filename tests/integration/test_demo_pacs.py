"""The demo's local PACS, both kinds, against a real C-STORE SCU (pynetdicom) on 127.0.0.1.

Each PACS is started for one test and stopped by its ``with`` block; the test then checks that its
port is closed. Network waits are a few seconds at most.
"""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.demo import pacs
from node.demo.pacs import BUILT_IN, ORTHANC, LocalPacs, local_pacs
from tests.mr_files import MR_IMAGE_STORAGE, mr_series, write_series
from tests.peers import require_tool

pytestmark = pytest.mark.peers

NODE_AE = "UADNODE"
TIMEOUT_S = 5.0
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(params=[BUILT_IN, ORTHANC])
def start_pacs(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], AbstractContextManager[LocalPacs]]:
    """Start (in a ``with``) a local PACS of each kind that accepts the node; Orthanc is skipped when absent
    (failed under UAD_REQUIRE_PEERS=1)."""
    if request.param == ORTHANC:
        binary = require_tool("Orthanc")
        return lambda: local_pacs(tmp_path / "pacs", NODE_AE, orthanc_binary=binary)
    return lambda: local_pacs(tmp_path / "pacs", NODE_AE, prefer_orthanc=False)


def result_file(folder: Path, study_uid: str, sop_class_uid: str, modality: str) -> Path:
    """A small object of a result SOP class in the study (RGB pixels, as the node's overlays carry)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.PatientName, ds.PatientID = "TEST^PATIENT", "TEST-0001"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 901, 1
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.full((8, 8, 3), 200, dtype=np.uint8).tobytes()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def send(local: LocalPacs, files: list[Path], calling_ae: str = NODE_AE) -> list[int]:
    """C-ECHO, then C-STORE every file on one association: the statuses (echo first), or [] when the
    association was rejected. A status of -1 is no answer (the peer aborted)."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
    ae.add_requested_context(Verification)
    for sop_class in (MR_IMAGE_STORAGE, SC_STORAGE, SEG_STORAGE):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate(local.host, local.port, ae_title=local.ae_title)
    if not assoc.is_established:
        return []
    try:
        answers = [assoc.send_c_echo(), *(assoc.send_c_store(pydicom.dcmread(path)) for path in files)]
        return [int(answer.Status) if "Status" in answer else -1 for answer in answers]
    finally:
        if assoc.is_established:
            assoc.release()


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.fixture
def files(tmp_path: Path) -> Iterator[list[Path]]:
    study_uid = generate_uid()
    yield [
        *write_series(mr_series(3, study_uid=study_uid), tmp_path / "mr"),
        result_file(tmp_path / "seg", study_uid, SEG_STORAGE, "SEG"),
        result_file(tmp_path / "sc", study_uid, SC_STORAGE, "OT"),
    ]


def test_the_pacs_keeps_what_the_node_sends(
    start_pacs: Callable[[], AbstractContextManager[LocalPacs]], files: list[Path]
) -> None:
    sent = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    with start_pacs() as local:
        assert local.host == "127.0.0.1" and local.ae_title == "DEMOPACS"
        assert local.received() == []
        assert send(local, files) == [0x0000] * (1 + len(files))
        received = {obj.sop_instance_uid: obj for obj in local.received()}
        if local.kind == ORTHANC:
            assert local.web_url is not None
            with urllib.request.urlopen(local.web_url, timeout=TIMEOUT_S) as page:
                assert page.status == 200
        port = local.port
    assert not listening(port)

    assert set(received) == {str(ds.SOPInstanceUID) for ds in sent}
    for ds in sent:
        obj = received[str(ds.SOPInstanceUID)]
        assert (obj.sop_class_uid, obj.series_uid, obj.study_uid, obj.modality) == (
            ds.SOPClassUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.Modality,
        )  # fmt: skip
        if local.kind == BUILT_IN:
            assert obj.path == local.folder / obj.series_uid / f"{obj.sop_instance_uid}.dcm"
            assert pydicom.dcmread(obj.path).PixelData == pydicom.dcmread(files[sent.index(ds)]).PixelData
        else:
            assert obj.path is None


def test_the_pacs_accepts_only_the_node(
    start_pacs: Callable[[], AbstractContextManager[LocalPacs]], files: list[Path]
) -> None:
    with start_pacs() as local:
        statuses = send(local, files[:1], calling_ae="STRANGER")
        assert statuses == [] or all(status != 0x0000 for status in statuses), statuses
        assert local.received() == []


def test_without_orthanc_the_built_in_scp_serves(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(pacs, "find_orthanc", lambda: None)
    with local_pacs(tmp_path, NODE_AE) as local:
        assert local.kind == BUILT_IN and local.web_url is None
    with pytest.raises(FileNotFoundError, match="apt-get install orthanc"):
        with pacs.running_orthanc(tmp_path / "orthanc", {"node": NODE_AE}):
            pass
