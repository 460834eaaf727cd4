"""spade-ad: SPADE (Cohen & Hoshen, 2020) anomaly detection and segmentation."""

__version__ = "0.1.0"

from ._threads import apply_thread_policy

# Before anything imports torch: how OpenMP threads wait decides how well we share the CPU (see _threads).
apply_thread_policy()

from .errors import (  # noqa: E402 -- after the thread policy, which must precede torch's import
    DatasetError,
    FeatureError,
    ImageError,
    ModelFileError,
    NotFittedError,
    SpadeError,
    WeightsError,
)
from .model import SPADE, Prediction, SpadeWarning  # noqa: E402 -- likewise

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
