"""PS3.10 framing and header parsing (node/receiver/part10.py): the file meta the node writes
before every stored data set, and the partial parse that decides where an instance is filed."""

from __future__ import annotations

import copy
import dataclasses
import struct
from io import BytesIO

import pydicom
import pytest
from pydicom.dataset import Dataset, validate_file_meta
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node.receiver.part10 import InstanceHeader, file_meta, read_header
from tests.mr_files import MR_IMAGE_STORAGE, mr_slice

STUDY_UID = "1.2.826.0.1.3680043.8.498.10"
SERIES_UID = "1.2.826.0.1.3680043.8.498.10.2"
ODD_UID = "1.2.826.0.1.3680043.8.498.10.2.77"  # 33 characters: padded with NUL
EVEN_UID = "1.2.826.0.1.3680043.8.498.10.2.777"  # 34 characters: no padding
ENCODINGS = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]


def test_uid_fixtures_have_the_parity_they_claim() -> None:
    """Guards the padding tests below: one odd-length and one even-length instance UID."""
    assert (len(ODD_UID) % 2, len(EVEN_UID) % 2) == (1, 0)


def encode(ds: Dataset, transfer_syntax_uid: str) -> bytes:
    """The data set alone (no preamble, no group 0002) as pydicom writes it in ``transfer_syntax_uid``."""
    ds = copy.deepcopy(ds)
    ds.file_meta.TransferSyntaxUID = transfer_syntax_uid
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    raw = buffer.getvalue()
    assert raw[128:132] == b"DICM" and raw[132:136] == b"\x02\x00\x00\x00"  # (0002,0000) leads group 2
    (group_length,) = struct.unpack("<I", raw[140:144])
    return raw[144 + group_length :]


def meta_elements(meta: bytes) -> dict[int, tuple[bytes, bytes]]:
    """Walk group 0002 of ``file_meta()`` output by hand: element number -> (VR, raw value)."""
    assert meta[:128] == b"\x00" * 128 and meta[128:132] == b"DICM"
    elements: dict[int, tuple[bytes, bytes]] = {}
    pos = 132
    while pos < len(meta):
        group, element = struct.unpack("<HH", meta[pos : pos + 4])
        assert group == 0x0002
        vr = meta[pos + 4 : pos + 6]
        if vr == b"OB":
            (length,) = struct.unpack("<I", meta[pos + 8 : pos + 12])
            start = pos + 12
        else:
            (length,) = struct.unpack("<H", meta[pos + 6 : pos + 8])
            start = pos + 8
        elements[element] = (vr, meta[start : start + length])
        pos = start + length
    assert pos == len(meta), "an element's length runs past the end of the meta"
    return elements


@pytest.mark.parametrize("transfer_syntax_uid", ENCODINGS)
@pytest.mark.parametrize(("sop_instance_uid", "source_ae"), [(ODD_UID, "SCANNER1"), (EVEN_UID, "MRI")])
def test_file_meta_then_data_set_is_a_valid_part10_file(
    transfer_syntax_uid: str, sop_instance_uid: str, source_ae: str
) -> None:
    """pydicom reads meta + data set as a conforming file, with exact meta values, in every encoding."""
    ds = mr_slice(STUDY_UID, SERIES_UID, 0, sop_instance_uid=sop_instance_uid)
    meta = file_meta(MR_IMAGE_STORAGE, sop_instance_uid, transfer_syntax_uid, source_ae)
    back = pydicom.dcmread(BytesIO(meta + encode(ds, transfer_syntax_uid)))
    validate_file_meta(back.file_meta, enforce_standard=True)
    fm = back.file_meta
    assert fm.FileMetaInformationVersion == b"\x00\x01"
    assert fm.MediaStorageSOPClassUID == MR_IMAGE_STORAGE
    assert fm.MediaStorageSOPInstanceUID == sop_instance_uid
    assert fm.TransferSyntaxUID == transfer_syntax_uid
    assert fm.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert fm.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    assert fm.SourceApplicationEntityTitle == source_ae
    assert fm.FileMetaInformationGroupLength == len(meta) - 144
    # The data set after the meta decodes with the transfer syntax the meta names.
    assert back.SOPInstanceUID == sop_instance_uid
    assert back.StudyInstanceUID == STUDY_UID
    assert back.InstanceNumber == 1
    if transfer_syntax_uid != ExplicitVRBigEndian:  # pydicom does not byte-swap OW when writing big endian
        assert back.PixelData == ds.PixelData


