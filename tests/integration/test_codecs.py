"""Compressed MR series from real encoders (dcmtk, GDCM) through the node's receiver and back into a volume.

Every transfer syntax the receiver accepts must be decodable, or an image acknowledged with Success fails
later at analysis. One node receives a small Colin27 series in each syntax (sent by dcmtk ``storescu`` in
the file's own syntax); each stored series must read back through ``series_to_volume`` identical to the
uncompressed one (lossless) or within a measured tolerance (lossy).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import (
    MPEG2MPML,
)
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage, Verification

from node.volume import series_to_volume
from tests.brains import colin27
from tests.dicom_series import AXIAL, centred_grid, resample, write_mr_series
from tests.encoders import ENCODINGS, Encoding, encode, storescu_profile
from tests.peers import NodeProcess, free_port, node_config, require_tool

pytestmark = pytest.mark.peers

NODELAY_ENV = {**os.environ, "TCP_NODELAY": "1"}


def brain_volume(size: int, slices: int) -> sitk.Image:
    """Colin27 with skull on an axial ``size`` x ``size`` grid of ``slices`` 5 mm slices."""
    head = colin27()
    fov_mm = 200.0
    return resample(head, centred_grid(head, AXIAL, (fov_mm / size, fov_mm / size, 5.0), (size, size, slices)))


@dataclass(frozen=True)
class Received:
    """What the node stored for one encoding, next to what was sent."""

    sent: list[Path]
    stored: list[Path]
    uncompressed: np.ndarray
    sender_output: str  # storescu's, for the failure message


@pytest.fixture(scope="module")
def codec_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node for the whole module: starting and stopping one costs seconds."""
    folder = tmp_path_factory.mktemp("codec-node")
    port = free_port()
    node = NodeProcess(node_config(folder, port), data_dir=folder / "data", port=port, ae_title="UADNODE")
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def received(codec_node: NodeProcess, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Received]:
    """One series per encoding, all sent by one dcmtk storescu run (which goes on past a refused file), then
    found among the node's files."""
    storescu = require_tool("storescu")
    folder = tmp_path_factory.mktemp("codecs")
    volume = brain_volume(128, 20)
    sent: dict[str, tuple[list[Path], np.ndarray]] = {}
    for encoding in ENCODINGS:
        raw = write_mr_series(volume, folder / "raw" / encoding.name)
        uncompressed = sitk.GetArrayFromImage(series_to_volume(raw).image)
        sent[encoding.name] = (encode(raw, folder / "sent" / encoding.name, encoding), uncompressed)
    # storescu proposes MR Image Storage in exactly these syntaxes, one context each, with no uncompressed
    # fallback: a syntax the node does not accept fails the send instead of being converted on the way.
    profile = storescu_profile(folder / "storescu.cfg", [encoding.transfer_syntax for encoding in ENCODINGS])
    command = [
        storescu,
        "-aet",
        "SCANNER1",
        "-aec",
        codec_node.ae_title,
        "-xf",
        str(profile),
        "Codecs",
        "-nh",
        "+sd",
        "+r",
    ]
    run = subprocess.run(
        [*command, "127.0.0.1", str(codec_node.port), str(folder / "sent")],
        capture_output=True,
        text=True,
        timeout=60,
        env=NODELAY_ENV,
    )
    output = f"storescu exit {run.returncode}\n{run.stdout}{run.stderr}"[-3000:]
    stored: dict[str, list[Path]] = {}
    for path in sorted((codec_node.data_dir / "studies").rglob("*.dcm")):
        stored.setdefault(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID, []).append(path)
    received = {}
    for encoding in ENCODINGS:
        files, uncompressed = sent[encoding.name]
        series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
        received[encoding.name] = Received(files, stored.get(series_uid, []), uncompressed, output)
    return received


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: e.name)
def test_compressed_series_is_stored_as_sent_and_decodes(received: dict[str, Received], encoding: Encoding) -> None:
    """Success for every image, the file kept in the sent syntax, and the volume equal to the uncompressed one
    (lossless) or within the encoding's tolerance (lossy)."""
    got = received[encoding.name]
    assert len(got.stored) == len(got.sent), got.sender_output
    syntaxes = {pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID for path in got.stored}
    assert syntaxes == {encoding.transfer_syntax}
    voxels = sitk.GetArrayFromImage(series_to_volume(got.stored).image)
    assert voxels.shape == got.uncompressed.shape
    if encoding.max_error is None:
        np.testing.assert_array_equal(voxels, got.uncompressed)
        return
    span = float(got.uncompressed.max() - got.uncompressed.min())
    error = np.abs(voxels - got.uncompressed) / span
    print(f"{encoding.name}: |difference| max {error.max():.4%}, mean {error.mean():.4%} of the range")
    assert error.max() <= encoding.max_error
    assert error.mean() <= encoding.mean_error


def test_undecodable_syntax_is_not_negotiated(codec_node: NodeProcess) -> None:
    """MR Image Storage offered only in MPEG2 (no decoder) is rejected at negotiation, so no image in it can be
    acknowledged and then fail at analysis; Verification on the same association is accepted."""
    ae = AE(ae_title="SCANNER1")
    ae.add_requested_context(Verification)
    ae.add_requested_context(MRImageStorage, [MPEG2MPML])
    assoc = ae.associate("127.0.0.1", codec_node.port, ae_title=codec_node.ae_title)
    assert assoc.is_established
    accepted = [str(cx.abstract_syntax) for cx in assoc.accepted_contexts]
    rejected = [(str(cx.abstract_syntax), list(cx.transfer_syntax)) for cx in assoc.rejected_contexts]
    assoc.release()
    assert accepted == [Verification]
    assert rejected == [(MRImageStorage, [MPEG2MPML])]
