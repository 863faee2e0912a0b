"""Multistep samplers: they reuse earlier denoiser outputs (history kept in loop-local variables)."""

from __future__ import annotations

from typing import Callable

MULTISTEP: dict[str, Callable] = {}
