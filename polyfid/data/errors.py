"""Kept for imports written before polyfid.errors: the data layer's error is polyfid.errors.DataError."""

from polyfid.errors import DataError

__all__ = ["DataError"]
