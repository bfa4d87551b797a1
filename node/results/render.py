"""Drawing the result images (numpy + Pillow): a source slice in grey, the anomaly score in colour above the
threshold, the mask contour, orientation letters and burned-in text.

Slices are drawn as the source displays them (row 0 at the top, column 0 at the left) and resampled to
square display pixels, so a viewer that ignores PixelSpacing (most do for Secondary Capture) still shows
true proportions. Text uses Pillow's built-in scalable font: nothing depends on system fonts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Colour ramp for scores from the threshold (first) to the series maximum (last): dark red -> orange ->
# pale yellow (ColorBrewer YlOrRd, reversed). Lightness rises monotonically, so "brighter = higher"
# reads without a legend, and no step is dark enough to look like a hole in grey anatomy.
RAMP = np.array(
    [(189, 0, 38), (227, 26, 28), (252, 78, 42), (253, 141, 60), (254, 178, 76), (254, 217, 118), (255, 255, 178)],
    dtype=np.float32,
)
OVERLAY_ALPHA = 0.55
CONTOUR = (0, 255, 255)  # cyan: apart from every ramp colour and from grey
TEXT = (255, 255, 255)
NOTICE = (255, 210, 0)
BAND = (0, 0, 0)


@dataclass(frozen=True)
class Scale:
    """Grey window and score range shared by every image of a series, so images compare at a glance."""

    grey_low: float
    grey_high: float
    threshold: float
    score_high: float  # score drawn with the last ramp colour (the series maximum)


def series_scale(image: np.ndarray, score: np.ndarray, threshold: float, max_score: float) -> Scale:
    """Grey window from the brain's intensities (0.5th-99.5th percentile of voxels with a score, i.e. inside
    the brain; all non-zero voxels when there are few): skull, fat and air do not squash the brain's
    contrast."""
    inside = image[score > 0]
    if inside.size < 0.01 * image.size:
        inside = image[image != 0]
    if inside.size == 0:
        inside = image.ravel()
    low, high = (float(v) for v in np.percentile(inside, (0.5, 99.5))) if inside.size else (0.0, 1.0)
    if high <= low:
        high = low + 1.0
    return Scale(low, high, float(threshold), max(float(max_score), float(threshold) * (1 + 1e-6), 1e-12))


def display_size(rows: int, columns: int, row_spacing: float, column_spacing: float, longest: int) -> tuple[int, int]:
    """(height, width) in square display pixels, the longer side ``longest`` pixels."""
    height_mm, width_mm = rows * row_spacing, columns * column_spacing
    pixel = max(height_mm, width_mm) / longest
    return max(1, round(height_mm / pixel)), max(1, round(width_mm / pixel))


def render_slice(
    image: np.ndarray, score: np.ndarray, mask: np.ndarray, scale: Scale, size: tuple[int, int]
) -> Image.Image:
    """One slice (rows, cols) as an RGB picture of ``size`` (height, width): grey anatomy, score colours where
    the score reaches the threshold, cyan contour around the mask."""
    height, width = size
    grey = np.clip((image.astype(np.float32) - scale.grey_low) / (scale.grey_high - scale.grey_low), 0, 1)
    grey_big = np.asarray(_resize(grey, size, Image.Resampling.BILINEAR))
    score_big = np.asarray(_resize(score.astype(np.float32), size, Image.Resampling.BILINEAR))
    mask_big = np.asarray(_resize(mask.astype(np.float32), size, Image.Resampling.NEAREST)) > 0.5

    rgb = np.repeat(grey_big[..., None] * 255.0, 3, axis=2)
    above = score_big >= scale.threshold
    if above.any():
        colours = ramp_colours((score_big[above] - scale.threshold) / (scale.score_high - scale.threshold))
        rgb[above] = (1 - OVERLAY_ALPHA) * rgb[above] + OVERLAY_ALPHA * colours
    rgb[contour(mask_big, thickness=max(1, round(max(height, width) / 256)))] = CONTOUR
    return Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8), "RGB")


def ramp_colours(fraction: np.ndarray) -> np.ndarray:
    """RGB (float) of the score ramp at ``fraction`` in [0, 1] (clipped), linearly between its stops."""
    position = np.clip(fraction, 0, 1) * (len(RAMP) - 1)
    low = np.minimum(position.astype(np.int64), len(RAMP) - 2)
    weight = (position - low)[..., None]
    return RAMP[low] * (1 - weight) + RAMP[low + 1] * weight


def contour(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Pixels of ``mask`` within ``thickness`` pixels of its outside (4-neighbourhood erosion)."""
    inner = mask.copy()
    for _ in range(thickness):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        shrunk[0, :] = shrunk[-1, :] = False
        shrunk[:, 0] = shrunk[:, -1] = False
        inner = shrunk
    return mask & ~inner


def draw_orientation(picture: Image.Image, orientation: tuple[str, str], size: int) -> None:
    """Direction letters at the picture's edges: row direction on the right, column direction at the bottom,
    their opposites left and top (as viewers label images)."""
    row, column = orientation
    draw = ImageDraw.Draw(picture)
    face = font(size)
    width, height = picture.size
    margin = max(2, size // 4)
    for text, (x, y), anchor in (
        (row, (width - margin, height // 2), "rm"),
        (opposite(row), (margin, height // 2), "lm"),
        (column, (width // 2, height - margin), "mb"),
        (opposite(column), (width // 2, margin), "mt"),
    ):
        draw.text((x, y), text, fill=TEXT, font=face, anchor=anchor, stroke_width=max(1, size // 10), stroke_fill=BAND)


def opposite(letters: str) -> str:
    swap = {"L": "R", "R": "L", "A": "P", "P": "A", "H": "F", "F": "H"}
    return "".join(swap.get(c, c) for c in letters)


def text_band(width: int, lines: list[tuple[str, tuple[int, int, int]]], size: int) -> Image.Image:
    """A black band holding ``lines`` (text, colour), left-aligned, one line each."""
    face = font(size)
    line_height = round(size * 1.35)
    band = Image.new("RGB", (width, line_height * len(lines) + size // 2), BAND)
    draw = ImageDraw.Draw(band)
    for i, (text, colour) in enumerate(lines):
        draw.text((size // 2, size // 4 + i * line_height), fit(text, face, width - size), fill=colour, font=face)
    return band


def fit(text: str, face: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> str:
    """``text``, cut with an ellipsis where it would run past ``width`` pixels."""
    if face.getlength(text) <= width:
        return text
    while text and face.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def stack(parts: list[Image.Image]) -> Image.Image:
    """Pictures one under the other (all as wide as the first)."""
    width = parts[0].size[0]
    out = Image.new("RGB", (width, sum(p.size[1] for p in parts)), BAND)
    y = 0
    for part in parts:
        out.paste(part, (0, y))
        y += part.size[1]
    return out


@lru_cache(maxsize=16)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in scalable font at ``size`` pixels (needs Pillow >= 10.1 with FreeType, as the wheels
    ship); the fixed-size bitmap font otherwise."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # old Pillow or no FreeType
        return ImageFont.load_default()


def _resize(values: np.ndarray, size: tuple[int, int], method: Image.Resampling) -> Image.Image:
    height, width = size
    return Image.fromarray(values.astype(np.float32), "F").resize((width, height), method)
