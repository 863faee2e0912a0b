"""Provenance costs and robustness: watermark bit accuracy under edits, false positives on
photographs, and the per-image cost of watermarking and of C2PA signing/verification.

    python bench/provenance.py                 # prints Markdown tables for bench/RESULTS.md
    python bench/provenance.py --generated 0   # skip the shipped-model images (slow on CPU)

Marked images: the scikit-image photographs (center-cropped square, resized to 256x256)
and ``--generated`` images of the shipped shapes model at 256x256. Each edit is read two
ways: ``raw`` decodes the edited image as it is; ``detect`` is what ``diffuse verify`` does
(also tries the sizes the image may have been generated at).
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from diffuse import credentials, watermark

PHOTOS = ["astronaut", "camera", "cat", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
          "coins", "moon", "page", "text", "clock", "grass", "gravel", "brick", "colorwheel", "horse", "logo",
          "retina", "eagle", "cell", "microaneurysms", "motorcycle_left"]


def photographs() -> dict[str, Image.Image]:
    """The scikit-image sample images that load offline, as RGB."""
    import skimage.data as data

    out = {}
    for name in PHOTOS:
        try:
            arr = getattr(data, name)()
        except Exception:  # images that need a download (or are missing from this version)
            continue
        if arr.ndim == 3 and arr.shape[-1] == 4:
            arr = arr[..., :3]
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        out[name] = Image.fromarray(np.asarray(arr, dtype=np.uint8)).convert("RGB")
    return out


def square(image: Image.Image, size: int) -> Image.Image:
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def resize(image: Image.Image, scale: float) -> Image.Image:
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)


def crop(image: Image.Image, keep: float, corner: bool) -> Image.Image:
    w, h = round(image.width * keep), round(image.height * keep)
    left, top = (0, 0) if corner else ((image.width - w) // 2, (image.height - h) // 2)
    return image.crop((left, top, left + w, top + h))


EDITS = {
    "none": lambda im: im,
    "JPEG q90": lambda im: jpeg(im, 90),
    "JPEG q70": lambda im: jpeg(im, 70),
    "JPEG q50": lambda im: jpeg(im, 50),
    "resize 90%": lambda im: resize(im, 0.9),
    "resize 90% + JPEG q90": lambda im: jpeg(resize(im, 0.9), 90),
    "resize 50%": lambda im: resize(im, 0.5),
    "crop 90% (top-left kept)": lambda im: crop(im, 0.9, True),
    "crop 90% (center)": lambda im: crop(im, 0.9, False),
}


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def generated_images(n: int) -> list[Image.Image]:
    from diffuse.pipeline import Pipeline, SampleSettings

    if n == 0:
        return []
    pipe = Pipeline.load("shapes")
    pipe.watermark = False
    prompts = ["a red circle above a blue square", "two yellow squares", "a green triangle", "a blue circle"]
    settings = SampleSettings(steps=10, cfg=3.0)
    return [pipe(prompts[i % len(prompts)], seeds=[i], settings=settings, size=256, plan_layout=False)[0].image for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generated", type=int, default=2, help="shipped shapes-model images at 256x256 to include")
    ap.add_argument("--repeats", type=int, default=5, help="timing repeats (median reported)")
    args = ap.parse_args()

    photos = photographs()
    originals = {f"{name} 256": square(im, 256) for name, im in photos.items()}
    for i, im in enumerate(generated_images(args.generated)):
        originals[f"shapes model #{i} 256"] = im
    marked = {k: watermark.embed(v) for k, v in originals.items()}

    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"Python {sys.version.split()[0]}; {len(photos)} scikit-image photographs "
          f"({', '.join(photos)}), {args.generated} shapes-model images\n")

    print(f"Watermark after edits ({len(marked)} marked images; mean bit accuracy over 64 bits, and the share "
          f"detected at >= {watermark.THRESHOLD}/64):\n")
    print("| edit | raw bit accuracy | detect bit accuracy | detected |")
    print("|---|---|---|---|")
    for edit, fn in EDITS.items():
        raw, best, hits = [], [], 0
        for im in marked.values():
            edited = fn(im)
            raw.append(watermark.bit_matches(edited) / 64 if not watermark.too_small(*edited.size) else float("nan"))
            found = watermark.detect(edited)
            best.append(found.accuracy if found.size is not None else float("nan"))
            hits += found.present
        raw_text = "n/a (too small)" if all(np.isnan(raw)) else f"{np.nanmean(raw):.3f}"
        best_text = "n/a (too small)" if all(np.isnan(best)) else f"{np.nanmean(best):.3f}"
        print(f"| {edit} | {raw_text} | {best_text} | {hits}/{len(marked)} |")

    print("\nFalse positives: `detect` (all candidate sizes) on unmarked images:\n")
    unmarked = {**{f"{k} (full {v.width}x{v.height})": v for k, v in photos.items()}, **originals}
    false = [(k, watermark.detect(v)) for k, v in unmarked.items()]
    accs = [d.accuracy for _, d in false]
    print(f"{sum(d.present for _, d in false)} of {len(false)} unmarked images reported as marked; best-size bit accuracy "
          f"mean {np.mean(accs):.3f}, max {np.max(accs):.3f} ({max(false, key=lambda x: x[1].matches)[0]}); "
          f"sizes tried per image: mean {np.mean([d.tried for _, d in false]):.1f}\n")

    print("Cost per image (median of repeats):\n")
    print("| size | watermark embed | detect, marked | detect, unmarked (all sizes) | C2PA sign | C2PA verify | manifest bytes |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        keys = credentials.SigningKeys.load(credentials.init_keys(Path(tmp) / "keys"))
        base = originals[next(iter(originals))]
        for size in (256, 512, 1024):
            im = base.resize((size, size), Image.BICUBIC)
            t_embed, m = timed(lambda: watermark.embed(im), args.repeats)
            t_det, _ = timed(lambda: watermark.detect(m), args.repeats)
            t_det_un, _ = timed(lambda: watermark.detect(im), args.repeats)
            buf = io.BytesIO()
            m.save(buf, "PNG")
            png = buf.getvalue()
            record = {"kind": "generate", "seed": 0, "sigmas": [80.0, 1.0, 0.0]}
            t_sign, signed = timed(lambda: credentials.sign_png_bytes(png, record, keys), args.repeats)
            path = Path(tmp) / "s.png"
            path.write_bytes(signed)
            t_ver, rep = timed(lambda: credentials.read_credentials(path), args.repeats)
            assert rep.found and not rep.tampered
            print(f"| {size}x{size} | {t_embed * 1e3:.1f} ms | {t_det * 1e3:.1f} ms | {t_det_un * 1e3:.0f} ms | "
                  f"{t_sign * 1e3:.1f} ms | {t_ver * 1e3:.1f} ms | {len(signed) - len(png)} |")


if __name__ == "__main__":
    main()
