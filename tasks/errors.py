"""Error types shared by stages and entry points; a leaf module that imports nothing of ours."""

from __future__ import annotations


class ModelFileError(ValueError):
    """A model file that cannot be loaded safely; the message names the file and the fix."""
