"""The error type of the data layer."""

from __future__ import annotations


class PreferenceDataError(ValueError):
    """A preference dataset (or one of its rows) cannot be used as given.

    The message names the source (file or ``"<dataset>"``), the row (0-based index) and the field where
    that applies, and says how to fix the problem. Errors raised by ``datasets``/``pyarrow``/``tokenizers``
    while reading or tokenising are re-raised as this type with that context (``raise ... from err``).
    """
