"""The "NOT SCREENED" notice: one Secondary Capture sent into the study when a series the node selected could not
be analysed (volume rejected, codec, quality gate, model error), so a radiologist can tell "screened, nothing
found" from "never screened".

Built from the source headers alone (the series may be unreadable: no pixels, no volume). The picture says, in
large type, that the series was not screened, why, which series it was, and that absence of findings must not
be assumed; the reason is also in ImageComments and DerivationDescription. Its own series
(``results.notice_series_number``), new UIDs on every build, every source image referenced, research use only.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from node.config import ResultsSection
from node.results.overlays import secondary_capture
from node.results.render import BAND, NOTICE, TEXT, fit, font
from node.results.sources import RESEARCH_NOTICE, new_uid
from node.results.summary import BANNER, FOUND, MUTED
from node.volume import SliceSource

NOTICE_SERIES_DESCRIPTION = "NOT SCREENED - anomaly screening (research use only)"
HEADLINE = "THIS SERIES WAS NOT SCREENED"
CONSEQUENCE = "No anomaly analysis was performed; absence of findings must not be assumed."
NOTICE_SIZE = (1024, 512)  # 2:1 and large type: legible as a PACS thumbnail
REASON_LINES = 3
MARGIN = 32


def build_not_screened_notice(
    sources: Sequence[Dataset], reason: str, options: ResultsSection
) -> tuple[Dataset, bytes]:
    """The notice as an RGB Secondary Capture in the sources' study (new series and SOP Instance UIDs, series
    number ``options.notice_series_number``, every source image referenced) and the same picture as PNG bytes.

    ``sources`` are the headers of the series' images, in any order; pixel data is never read. Raises
    ValueError when there is none or they span more than one series (a notice is about one series).
    """
    ordered = _in_instance_order(sources)
    first = ordered[0]
    one_line = _one_line(reason)
    picture = notice_picture(one_line, first, len(ordered))
    sc = secondary_capture(
        picture,
        None,  # a picture of text: no anatomy, no orientation
        first,
        [SliceSource(str(ds.SOPInstanceUID), None, str(ds.SOPClassUID)) for ds in ordered],
        options,
        series_instance_uid=new_uid(),
        instance_number=1,
        pixel_spacing_mm=None,
        derivation=_clip(f"Not screened (no anomaly analysis), {RESEARCH_NOTICE.lower()}; reason: {one_line}", 1024),
        series_number=options.notice_series_number,
        series_description=NOTICE_SERIES_DESCRIPTION,
        comments=_clip(f"{RESEARCH_NOTICE}. NOT SCREENED: {one_line}", 10240),
    )
    if not one_line.isascii() and "ISO_IR 192" not in sc.get("SpecificCharacterSet", ""):
        # the reason may quote what the node read (a file name, an exception); UTF-8 holds any of it, and
        # pydicom re-encodes the copied patient attributes from their decoded text
        sc.SpecificCharacterSet = "ISO_IR 192"
    png = io.BytesIO()
    picture.save(png, format="PNG", optimize=True)
    return sc, png.getvalue()


def notice_picture(reason: str, source: Dataset, images: int) -> Image.Image:
    """The notice as one RGB picture (NOTICE_SIZE): research-use banner, headline, reason (wrapped over up to
    REASON_LINES lines, the last cut with an ellipsis), the source series, and what the reader must not
    assume."""
    width, height = NOTICE_SIZE
    picture = Image.new("RGB", NOTICE_SIZE, BAND)
    draw = ImageDraw.Draw(picture)
    draw.rectangle([0, 0, width - 1, 63], fill=BANNER)
    draw.text((width // 2, 32), fit(RESEARCH_NOTICE, font(38), width - 2 * MARGIN), NOTICE, font(38), anchor="mm")
    headline = fit(HEADLINE, font(60), width - 2 * MARGIN)
    draw.text((width // 2, 84), headline, FOUND, font(60), anchor="mt", stroke_width=1, stroke_fill=FOUND)  # bold
    draw.line([(MARGIN, 172), (width - MARGIN, 172)], fill=BANNER, width=3)

    label, face = "Reason:", font(28)
    indent = MARGIN + round(face.getlength(label + " "))
    draw.text((MARGIN, 196), label, fill=MUTED, font=face)
    lines = wrap(reason, face, width - indent - MARGIN, REASON_LINES)
    for i, line in enumerate(lines):
        draw.text((indent, 196 + i * 38), line, fill=TEXT, font=face)
    if "".join(lines).replace(" ", "") != reason.replace(" ", ""):  # cut: say where the whole of it is
        draw.text((MARGIN, height - 12), "Full reason: Image Comments (0020,4000)", MUTED, font(16), anchor="ls")

    draw.text((MARGIN, 334), fit(_series_line(source, images), font(26), width - 2 * MARGIN), TEXT, font(26))
    draw.line([(MARGIN, 396), (width - MARGIN, 396)], fill=BANNER, width=3)
    draw.text((MARGIN, 418), fit(CONSEQUENCE, font(26), width - 2 * MARGIN), NOTICE, font(26))
    draw.text((width - MARGIN // 2, height - 12), "uad-node", fill=MUTED, font=font(14), anchor="rs")
    return picture


def wrap(text: str, face: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int, max_lines: int) -> list[str]:
    """``text`` in at most ``max_lines`` lines of at most ``width`` pixels, broken between words (inside a word
    longer than a line); what does not fit ends the last line as "...". Cost grows with what is shown, not with
    the length of ``text`` (a reason may quote a whole traceback)."""
    lines: list[str] = []
    rest = text.split()
    glue = " "  # between the last line and the rest: none inside a broken word
    while rest and len(lines) < max_lines:
        line, glue = "", " "
        while rest:
            candidate = f"{line} {rest[0]}" if line else rest[0]
            if face.getlength(candidate) <= width:
                line, rest = candidate, rest[1:]
            elif not line:  # one word wider than the line: break it
                cut = max(1, _fitting(rest[0], face, width))
                line, rest, glue = rest[0][:cut], [rest[0][cut:], *rest[1:]], ""
                break
            else:
                break
        lines.append(line)
    if rest:  # the last line is full, so with the rest it is too wide: cut it where "..." still fits
        tail = lines[-1] + glue + " ".join(rest)
        lines[-1] = tail[: _fitting(tail, face, width - round(face.getlength("...")))].rstrip() + "..."
    return lines


def _fitting(text: str, face: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> int:
    """How many leading characters of ``text`` fit in ``width`` pixels (bisection: text may be long)."""
    low, high = 0, min(len(text), width)  # more characters than pixels would not be legible anyway
    while low < high:
        middle = (low + high + 1) // 2
        if face.getlength(text[:middle]) <= width:
            low = middle
        else:
            high = middle - 1
    return low


def _in_instance_order(sources: Sequence[Dataset]) -> list[Dataset]:
    """The sources by InstanceNumber (those without one last, in the given order), each SOP instance once."""
    if not sources:
        raise ValueError("a NOT SCREENED notice needs the header of at least one source image")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in sources}
    if len(series) > 1:
        raise ValueError(f"the source headers belong to {len(series)} series; a notice is about one series")

    def key(item: tuple[int, Dataset]) -> tuple[bool, int, int]:
        position, ds = item
        try:
            return False, int(ds.get("InstanceNumber")), position
        except (TypeError, ValueError):
            return True, 0, position

    unique: dict[str, Dataset] = {}
    for _, ds in sorted(enumerate(sources), key=key):
        unique.setdefault(str(ds.SOPInstanceUID), ds)
    return list(unique.values())


def _series_line(source: Dataset, images: int) -> str:
    name = str(source.get("SeriesDescription", "") or "unnamed series")
    number = source.get("SeriesNumber")
    modality = str(source.get("Modality", "") or "")
    line = f"Series: {name}" + (f" (series {number})" if number not in (None, "") else "")
    return line + f", {images} {modality + ' ' if modality else ''}image{'s' if images != 1 else ''}"


def _one_line(reason: str) -> str:
    """The reason on one line (newlines, tabs and runs of spaces become one space); never empty."""
    return " ".join("".join(c if c.isprintable() else " " for c in reason).split()) or "no reason given"


def _clip(text: str, limit: int) -> str:
    """``text`` within a VR's ``limit`` characters, ending in "..." when cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
