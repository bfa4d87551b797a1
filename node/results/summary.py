"""The one summary image a radiologist reads first: key slices, the figures, the model, and that this is research
output. Sent as an RGB Secondary Capture (first image of the overlay series) and kept as a PNG.

Layout, top to bottom: a red banner "RESEARCH USE ONLY - NOT FOR DIAGNOSIS"; the figures in large type
(anomalous volume, regions, maximum score against threshold, and in small type where the threshold comes from);
model, version and source series; a row of key slices (largest findings, or mid-brain slices when nothing is
found) with captions; the colour legend.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset

from node.config import ResultsSection
from node.results.findings import Findings
from node.results.overlays import build_overlays, overlay_slices, secondary_capture
from node.results.render import (
    BAND,
    CONTOUR,
    NOTICE,
    TEXT,
    display_size,
    draw_orientation,
    fit,
    font,
    ramp_colours,
    render_slice,
    series_scale,
    stack,
)
from node.results.sources import RESEARCH_NOTICE, new_uid, patient_orientation, sources_by_uid
from node.volume import SeriesVolume

WIDTH = 1280
KEY_SLICES = 4
TILE = 280  # longest side of a key-slice tile, pixels: four fit in WIDTH
GAP = 16
LEGEND_HEIGHT = 84
TILE_GAP = 32
FRAME = (70, 70, 70)
BANNER = (150, 0, 0)
MUTED = (190, 190, 190)
FOUND = (255, 170, 60)
CLEAR = (120, 220, 120)


def build_summary(
    series: SeriesVolume,
    sources: Sequence[Dataset],
    findings: Findings,
    timings_s: dict[str, float],
    options: ResultsSection,
    *,
    series_instance_uid: str | None = None,
    instance_number: int = 1,
) -> tuple[Dataset, bytes]:
    """The summary as an RGB Secondary Capture (new UIDs; in ``series_instance_uid`` when given, to share the
    overlay series) and as PNG bytes for a person."""
    by_uid = sources_by_uid(series, sources)
    picture = summary_picture(series, findings, timings_s, by_uid)
    chosen = summary_slices(findings)
    first = by_uid[series.slice_sources[0].sop_instance_uid]
    sc = secondary_capture(
        picture,
        series,
        first,
        [series.slice_sources[k] for k in chosen],
        options,
        series_instance_uid=series_instance_uid or new_uid(),
        instance_number=instance_number,
        pixel_spacing_mm=None,  # a composite: panels are drawn at different scales
        derivation=f"Anomaly screening summary; {RESEARCH_NOTICE.lower()}",
    )
    png = io.BytesIO()
    picture.save(png, format="PNG", optimize=True)
    return sc, png.getvalue()


def build_secondary_captures(
    series: SeriesVolume,
    sources: Sequence[Dataset],
    findings: Findings,
    timings_s: dict[str, float],
    options: ResultsSection,
) -> tuple[list[Dataset], bytes]:
    """The whole Secondary Capture series of one analysis: the summary first (instance 1, what a viewer opens
    on), then the overlays; and the summary PNG."""
    series_uid = new_uid()
    summary, png = build_summary(series, sources, findings, timings_s, options, series_instance_uid=series_uid)
    overlays = build_overlays(
        series, sources, findings, options, series_instance_uid=series_uid, first_instance_number=2
    )
    return [summary, *overlays], png


def summary_slices(findings: Findings) -> list[int]:
    """Key slices, in slice order: the largest findings; with nothing found, three slices through the middle
    of the brain (where the score map is non-zero; the whole stack when it is zero everywhere)."""
    chosen = overlay_slices(findings, KEY_SLICES)
    if chosen:
        return chosen
    brain = np.flatnonzero(findings.score.any(axis=(1, 2)))
    first, last = (int(brain[0]), int(brain[-1])) if brain.size else (0, findings.mask.shape[0] - 1)
    return sorted({round(first + f * (last - first)) for f in (0.35, 0.5, 0.65)})


def summary_picture(
    series: SeriesVolume, findings: Findings, timings_s: dict[str, float], by_uid: dict[str, Dataset]
) -> Image.Image:
    """The summary as one RGB picture, WIDTH pixels wide."""
    parts = [_banner(), _figures(series, findings, timings_s, by_uid), _tiles(series, findings, by_uid)]
    return stack([*parts, _legend(findings)])


def _banner() -> Image.Image:
    banner = Image.new("RGB", (WIDTH, 64), BANNER)
    ImageDraw.Draw(banner).text((WIDTH // 2, 32), RESEARCH_NOTICE, fill=NOTICE, font=font(38), anchor="mm")
    return banner


def _figures(
    series: SeriesVolume, findings: Findings, timings_s: dict[str, float], by_uid: dict[str, Dataset]
) -> Image.Image:
    panel = Image.new("RGB", (WIDTH, 196), BAND)
    draw = ImageDraw.Draw(panel)
    if findings.found:
        regions = "region" if findings.components == 1 else "regions"
        headline = f"Anomalous volume {findings.anomaly_volume_ml:.1f} mL in {findings.components} {regions}"
        colour = FOUND
    else:
        headline, colour = "No voxel above the anomaly threshold", CLEAR
    draw.text((GAP, 12), fit(headline, font(40), WIDTH - 2 * GAP), fill=colour, font=font(40))
    figures = f"Maximum score {findings.max_score:.3g}   (threshold {findings.threshold:.3g})"
    draw.text((GAP, 66), figures, fill=TEXT, font=font(28))
    if findings.calibration:  # where the threshold comes from, next to it
        left = GAP + int(font(28).getlength(figures)) + GAP
        text = fit(f"threshold: {findings.calibration}", font(20), WIDTH - GAP - left)
        draw.text((left, 80), text, fill=MUTED, font=font(20), anchor="lm")
    source = by_uid[series.slice_sources[0].sop_instance_uid]
    name = str(source.get("SeriesDescription", "") or "unnamed series")
    number = source.get("SeriesNumber")
    series_line = f"Series: {name}" + (f" (series {number})" if number is not None else "")
    series_line += f", {len(series.slice_sources)} slices"
    method = "Unsupervised anomaly detection (reconstruction error of a diffusion model)"
    if timings_s:
        method += f"; analysis took {timings_s.get('total', sum(timings_s.values())):.0f} s"
    lines = [f"Model: {findings.model_name}   version {findings.model_version}", series_line, method]
    face = font(20)
    for i, line in enumerate(lines):
        draw.text((GAP, 110 + i * 27), fit(line, face, WIDTH - 2 * GAP), fill=MUTED, font=face)
    return panel


def _tiles(series: SeriesVolume, findings: Findings, by_uid: dict[str, Dataset]) -> Image.Image:
    """Key slices side by side, each with its caption; centred in the row."""
    voxels = sitk.GetArrayViewFromImage(series.image)
    scale = series_scale(voxels, findings.score, findings.threshold, findings.max_score)
    column_mm, row_mm, _ = series.image.GetSpacing()
    rows, columns = voxels.shape[1:]
    size = display_size(rows, columns, row_mm, column_mm, TILE)
    chosen = summary_slices(findings)
    areas = findings.slice_areas()
    caption_face = font(18)
    tile_width = TILE
    row = Image.new("RGB", (WIDTH, size[0] + 64), BAND)
    left = (WIDTH - len(chosen) * tile_width - (len(chosen) - 1) * TILE_GAP) // 2
    draw = ImageDraw.Draw(row)
    for i, k in enumerate(chosen):
        tile = render_slice(voxels[k], findings.score[k], findings.mask[k], scale, size)
        draw_orientation(tile, patient_orientation(series), 16)
        x = left + i * (tile_width + TILE_GAP)
        row.paste(tile, (x + (tile_width - size[1]) // 2, 2))
        draw.rectangle([x - 2, 0, x + tile_width + 1, size[0] + 3], outline=FRAME, width=1)
        source = series.slice_sources[k]
        number = by_uid[source.sop_instance_uid].get("InstanceNumber")
        name = f"image {number}" if number is not None else f"slice {k + 1}"
        if source.frame_number is not None:
            name += f" frame {source.frame_number}"
        area = float(areas[k]) * row_mm * column_mm / 100.0
        detail = f"finding {area:.1f} cm2" if areas[k] else "no finding"
        centre = x + tile_width // 2
        name = fit(name, caption_face, tile_width)
        draw.text((centre, size[0] + 10), name, fill=TEXT, font=caption_face, anchor="mt")
        draw.text((centre, size[0] + 34), detail, fill=MUTED, font=caption_face, anchor="mt")
    return row


def _legend(findings: Findings) -> Image.Image:
    """Colour bar from threshold to maximum, and what the cyan line means."""
    legend = Image.new("RGB", (WIDTH, LEGEND_HEIGHT), BAND)
    draw = ImageDraw.Draw(legend)
    face = font(18)
    bar_left, bar_width, top = GAP + 70, 360, 16
    if not findings.found:
        text = "No colour overlay: no score reached the threshold"
        draw.text((GAP, top + 9), text, fill=MUTED, font=face, anchor="lm")
        draw.text((WIDTH - GAP, 70), "uad-node", fill=MUTED, font=font(14), anchor="rm")
        return legend
    ramp = ramp_colours(np.linspace(0, 1, bar_width))[None].repeat(18, axis=0)
    legend.paste(Image.fromarray(np.round(ramp).astype(np.uint8), "RGB"), (bar_left, top))
    draw.text((GAP, top + 9), "score", fill=TEXT, font=face, anchor="lm")
    draw.text((bar_left, top + 24), f"{findings.threshold:.3g} (threshold)", fill=MUTED, font=face)
    draw.text((bar_left + bar_width, top + 24), f"{findings.max_score:.3g} (max)", fill=MUTED, font=face, anchor="ra")
    x = bar_left + bar_width + 60
    draw.line([(x, top + 9), (x + 40, top + 9)], fill=CONTOUR, width=3)
    draw.text((x + 52, top + 9), "outline of the anomaly mask (SEG)", fill=TEXT, font=face, anchor="lm")
    draw.text((WIDTH - GAP, 70), "uad-node", fill=MUTED, font=font(14), anchor="rm")
    return legend
