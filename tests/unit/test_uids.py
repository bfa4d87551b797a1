"""The DICOM UID grammar (PS3.5 9.1): UIDs become path components, so the check must be strict."""

from __future__ import annotations

import pytest

from node.uids import is_valid_uid

UID_64 = "1." + "2" * 62
UID_65 = "1." + "2" * 63


def test_length_fixtures_are_what_they_claim() -> None:
    """Guards the boundary fixtures below: 64 is the longest legal UID, 65 one past it."""
    assert (len(UID_64), len(UID_65)) == (64, 65)


@pytest.mark.parametrize(
    "uid",
    [
        "1.2.840.10008.5.1.4.1.1.4",
        "1.2.840.10008.5.1.4.1.1.4.1",
        "0.0",
        "2.25.0",
        UID_64,
    ],
)
def test_accepts_well_formed_uids(uid: str) -> None:
    """Dot-separated numbers without leading zeros, up to 64 characters, are valid."""
    assert is_valid_uid(uid) is True


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param("1", id="single-component"),
        pytest.param("1.02", id="leading-zero"),
        pytest.param("01.2", id="leading-zero-first"),
        pytest.param("00.1", id="double-zero"),
        pytest.param("1..2", id="empty-component"),
        pytest.param("1.2.", id="trailing-dot"),
        pytest.param(".1.2", id="leading-dot"),
        pytest.param("1.2.a", id="letter"),
        pytest.param("../1.2", id="parent-dir"),
        pytest.param("1.2/3", id="slash"),
        pytest.param("1.2\\3", id="backslash"),
        pytest.param("1.2\n", id="trailing-newline"),
        pytest.param(" 1.2", id="leading-space"),
        pytest.param("1.-2", id="negative"),
        pytest.param(UID_65, id="65-chars"),
        pytest.param(None, id="None"),
        pytest.param(12, id="int"),
        pytest.param(1.2, id="float"),
        pytest.param(b"1.2", id="bytes"),
    ],
)
def test_rejects_malformed_uids_and_non_strings(value: object) -> None:
    """Anything that could escape a directory or break the grammar is refused, never raised on."""
    assert is_valid_uid(value) is False
