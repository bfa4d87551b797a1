"""The node's results in the OHIF viewer, as a radiologist opens them: OHIF 3.13 (npm ``@ohif/app``'s prebuilt
viewer) in headless Chromium, reading a real Orthanc through its DICOMweb plugin.

One study, analysed by the real pipeline (``uad-node analyze`` on the demo study, with the fast test model), goes to
Orthanc with its SEG, Secondary Captures and measurement SR. In the viewer the SEG must load (the segmentation
panel lists the "Anomaly" segment) and the TID 1500 SR must open on the slice its planar group references, drawing
the outline labelled with the SR's volume, where OHIF used to blank the viewport (``Cannot read properties of
undefined (reading 'ReferencedSOPSequence')``). Screenshots of both go to the test's folder and to runs/.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes

from node.demo.study import build_sample_study
from tests.ohif import VIEWER_PACKAGES, Browser, ohif_dist, running_browser, running_viewer
from tests.peers import REPO, require_file, require_tool, running_orthanc
from tests.tiny_model import write_fast_checkpoint

pytestmark = [pytest.mark.peers, pytest.mark.timeout(180)]  # the bound: the whole test under 3 minutes

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # Debian orthanc-dicomweb
ORTHANC_DICOMWEB = {
    "Plugins": [str(DICOMWEB_PLUGIN)],
    "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "StudiesMetadata": "Full"},
}
SEG_DESCRIPTION = "UAD anomaly SEG (research use only)"
SR_DESCRIPTION = "UAD anomaly measurements (research use only)"
WAIT_S = 40.0  # one viewer step (SwiftShader renders on a loaded 2-core machine)


@pytest.fixture(scope="session")
def ohif() -> Path:
    """OHIF's dist/, from the cache or fetched once with npm."""
    require_tool("npm")
    return ohif_dist()


@pytest.fixture
def viewer_tools() -> None:
    """Skip (fail under UAD_REQUIRE_PEERS=1) without Orthanc, its DICOMweb plugin, nginx or Chromium."""
    for tool in ("Orthanc", "nginx", "chromium"):
        require_tool(tool)
    require_file(DICOMWEB_PLUGIN, VIEWER_PACKAGES)


def analysed_study(folder: Path) -> tuple[list[Path], Path]:
    """The demo study and the node's results for its T1 series (``uad-node analyze``, fast test model)."""
    study = build_sample_study(folder / "study")
    checkpoint = write_fast_checkpoint(folder / "fast.pt")
    config = folder / "analyze.toml"
    config.write_text(f'[selection]\nmodels = {{ T1 = "{checkpoint}" }}\n')
    out = folder / "out"
    run = subprocess.run(
        [sys.executable, "-m", "node", "analyze", str(folder / "study"), "--out", str(out), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return study.files, out / study.t1_series_uid


def upload(http_port: int, paths: list[Path]) -> None:
    """Each file through Orthanc's REST API (POST /instances), as a PACS import would."""
    for path in paths:
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}/instances", data=path.read_bytes())
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read())["Status"] in {"Success", "AlreadyStored"}, path


def thumbnail_centre(description: str) -> str:
    """JavaScript: the centre of the study browser's thumbnail of the series ``description``, or null."""
    return f"""(() => {{
        const item = [...document.querySelectorAll('[data-cy^="study-browser-thumbnail"]')].find(
            e => e.querySelector('[data-cy="series-description-label"]')?.innerText === {json.dumps(description)});
        if (!item) return null;
        const r = item.getBoundingClientRect();
        return [r.x + r.width / 2, r.y + r.height / 2];
    }})()"""


def click_text(text: str) -> str:
    """JavaScript: click the innermost element whose text is ``text``; whether one was there."""
    return f"""(() => {{
        const hits = [...document.querySelectorAll('button, a, span, div')].filter(
            e => e.innerText && e.innerText.trim() === {json.dumps(text)});
        if (!hits.length) return false;
        hits[hits.length - 1].click();
        return true;
    }})()"""


def click_data_cy(name: str) -> str:
    return f"""(() => {{ const e = document.querySelector('[data-cy="{name}"]'); if (e) e.click(); return !!e; }})()"""


def segment_rows() -> str:
    """JavaScript: the segment labels the segmentation panel lists, or null; opens the panel (once) while it is
    collapsed, as OHIF leaves it after loading a SEG."""
    return """(() => {
        const rows = [...document.querySelectorAll('[data-cy="data-row-title"]')].map(e => e.innerText.trim());
        if (rows.length) return rows;
        const button = document.querySelector('[data-cy="panelSegmentation-btn"]');
        if (button && !window.uadPanelOpened) { window.uadPanelOpened = true; button.click(); }
        return null;
    })()"""


