"""The transfer syntaxes the receiver negotiates are the ones this installation decodes."""

from __future__ import annotations

import pytest
from pydicom.pixels import get_decoder
from pydicom.uid import (
    HEVCM10P51,
    HEVCMP51,
    JPEG2000,
    MPEG2MPHL,
    MPEG2MPML,
    MPEG4HP41,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from node.config import NodeConfig
from node.receiver.codecs import decodable_transfer_syntaxes, missing_decoders
from node.receiver.server import presentation_contexts

EXPECTED = [
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGExtended12Bit,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    JPEG2000Lossless,
    JPEG2000,
]


@pytest.mark.parametrize("uid", EXPECTED, ids=lambda uid: uid.name)
def test_native_and_image_compression_syntaxes_are_decodable(uid: str) -> None:
    """With the project's dependencies installed, every syntax a PACS uses for MR decodes."""
    assert uid in decodable_transfer_syntaxes()


@pytest.mark.parametrize("uid", [MPEG2MPML, MPEG2MPHL, MPEG4HP41, HEVCMP51, HEVCM10P51], ids=lambda uid: uid.name)
def test_video_syntaxes_are_not(uid: str) -> None:
    """Nothing installed decodes video into pixels: such images must not be acknowledged."""
    assert uid not in decodable_transfer_syntaxes()


def test_jpeg_extended_is_not_trusted_to_pillow_or_gdcm_alone() -> None:
    """Without pylibjpeg, pydicom still reports JPEG Extended available (Pillow, GDCM), but both decode only
    8-bit samples and MR is 12-bit: the syntax is then not negotiated, and start-up names it."""
    decoder = get_decoder(JPEGExtended12Bit)
    assert {"gdcm", "pillow", "pylibjpeg"} <= set(decoder.available_plugins)
    decoder.remove_plugin("pylibjpeg")
    try:
        assert decoder.is_available
        assert JPEGExtended12Bit not in decodable_transfer_syntaxes()
        assert JPEGExtended12Bit.name in missing_decoders()
    finally:  # back in place (now tried last: Pillow and GDCM refuse 12-bit before decoding, so no change)
        decoder.add_plugin("pylibjpeg", ("pydicom.pixels.decoders.pylibjpeg", "_decode_frame"))
    assert JPEGExtended12Bit in decodable_transfer_syntaxes()


def test_no_syntax_a_pacs_uses_for_mr_is_left_out_for_want_of_a_plugin() -> None:
    """The dependencies cover them all; what start-up reports missing is only what no dependency decodes
    (High-Throughput JPEG 2000 needs pylibjpeg-openjpeg, which is not one)."""
    assert not {uid.name for uid in EXPECTED} & set(missing_decoders())


def test_presentation_contexts_offer_exactly_the_decodable_syntaxes() -> None:
    """Verification and every storage context accept the decodable syntaxes and nothing else."""
    decodable = decodable_transfer_syntaxes()
    for context in presentation_contexts(NodeConfig()):
        assert list(context.transfer_syntax) == decodable, context.abstract_syntax
