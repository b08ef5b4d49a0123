"""The one exception the data pipeline raises for bad input."""

from __future__ import annotations


class DataError(ValueError):
    """A data set on disk cannot be used as it is.

    The message is one paragraph that names the offending file (or path) and says how to fix it,
    so the training script can print it as is, without a traceback.
    """
