"""Errors of model conversion."""

from __future__ import annotations


class UnsupportedModel(ValueError):
    """A source model (or one of its options) that diffuse cannot convert; the message names it and what to do."""
