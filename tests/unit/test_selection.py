"""Series selection on vendor-like headers: every decision, selected or not, with its reason.

Headers are built as ``dcmread(..., stop_before_pixels=True)`` returns them: no pixel data. The
descriptions and timings are the ones Siemens, GE and Philips scanners write for routine brain series.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from node.selection import (
    Contrast,
    SelectionSection,
    SeriesHeaders,
    group_by_series,
    read_headers,
    select_series,
    summarise,
)
from node.selection.config import SHIPPED_T1_CHECKPOINT
from tests.mr_files import mr_series, write_series

MR = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
ORIGINAL = ("ORIGINAL", "PRIMARY", "M", "ND")

CONFIG = SelectionSection(models={"T1": "models/t1.pt", "FLAIR": "models/flair.pt"})

# The [selection] table proposed for config/node.toml, checked here so the proposal stays valid.
PROPOSED_TOML = r"""
[selection]
# Which received series are analysed. Every series gets a recorded decision with its reason.
# The rules run in this order; the first that fails skips the series and becomes its reason:
# SOP class, modality, image type, localizer/calibration names, exclude, include, slice count,
# then a model for the series' contrast class (T1, T2, FLAIR or other; how a series is classified
# is documented in node/selection/contrast.py).
modalities = ["MR"]           # Modality (0008,0060) values that may be analysed
# SOP classes that may be analysed (MR Image Storage, Enhanced MR Image Storage).
sop_classes = ["1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1"]
# Skip a series if any image's ImageType (or Enhanced MR FrameType) holds one of these values:
# localizers, derived and secondary images, reformats (MPR) and projections (MIP).
excluded_image_types = ["DERIVED", "SECONDARY", "LOCALIZER", "MPR", "PROJECTION IMAGE", "REFORMATTED"]
# Regular expressions (Python syntax, case-insensitive, matching anywhere) tried on SeriesDescription,
# ProtocolName, SequenceName and (Enhanced MR) PulseSequenceName. Single quotes keep backslashes as
# written, e.g. exclude = ['\bpost\b', 'gad', '\+c\b'] skips post-contrast series.
include = []                  # empty = any series; otherwise one pattern must match one of its names
exclude = []                  # a series with a name matching any of these is skipped
min_slices = 20               # fewer slices are skipped (distinct slice positions; multi-frame frames count)
# The checkpoint for each contrast class (keys T1, T2, FLAIR, other), relative to this file's folder.
# A series whose class has no entry is skipped ("contrast class T2 has no model configured").
models = { T1 = "../models/checkpoints/default-t1.pt" }
"""


def mr_headers(
    description: str | None,
    slices: int = 30,
    *,
    tr: float | None = None,
    te: float | None = None,
    ti: float | None = None,
    protocol: str | None = None,
    sequence: str | None = None,
    image_type: tuple[str, ...] = ORIGINAL,
    echoes: int = 1,
    b_values: tuple[float, ...] = (),
    modality: str = "MR",
    sop_class: str = MR,
) -> SeriesHeaders:
    """A single-frame series: ``slices`` positions 1 mm apart, ``echoes`` images at each (then b values)."""
    study_uid, series_uid = generate_uid(), generate_uid()
    instances = []
    for index in range(slices * max(echoes, len(b_values) or 1)):
        ds = Dataset()
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.Modality = modality
        ds.ImageType = list(image_type)
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(index % slices)]
        for keyword, value in (("SeriesDescription", description), ("ProtocolName", protocol)):
            if value is not None:
                setattr(ds, keyword, value)
        if sequence is not None:
            ds.SequenceName = sequence
        for keyword, value in (("RepetitionTime", tr), ("EchoTime", te), ("InversionTime", ti)):
            if value is not None:
                setattr(ds, keyword, value)
        if b_values:
            ds.DiffusionBValue = b_values[index // slices]
        instances.append(ds)
    return SeriesHeaders(series_uid, tuple(instances))


def _item(**attributes: object) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def enhanced_mr(
    frames: int,
    *,
    tr: float,
    te: float,
    ti: float | None = None,
    description: str = "",
    protocol: str = "",
    pulse_sequence: str = "",
    per_frame_timing: bool = False,
    derived_frames: int = 0,
) -> SeriesHeaders:
    """One Enhanced MR instance: positions per frame, timing in the shared (or per-frame) functional groups."""
    timing = [
        _item(MRTimingAndRelatedParametersSequence=[_item(RepetitionTime=tr, FlipAngle=8.0)]),
        _item(MREchoSequence=[_item(EffectiveEchoTime=te)]),
    ]
    if ti is not None:
        timing.append(_item(MRModifierSequence=[_item(InversionRecovery="YES", InversionTimes=[ti])]))
    shared = Dataset()
    shared.PixelMeasuresSequence = [_item(PixelSpacing=[1.0, 1.0], SliceThickness=1.0)]
    per_frame = []
    for index in range(frames):
        frame = Dataset()
        frame.PlanePositionSequence = [_item(ImagePositionPatient=[0.0, 0.0, float(index)])]
        frame.FrameContentSequence = [_item(InStackPositionNumber=index + 1)]
        kind = "DERIVED" if index < derived_frames else "ORIGINAL"
        frame.MRImageFrameTypeSequence = [_item(FrameType=[kind, "PRIMARY", "VOLUME", "NONE"])]
        for group in timing if per_frame_timing else ():
            frame.update(group)
        per_frame.append(frame)
    for group in () if per_frame_timing else timing:
        shared.update(group)
    ds = Dataset()
    ds.SOPClassUID = ENHANCED_MR
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "MR"
    ds.ImageType = ["MIXED" if derived_frames else "ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.SeriesDescription = description
    ds.ProtocolName = protocol
    ds.PulseSequenceName = pulse_sequence
    ds.NumberOfFrames = frames
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = per_frame
    return SeriesHeaders(ds.SeriesInstanceUID, (ds,))


@dataclass(frozen=True)
class Case:
    """A series, the decision expected for it ("selected T1", "skipped other", ...) and reason fragments."""

    headers: Callable[[], SeriesHeaders]
    expect: str
    fragments: tuple[str, ...]
    config: SelectionSection = CONFIG


T2_ONLY = SelectionSection(models={"T2": "models/t2.pt"})
LOCALIZER = ("ORIGINAL", "PRIMARY", "LOCALIZER")
PHILIPS = ("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE")
MPR = ("DERIVED", "SECONDARY", "MPR", "CSA MPR")
DIFFUSION = ("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE")

CASES: dict[str, Case] = {
    "siemens-mprage": Case(
        lambda: mr_headers("t1_mprage_sag_p2_iso", 176, tr=2300, te=2.98, ti=900, sequence="*tfl3d1_16ns"),
        "selected T1",
        ("contrast class T1 by keyword 't1' in SeriesDescription 't1_mprage_sag_p2_iso'", "176 slices", "t1.pt"),
    ),
    "ge-bravo": Case(
        lambda: mr_headers("Sag T1 BRAVO", 156, tr=8.2, te=3.2, ti=450, protocol="BRAIN ROUTINE"),
        "selected T1",
        ("keyword 'T1' in SeriesDescription 'Sag T1 BRAVO'", "156 slices"),
    ),
    "philips-tfe": Case(
        lambda: mr_headers("T1W_3D_TFE", 180, tr=8.1, te=3.7, protocol="T1W_3D_TFE", image_type=PHILIPS),
        "selected T1",
        ("keyword 'T1W' in SeriesDescription 'T1W_3D_TFE'",),
    ),
    # GE's ProtocolName is the exam's: "PERFUSION" there must not outvote the description.
    "ge-t2-fse-no-model": Case(
        lambda: mr_headers("AX T2 FSE", 28, tr=4000, te=100, protocol="STROKE PERFUSION"),
        "skipped T2",
        ("contrast class T2 has no model configured", "keyword 'T2' in SeriesDescription 'AX T2 FSE'"),
    ),
    "ge-t2-fse-with-model": Case(
        lambda: mr_headers("AX T2 FSE", 28, tr=4000, te=100),
        "selected T2",
        ("contrast class T2", "28 slices", "models/t2.pt"),
        T2_ONLY,
    ),
    "siemens-tirm": Case(
        lambda: mr_headers("t2_tirm_tra_dark-fluid", 25, tr=9000, te=81, ti=2500, sequence="*tir2d1_16"),
        "selected FLAIR",
        ("keyword 'tirm' in SeriesDescription 't2_tirm_tra_dark-fluid'", "models/flair.pt"),
    ),
    "ge-flair": Case(
        lambda: mr_headers("Ax FLAIR", 28, tr=9000, te=120, ti=2250),
        "selected FLAIR",
        ("keyword 'FLAIR' in SeriesDescription 'Ax FLAIR'",),
    ),
    "ge-t1-flair": Case(
        lambda: mr_headers("Ax T1 FLAIR", 28, tr=2100, te=24, ti=760),
        "selected T1",
        ("keyword 'T1 FLAIR' in SeriesDescription 'Ax T1 FLAIR'",),
    ),
    "siemens-dwi": Case(
        lambda: mr_headers("ep2d_diff", 25, tr=5000, te=89, sequence="*ep_b1000t", b_values=(0, 1000)),
        "skipped other",
        ("contrast class other has no model configured", "keyword 'diff' in SeriesDescription 'ep2d_diff'"),
    ),
    # T2 timings and no names: only the b value says diffusion.
    "dwi-by-b-value": Case(
        lambda: mr_headers(None, 25, tr=5000, te=89, b_values=(0, 1000), image_type=DIFFUSION),
        "skipped other",
        ("contrast class other has no model configured", "DiffusionBValue 1000 > 0"),
        T2_ONLY,
    ),
    "siemens-swi": Case(
        lambda: mr_headers("t2_swi_tra_p2", 72, tr=27, te=20),
        "skipped other",
        ("keyword 'swi' in SeriesDescription 't2_swi_tra_p2'",),
    ),
    "ge-t2-star": Case(
        lambda: mr_headers("AX T2* GRE", 28, tr=650, te=15),
        "skipped other",
        ("keyword 'T2*' in SeriesDescription 'AX T2* GRE'",),
    ),
    "siemens-localizer": Case(
        lambda: mr_headers("localizer", 3, tr=8.6, te=4.0, image_type=LOCALIZER),
        "skipped T1",
        ("ImageType contains LOCALIZER",),
    ),
    "ge-3-plane-loc": Case(
        lambda: mr_headers("3-Plane Loc", 27, tr=5.5, te=1.6, image_type=("ORIGINAL", "PRIMARY", "OTHER")),
        "skipped T1",
        ("SeriesDescription '3-Plane Loc' names a localizer or calibration scan ('3-Plane Loc')",),
    ),
    "philips-survey": Case(
        lambda: mr_headers("SmartSurvey", 27, tr=11, te=4.6, image_type=PHILIPS),
        "skipped T1",
        ("SeriesDescription 'SmartSurvey' names a localizer",),
    ),
    "siemens-mpr": Case(
        lambda: mr_headers("t1_mprage_sag_p2_iso_MPR_Tra", 60, tr=2300, te=2.98, ti=900, image_type=MPR),
        "skipped T1",
        ("ImageType contains DERIVED, SECONDARY, MPR",),
    ),
    "ct": Case(
        lambda: mr_headers("Head 5mm", 30, modality="CT", sop_class=CT, image_type=("ORIGINAL", "PRIMARY", "AXIAL")),
        "skipped other",
        ("SOPClassUID 1.2.840.10008.5.1.4.1.1.2 (CT Image Storage) is not in sop_classes",),
    ),
    "wrong-modality": Case(
        lambda: mr_headers("T1 AX", 30, modality="OT"),
        "skipped T1",
        ("Modality OT is not in modalities ['MR']",),
    ),
    "t1-too-few-slices": Case(
        lambda: mr_headers("t1_se_tra", 12, tr=500, te=10),
        "skipped T1",
        ("12 slices < minimum 20",),
    ),
    "multi-echo-counts-positions": Case(
        lambda: mr_headers("t1_fl2d_tra_2echo", 15, tr=300, te=5, echoes=2),
        "skipped T1",
        ("15 slices < minimum 20",),
    ),
    "no-name-spin-echo-t1": Case(
        lambda: mr_headers(None, 24, tr=500, te=12),
        "selected T1",
        ("timing (TR 500 ms, TE 12 ms, TI none): TR <= 800 and TE <= 30 ms",),
    ),
    "no-name-mprage-timing": Case(
        lambda: mr_headers("", 176, tr=2300, te=2.98, ti=900),
        "selected T1",
        ("TI 900 ms", "inversion-recovery gradient echo: 700 <= TI <= 1200"),
    ),
    "no-name-no-timing": Case(
        lambda: mr_headers(None, 24),
        "skipped other",
        ("no SeriesDescription, ProtocolName", "(TR none, TE none, TI none) fits no"),
    ),
    "unknown-sequence-odd-timing": Case(
        lambda: mr_headers("sag 3D research", 60, tr=1500, te=40),
        "skipped other",
        ("no contrast keyword in SeriesDescription 'sag 3D research'", "TR 1500 ms, TE 40 ms, TI none"),
    ),
    "enhanced-shared-timing": Case(
        lambda: enhanced_mr(180, tr=8.1, te=3.7, description="sag 3D", protocol="BRAIN_3D"),
        "selected T1",
        ("timing (TR 8.1 ms, TE 3.7 ms, TI none): TR <= 800", "180 slices"),
    ),
    "enhanced-per-frame-timing": Case(
        lambda: enhanced_mr(160, tr=4800, te=310, ti=1650, per_frame_timing=True),
        "selected FLAIR",
        ("TR 4800 ms, TE 310 ms, TI 1650 ms): TI >= 1500 and TE >= 70", "160 slices"),
    ),
    "enhanced-pulse-sequence-name": Case(
        lambda: enhanced_mr(150, tr=8.1, te=3.7, pulse_sequence="TFE"),
        "selected T1",
        ("keyword 'TFE' in PulseSequenceName 'TFE'",),
    ),
    "enhanced-too-few-frames": Case(
        lambda: enhanced_mr(14, tr=8.1, te=3.7, description="T1 3D"),
        "skipped T1",
        ("14 slices < minimum 20",),
    ),
    "enhanced-derived-frames": Case(
        lambda: enhanced_mr(40, tr=8.1, te=3.7, description="T1 3D", derived_frames=5),
        "skipped T1",
        ("ImageType contains DERIVED",),
    ),
    "exclude-pattern": Case(
        lambda: mr_headers("AX DWI", 28, tr=6000, te=80),
        "skipped other",
        ("SeriesDescription 'AX DWI' matches exclude pattern 'dwi'",),
        SelectionSection(exclude=["post", "dwi"], models={"T1": "models/t1.pt"}),
    ),
    "include-pattern-misses": Case(
        lambda: mr_headers("AX T2 FSE", 28, tr=4000, te=100, protocol="BRAIN ROUTINE"),
        "skipped T2",
        ("no include pattern ('t1', 'mprage') matches SeriesDescription 'AX T2 FSE', ProtocolName 'BRAIN ROUTINE'",),
        SelectionSection(include=["t1", "mprage"], models={"T1": "models/t1.pt", "T2": "models/t2.pt"}),
    ),
    "include-pattern-matches": Case(
        lambda: mr_headers("t1_mprage_sag_p2_iso", 160, tr=2300, te=2.98, ti=900),
        "selected T1",
        ("contrast class T1", "160 slices"),
        SelectionSection(include=["T1", "mprage"], models={"T1": "models/t1.pt"}),
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_decision(name: str) -> None:
    case = CASES[name]
    series = case.headers()
    decision = select_series(series, case.config)
    verdict = "selected" if decision.selected else "skipped"
    assert f"{verdict} {decision.contrast}" == case.expect, decision.reason
    assert decision.series_uid == series.series_uid
    for fragment in case.fragments:
        assert fragment in decision.reason
    assert decision.model == (case.config.models[decision.contrast] if decision.selected else None)


def test_every_reason_is_specific() -> None:
    """Each reason carries the values that decided it, so no two of these different series read alike."""
    reasons = [select_series(case.headers(), case.config).reason for case in CASES.values()]
    assert all(reason.strip() for reason in reasons)
    assert len(set(reasons)) == len(reasons)


def test_enhanced_mr_timing_and_positions_come_from_functional_groups() -> None:
    shared = summarise(enhanced_mr(30, tr=2300, te=2.98, ti=900))
    per_frame = summarise(enhanced_mr(30, tr=9000, te=81, ti=2500, per_frame_timing=True))
    assert (shared.timing.repetition_ms, shared.timing.echo_ms, shared.timing.inversion_ms) == (2300, 2.98, 900)
    assert (per_frame.timing.repetition_ms, per_frame.timing.echo_ms, per_frame.timing.inversion_ms) == (9000, 81, 2500)
    assert (shared.images, shared.slices) == (30, 30)
    assert shared.names == ()


def test_one_odd_image_does_not_decide_the_timing() -> None:
    series = mr_headers("sag", 24, tr=4000, te=100)
    series.instances[0].EchoTime = 10
    assert summarise(series).timing.echo_ms == 100


def test_legacy_multi_frame_counts_frames() -> None:
    """MR Image Storage with NumberOfFrames (seen in the wild) has one position for all frames: count frames."""
    series = mr_headers("T1 AX", 1, tr=500, te=10)
    series.instances[0].NumberOfFrames = 24
    summary = summarise(series)
    assert (summary.images, summary.slices) == (24, 24)
    assert select_series(series, CONFIG).selected


def test_group_by_series_keeps_first_seen_order() -> None:
    a, b, c = mr_headers("a", 3), mr_headers("b", 2), mr_headers("c", 1)
    mixed = [b.instances[0], a.instances[0], c.instances[0], a.instances[1], b.instances[1], a.instances[2]]
    groups = group_by_series(mixed)
    assert [(g.series_uid, len(g.instances)) for g in groups] == [
        (b.series_uid, 2),
        (a.series_uid, 3),
        (c.series_uid, 1),
    ]


def test_series_headers_refuse_strangers_and_emptiness() -> None:
    a, b = mr_headers("a", 2), mr_headers("b", 1)
    with pytest.raises(ValueError, match="do not belong"):
        SeriesHeaders(a.series_uid, a.instances + b.instances)
    with pytest.raises(ValueError, match="no instances"):
        SeriesHeaders(a.series_uid, ())
    del b.instances[0].SeriesInstanceUID
    with pytest.raises(ValueError, match="has no series UID"):
        group_by_series(b.instances)


def test_headers_read_from_stored_files(tmp_path: Path) -> None:
    paths = write_series(mr_series(20, size=8), tmp_path / "series")
    headers = read_headers(paths)
    assert all("PixelData" not in ds for ds in headers)
    (series,) = group_by_series(headers)
    decision = select_series(series, CONFIG)
    assert decision.selected, decision.reason
    assert "keyword 'T1' in SeriesDescription 'T1 AX'; 20 slices" in decision.reason


def test_pydicom_sample_file() -> None:
    """A real scanner file (pydicom's MR_small): a derived image, T2 by its timing (TR 4000, TE 240)."""
    (series,) = group_by_series(read_headers([Path(get_testdata_file("MR_small.dcm"))]))
    decision = select_series(series, CONFIG)
    assert not decision.selected
    assert decision.reason == "ImageType contains DERIVED, SECONDARY"
    assert decision.contrast == Contrast.T2


def test_config_defaults() -> None:
    config = SelectionSection()
    assert config.modalities == ["MR"]
    assert config.sop_classes == [MR, ENHANCED_MR]
    assert config.min_slices == 20
    assert "LOCALIZER" in config.excluded_image_types
    assert config.models == {Contrast.T1: SHIPPED_T1_CHECKPOINT} and SHIPPED_T1_CHECKPOINT.is_file()
    decision = select_series(mr_headers("t2_tse_tra", 30, tr=5000, te=100), config)
    assert decision.reason.startswith("contrast class T2 has no model configured")


def test_proposed_toml_section_is_valid() -> None:
    config = SelectionSection.model_validate(tomllib.loads(PROPOSED_TOML)["selection"])
    assert config.models == {Contrast.T1: Path("../models/checkpoints/default-t1.pt")}
    assert config == SelectionSection(models=config.models)


def test_config_normalises_code_strings() -> None:
    config = SelectionSection(modalities=[" mr "], excluded_image_types=["derived"])
    assert (config.modalities, config.excluded_image_types) == (["MR"], ["DERIVED"])


@pytest.mark.parametrize(
    ("raw", "loc", "fragments"),
    [
        ({"exclude": ["dwi", "(diff"]}, ("exclude", 1), ("invalid regular expression '(diff'", "missing )")),
        ({"include": ["[t1"]}, ("include", 0), ("invalid regular expression '[t1'",)),
        ({"models": {"T3": "m.pt"}}, ("models",), ("unknown contrast class 'T3'", "T1, T2, FLAIR, other")),
        ({"models": {"t1": "m.pt"}}, ("models",), ("unknown contrast class 't1'",)),
        ({"models": {"T1": " "}}, ("models",), ("model path for T1 is empty",)),
        ({"modalities": []}, ("modalities",), ("at least one value",)),
        ({"sop_classes": [MR, "1.2.x"]}, ("sop_classes",), ("1.2.x",)),
        ({"min_slices": 0}, ("min_slices",), ("greater than or equal to 1",)),
        ({"min_slice": 10}, ("min_slice",), ("Extra inputs",)),
    ],
)
def test_config_errors_name_their_key(raw: dict, loc: tuple, fragments: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as info:
        SelectionSection.model_validate(raw)
    (error,) = info.value.errors()
    assert error["loc"] == loc
    for fragment in fragments:
        assert fragment in error["msg"]


def test_post_contrast_exclude_example_from_the_toml_comment() -> None:
    raw = tomllib.loads("exclude = ['\\bpost\\b', 'gad', '\\+c\\b']\nmodels = { T1 = 't1.pt' }")
    config = SelectionSection.model_validate(raw)
    reasons = {
        name: select_series(mr_headers(name, 30, tr=500, te=10), config).reason
        for name in ("Ax T1 POST", "T1 +C", "t1_se_tra_GAD", "Ax T1 postero-lateral")
    }
    assert reasons["Ax T1 POST"] == r"SeriesDescription 'Ax T1 POST' matches exclude pattern '\bpost\b'"
    assert reasons["T1 +C"] == r"SeriesDescription 'T1 +C' matches exclude pattern '\+c\b'"
    assert reasons["t1_se_tra_GAD"] == "SeriesDescription 't1_se_tra_GAD' matches exclude pattern 'gad'"
    assert reasons["Ax T1 postero-lateral"].startswith("contrast class T1 by keyword 'T1'")
