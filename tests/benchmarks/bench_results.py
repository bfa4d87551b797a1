"""Results benchmark: seconds to build the SEG, the overlays and the summary of a clinical-size series, and the
SEG size in MB for each empty-frame policy and with the score segment, and the measurement SR.

The series: MNI152 resampled to 256x256x150 at 0.9x0.9x1.2 mm, axial, written as one MR file per slice
(fake patient) and read back the way the node reads it; the findings are a synthetic score blob (about
30 mm across) with its mask at the threshold. Sending: the SEG (empty frames kept), the SR and the SC series
(summary + overlays) go to dcmtk ``storescp`` on loopback over one association through the node's
sender, when dcmtk is installed.

Run from the repository root::

    .venv/bin/python tests/benchmarks/bench_results.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # the offline brains and DICOM helpers live in tests/

from node.config import Destination, NodeConfig, ResultsSection  # noqa: E402
from node.db import open_database  # noqa: E402
from node.results import (  # noqa: E402
    Findings,
    build_measurement_report,
    build_overlays,
    build_segmentations,
    build_summary,
    findings_from,
)
from node.sender import Sender  # noqa: E402
from node.volume import SeriesVolume, series_to_volume  # noqa: E402
from tests.brains import mni152_t1  # noqa: E402
from tests.dicom_series import AXIAL, centred_grid, resample, write_mr_series  # noqa: E402
from tests.peers import free_port, wait_for_port  # noqa: E402


def clinical_series(folder: Path) -> tuple[SeriesVolume, list[pydicom.Dataset]]:
    brain = mni152_t1()
    paths = write_mr_series(resample(brain, centred_grid(brain, AXIAL, (0.9, 0.9, 1.2), (256, 256, 150))), folder)
    return series_to_volume(paths), [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def blob(volume: SeriesVolume) -> Findings:
    voxels = sitk.GetArrayViewFromImage(volume.image)
    k, r, c = np.indices(voxels.shape, dtype=np.float32)
    spacing = volume.image.GetSpacing()
    centre = np.array(voxels.shape) * (0.55, 0.4, 0.35)
    d2 = sum(((axis - m) * s / 15.0) ** 2 for axis, m, s in zip((k, r, c), centre, spacing[::-1], strict=True))
    score = np.where(voxels > 0.1 * voxels.max(), 0.02 + 0.5 * np.exp(-d2), 0).astype(np.float32)
    return findings_from(score >= 0.2, score, 0.2, "cDDPM default T1", "3f2a9c01be77", spacing)


def timed(build: Callable[[], object], repeat: int) -> tuple[float, object]:
    seconds, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = build()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def size_mb(ds: pydicom.Dataset, path: Path) -> float:
    ds.save_as(path, enforce_file_format=True)
    return path.stat().st_size / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="builds per figure; the median is printed")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, repeat {args.repeat} (median)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        volume, sources = clinical_series(folder / "series")
        findings = blob(volume)
        print(
            f"series 256x256x150 written and read in {time.perf_counter() - start:.1f} s; findings "
            f"{findings.anomaly_volume_ml:.1f} mL on {np.count_nonzero(findings.slice_areas())} slices"
        )
        rows = []
        for label, options in (
            ("SEG keep", ResultsSection(seg_empty_frames="keep")),
            ("SEG omit", ResultsSection(seg_empty_frames="omit")),
            ("SEG keep + score (FRACTIONAL, RLE)", ResultsSection(seg_empty_frames="keep", seg_score_segment=True)),
        ):
            seconds, objects = timed(lambda o=options: build_segmentations(volume, sources, findings, o), args.repeat)
            sizes = [size_mb(ds, folder / f"seg{i}.dcm") for i, ds in enumerate(objects)]  # type: ignore[arg-type]
            shown = " + ".join(f"{s:.2f}" for s in sizes)
            rows.append(f"{label:<36} {seconds:6.2f} s   {shown} MB")
        options = ResultsSection()
        seconds, overlays = timed(lambda: build_overlays(volume, sources, findings, options), args.repeat)
        total_mb = sum(size_mb(ds, folder / f"sc{i}.dcm") for i, ds in enumerate(overlays))  # type: ignore[arg-type]
        rows.append(f"{f'{len(overlays)} overlays (SC RGB)':<36} {seconds:6.2f} s   {total_mb:.2f} MB")
        seconds, (summary, png) = timed(  # type: ignore[misc]
            lambda: build_summary(volume, sources, findings, {"total": 40.0}, options), args.repeat
        )
        rows.append(f"{'summary (SC + PNG)':<36} {seconds:6.2f} s   {size_mb(summary, folder / 'summary.dcm'):.2f} MB")
        seg = pydicom.dcmread(folder / "seg0.dcm")
        seconds, sr = timed(lambda: build_measurement_report(seg, sources, findings, options), args.repeat)
        rows.append(f"{'measurement SR (TID 1500)':<36} {seconds:6.2f} s   {size_mb(sr, folder / 'sr.dcm'):.3f} MB")  # type: ignore[arg-type]
        files = [folder / "seg0.dcm", folder / "sr.dcm", folder / "summary.dcm"]
        files += [folder / f"sc{i}.dcm" for i in range(len(overlays))]
        if shutil.which("storescp"):
            label = f"send SEG + SR + {len(files) - 2} SC to storescp"
            rows.append(f"{label:<36} {send_seconds(files, folder):6.2f} s")
        print("\n".join(rows))


def send_seconds(files: list[Path], folder: Path) -> float:
    """Wall time of one ``send_once`` of ``files`` to a dcmtk storescp on 127.0.0.1 (TCP_NODELAY both ends)."""
    port = free_port()
    (folder / "received").mkdir()
    scp = subprocess.Popen(
        ["storescp", "-od", str(folder / "received"), "-pdu", "131072", str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    db = open_database(f"sqlite:///{folder / 'node.sqlite'}")
    try:
        wait_for_port(port, scp)
        config = NodeConfig.model_validate({"node": {"ae_title": "UADNODE"}})
        start = time.perf_counter()
        result = Sender(config, db).send_once(
            Destination(name="scp", ae_title="STORESCP", host="127.0.0.1", port=port), files, "1.2.3"
        )
        seconds = time.perf_counter() - start
        assert result.outcome == "delivered", result
        return seconds
    finally:
        db.close()
        scp.terminate()
        scp.wait(timeout=10)


if __name__ == "__main__":
    main()
