"""spade-ad: SPADE (Cohen & Hoshen, 2020) anomaly detection and segmentation."""

__version__ = "0.1.0"

from .errors import (
    DatasetError,
    FeatureError,
    ImageError,
    ModelFileError,
    NotFittedError,
    SpadeError,
    WeightsError,
)
from .model import SPADE, Prediction, SpadeWarning

__all__ = [
    "SPADE",
    "DatasetError",
    "FeatureError",
    "ImageError",
    "ModelFileError",
    "NotFittedError",
    "Prediction",
    "SpadeError",
    "SpadeWarning",
    "WeightsError",
    "__version__",
]
