"""Which transfer syntaxes this installation can decode, so the receiver negotiates only those.

An image acknowledged with Success must be readable at analysis. The receiver stores what it is sent
without transcoding, so a syntax whose pixel data no installed pydicom plugin decodes at MR bit depths
must not be negotiated: the sender then converts or sends uncompressed instead of being told Success.
"""

from __future__ import annotations

from pydicom.pixels import get_decoder
from pydicom.uid import UID, AllTransferSyntaxes, JPEGExtended12Bit

__all__ = ["decodable_transfer_syntaxes", "missing_decoders"]

# Plugins that pydicom lists for a syntax but that cannot decode MR pixel data (12 to 16 bits) in it.
# JPEG Extended is mostly 12-bit; pydicom's Pillow and GDCM plugins refuse anything but 8-bit there.
_NOT_FOR_MR: dict[str, frozenset[str]] = {JPEGExtended12Bit: frozenset({"gdcm", "pillow"})}


def decodable_transfer_syntaxes() -> list[str]:
    """The transfer syntaxes whose pixel data this installation decodes: the native ones, and each
    compressed one with an installed plugin that handles MR bit depths. In pydicom's order."""
    return [str(uid) for uid in AllTransferSyntaxes if _mr_plugins(uid)]


def missing_decoders() -> list[str]:
    """Names of the compressed syntaxes pydicom could decode with a plugin that is not installed: the
    ones a missing dependency keeps out of negotiation (video and JPIP syntaxes have no decoder at all)."""
    return [uid.name for uid in AllTransferSyntaxes if _mr_plugins(uid) == frozenset()]


def _mr_plugins(uid: UID) -> frozenset[str] | None:
    """The installed plugins that decode ``uid`` for MR ("pydicom" itself for a native syntax; empty when
    all are missing), or None when pydicom has no decoder for ``uid`` at all."""
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return None
    if not uid.is_compressed:
        return frozenset({"pydicom"})
    return frozenset(decoder.available_plugins) - _NOT_FOR_MR.get(uid, frozenset())
