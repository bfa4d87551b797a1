"""Is this input something the model can answer for? Measures between preprocessing and the model.

A screening model reconstructs whatever it is given; on a phantom, a head whose pixels contradict their
orientation tags or a contrast it was not trained on, it "finds" large anomalies with the same
confidence as on a real lesion. ``QualityGate`` measures, on the model grid and in well under a second,
whether the registration can have worked, whether the brain mask is plausible, how much of the brain the
field of view covers and whether the tissue contrast is the model's; after inference, whether the answer
itself is plausible. Every measure is a number recorded with the series; ``QualityThresholds`` says
which values refuse it.

``models.quality.gate`` holds the measures (it imports SimpleITK and the atlas's tissue maps);
``models.quality.thresholds`` only the numbers, so a config can be checked without loading either.
"""

from models.quality.thresholds import QualityThresholds

__all__ = ["QualityThresholds"]
