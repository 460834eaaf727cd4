"""Error types raised by spade-ad.

Every error a user can cause (bad file, bad model, missing weights, bad option) is a
:class:`SpadeError`, so the command line can turn it into a one-line message and exit code 2,
and library users can catch one type.
"""

from __future__ import annotations


class SpadeError(Exception):
    """Base class of every error spade-ad raises on purpose."""


class ImageError(SpadeError):
    """An image (or mask) that cannot be read or is unusable; the message names the file."""


class ImageTooLargeError(ImageError):
    """An image with more pixels than allowed (refused from its header, before decoding)."""


class DatasetError(SpadeError):
    """A dataset folder that is empty, incomplete or inconsistent (e.g. a mask without an image)."""


class WeightsError(SpadeError):
    """Backbone weights that are missing or do not match what the model was fitted with."""


class ModelFileError(SpadeError):
    """A saved model file that is truncated, edited, of another format version or inconsistent."""


class FeatureError(SpadeError):
    """Features that cannot be used (NaN or infinite values), naming the image they came from."""


class NotFittedError(SpadeError):
    """``predict``/``save`` called before ``fit``."""
