"""Randomness per image: seed lists, one generator per image, per-image noise draws.

Every random draw for image ``i`` (its initial noise and the noise of every stochastic
sampler step) comes from generator ``i``, so an image never depends on the batch it was
drawn in (DESIGN.md §4 rule 8; the EDM reference code does the same with one
``torch.Generator`` per seed).
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

Generators = Union[None, torch.Generator, Sequence[torch.Generator]]

MAX_SEEDS = 100_000


def parse_seeds(spec: str | int | Sequence[int]) -> list[int]:
    """Parse a seed list such as ``"0-15,42"`` into ``[0, 1, ..., 15, 42]``.

    Ranges are inclusive. Seeds must be non-negative integers below 2**63.
    """
    if isinstance(spec, int):
        spec = [spec]
    if not isinstance(spec, str):
        seeds = [int(s) for s in spec]
    else:
        seeds = []
        for part in spec.replace(" ", "").split(","):
            if not part:
                raise ValueError(f"seed list {spec!r} has an empty item; write e.g. '0-7' or '1,5,9'")
            lo, sep, hi = part.partition("-")
            try:
                if sep:
                    a, b = int(lo), int(hi)
                    if b < a:
                        raise ValueError(f"seed range {part!r} runs backwards; write it as '{b}-{a}'")
                    if b - a + 1 > MAX_SEEDS:
                        raise ValueError(f"seed range {part!r} has more than {MAX_SEEDS} seeds")
                    seeds.extend(range(a, b + 1))
                else:
                    seeds.append(int(part))
            except ValueError as e:
                if "seed" in str(e):
                    raise
                raise ValueError(f"seed list {spec!r}: {part!r} is not an integer or a range like '0-7'") from None
    for s in seeds:
        if not 0 <= s < 2**63:
            raise ValueError(f"seed {s} is out of range; seeds are integers in [0, 2**63)")
    if not seeds:
        raise ValueError("the seed list is empty; give at least one seed, e.g. '0'")
    return seeds


def generators_for(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One freshly seeded ``torch.Generator`` per seed."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def stream_generators(seeds: Sequence[int], stream: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per seed for side stream ``stream`` >= 1 of that seed (e.g. a region path's noise), seeded from
    (seed, stream) through numpy's SeedSequence: independent of the seed's main generator and of other streams."""
    return [torch.Generator(device=device).manual_seed(int(np.random.SeedSequence([int(s), stream]).generate_state(1, np.uint64)[0] >> 1))
            for s in seeds]


def check_generators(generator: Generators, batch: int) -> None:
    """Raise ``ValueError`` when a generator list does not match the batch size."""
    if generator is not None and not isinstance(generator, torch.Generator):
        if len(generator) != batch:
            raise ValueError(
                f"got {len(generator)} generators for a batch of {batch}; pass one generator per image"
            )


def randn(
    shape: Sequence[int],
    generator: Generators = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise of ``shape`` = [B, ...].

    With a list of generators, row ``i`` is drawn from ``generator[i]`` alone, so it is
    identical to drawing ``[1, ...]`` from that generator by itself.
    """
    shape = tuple(int(s) for s in shape)
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        out = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype)
        return out.to(device)
    check_generators(generator, shape[0])
    rows = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype).to(device) for g in generator]
    return torch.cat(rows, dim=0)


def randn_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Per-image standard normal noise shaped like ``x`` (float32 draws, cast to x's dtype)."""
    return randn(x.shape, generator, device=x.device).to(x.dtype)
