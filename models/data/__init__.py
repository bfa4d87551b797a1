"""Training data: the offline brains, folders of a site's healthy scans, augmentation and slice batches."""
