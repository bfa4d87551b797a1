"""The DICOM UID grammar (PS3.5 section 9.1).

UIDs become directory and file names, so nothing that fails this check may
ever reach a path.
"""

from __future__ import annotations

import re

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")


def is_valid_uid(value: object) -> bool:
    """True for a well-formed UID: dot-separated numbers, no leading zeros, at most 64 characters."""
    return isinstance(value, str) and len(value) <= 64 and _UID.fullmatch(value) is not None


def check_uids(values: list[str]) -> list[str]:
    """Config validator: every value a well-formed UID (the error lists the ones that are not)."""
    bad = [value for value in values if not is_valid_uid(value)]
    if bad:
        raise ValueError(f"not valid DICOM UIDs: {bad}")
    return values
