"""The one error the preprocessing raises for an input it cannot bring onto the model grid."""


class PreprocessingError(ValueError):
    """The image cannot be preprocessed (not a 3D scalar image, registration implausible, no brain found).

    A caller screening a series marks it as not screened, with ``str(error)`` as the reason.
    """
