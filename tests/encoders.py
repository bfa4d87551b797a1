"""Real encoders (dcmtk, GDCM) for compressed test series, and a storescu profile that sends each file in its
own transfer syntax (``storescu`` alone proposes only uncompressed syntaxes for compressed files it cannot
convert)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom.sop_class import MRImageStorage

from tests.peers import require_tool


@dataclass(frozen=True)
class Encoding:
    """A real encoder command line (input and output paths follow it) and the transfer syntax it writes."""

    name: str
    transfer_syntax: str
    command: tuple[str, ...]
    # Lossy only: largest and mean |difference| to the uncompressed volume, as fractions of its intensity range.
    max_error: float | None = None
    mean_error: float | None = None


# Lossy JPEG goes through dcmtk's rendering; +rm keeps the physical scale in Rescale Slope/Intercept.
# dcmcjpls refuses near-lossless for signed pixels, so GDCM encodes it (error bound 2 stored values).
# Error bounds: measured on this module's Colin27 series (max, mean: JPEG 12-bit 1.81%, 0.41%; JPEG 8-bit
# 8.57%, 0.71%; JPEG-LS near-lossless 0.0033%, 0.0019%; JPEG 2000 at ratio 10 7.37%, 0.60%), about 1.5x that.
ENCODINGS = (
    Encoding("jpeg-lossless-sv1", JPEGLosslessSV1, ("dcmcjpeg", "+e1")),
    Encoding("jpeg-lossless", JPEGLossless, ("dcmcjpeg", "+el")),
    Encoding("jpeg-extended-12bit", JPEGExtended12Bit, ("dcmcjpeg", "+ee", "+rm"), max_error=0.03, mean_error=0.006),
    Encoding("jpeg-baseline-8bit", JPEGBaseline8Bit, ("dcmcjpeg", "+eb", "+rm"), max_error=0.12, mean_error=0.01),
    Encoding("jpeg-ls-lossless", JPEGLSLossless, ("dcmcjpls",)),
    Encoding(
        "jpeg-ls-near-lossless",
        JPEGLSNearLossless,
        ("gdcmconv", "--jpegls", "--lossy", "-e", "2"),
        max_error=5e-5,  # the bound itself is 2 stored values of the writer's +-30000 scale: 3.3e-5
        mean_error=3e-5,
    ),
    Encoding("rle", RLELossless, ("dcmcrle",)),
    Encoding("j2k-lossless", JPEG2000Lossless, ("gdcmconv", "--j2k")),
    Encoding("j2k-lossy", JPEG2000, ("gdcmconv", "--j2k", "--lossy", "-r", "10"), max_error=0.11, mean_error=0.01),
)


def encode(paths: Sequence[Path], folder: Path, encoding: Encoding) -> list[Path]:
    """Each file encoded by the real tool into ``folder`` (same names); fails on the tool's error."""
    tool = require_tool(encoding.command[0])
    folder.mkdir(parents=True, exist_ok=True)

    def one(path: Path) -> Path:
        out = folder / path.name
        run = subprocess.run([tool, *encoding.command[1:], str(path), str(out)], capture_output=True, text=True)
        assert run.returncode == 0, f"{encoding.command} {path.name}: {run.stderr}"
        return out

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(one, paths))


def storescu_profile(path: Path, transfer_syntaxes: Sequence[str]) -> Path:
    """A dcmtk association config whose profile "Codecs" proposes MR Image Storage once in each syntax."""
    groups = "".join(f"[TS{i}]\nTransferSyntax1 = {uid}\n" for i, uid in enumerate(transfer_syntaxes))
    contexts = "".join(f"PresentationContext{i + 1} = {MRImageStorage}\\TS{i}\n" for i in range(len(transfer_syntaxes)))
    path.write_text(
        f"[[TransferSyntaxes]]\n{groups}[[PresentationContexts]]\n[Codecs]\n{contexts}"
        "[[Profiles]]\n[Codecs]\nPresentationContexts = Codecs\n"
    )
    return path
