"""Seed lists and per-image noise."""

import pytest
import torch

from diffuse import rng


def test_parse_seeds():
    assert rng.parse_seeds("0-3,42") == [0, 1, 2, 3, 42]
    assert rng.parse_seeds(7) == [7]
    assert rng.parse_seeds([5, 6]) == [5, 6]


@pytest.mark.parametrize("spec, message", [
    ("3-1", "runs backwards"), ("a", "not an integer"), ("1,,2", "empty item"), ("-5", "not an integer"),
])
def test_bad_seed_lists(spec, message):
    with pytest.raises(ValueError, match=message):
        rng.parse_seeds(spec)


def test_each_row_comes_from_its_own_generator():
    batch = rng.randn((5, 3, 4, 4), rng.generators_for([10, 11, 12, 13, 14]))
    alone = rng.randn((1, 3, 4, 4), rng.generators_for([12]))
    assert torch.equal(batch[2:3], alone)
    with pytest.raises(ValueError, match="one generator per image"):
        rng.randn((3, 2), rng.generators_for([1, 2]))
