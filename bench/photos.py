"""Editing real photographs (issue #6): a pixel model trained on crops of scikit-image's bundled photos,
then img2img, inpainting, outpainting and inversion on parts of those photos it never saw.

* ``crops``: random square crops (side 12-45% of the photo's shorter side, resized with Lanczos to
  ``--size``) of the nine bundled color photographs, none touching the photo's held-out square (its
  central square, ``HELD_OUT`` of the shorter side), written as PNGs to a folder for ``diffuse train``.
* ``examples``: for four photos, the held-out square (never in the training crops) goes through the
  four edits with the model; writes one before/after grid PNG
  (columns: input, img2img at strength 0.5, the inpainting mask over the input, inpainted, the input's
  top and left quarter cut off and outpainted back, the inversion round trip) and prints the inversion RMSE per photo.

    python bench/photos.py crops --out runs/photos/crops --n 6000
    diffuse train --preset folder --out runs/photos/run --set train.data=folder:runs/photos/crops
    diffuse export runs/photos/run --out runs/photos/model
    python bench/photos.py examples --model runs/photos/model --out bench/photos.png
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffuse.pipeline import Pipeline, SampleSettings  # noqa: E402

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
          "motorcycle_right.png", "retina.jpg", "rocket.jpg")
EXAMPLES = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")
HELD_OUT = 0.3  # side of every photo's central square that no training crop touches, over its shorter side
UPSCALE = 4  # the grid shows each 32x32 image at 128x128 (nearest neighbour: the model's real pixels)


def photo(name: str) -> Image.Image:
    try:
        import skimage
    except ImportError:
        raise SystemExit("error: the photos come with scikit-image: pip install scikit-image") from None
    path = Path(skimage.__file__).parent / "data" / name
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing from this scikit-image install")
    return Image.open(path).convert("RGB")


def crops(out: Path, n: int, size: int, seed: int) -> None:
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} is not empty; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    images = [photo(name) for name in PHOTOS]
    for i in range(n):
        im = images[i % len(images)]
        w, h = im.size
        hx0, hy0, hx1, hy1 = held_out_box(w, h)
        while True:
            side = round(min(w, h) * rng.uniform(0.12, 0.45))
            x, y = rng.randrange(0, w - side + 1), rng.randrange(0, h - side + 1)
            if x + side <= hx0 or x >= hx1 or y + side <= hy0 or y >= hy1:
                break
        im.crop((x, y, x + side, y + side)).resize((size, size), Image.LANCZOS).save(out / f"{i:05d}.png")
    print(f"wrote {n} crops of {size}x{size} from {len(images)} photos to {out}")


def held_out_box(w: int, h: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the central square no training crop touches."""
    side = round(min(w, h) * HELD_OUT)
    x, y = (w - side) // 2, (h - side) // 2
    return x, y, x + side, y + side


def held_out_square(name: str, size: int) -> Image.Image:
    im = photo(name)
    return im.crop(held_out_box(*im.size)).resize((size, size), Image.LANCZOS)


def examples(model: str, out: Path, seed: int) -> None:
    if out.exists():
        raise SystemExit(f"error: {out} exists; choose a new --out")
    pipe = Pipeline.load(model)
    size = pipe.model.cfg.image_size * pipe.codec.factor
    quarter = size // 4
    mask = np.zeros((size, size), np.float32)
    mask[quarter:size - quarter, quarter:size - quarter] = 1
    invert_settings = SampleSettings(sampler="euler", steps=50, schedule="karras")
    rows = []
    print("| photo | inversion RMSE (0-255), 50 Euler steps |")
    print("|---|---|")
    for name in EXAMPLES:
        src = held_out_square(name, size)
        pixels = np.asarray(src)
        [i2i] = pipe.img2img(src, strength=0.5, seeds=[seed])
        [inp] = pipe.inpaint(src, mask, seeds=[seed])
        [outp] = pipe.outpaint(src.crop((quarter, quarter, size, size)), f"left={quarter},top={quarter}", seeds=[seed])
        [rec] = pipe.invert(src, settings=invert_settings)
        shown_mask = pixels.copy()
        shown_mask[mask == 1] = (pixels[mask == 1] // 3 + 170).astype(np.uint8)
        tiles = [pixels, np.asarray(i2i.image), shown_mask, np.asarray(inp.image), np.asarray(outp.image), np.asarray(rec.image)]
        rows.append(np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0))) for t in tiles], axis=1))
        print(f"| {name} | {rec.record['reconstruction_rmse']:.2f} |")
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    grid = grid.resize((grid.width * UPSCALE, grid.height * UPSCALE), Image.NEAREST)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    print(f"wrote {out}: columns input, img2img 0.5, mask, inpainted, top/left quarter outpainted, inversion round trip")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("crops", help="write training crops of the bundled photos")
    c.add_argument("--out", type=Path, required=True, help="new folder for the PNG crops")
    c.add_argument("--n", type=int, default=6000, help="number of crops")
    c.add_argument("--size", type=int, default=32, help="crop side in pixels")
    c.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("examples", help="before/after grid of the four edits on held-out squares")
    e.add_argument("--model", required=True, help="model folder trained on the crops")
    e.add_argument("--out", type=Path, required=True, help="grid PNG to write (never overwritten)")
    e.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.cmd == "crops":
        if args.n < 1 or args.size < 8:
            ap.error("--n must be >= 1 and --size >= 8")
        crops(args.out, args.n, args.size, args.seed)
    else:
        examples(args.model, args.out, args.seed)


if __name__ == "__main__":
    main()
