"""Which contrast a series has (T1, T2, FLAIR or other), because each contrast needs its own model.

The rules, in order; the first that decides wins, and its reason is kept.

1. **Keywords in the series' names.** The names are tried one at a time, most
   specific first: SeriesDescription, ProtocolName, SequenceName, PulseSequenceName
   (GE puts the whole exam's protocol in ProtocolName, so "STROKE PERFUSION" there
   must not outvote "Ax T2 FSE" in the description). In each name the keyword
   groups are tried in this order, matching case-insensitively as whole words
   (letters and digits; ``_``, ``-``, spaces and the like separate words):

   - other: diffusion (DWI, DIFF..., DTI, ADC, TRACE..., b1000, Siemens ``ep_b...``),
     susceptibility (SWI, SWAN, T2*, T2STAR, HEMO, SUSC...), perfusion and flow
     (PERF..., PWI, DSC, DCE, ASL, PASL, PCASL, TOF, ANGIO, MRA, MRV, CINE),
     functional and spectroscopy (BOLD, FMRI, MRS, SVS, CSI), proton density
     (PD, PDW), STIR, MP2RAGE inversion images (INV1, INV2) and T1/T2 maps.
     These come first because such names often contain "T2" or "T1" too.
   - T1: "T1 FLAIR" (GE's T1 FLAIR is T1-weighted: short inversion time).
   - FLAIR: FLAIR, DARK-FLUID, TIRM.
   - T2: T2, T2W.
   - T1: T1, T1W, MPRAGE (MP-RAGE), MP2RAGE, SPGR, FSPGR, BRAVO, TFE.

2. **Diffusion weighting.** Any image with DiffusionBValue > 0 is other.

3. **Timing** (RepetitionTime TR, EchoTime TE, InversionTime TI, in ms; for
   Enhanced MR the functional groups' RepetitionTime, EffectiveEchoTime and first
   InversionTimes value; each the value most images carry; TI 0 counts as none):

   - FLAIR: TI >= 1500 and TE >= 70.
   - T2: TR >= 2000 and TE >= 70.
   - T1: TR <= 800 and TE <= 30 (spin echo or gradient echo T1).
   - T1: 700 <= TI <= 1200, TE < 10 and TR < 3000 (inversion-recovery gradient
     echo, i.e. MPRAGE-like).

4. Otherwise **other**.

The thresholds are constants, not config: they encode physics, not site policy.
A site whose names mislead these rules excludes such series with the
``[selection]`` exclude patterns instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from node.selection.series import SeriesSummary, Timing


class Contrast(StrEnum):
    """A contrast class; each may have its own model."""

    T1 = "T1"
    T2 = "T2"
    FLAIR = "FLAIR"
    OTHER = "other"


@dataclass(frozen=True)
class ContrastFinding:
    """The contrast class of a series and the rule (with the values) that decided it."""

    contrast: Contrast
    reason: str


_SEP = r"[\s_-]*"


def _words(*alternatives: str) -> re.Pattern[str]:
    """Regex alternatives that match only as whole words: not inside a longer run of letters and digits."""
    return re.compile(rf"(?<![a-z0-9])(?:{'|'.join(alternatives)})(?![a-z0-9])", re.IGNORECASE)


# Tried in this order within each name; the first group with a match decides.
_KEYWORDS: tuple[tuple[Contrast, re.Pattern[str]], ...] = (
    (
        Contrast.OTHER,
        _words(
            r"dwi|diff[a-z]*|dti|adc|trace[a-z]*|b\d{3,4}|ep_b\d+[a-z]*",  # diffusion
            rf"swi|swan|t2\s*\*[a-z0-9]*|t2{_SEP}star|hemo|susc[a-z]*",  # susceptibility
            r"perf[a-z]*|pwi|dsc|dce|asl|pasl|pcasl|tof|angio|mra|mrv|cine",  # perfusion, flow, angiography
            r"bold|fmri|mrs|svs|csi",  # functional, spectroscopy
            rf"pdw?|stir|inv[12]|t[12]{_SEP}maps?",  # other weightings, MP2RAGE inversions, relaxation maps
        ),
    ),
    (Contrast.T1, _words(rf"t1w?{_SEP}flair")),  # GE's T1 FLAIR: short TI, T1-weighted
    (Contrast.FLAIR, _words("flair", rf"dark{_SEP}fluid", "tirm")),
    (Contrast.T2, _words("t2w?")),
    (Contrast.T1, _words("t1w?", rf"mp{_SEP}rage", "mp2rage", "f?spgr", "bravo", "tfe")),
)

FLAIR_MIN_TI_MS = 1500.0
FLAIR_MIN_TE_MS = 70.0
T2_MIN_TR_MS = 2000.0
T2_MIN_TE_MS = 70.0
T1_MAX_TR_MS = 800.0
T1_MAX_TE_MS = 30.0
IR_GRE_TI_MS = (700.0, 1200.0)
IR_GRE_MAX_TE_MS = 10.0
IR_GRE_MAX_TR_MS = 3000.0


def classify_contrast(summary: SeriesSummary) -> ContrastFinding:
    """Apply the rules in the module docstring; the reason names the rule and the values that decided."""
    for attribute, value in summary.names:
        for contrast, pattern in _KEYWORDS:
            if match := pattern.search(value):
                return ContrastFinding(contrast, f"keyword '{match.group(0)}' in {attribute} '{value}'")
    if summary.max_b_value is not None and summary.max_b_value > 0:
        return ContrastFinding(Contrast.OTHER, f"DiffusionBValue {summary.max_b_value:g} > 0 (diffusion-weighted)")
    return _by_timing(summary.timing, no_keyword=_no_keyword(summary))


def _by_timing(timing: Timing, no_keyword: str) -> ContrastFinding:
    tr, te, ti = timing.repetition_ms, timing.echo_ms, timing.inversion_ms
    rule: tuple[Contrast, str] | None = None
    if ti is not None and te is not None and ti >= FLAIR_MIN_TI_MS and te >= FLAIR_MIN_TE_MS:
        rule = Contrast.FLAIR, f"TI >= {FLAIR_MIN_TI_MS:g} and TE >= {FLAIR_MIN_TE_MS:g}"
    elif tr is not None and te is not None and tr >= T2_MIN_TR_MS and te >= T2_MIN_TE_MS:
        rule = Contrast.T2, f"TR >= {T2_MIN_TR_MS:g} and TE >= {T2_MIN_TE_MS:g}"
    elif tr is not None and te is not None and tr <= T1_MAX_TR_MS and te <= T1_MAX_TE_MS:
        rule = Contrast.T1, f"TR <= {T1_MAX_TR_MS:g} and TE <= {T1_MAX_TE_MS:g}"
    elif (
        tr is not None
        and te is not None
        and ti is not None
        and IR_GRE_TI_MS[0] <= ti <= IR_GRE_TI_MS[1]
        and te < IR_GRE_MAX_TE_MS
        and tr < IR_GRE_MAX_TR_MS
    ):
        low, high = IR_GRE_TI_MS
        rule = (
            Contrast.T1,
            (
                f"inversion-recovery gradient echo: {low:g} <= TI <= {high:g}, "
                f"TE < {IR_GRE_MAX_TE_MS:g}, TR < {IR_GRE_MAX_TR_MS:g}"
            ),
        )
    if rule is None:
        return ContrastFinding(Contrast.OTHER, f"{no_keyword}, and timing ({timing}) fits no timing rule")
    contrast, condition = rule
    return ContrastFinding(contrast, f"timing ({timing}): {condition} ms")


def _no_keyword(summary: SeriesSummary) -> str:
    if not summary.names:
        return "no SeriesDescription, ProtocolName, SequenceName or PulseSequenceName"
    named = ", ".join(f"{attribute} '{value}'" for attribute, value in summary.names)
    return f"no contrast keyword in {named}"
