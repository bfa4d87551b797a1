"""``uad-node demo``: a local PACS, a sample brain study with a known lesion, and the round trip through the node.

Nothing here needs a network or a GPU; the modules import torch and nilearn lazily (they are slow to import).
"""