def svg_text() -> str:
    """JavaScript: the text the annotation tools draw over the images (Cornerstone's SVG layer)."""
    return "[...document.querySelectorAll('.svg-layer text')].map(e => e.textContent).join('|')"


@pytest.fixture
def screenshots(tmp_path: Path) -> Iterator[Path]:
    """The test's folder for screenshots; whatever was taken is copied to runs/ even when the test fails."""
    folder = tmp_path / "screenshots"
    folder.mkdir()
    yield folder
    (REPO / "runs").mkdir(exist_ok=True)
    for shot in folder.glob("*.png"):
        shutil.copy(shot, REPO / "runs" / shot.name)


def open_study(browser: Browser, url: str) -> None:
    browser.send("Page.navigate", url=url)
    browser.wait_for(thumbnail_centre(SEG_DESCRIPTION), WAIT_S, "the SEG series in the study browser")
    browser.wait_for(
        "document.querySelector('[data-cy=\"viewport-overlay-bottom-right\"]')?.innerText", WAIT_S, "an image"
    )
    # First-visit help (a guided tour and a notice) covers the viewer: dismiss it as a person would.
    browser.wait_for(click_text("Skip all"), WAIT_S, "the guided tour")
    browser.evaluate(click_text("Confirm and hide"))


def test_ohif_loads_the_seg_and_opens_the_measurement_sr(
    ohif: Path, viewer_tools: None, tmp_path: Path, screenshots: Path
) -> None:
    sources, results = analysed_study(tmp_path)
    seg_path, sr_path = results / "seg.dcm", results / "sr.dcm"
    overlays = sorted((results / "overlays").glob("*.dcm"))
    sr = hd.sr.srread(sr_path)
    [volumetric] = sr.content.get_volumetric_roi_measurement_groups()
    [volume] = volumetric.get_measurements(name=codes.SCT.Volume)
    [planar] = sr.content.get_planar_roi_measurement_groups()
    [outlined] = planar.roi.ContentSequence[0].ReferencedSOPSequence
    slice_number = next(
        int(ds.InstanceNumber)
        for ds in (pydicom.dcmread(path, stop_before_pixels=True) for path in sources)
        if ds.SOPInstanceUID == outlined.ReferencedSOPInstanceUID
    )

    with (
        running_orthanc(tmp_path / "orthanc", {}, settings=ORTHANC_DICOMWEB) as orthanc,
        running_viewer(tmp_path / "nginx", ohif, orthanc.http_port) as viewer,
        running_browser(tmp_path / "chromium") as browser,
    ):
        upload(orthanc.http_port, [*sources, seg_path, sr_path, *overlays])
        study_uid = pydicom.dcmread(seg_path, stop_before_pixels=True).StudyInstanceUID
        open_study(browser, f"{viewer.url}/viewer?StudyInstanceUIDs={study_uid}")

        # The SEG: double-click its series, accept OHIF's "open this segmentation?", see the segment listed.
        browser.double_click(*browser.wait_for(thumbnail_centre(SEG_DESCRIPTION), WAIT_S, "the SEG thumbnail"))
        browser.wait_for(click_data_cy("yes-hydrate-btn"), WAIT_S, "OHIF's prompt to open the SEG")
        assert browser.wait_for(segment_rows(), WAIT_S, "a segment in the segmentation panel") == ["Anomaly"]
        browser.pump(3)  # let the labelmap render before the picture
        browser.screenshot(screenshots / "ohif-seg.png")

        # The SR: double-click it; OHIF's SR viewport goes to the outlined slice and draws the labelled outline.
        browser.double_click(*browser.wait_for(thumbnail_centre(SR_DESCRIPTION), WAIT_S, "the SR thumbnail"))
        label = browser.wait_for(svg_text(), WAIT_S, "the SR's measurement drawn over the image")
        assert label == f"Volume: {volume.value:.2f} mL"  # OHIF's format of the SR's NUM item
        overlay = "document.querySelector('[data-cy=\"viewport-overlay-bottom-right\"]')?.innerText"
        assert browser.evaluate(overlay).startswith(f"I:{slice_number} ")  # the slice the planar group references
        browser.pump(2)
        browser.screenshot(screenshots / "ohif-sr.png")
        assert not [line for line in browser.console if "ReferencedSOPSequence" in line], browser.console
