"""spade-ad: SPADE (Cohen & Hoshen, 2020) anomaly detection and segmentation."""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    DatasetError,
    FeatureError,
    ImageError,
    ModelFileError,
    NotFittedError,
    SpadeError,
    WeightsError,
)
from .model import SPADE, Prediction, SpadeWarning  # noqa: E402

__all__ = [
    "SPADE",
    "Prediction",
    "SpadeWarning",
    "SpadeError",
    "ImageError",
    "DatasetError",
    "WeightsError",
    "ModelFileError",
    "FeatureError",
    "NotFittedError",
    "__version__",
]
