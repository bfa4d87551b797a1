"""``uad-node demo``: the whole node on one machine, end to end, in about a minute.

1. a local PACS on 127.0.0.1 (a real Orthanc when installed, otherwise the built-in storage SCP);
2. the node in this process, on the embedded defaults (SQLite in a temporary data dir, the shipped T1
   checkpoint), sending its results to that PACS;
3. the sample study (a packaged brain with one simulated lesion, plus a localizer), written as DICOM and
   sent to the node by a real C-STORE SCU;
4. waiting until the node has completed the series, decided (T1 analysed, localizer skipped), analysed it
   and the SEG and Secondary Captures are stored in the PACS;
5. printing what was found and where, next to the simulated lesion, with per-stage timings, and writing
   ``summary.png`` and ``report.json`` to ``--out``.

Nothing leaves the machine and nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE

from node.config import NodeConfig
from node.db.database import Database, open_database
from node.demo.pacs import LocalPacs, free_port, local_pacs
from node.demo.study import SampleStudy, build_sample_study
from node.jobs.states import JobState
from node.jobs.store import JobRecord, JobStore
from node.service import configure_logging, run_node

SCANNER_AE = "DEMOSCANNER"
NODE_AE = "UADNODE"
SEG_MODALITY = "SEG"


class DemoError(Exception):
    """The demo could not show the node working; the message says where it stopped."""


@dataclass(frozen=True)
class DemoOptions:
    out: Path
    quiet_s: float = 3.0  # the series quiet period; the production default is 10 s
    prefer_orthanc: bool = True
    seed: int = 0
    threads: int = 0  # model threads; 0 = all cores
    timeout_s: float = 900.0
    keep: bool = False  # keep the temporary node data and PACS storage


def run_demo(options: DemoOptions, say: Callable[[str], None] = print) -> JobRecord:
    """Run the demo (see the module docstring); returns the analysed series' job. Raises DemoError."""

    options.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="uad-demo-"))
    configure_logging(logging.INFO, logging.FileHandler(options.out / "node.log", mode="w"))
    try:
        say("building the sample study ...")
        study = build_sample_study(work / "study", options.seed)
        say(f"  {study.brain}, {len(study.files)} images in 2 series; simulated lesion: {study.lesion}")
        with local_pacs(work / "pacs", NODE_AE, options.prefer_orthanc) as pacs:
            say(f"local PACS: {pacs.kind}, AE {pacs.ae_title} on {pacs.host}:{pacs.port}")
            config = _config(work / "node", pacs, options)
            stop, started = threading.Event(), threading.Event()
            node = threading.Thread(target=run_node, args=(config, stop, started), name="uad-node", daemon=True)
            node.start()
            if not started.wait(60):
                raise DemoError(f"the node did not start; see {options.out / 'node.log'}")
            say(
                f"node: AE {NODE_AE} on 127.0.0.1:{config.node.port}, data in {config.node.data_dir}, "
                "models " + ", ".join(f"{contrast}: {path}" for contrast, path in config.selection.models.items())
            )
            db = open_database(config.node.effective_database_url(), migrate=False)
            try:
                sent_at = _send(study, config.node.port, say)
                job = _wait(db, study, pacs, sent_at, options, say)
            finally:
                stop.set()
                node.join(timeout=120)
                db.close()
            _show(job, study, pacs, time.monotonic() - sent_at, options.out, say)
            if pacs.web_url:
                say(f"(Orthanc stops with the demo; its storage is in {pacs.folder} with --keep)")
        return job
    finally:
        if options.keep:
            say(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _config(data_dir: Path, pacs: LocalPacs, options: DemoOptions) -> NodeConfig:
    """The embedded defaults, plus: loopback, a free port, the demo scanner as the only sender, the PACS."""
    return NodeConfig.model_validate(
        {
            "node": {
                "ae_title": NODE_AE,
                "host": "127.0.0.1",
                "port": free_port(),
                "data_dir": data_dir,
                "allowed_senders": [{"ae_title": SCANNER_AE, "host": "127.0.0.1"}],
                "min_free_disk_mb": 100,
            },
            "completion": {"series_quiet_s": options.quiet_s, "study_quiet_s": max(60.0, options.quiet_s)},
            "jobs": {"poll_interval_s": 0.5, "threads": options.threads},
            "destinations": [{"name": "pacs", "ae_title": pacs.ae_title, "host": pacs.host, "port": pacs.port}],
        }
    )


def _send(study: SampleStudy, port: int, say: Callable[[str], None]) -> float:
    """C-STORE every file of the study over one association, as a scanner does; returns when the last was
    acknowledged (monotonic clock)."""
    datasets = [dcmread(path) for path in study.files]
    ae = AE(ae_title=SCANNER_AE)
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    started = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    if not assoc.is_established:
        raise DemoError(f"the node did not accept the association from {SCANNER_AE}")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if not status or status.Status != 0x0000:
                raise DemoError(f"the node answered {status.get('Status') if status else 'nothing'} to a C-STORE")
    finally:
        assoc.release()
    say(f"sent {len(datasets)} images to the node in {time.monotonic() - started:.1f} s (all acknowledged: Success)")
    return time.monotonic()


def _wait(
    db: Database, study: SampleStudy, pacs: LocalPacs, sent_at: float, options: DemoOptions, say: Callable[[str], None]
) -> JobRecord:
    """Until the T1 job is done and its SEG is in the PACS, narrating each job's state changes."""
    store = JobStore(db)
    seen: dict[int, str] = {}
    deadline = sent_at + options.timeout_s
    while time.monotonic() < deadline:
        jobs = {job.series_uid: job for job in store.all()}
        for job in jobs.values():
            if seen.get(job.id) != job.state:
                seen[job.id] = job.state
                what = "T1" if job.series_uid == study.t1_series_uid else "localizer"
                reason = f" ({job.reason})" if job.state.finished and job.reason else ""
                say(f"  [{time.monotonic() - sent_at:5.1f} s] job {job.id} ({what}): {job.state}{reason}")
        t1 = jobs.get(study.t1_series_uid)
        if t1 is not None and t1.state in (JobState.FAILED, JobState.SKIPPED, JobState.CANCELLED):
            raise DemoError(f"the T1 series was not analysed: {t1.state}: {t1.reason}")
        if t1 is not None and t1.state is JobState.DONE and _in_pacs(pacs, study, SEG_MODALITY):
            return t1
        time.sleep(0.25)
    raise DemoError(f"no SEG in the PACS after {options.timeout_s:.0f} s; see {options.out / 'node.log'}")


def _in_pacs(pacs: LocalPacs, study: SampleStudy, modality: str) -> int:
    return sum(1 for item in pacs.received() if item.study_uid == study.study_uid and item.modality == modality)


def _show(
    job: JobRecord, study: SampleStudy, pacs: LocalPacs, end_to_end_s: float, out: Path, say: Callable[[str], None]
) -> None:
    report = job.report
    say("")
    say(f"results in the PACS ({pacs.kind}), study {study.study_uid}:")
    say(
        f"  {_in_pacs(pacs, study, SEG_MODALITY)} SEG, {_in_pacs(pacs, study, 'OT')} Secondary Capture "
        f"images (summary + overlays) and {_in_pacs(pacs, study, 'SR')} measurement SR"
    )
    say(f"model: {report['model']} (threshold {report['threshold']:.3g})")
    say(
        f"found: {report['anomaly_volume_ml']:.1f} mL above threshold in {report['components']} region(s), "
        f"max score {report['max_score']:.3f}"
    )
    region = report.get("largest_region")
    if region:
        x, y, z = region["centre_lps"]
        distance = math.dist(region["centre_lps"], study.lesion_centre_lps)
        side = "near the midline" if abs(x) < 10 else ("left hemisphere" if x > 0 else "right hemisphere")
        say(
            f"  largest region: {region['volume_ml']:.1f} mL at ({x:.1f}, {y:.1f}, {z:.1f}) mm (LPS), "
            f"{side}; {distance:.0f} mm from the simulated lesion's centre"
        )
    say(f"simulated lesion: {study.lesion}")
    stages = job.stage_seconds()
    analysis = report.get("timings_s", {})
    say("timings (s):")
    say("  " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in stages.items()))
    say("  inside the analysis: " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in analysis.items()))
    say(f"  last image acknowledged -> SEG stored in the PACS: {end_to_end_s:.1f}")
    shutil.copyfile(Path(job.results_dir) / "summary.png", out / "summary.png")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    say(f"wrote {out / 'summary.png'} and {out / 'report.json'} (node log: {out / 'node.log'})")
    say("The shipped model is a CPU-trained starting point: see models/checkpoints/README.md for how it scores.")


def main(options: DemoOptions) -> int:
    try:
        run_demo(options)
    except DemoError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    return 0