@pytest.mark.parametrize(
    ("sop_instance_uid", "transfer_syntax_uid", "source_ae"),
    [
        (ODD_UID, ExplicitVRLittleEndian, "SCANNER1"),  # odd UIDs, even AE
        (EVEN_UID, "1.2.840.10008.1.2.4.50", "ABC"),  # even UIDs, odd AE
        (ODD_UID, ImplicitVRLittleEndian, "A"),
    ],
)
def test_file_meta_bytes_pad_every_value_to_even_length(
    sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str
) -> None:
    """UIDs are NUL-padded, text space-padded, every length even, (0002,0000) counts the rest exactly."""
    meta = file_meta(MR_IMAGE_STORAGE, sop_instance_uid, transfer_syntax_uid, source_ae)
    elements = meta_elements(meta)
    assert sorted(elements) == [0x0000, 0x0001, 0x0002, 0x0003, 0x0010, 0x0012, 0x0013, 0x0016]
    assert all(len(value) % 2 == 0 for _, value in elements.values())
    assert elements[0x0000] == (b"UL", struct.pack("<I", len(meta) - 144))
    assert elements[0x0001] == (b"OB", b"\x00\x01")

    def padded(text: str, pad: bytes) -> bytes:
        raw = text.encode("ascii")
        return raw + pad if len(raw) % 2 else raw

    assert elements[0x0002] == (b"UI", padded(MR_IMAGE_STORAGE, b"\x00"))
    assert elements[0x0003] == (b"UI", padded(sop_instance_uid, b"\x00"))
    assert elements[0x0010] == (b"UI", padded(transfer_syntax_uid, b"\x00"))
    assert elements[0x0012] == (b"UI", padded(IMPLEMENTATION_CLASS_UID, b"\x00"))
    assert elements[0x0013] == (b"SH", padded(IMPLEMENTATION_VERSION_NAME, b" "))
    assert elements[0x0016] == (b"AE", padded(source_ae, b" "))


def test_file_meta_without_source_ae_omits_the_element() -> None:
    """An empty calling AE title writes no (0002,0016) rather than an empty or space-only one."""
    meta = file_meta(MR_IMAGE_STORAGE, ODD_UID, ExplicitVRLittleEndian, "")
    assert 0x0016 not in meta_elements(meta)
    back = pydicom.dcmread(BytesIO(meta + encode(mr_slice(STUDY_UID, SERIES_UID, 0), ExplicitVRLittleEndian)))
    assert "SourceApplicationEntityTitle" not in back.file_meta
    assert back.file_meta.FileMetaInformationGroupLength == len(meta) - 144


def test_read_header_gives_the_same_values_in_every_encoding() -> None:
    """Explicit/implicit LE, explicit BE and deflated encodings of one data set file it identically."""
    ds = mr_slice(STUDY_UID, SERIES_UID, 6, sop_instance_uid=ODD_UID)
    ds.SeriesNumber = 12
    ds.SeriesDescription = "T2 COR"  # even length
    ds.Modality = "MR"
    expected = InstanceHeader(
        sop_class_uid=MR_IMAGE_STORAGE,
        sop_instance_uid=ODD_UID,
        study_uid=STUDY_UID,
        series_uid=SERIES_UID,
        transfer_syntax_uid="",
        modality="MR",
        series_number=12,
        series_description="T2 COR",
        instance_number=7,
        patient_id="TEST-0001",
    )
    for transfer_syntax_uid in ENCODINGS:
        header = read_header(encode(ds, transfer_syntax_uid), transfer_syntax_uid)
        assert header == dataclasses.replace(expected, transfer_syntax_uid=transfer_syntax_uid), transfer_syntax_uid


def test_read_header_strips_padding_and_tolerates_missing_optional_attributes() -> None:
    """Odd-length padded values come back unpadded; absent optional attributes are ''/None, not errors."""
    ds = mr_slice(STUDY_UID, SERIES_UID, 0, sop_instance_uid=ODD_UID)
    ds.SeriesDescription = "T1 AX"  # 5 characters: space-padded on the wire
    del ds.SeriesNumber, ds.InstanceNumber, ds.Modality
    data = encode(ds, ExplicitVRLittleEndian)
    assert ODD_UID.encode() + b"\x00" in data and b"T1 AX " in data  # the padding is really there
    header = read_header(memoryview(data), ExplicitVRLittleEndian)
    assert header.sop_instance_uid == ODD_UID
    assert header.series_description == "T1 AX"
    assert (header.modality, header.series_number, header.instance_number) == ("", None, None)


