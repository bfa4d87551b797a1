"""read_header's direct scan (node/receiver/part10.py) against pydicom's reading of the same bytes.

The scan only answers when it is sure; these tests hold it to giving exactly pydicom's header on
plain data sets, and to handing over (returning None) on everything it does not handle itself.
"""

from __future__ import annotations

import contextlib
import copy
import struct
from io import BytesIO

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

import node.receiver.part10 as part10
from node.receiver.part10 import _read_header_pydicom, _scan_header, read_header
from tests.mr_files import mr_slice

SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


def encode(ds: Dataset, transfer_syntax_uid: str) -> bytes:
    ds = copy.deepcopy(ds)
    ds.file_meta.TransferSyntaxUID = transfer_syntax_uid
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    raw = buffer.getvalue()
    (group_length,) = struct.unpack("<I", raw[140:144])
    return raw[144 + group_length :]


def base() -> Dataset:
    ds = mr_slice(generate_uid(), generate_uid(), 4)
    ds.SpecificCharacterSet = "ISO_IR 100"
    return ds


def variants() -> list[tuple[str, Dataset]]:
    """Data sets the scan must read exactly as pydicom does."""
    cases = [("plain", base())]
    ds = base()
    ds.ReferencedImageSequence = Sequence([Dataset()])
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = generate_uid()
    cases.append(("sequence before the needed tags", ds))
    ds = base()
    ds.SeriesDescription = "  T1 AX  "
    ds.SeriesNumber = "0012"
    cases.append(("padding and leading zeros", ds))
    ds = base()
    del ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber, ds.PatientID
    cases.append(("optional attributes missing", ds))
    ds = base()
    ds.SeriesDescription = ""
    ds.InstanceNumber = ""
    cases.append(("empty values", ds))
    ds = base()
    ds.add_new(0x00090010, "LO", "PRIVATE CREATOR")
    ds.add_new(0x00091001, "UN", b"\x01\x02\x03\x04")
    cases.append(("private elements", ds))
    return cases


@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize(("case", "ds"), variants(), ids=[case for case, _ in variants()])
def test_scan_matches_pydicom(case: str, ds: Dataset, syntax: str) -> None:
    raw = encode(ds, syntax)
    scanned = _scan_header(memoryview(raw), syntax)
    assert scanned is not None, case
    assert scanned == _read_header_pydicom(raw, syntax)


def handed_over() -> list[tuple[str, Dataset]]:
    """Data sets the scan must leave to pydicom (it returns None)."""
    cases = []
    ds = base()
    ds.SeriesDescription = "Tête"
    cases.append(("non-ASCII text", ds))
    ds = base()
    ds.SeriesDescription = ["T1", "AX"]
    cases.append(("multi-valued text", ds))
    ds = base()
    ds.SeriesNumber = "1.0"
    cases.append(("IS pydicom may accept", ds))
    return cases


@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize(("case", "ds"), handed_over(), ids=[case for case, _ in handed_over()])
def test_scan_hands_over_what_it_does_not_handle(case: str, ds: Dataset, syntax: str) -> None:
    raw = encode(ds, syntax)
    assert _scan_header(memoryview(raw), syntax) is None, case
    try:
        expected = _read_header_pydicom(raw, syntax)
    except ValueError:
        with pytest.raises(ValueError):
            read_header(raw, syntax)
        return
    assert read_header(raw, syntax) == expected


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_truncated_data_sets_are_left_to_pydicom(syntax: str) -> None:
    """Cut anywhere in the first elements: the scan never answers for a cut value; read_header raises
    or agrees with pydicom, exactly as before the scan existed."""
    raw = encode(base(), syntax)
    end = raw.index(b"\xe0\x7f") if b"\xe0\x7f" in raw else len(raw)
    for cut in range(0, min(end, 600)):
        data = raw[:cut]
        try:
            expected = _read_header_pydicom(data, syntax)
        except ValueError:
            with pytest.raises(ValueError):
                read_header(data, syntax)
            continue
        assert read_header(data, syntax) == expected, cut


def test_undefined_length_sequence_is_left_to_pydicom() -> None:
    ds = base()
    ds.ReferencedImageSequence = Sequence([Dataset()])
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = generate_uid()
    ds["ReferencedImageSequence"].is_undefined_length = True
    raw = encode(ds, ImplicitVRLittleEndian)
    assert b"\xff\xff\xff\xff" in raw
    assert _scan_header(memoryview(raw), ImplicitVRLittleEndian) is None
    assert read_header(raw, ImplicitVRLittleEndian) == _read_header_pydicom(raw, ImplicitVRLittleEndian)


def test_big_endian_and_deflate_never_reach_the_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian

    def fail(*args: object) -> None:
        raise AssertionError("scanned")

    monkeypatch.setattr(part10, "_scan_header", fail)
    for syntax in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
        with contextlib.suppress(ValueError):
            read_header(b"\x08\x00\x16\x00", syntax)
