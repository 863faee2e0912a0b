"""Datasets: value ranges, labels, captions, folder layouts, bad files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse.data import DigitsDataset, FolderDataset, ShapesDataset, load_image, make_dataset
from diffuse.shapes import HELDOUT_PAIRS, parse_prompt, render, sample, vocabulary


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array)
    (im.convert(mode) if mode else im).save(path)
    return path


def test_shapes_dataset_items() -> None:
    ds = make_dataset("shapes", 32, length=50, base_seed=100)
    assert (len(ds), ds.channels, ds.size, ds.num_classes, ds.has_captions) == (50, 3, 32, 0, True)
    item = ds[7]
    x = item["image"]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and x.min() == -1.0 and x.max() == 1.0
    ex = sample(107)
    assert item["caption"] == ex.caption
    expected = torch.from_numpy(render(ex.scene, 32)).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(x, expected)
    torch.testing.assert_close(ds[7]["image"], x)  # deterministic
    with pytest.raises(IndexError):
        ds[50]


def test_shapes_dataset_families_and_captions() -> None:
    ds = ShapesDataset(size=16, length=30_000, families=["counting"])
    assert all(ds.example(i).family == "counting" for i in range(100))
    full = ShapesDataset(length=30_000)
    captions = full.captions()
    assert len(captions) == 20_000 and captions[:3] == [full[i]["caption"] for i in range(3)]
    assert {w for c in captions for w in c.split()} == set(vocabulary())
    assert not any({(o.color, o.shape) for o in parse_prompt(c).objects} & HELDOUT_PAIRS for c in captions)
    with pytest.raises(ValueError, match="unknown shapes families"):
        ShapesDataset(families=["heldout"])


def test_shapes_family_weights_set_the_family_proportions() -> None:
    n = 6000
    ds = ShapesDataset(length=n, family_weights={"position": 3, "counting": 1, "colors": 0})
    counts = Counter(ds.example(i).family for i in range(n))
    assert set(counts) == {"position", "counting"}
    # binomial(6000, 0.75): sd 34
    assert abs(counts["position"] - 0.75 * n) < 4 * 34
    with pytest.raises(ValueError, match="unknown shapes families"):
        ShapesDataset(family_weights={"heldout": 1})
    with pytest.raises(ValueError, match="not both"):
        ShapesDataset(families=["single"], family_weights={"single": 1})


def test_digits() -> None:
    ds = make_dataset("digits", 16)
    assert (len(ds), ds.channels, ds.num_classes, ds.has_captions, ds.captions()) == (1797, 1, 10, False, [])
    item = ds[0]
    assert item["image"].shape == (1, 16, 16) and item["label"] == 0
    assert sorted({ds[i]["label"] for i in range(20)}) == list(range(10))
    assert ds.images.min() == -1.0 and 0.9 < ds.images.max() <= 1.0
    native = DigitsDataset(8)
    from sklearn.datasets import load_digits
    torch.testing.assert_close(native[5]["image"][0], torch.from_numpy(load_digits().images[5]).float() / 8 - 1)


def test_folder_with_txt_and_jsonl_captions(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    _save(tmp_path / "a.png", rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    (tmp_path / "a.txt").write_text("a red circle\n")
    _save(tmp_path / "b.jpg", rng.integers(0, 256, (30, 30, 3), dtype=np.uint8))
    _save(tmp_path / "c.webp", rng.integers(0, 256, (50, 20, 3), dtype=np.uint8))
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "b.jpg", "text": "two blue squares"}) + "\n"
        + json.dumps({"file_name": "c.webp", "text": "a cat"}) + "\n"
        + json.dumps({"file_name": "a.png", "text": "overridden by a.txt"}) + "\n")
    ds = make_dataset(f"folder:{tmp_path}", 24)
    assert (len(ds), ds.channels, ds.num_classes, ds.has_captions) == (3, 3, 0, True)
    assert ds.captions() == ["a red circle", "two blue squares", "a cat"]
    for i in range(3):
        item = ds[i]
        assert item["image"].shape == (3, 24, 24) and "label" not in item
        assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert ds[1]["caption"] == "two blue squares"


def test_resize_and_center_crop(tmp_path: Path) -> None:
    """A 20x40 (w x h) image: the shorter side becomes 10 (bicubic), then rows 5..14 of 20 are kept."""
    array = np.zeros((40, 20, 3), np.uint8)
    array[:6] = 255  # white top: cropped away
    array[:, :10, 1] = 255  # green left half
    out = load_image(_save(tmp_path / "tall.png", array), 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert out[..., 0].max() < 5 and out[..., 2].max() < 5
    assert out[:, :4, 1].min() > 250 and out[:, 6:, 1].max() < 5


def test_subfolder_classes_and_mode_conversion(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 4:, 3] = 255  # left half transparent: composited over black
    _save(tmp_path / "zebra" / "x.png", rgba)
    _save(tmp_path / "ant" / "gray.png", np.full((8, 8), 128, np.uint8), "L")
    _save(tmp_path / "ant" / "pal.bmp", np.full((8, 8, 3), (0, 0, 255), np.uint8), "P")
    ds = FolderDataset(tmp_path, size=8)
    assert ds.class_names == ["ant", "zebra"] and ds.num_classes == 2 and not ds.has_captions
    assert [ds[i]["label"] for i in range(3)] == [0, 0, 1]
    gray, pal, x = (ds[i]["image"] for i in range(3))
    torch.testing.assert_close(gray, torch.full((3, 8, 8), 128 / 127.5 - 1))
    assert pal[:, 0, 0].tolist() == [-1.0, -1.0, 1.0]
    assert x[:, :, :4].max() == -1.0 and x[0, :, 4:].min() == pytest.approx(200 / 127.5 - 1)
    assert "caption" not in ds[0]


def test_corrupt_file_is_named_or_skipped(tmp_path: Path) -> None:
    _save(tmp_path / "good.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "bad.png").write_bytes(b"this is not a png")
    truncated = tmp_path / "trunc.png"
    _save(truncated, np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        FolderDataset(tmp_path, 8)
    (tmp_path / "bad.png").unlink()
    ds = FolderDataset(tmp_path, 8)  # the header of trunc.png is fine: the error comes at access
    with pytest.raises(ValueError, match="cannot read image .*trunc.png"):
        ds[1]
    (tmp_path / "bad.png").write_bytes(b"this is not a png")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        skipping = FolderDataset(tmp_path, 8, skip_bad_files=True)
    assert [p.name for p in skipping.files] == ["good.png"] and skipping[0]["image"].shape == (3, 8, 8)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="contains no images"):
        make_dataset(f"folder:{tmp_path}", 8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_dataset(f"folder:{tmp_path / 'nope'}", 8)
    _save(tmp_path / "root.png", np.zeros((4, 4, 3), np.uint8))
    _save(tmp_path / "cls" / "x.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="mixes class subfolders"):
        FolderDataset(tmp_path, 4)
    (tmp_path / "cls" / "x.png").unlink()
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "root.png"}\n')
    with pytest.raises(ValueError, match="metadata.jsonl:1"):
        FolderDataset(tmp_path, 4)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "x"}\n')
    with pytest.raises(ValueError, match="gone.png"):
        FolderDataset(tmp_path, 4)
    for spec in ("mnist", "folder:", "Shapes"):
        with pytest.raises(ValueError, match="unknown dataset"):
            make_dataset(spec, 8)
