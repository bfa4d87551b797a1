"""Training data: the offline brains, folders of a site's healthy scans, augmentation and slice batches.

- ``brains``: the real brains that exist offline, as SimpleITK images (Colin27 is for evaluation only).
- ``volumes``: sources preprocessed onto the model grid with tissue maps (``TrainingVolume``), cached.
- ``synthesis``: T1/T2/FLAIR-like images painted from tissue maps.
- ``augment``: one random spatial warp and scanner-like intensity changes per volume.
- ``sampler``: batches of axial slices as a pure function of (seed, step), so training resumes exactly.
"""
