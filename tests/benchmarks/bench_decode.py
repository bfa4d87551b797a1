"""Decode benchmark: ms per slice for each compressed transfer syntax and each installed pydicom plugin.

Colin27 (with skull) is written as an axial MR series (int16, rescale slope/intercept, as the demo writes
it), encoded by the real tools the integration tests use (dcmtk ``dcmcjpeg``/``dcmcjpls``/``dcmcrle``,
GDCM ``gdcmconv``), and decoded with ``pydicom.pixels.pixel_array`` once per available plugin, forced,
and once with pydicom's own choice ("default"). Each row also gives the largest difference to the
uncompressed series in physical units (stored value x slope + intercept), as a share of its range.

Run from the repository root::

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/bench_decode.py [--size 256] [--slices 30] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder, pixel_array

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # the brains, the series writer and the encoder table live in tests/

from node.receiver.codecs import decodable_transfer_syntaxes  # noqa: E402
from tests.dicom_series import write_mr_series  # noqa: E402
from tests.encoders import ENCODINGS, encode  # noqa: E402
from tests.integration.test_codecs import brain_volume  # noqa: E402

PACKAGES = ("pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "python-gdcm")
PACKAGES += ("pyjpegls", "pillow")
ROW = "{:<22} {:<24} {:<10} {:>8}  {:>10}  {:>8}"


def physical(datasets: list[Dataset], stored: list[np.ndarray]) -> np.ndarray:
    """The slices in physical units, as the node reads them (stored value x slope + intercept)."""
    pairs = zip(datasets, stored, strict=True)
    return np.stack([pixels * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds, pixels in pairs])


def best_decode(datasets: list[Dataset], plugin: str, repeat: int) -> tuple[float, list[np.ndarray]]:
    """Fastest of ``repeat`` runs decoding every slice with ``plugin`` ("" lets pydicom choose): ms per slice."""
    options = {"decoding_plugin": plugin} if plugin else {}
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        decoded = [pixel_array(ds, **options) for ds in datasets]
        best = min(best, time.perf_counter() - start)
    return 1000 * best / len(datasets), decoded


def installed(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="rows and columns of each slice")
    parser.add_argument("--slices", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3, help="runs per plugin; the fastest counts")
    args = parser.parse_args()

    print(f"{platform.platform()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(", ".join(f"{package} {installed(package)}" for package in PACKAGES))
    print(f"Colin27, axial {args.size}x{args.size}, {args.slices} slices; best of {args.repeat}\n")
    accepted = set(decodable_transfer_syntaxes())
    volume = brain_volume(args.size, args.slices)
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as scratch:
        raw = write_mr_series(volume, Path(scratch) / "raw")
        originals = [pydicom.dcmread(path) for path in raw]
        native_ms, stored = best_decode(originals, "", args.repeat)
        reference = physical(originals, stored)
        span = float(reference.max() - reference.min())
        header = ROW.format("encoding", "transfer syntax", "plugin", "ms/slice", "max |diff|", "KB/slice")
        print(header, "-" * len(header), sep="\n")
        size_kb = sum(path.stat().st_size for path in raw) / len(raw) / 1024
        print(ROW.format("uncompressed", "Explicit VR LE", "-", f"{native_ms:.2f}", f"{0:.4%}", f"{size_kb:.1f}"))
        for encoding in ENCODINGS:
            paths = encode(raw, Path(scratch) / encoding.name, encoding)
            datasets = [pydicom.dcmread(path) for path in paths]
            size_kb = sum(path.stat().st_size for path in paths) / len(paths) / 1024
            syntax = encoding.transfer_syntax
            label = syntax if syntax in accepted else f"{syntax} (not accepted)"
            for plugin in ("", *get_decoder(syntax).available_plugins):
                try:
                    ms, decoded = best_decode(datasets, plugin, args.repeat)
                except Exception as exc:  # a plugin that cannot decode this data: say why, go on
                    reason = str(exc).splitlines()[-1].strip()[:70]
                    print(f"{encoding.name:<22} {label:<24} {plugin or 'default':<10} fails: {reason}")
                    continue
                worst = f"{float(np.abs(physical(datasets, decoded) - reference).max()) / span:.4%}"
                print(ROW.format(encoding.name, label, plugin or "default", f"{ms:.2f}", worst, f"{size_kb:.1f}"))


if __name__ == "__main__":
    main()
