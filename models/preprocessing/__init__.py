"""Preprocessing shared by training and inference: a head in any orientation onto the model grid, and back.

Build one ``Preprocessor(load_mni152_atlas())`` per process; ``preprocessor(image)`` gives a
``Preprocessed`` (the model-grid volume and brain mask, and the affine); ``to_input_grid(scores,
preprocessed, "linear")`` puts a model-grid map back on the input image's own grid.
"""

from models.preprocessing.errors import PreprocessingError
from models.preprocessing.grid import Grid, Interpolation
from models.preprocessing.model_grid import ModelGeometry, ModelGridSpec
from models.preprocessing.pipeline import (
    PREPROCESSING_VERSION,
    SUPPORTED_VERSIONS,
    Preprocessed,
    Preprocessor,
    atlas_to_model_grid,
    mask_to_input_grid,
    to_input_grid,
    to_model_grid,
)

__all__ = [
    "PREPROCESSING_VERSION",
    "SUPPORTED_VERSIONS",
    "Grid",
    "Interpolation",
    "ModelGeometry",
    "ModelGridSpec",
    "Preprocessed",
    "PreprocessingError",
    "Preprocessor",
    "atlas_to_model_grid",
    "mask_to_input_grid",
    "to_input_grid",
    "to_model_grid",
]