def test_read_header_undecodable_data_raises_value_error() -> None:
    """A parse failure inside pydicom (here an undefined-length sequence cut off mid-item) is a ValueError."""
    data = (
        b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff"  # (0008,1115) SQ, undefined length
        b"\xfe\xff\x00\xe0\xff\xff\xff\xff"  # item, undefined length
        b"\x08\x00"  # half a tag, then the end
    )
    with pytest.raises(ValueError, match="unreadable data set"):
        read_header(data, ExplicitVRLittleEndian)


@pytest.mark.parametrize("transfer_syntax_uid", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
@pytest.mark.parametrize(
    "garbage",
    [b"", b"\x00" * 64, b"\xff" * 100, b"not a DICOM data set at all " * 4],
    ids=["empty", "zeros", "ff", "text"],
)
def test_read_header_garbage_never_yields_a_fileable_header(garbage: bytes, transfer_syntax_uid: str) -> None:
    """Garbage either raises ValueError or gives a header ``invalid_uid()`` refuses (pydicom is lenient)."""
    try:
        header = read_header(garbage, transfer_syntax_uid)
    except ValueError:
        return
    assert header.invalid_uid() is not None


def test_read_header_corrupt_deflated_data_raises_value_error() -> None:
    """Bytes that are not a raw deflate stream, announced as Deflated Explicit VR LE, are a ValueError."""
    with pytest.raises(ValueError):
        read_header(b"\xff" * 100, DeflatedExplicitVRLittleEndian)


def test_read_header_data_set_truncated_inside_a_uid_raises_value_error() -> None:
    """A data set cut off inside Series Instance UID must not be filed under a prefix of that UID."""
    ds = mr_slice(STUDY_UID, SERIES_UID, 0, sop_instance_uid=ODD_UID)
    data = encode(ds, ExplicitVRLittleEndian)
    start = data.index(b"\x20\x00\x0e\x00UI") + 8  # value of (0020,000E)
    cut = start + len("1.2.826.0.1.3680043")  # a digit boundary: the prefix is itself a valid UID
    with pytest.raises(ValueError):
        header = read_header(data[:cut], ExplicitVRLittleEndian)
        # Not reached when it raises; when it does not, show what the node would have filed it under.
        print("filed under series", header.series_uid, "valid:", header.invalid_uid() is None)


def _header(**changes: str) -> InstanceHeader:
    values = {
        "sop_class_uid": MR_IMAGE_STORAGE,
        "sop_instance_uid": ODD_UID,
        "study_uid": STUDY_UID,
        "series_uid": SERIES_UID,
        "transfer_syntax_uid": ExplicitVRLittleEndian,
    }
    return InstanceHeader(**(values | changes))


def test_invalid_uid_none_when_all_uids_are_valid() -> None:
    """A well-formed header passes."""
    assert _header().invalid_uid() is None


@pytest.mark.parametrize(
    ("changes", "first_bad"),
    [
        ({"sop_class_uid": ""}, "sop_class_uid"),
        ({"sop_instance_uid": "../x"}, "sop_instance_uid"),
        ({"study_uid": "1.2.840.abc"}, "study_uid"),
        ({"series_uid": "1.2/3"}, "series_uid"),
        ({"transfer_syntax_uid": "1.02"}, "transfer_syntax_uid"),
        ({"series_uid": "", "transfer_syntax_uid": ""}, "series_uid"),
        ({"study_uid": "..", "series_uid": "x", "sop_instance_uid": "1."}, "sop_instance_uid"),
        ({"sop_class_uid": "1." + "2" * 63, "study_uid": ""}, "sop_class_uid"),  # 65 characters
    ],
)
def test_invalid_uid_names_the_first_bad_field(changes: dict[str, str], first_bad: str) -> None:
    """The first malformed UID in filing order is named (these values become path components)."""
    assert _header(**changes).invalid_uid() == first_bad
