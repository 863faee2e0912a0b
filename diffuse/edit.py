"""Editing real images with any model and any sampler: img2img, inpaint, outpaint, invert.

Every edit works in the pipeline codec's space (DESIGN.md §3): the input is encoded with
``pipe.codec``, denoised there, and decoded at the end, so pixel and latent models share
this code. Conventions:

* **img2img** (SDEdit, Meng et al. 2022, Sec. 3): ``strength`` s in (0, 1] selects the last
  ``k = floor(s N)`` of the N steps of the model's schedule; the input is noised to the
  first of those sigmas, x = x0 + sigma_k eps, and only those k steps run. k = 0 is an
  error. s = 1 starts from pure noise sigma_max eps and equals plain generation (same seed).
* **inpaint**: white = replace, black = keep. The known region is re-imposed at the
  current noise level by a denoiser wrapper (:class:`KnownRegion`): the x0 estimate is
  replaced by the input there, D' = m D + (1 - m) x0. Every sampler is exact for a
  constant D, so in the kept region x stays exactly x0 + sigma * (noise of unit variance)
  after every step (the same eps throughout for deterministic samplers) -- the
  replacement method, without touching the samplers. At the end the kept pixels are
  pasted back, so they EQUAL the input bit for bit, for pixel and latent models alike.
* **masks in model space**: a model-space cell covers ``factor x factor`` pixels; it is
  kept only if all its pixels are kept. For a binary mask that is area-averaging
  (avg-pool by the factor) followed by thresholding at > 0; for a feathered mask the cell
  takes its largest replace weight (max-pool), which is the same set of kept cells.
* **feather** r: the mask is softened *inward* only, m = min(d, r) / r with d the
  Chebyshev distance (pixels) to the nearest kept pixel, so kept pixels stay exact and
  the seam is a linear blend r pixels wide inside the replaced region.
* **gray masks** (values other than 0 and 255) are an error unless ``binarize`` (gray
  >= 128 replaces); a mask that keeps or replaces everything is an error.
* **RePaint** (Lugmayr et al. 2022, Alg. 1 and Sec. 4.2 "jumps"): the schedule is run in
  blocks of ``jump_length`` steps; after each block (not the last), x is noised back up
  to the block's first sigma with the forward process q(x_a | x_b) = N(x_b, (sigma_a^2 -
  sigma_b^2) I) and the block is run again, ``jumps`` times. A block is a sampler run on
  the schedule's tail stopped by its callback, so every sampler works.
* **outpaint**: the canvas is extended (edge pixels repeated as the starting fill) and the
  new area inpainted; the new canvas must be square and a size the model can make.
* **invert** (DDIM inversion, Song et al. 2021 Sec. 4.3 / Eq. 13 run backwards; the
  probability-flow ODE, Karras et al. 2022 Eq. 4): Euler (= DDIM in sigma space) or Heun
  steps of dx/dsigma = (x - D(x, sigma)) / sigma with the schedule reversed, from the
  image at sigma = 0 up to sigma_max; reconstruction runs the matching sampler back down.
  Running it down with another prompt keeps the layout ("same layout, different prompt").
* **records and provenance**: every result's record identifies its input by the SHA-256 of
  the pixels read (``input_image.pixels_sha256``, after mode conversion, before resizing),
  an inpainting mask likewise (``mask.pixels_sha256``, and the mask itself as a base64 1-bit
  PNG when at most MASK_EMBED_LIMIT characters), plus ``resize``, strength, jumps, feather
  and extend, so :mod:`diffuse.replay` can redo the edit. Results pass through
  :meth:`Pipeline.finish` like generated images (output classifier, invisible watermark at
  >= 256x256), and the sampler corrections (eps scaling in the denoiser, DCW as post-step,
  scaled by the full schedule's first sigma; for invert only on the way down) apply as in
  generation. The watermark touches every pixel, kept ones included: kept pixels equal the
  input exactly only without it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from . import rng
from .masks import concat_without_picture, inpaint_concat, model_space_mask
from .pipeline import Generated, SampleSettings, guided_denoiser
from .record import file_hash, pixels_hash, read_record
from .samplers import get_sampler
from .steps import CountingDenoiser, StepInfo, to_d

if TYPE_CHECKING:
    from .pipeline import Pipeline

MAX_INPUT_PIXELS = 4096 * 4096  # refuse larger inputs before decoding them (decompression bombs)
MASK_EMBED_LIMIT = 4096  # base64 characters: a larger mask is kept in the record as its hash only
EXTEND_SIDES = ("left", "top", "right", "bottom")
ImageSource = str | Path | Image.Image


# ---------------------------------------------------------------- reading inputs

@dataclasses.dataclass
class InputImage:
    """A decoded input: uint8 pixels [H, W, C], the conversions made, and where it came from."""

    pixels: np.ndarray
    notes: list[str]
    info: dict[str, Any]  # file name and file hash, original size and mode, pixels_sha256 of the converted pixels
    record: Optional[dict[str, Any]]  # the diffuse record the input PNG carries, if any


def _open(source: ImageSource, what: str) -> tuple[Image.Image, dict[str, Any], Optional[dict[str, Any]]]:
    """Open and fully decode an image file (or take a PIL image), with one-line errors."""
    if isinstance(source, Image.Image):
        return source, {"file": None, "sha256": None}, None
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist (or is not a file)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except UnidentifiedImageError:
        raise ValueError(f"{what} {path} is not an image Pillow can read; give a PNG, JPEG or WebP file") from None
    except Image.DecompressionBombError:
        raise ValueError(f"{what} {path} is too large to decode safely; give an image of at most {MAX_INPUT_PIXELS} pixels") from None
    if im.width * im.height > MAX_INPUT_PIXELS:
        raise ValueError(f"{what} {path} is {im.width}x{im.height} ({im.width * im.height} pixels), more than the limit of "
                         f"{MAX_INPUT_PIXELS}; shrink it first")
    try:
        im.load()
    except (OSError, SyntaxError) as e:
        raise ValueError(f"cannot decode {what} {path}: {e}") from None
    record = None
    if isinstance(getattr(im, "text", None), dict) and "diffuse" in im.text:
        record = read_record(path)
    return im, {"file": path.name, "sha256": file_hash(path)}, record


def read_image(source: ImageSource, channels: int) -> InputImage:
    """An input image as uint8 [H, W, channels]. Transparency is composited over black (the
    background the shipped models draw on) and said so; alpha never becomes a channel;
    color <-> gray conversions are named in ``notes``."""
    im, info, record = _open(source, "input image")
    info.update(width=im.width, height=im.height, mode=im.mode)
    notes = []
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        if np.asarray(rgba)[..., 3].min() < 255:
            notes.append(f"composited the {im.mode} image's transparency over black (alpha is not an image channel)")
        else:
            notes.append(f"dropped the {im.mode} image's alpha channel (fully opaque)")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), rgba).convert("RGB")
    target = "L" if channels == 1 else "RGB"
    if channels not in (1, 3):
        raise ValueError(f"edits read 1- or 3-channel images; this model's codec takes {channels} channels")
    if im.mode != target:
        notes.append(f"converted the {im.mode} image to {'grayscale' if target == 'L' else 'RGB'} for this {channels}-channel model")
        im = im.convert(target)
    pixels = np.asarray(im, dtype=np.uint8).reshape(im.height, im.width, channels)
    info["pixels_sha256"] = pixels_hash(pixels)  # what replay checks an --input against (before any resize)
    return InputImage(pixels, notes, info, record)


def read_mask(source: ImageSource, size: tuple[int, int], *, binarize: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """A mask file as float32 [H, W] in {0, 1} (1 = replace); ``size`` = the image's (width, height)."""
    im, info, _ = _open(source, "mask")
    if im.size != tuple(size):
        raise ValueError(f"the mask is {im.width}x{im.height} but the image is {size[0]}x{size[1]}; give a mask of the image's size")
    if im.mode in ("RGBA", "LA", "PA") and np.asarray(im.convert("RGBA"))[..., 3].min() < 255:
        raise ValueError("the mask has transparent pixels; save it as an opaque black-and-white image (white = replace, black = keep)")
    gray = np.asarray(im.convert("L"))
    gray_pixels = int(((gray != 0) & (gray != 255)).sum())
    if gray_pixels and not binarize:
        raise ValueError(f"the mask has {gray_pixels} gray pixels (neither black nor white); pass --binarize to threshold at 50% "
                         f"(use --feather N for a soft edge)")
    mask = (gray >= 128).astype(np.float32)
    check_mask(mask)
    info.update(binarized=bool(binarize and gray_pixels), gray_pixels=gray_pixels)
    return mask, info


def mask_hash(mask: np.ndarray) -> str:
    """:func:`~diffuse.record.pixels_hash` of a 0/1 mask [H, W] (as 0/255 gray)."""
    return pixels_hash((mask * 255).astype(np.uint8)[..., None])


def embed_mask(mask: np.ndarray) -> Optional[str]:
    """A 0/1 mask [H, W] as a base64 1-bit PNG for the record, or None when that is over MASK_EMBED_LIMIT characters."""
    buf = io.BytesIO()
    Image.fromarray(mask.astype(bool)).save(buf, format="PNG", optimize=True)
    text = base64.b64encode(buf.getvalue()).decode("ascii")
    return text if len(text) <= MASK_EMBED_LIMIT else None


def decode_mask(text: str) -> np.ndarray:
    """The float32 0/1 mask [H, W] that :func:`embed_mask` wrote."""
    try:
        with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as im:
            return (np.asarray(im.convert("L")) >= 128).astype(np.float32)
    except (binascii.Error, UnidentifiedImageError, OSError) as e:
        raise ValueError(f"the record's embedded mask is damaged ({e}); give the mask file with --mask") from None


def check_mask(mask: np.ndarray) -> None:
    if not mask.any():
        raise ValueError("the mask is all black: it replaces nothing; paint the region to replace white")
    if mask.all():
        raise ValueError("the mask is all white: it replaces everything; use `diffuse generate` (or `edit img2img`) instead")


def feather(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Inward feathering of a binary mask [..., H, W] (1 = replace): min(d, radius) / radius
    with d the Chebyshev distance to the nearest kept pixel; kept pixels stay 0."""
    if int(radius) != radius or radius < 0:
        raise ValueError(f"feather must be a whole number of pixels >= 0, got {radius}")
    if radius == 0:
        return mask
    keep = (1 - mask).reshape(-1, 1, *mask.shape[-2:])
    inside = torch.zeros_like(keep)
    for k in range(int(radius)):  # count the distances 0..radius-1 that the pixel lies beyond
        inside += 1 - F.max_pool2d(keep, 2 * k + 1, stride=1, padding=k)
    return (inside / radius).reshape(mask.shape)


def parse_extend(spec: str | dict[str, int]) -> dict[str, int]:
    """``"left=16,top=0"`` (or a dict) -> pixels to add on each side (missing sides: 0)."""
    items = spec.items() if isinstance(spec, dict) else [part.partition("=")[::2] for part in spec.split(",") if part.strip()]
    out = dict.fromkeys(EXTEND_SIDES, 0)
    for side, value in items:
        side = side.strip()
        if side not in out:
            raise ValueError(f"--extend: unknown side {side!r}; write e.g. left=16,top=0,right=16,bottom=0")
        try:
            out[side] = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"--extend: {side}={value!r} is not a whole number of pixels") from None
        if out[side] < 0:
            raise ValueError(f"--extend: {side}={out[side]} is negative; outpainting only adds pixels")
    if not any(out.values()):
        raise ValueError("--extend adds no pixels; give e.g. left=16")
    return out


# ---------------------------------------------------------------- sampling in model space

class KnownRegion:
    """Denoiser wrapper for inpainting: D'(x, sigma, c) = m D(x, sigma, c) + (1 - m) x0_known
    (m = 1 replace, model space). Keeps x = x0_known + sigma * noise in the kept region."""

    def __init__(self, denoiser: Callable, known: torch.Tensor, mask: torch.Tensor):
        self.denoiser, self.known, self.mask = denoiser, known, mask

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        return self.mask * self.denoiser(x, sigma, cond) + (1 - self.mask) * self.known


class _Reached(Exception):
    def __init__(self, x: torch.Tensor):
        self.x = x


def steps_for_strength(strength: float, steps: int) -> int:
    """How many of ``steps`` solver steps img2img runs at ``strength`` (SDEdit's t0 as a fraction of the schedule)."""
    if not (isinstance(strength, (int, float)) and 0 < strength <= 1):
        raise ValueError(f"strength must be in (0, 1], got {strength}; 1 redraws everything, small values keep more of the input")
    k = int(strength * steps + 1e-9)
    if k == 0:
        raise ValueError(f"strength {strength} with {steps} steps runs 0 steps (it would return the input); "
                         f"use strength >= {1 / steps:.3g} or more --steps")
    return k


def repaint_blocks(steps: int, jumps: int, jump_length: int) -> list[tuple[int, int]]:
    """The (start, end) step ranges run in order: blocks of ``jump_length`` steps, each but the
    last repeated ``jumps`` more times after noising back up to its start."""
    if int(jumps) != jumps or jumps < 0:
        raise ValueError(f"jumps must be a whole number >= 0, got {jumps}")
    if int(jump_length) != jump_length or jump_length < 1:
        raise ValueError(f"jump length must be a whole number of steps >= 1, got {jump_length}")
    if jumps == 0:
        return [(0, steps)]
    out = []
    for start in range(0, steps, jump_length):
        end = min(start + jump_length, steps)
        out += [(start, end)] * (1 + (jumps if end < steps else 0))
    return out


@torch.no_grad()
def sample_from(denoiser: Callable, cond: Any, settings: SampleSettings, sigmas: list[float], x: torch.Tensor,
                generators: Sequence[torch.Generator], *, jumps: int = 0, jump_length: int = 10,
                callback: Optional[Callable[[StepInfo], None]] = None,
                post_step: Optional[Callable[[StepInfo], torch.Tensor]] = None) -> tuple[torch.Tensor, int, int]:
    """Run ``settings.sampler`` over the schedule tail ``sigmas`` (descending to 0) from x, with
    RePaint resampling when jumps > 0 and the samplers' ``post_step`` correction (e.g. DCW) after
    every step. Returns (x at sigma = 0, solver steps run, denoiser evaluations)."""
    sampler = get_sampler(settings.sampler)
    blocks = repaint_blocks(len(sigmas) - 1, jumps, jump_length)
    total = sum(e - s for s, e in blocks)
    done, nfe = 0, 0
    for n, (start, end) in enumerate(blocks):
        if n and blocks[n - 1] == (start, end):  # resample: forward process from sigma_end back up to sigma_start
            x = x + math.sqrt(sigmas[start] ** 2 - sigmas[end] ** 2) * rng.randn_like(x, generators)
        last: dict[str, int] = {}

        def on_step(info: StepInfo, start: int = start, end: int = end, offset: int = done, last: dict = last) -> None:
            last["nfe"] = info.nfe
            if callback is not None:
                callback(dataclasses.replace(info, i=offset + info.i, n=total, nfe=nfe + info.nfe))
            if start + info.i + 1 == end and end < len(sigmas) - 1:
                raise _Reached(info.x)

        try:
            x = sampler(denoiser, x, sigmas[start:], cond, generator=generators, callback=on_step, post_step=post_step,
                        **settings.sampler_options)
        except _Reached as stop:
            x = stop.x
        done, nfe = done + end - start, nfe + last["nfe"]
    return x, done, nfe


# ---------------------------------------------------------------- edits

def _check_canvas(pipe: "Pipeline", height: int, width: int, what: str, fix: str) -> None:
    """A clear error unless height x width is a size the model (through its codec) can make; ``fix`` says what to do."""
    factor = pipe.codec.factor
    if height != width:
        raise ValueError(f"{what} is {width}x{height} but this model makes square images; {fix}")
    if height % factor:
        raise ValueError(f"{what} is {width}x{height}, not a multiple of the codec's factor {factor}; {fix}")
    try:
        pipe.check_size(height)
    except ValueError as e:
        raise ValueError(f"{what}: {e}; {fix}") from None


def _fit(pipe: "Pipeline", inp: InputImage, resize: bool) -> InputImage:
    """The input at a size the model can make: as it is, or resized to the native size when asked."""
    h, w = inp.pixels.shape[:2]
    native = pipe.model.cfg.image_size * pipe.codec.factor
    if resize and (h, w) != (native, native):
        if h != w:
            raise ValueError(f"the input image is {w}x{h}; resize keeps square images square only: crop it to a square first")
        inp.pixels = np.asarray(_pil(inp.pixels).resize((native, native), Image.LANCZOS)).reshape(native, native, -1)
        inp.notes.append(f"resized the {w}x{h} image to {native}x{native} (Lanczos)")
        return inp
    fix = f"pass --resize (resize=True) to resample it to {native}x{native}" if h == w else \
        "crop it to a square, or extend it to one with `diffuse edit outpaint`"
    _check_canvas(pipe, h, w, "the input image", fix)
    return inp


def fit_input(pipe: "Pipeline", image: ImageSource, resize: bool) -> InputImage:
    """Read an input image in the model's channels and check (or, with ``resize``, bring) it to a size the model makes."""
    return _fit(pipe, read_image(image, pipe.codec.image_channels), resize)


def _to_tensor(pipe: "Pipeline", pixels: np.ndarray) -> torch.Tensor:
    """uint8 pixels [H, W, C] -> [1, C, H, W] in [-1, 1] on the pipeline's device."""
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float().to(pipe.device) / 127.5 - 1


def _pil(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


@torch.no_grad()
def _edit(pipe: "Pipeline", kind: str, inp: InputImage, pixel_mask: Optional[np.ndarray], strength: float, *,
          prompt: Optional[str], negative: Optional[str], class_label: Optional[int], seeds: Sequence[int] | str | int,
          settings: Optional[SampleSettings], jumps: int, jump_length: int, batch_size: int,
          callback: Optional[Callable[[StepInfo], None]], extra: dict[str, Any]) -> list[Generated]:
    """The shared core: noise the encoded input to the strength's sigma, sample (re-imposing the
    kept region when there is a mask), decode, and paste the kept pixels back."""
    settings = settings or pipe.defaults
    seeds = rng.parse_seeds(seeds)
    pipe.check_prompt(prompt, negative)
    all_sigmas = settings.sigmas(pipe.model).tolist()
    k = steps_for_strength(strength, settings.steps)
    first = settings.steps - k
    tail = all_sigmas[first:]
    pixels = _to_tensor(pipe, inp.pixels)
    x0 = pipe.codec.encode(pixels)
    h, w = inp.pixels.shape[:2]
    mask = concat = None
    if pixel_mask is not None:
        m_pix = torch.from_numpy(pixel_mask)[None, None].to(pipe.device)
        mask = model_space_mask(m_pix, pipe.codec.factor)
    if pipe.model.cfg.inpainting and mask is not None:  # it also sees the mask and what is kept
        concat = inpaint_concat(pipe.codec, pixels, m_pix)
    else:
        concat = concat_without_picture(pipe.model.cfg.inpainting, pipe.codec, 1, h, pipe.device)
    # starting content: the whole input when strength < 1 (SDEdit); at strength 1 only the kept part
    start = x0 if strength < 1 else (x0 * (1 - mask) if mask is not None else torch.zeros_like(x0))
    out: list[Generated] = []
    for at in range(0, len(seeds), batch_size):
        chunk = seeds[at:at + batch_size]
        n = len(chunk)
        denoiser, cond = guided_denoiser(pipe.model, settings, n, prompts=None if prompt is None else [prompt] * n,
                                         negative=None if negative is None else [negative] * n,
                                         labels=None if class_label is None else [class_label] * n,
                                         concat=None if concat is None else concat.expand(n, -1, -1, -1))
        if mask is not None:
            denoiser = KnownRegion(denoiser, x0, mask)
        generators = rng.generators_for(chunk, "cpu")
        x = start + tail[0] * rng.randn((n, *x0.shape[1:]), generators, device=pipe.device)
        x, steps_run, nfe = sample_from(denoiser, cond, settings, tail, x, generators, jumps=jumps, jump_length=jump_length,
                                        callback=callback, post_step=settings.post_step(all_sigmas[0]))
        images = ((pipe.codec.decode(x).float().clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).cpu().numpy()
        if pixel_mask is not None:  # paste the kept pixels back: exactly the input where the mask is 0
            m = pixel_mask[..., None]
            images = np.where(m == 0, inp.pixels, m * images + (1 - m) * inp.pixels)
        for seed, arr in zip(chunk, np.rint(images).astype(np.uint8)):
            image, mark = pipe.finish(_pil(arr), seed)
            record = pipe.record(prompt, negative, class_label, seed, settings, h, all_sigmas)
            record.update(kind=kind, width=w, height=h, denoising_strength=strength, first_step=first, steps_run=steps_run,
                          nfe=nfe, input_image=inp.info, input_conversions=inp.notes, input_record=inp.record,
                          watermark=mark, **extra)
            out.append(Generated(image, seed, record))
    return out


def img2img(pipe: "Pipeline", image: ImageSource, prompt: Optional[str] = None, *, strength: float = 0.75,
            negative: Optional[str] = None, class_label: Optional[int] = None, seeds: Sequence[int] | str | int = 0,
            settings: Optional[SampleSettings] = None, resize: bool = False, batch_size: int = 8,
            callback: Optional[Callable[[StepInfo], None]] = None) -> list[Generated]:
    """SDEdit: one image per seed, the input noised to the sigma ``strength`` selects and denoised from there."""
    inp = fit_input(pipe, image, resize)
    return _edit(pipe, "img2img", inp, None, strength, prompt=prompt, negative=negative, class_label=class_label, seeds=seeds,
                 settings=settings, jumps=0, jump_length=1, batch_size=batch_size, callback=callback, extra={"resize": resize})


def inpaint(pipe: "Pipeline", image: ImageSource, mask: ImageSource | np.ndarray, prompt: Optional[str] = None, *,
            strength: float = 1.0, feather_px: int = 0, binarize: bool = False, jumps: int = 0, jump_length: int = 10,
            negative: Optional[str] = None, class_label: Optional[int] = None, seeds: Sequence[int] | str | int = 0,
            settings: Optional[SampleSettings] = None, resize: bool = False, batch_size: int = 8,
            callback: Optional[Callable[[StepInfo], None]] = None) -> list[Generated]:
    """Replace the white part of ``mask`` (a file, a PIL image, or a 0/1 array [H, W]) and keep the rest exactly."""
    inp = read_image(image, pipe.codec.image_channels)
    size = (inp.pixels.shape[1], inp.pixels.shape[0])
    if isinstance(mask, np.ndarray):
        if mask.shape != (size[1], size[0]) or not np.isin(mask, (0, 1)).all():
            raise ValueError(f"a mask array must hold only 0 and 1 and have the image's shape {(size[1], size[0])}, got {mask.shape}")
        m, mask_info = mask.astype(np.float32), {"file": None, "sha256": None}
        check_mask(m)
    else:
        m, mask_info = read_mask(mask, size, binarize=binarize)
    mask_info.update(pixels_sha256=mask_hash(m), embedded=embed_mask(m))  # the mask as read, before any resize
    inp = _fit(pipe, inp, resize)
    if inp.pixels.shape[:2] != m.shape:  # resized: resample the mask the same way (nearest keeps it binary)
        h, w = inp.pixels.shape[:2]
        m = np.asarray(Image.fromarray((m * 255).astype(np.uint8)).resize((w, h), Image.NEAREST), dtype=np.float32) / 255
        check_mask(m)
    soft = feather(torch.from_numpy(m), feather_px).numpy()
    mask_info.update(feather=feather_px, replaced_fraction=round(float(m.mean()), 6))
    return _edit(pipe, "inpaint", inp, soft, strength, prompt=prompt, negative=negative, class_label=class_label, seeds=seeds,
                 settings=settings, jumps=jumps, jump_length=jump_length, batch_size=batch_size, callback=callback,
                 extra={"mask": mask_info, "jumps": jumps, "jump_length": jump_length if jumps else None, "resize": resize})


def outpaint(pipe: "Pipeline", image: ImageSource, extend: str | dict[str, int], prompt: Optional[str] = None, *,
             feather_px: int = 0, jumps: int = 0, jump_length: int = 10, negative: Optional[str] = None,
             class_label: Optional[int] = None, seeds: Sequence[int] | str | int = 0, settings: Optional[SampleSettings] = None,
             batch_size: int = 8, callback: Optional[Callable[[StepInfo], None]] = None) -> list[Generated]:
    """Extend the canvas by ``extend`` pixels per side (e.g. "left=16,right=16") and fill the new area."""
    ext = parse_extend(extend)
    factor = pipe.codec.factor
    bad = [f"{s}={v}" for s, v in ext.items() if v % factor]
    if bad:
        raise ValueError(f"--extend {', '.join(bad)}: each side must be a multiple of the codec's factor {factor}")
    inp = read_image(image, pipe.codec.image_channels)
    h, w = inp.pixels.shape[:2]
    H, W = h + ext["top"] + ext["bottom"], w + ext["left"] + ext["right"]
    _check_canvas(pipe, H, W, f"the extended canvas ({w}x{h} extended by {', '.join(f'{k}={v}' for k, v in ext.items() if v)})",
                  "choose --extend so that the canvas is a square the model can make")
    pad = ((ext["top"], ext["bottom"]), (ext["left"], ext["right"]), (0, 0))
    inp.pixels = np.pad(inp.pixels, pad, mode="edge")  # the starting fill; the new area is drawn from noise
    mask = np.pad(np.zeros((h, w), np.float32), pad[:2], constant_values=1)
    soft = feather(torch.from_numpy(mask), feather_px).numpy()
    return _edit(pipe, "outpaint", inp, soft, 1.0, prompt=prompt, negative=negative, class_label=class_label, seeds=seeds,
                 settings=settings, jumps=jumps, jump_length=jump_length, batch_size=batch_size, callback=callback,
                 extra={"extend": ext, "mask": {"feather": feather_px}, "jumps": jumps,
                        "jump_length": jump_length if jumps else None})


# ---------------------------------------------------------------- inversion

INVERSION_ORDER = {"euler": 1, "ddim": 1, "heun": 2}


@torch.no_grad()
def invert_to_noise(denoiser: Callable, cond: Any, x0: torch.Tensor, sigmas: Sequence[float], order: int = 1) -> tuple[torch.Tensor, int]:
    """Deterministic inversion: integrate the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma
    forward in sigma over the reversed schedule (0 = s_0 < s_1 < ... < s_N = sigmas[0]).

    Each step mirrors the sampler's step on the same interval: the first (0 -> s_1) inverts the
    sampler's last step x0 = D(x, s_1) by x = x0 + s_1 (x0 - D(x0, s_1)) / s_1; the others are
    Euler (order 1, = DDIM with eta = 0) or Heun (order 2) steps. Returns (x at sigmas[0], NFE).
    """
    s = list(reversed([float(v) for v in sigmas]))
    model = CountingDenoiser(denoiser, cond)
    x = x0
    for a, b in zip(s[:-1], s[1:]):
        if a == 0:
            x = x + b * to_d(x, b, model(x, b))
            continue
        d = to_d(x, a, model(x, a))
        x_euler = x + (b - a) * d
        x = x_euler if order == 1 else x + (b - a) * (d + to_d(x_euler, b, model(x_euler, b))) / 2
    return x, model.nfe


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    """Root-mean-square difference of two uint8 images, in 0..255 levels."""
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


@torch.no_grad()
def invert(pipe: "Pipeline", image: ImageSource, prompt: Optional[str] = None, *, negative: Optional[str] = None,
           class_label: Optional[int] = None, target_prompts: Sequence[str] = (), target_labels: Sequence[int] = (),
           settings: Optional[SampleSettings] = None, resize: bool = False,
           callback: Optional[Callable[[StepInfo], None]] = None) -> list[Generated]:
    """Invert ``image`` to noise under ``prompt`` (or ``class_label``), then sample back down:
    [the reconstruction, then one image per target prompt / label from the same noise].
    ``settings.sampler`` must be euler, ddim (eta 0) or heun; the reconstruction's record
    holds its RMSE (0..255 levels) against the input and the NFE of both directions."""
    settings = settings or pipe.defaults
    if settings.sampler not in INVERSION_ORDER or settings.sampler_options.get("eta", 0) != 0 \
            or settings.sampler_options.get("s_churn", 0) != 0:
        raise ValueError(f"invert runs deterministic Euler/DDIM or Heun steps; use sampler euler, ddim (eta 0) or heun, "
                         f"not {settings.sampler} {settings.sampler_options or ''}".rstrip())
    inp = fit_input(pipe, image, resize)
    pipe.check_prompt(prompt, negative)
    for p in target_prompts:
        pipe.check_prompt(p, negative)
    sigmas = settings.sigmas(pipe.model).tolist()
    x0 = pipe.codec.encode(_to_tensor(pipe, inp.pixels))
    h, w = inp.pixels.shape[:2]
    sampler = get_sampler(settings.sampler)
    concat = concat_without_picture(pipe.model.cfg.inpainting, pipe.codec, 1, h, pipe.device)  # an inpainting model: no mask

    def denoiser_for(p: Optional[str], label: Optional[int]) -> tuple[Callable, Any]:
        return guided_denoiser(pipe.model, settings, 1, prompts=None if p is None else [p], concat=concat,
                               negative=None if negative is None else [negative], labels=None if label is None else [label])

    denoiser, cond = denoiser_for(prompt, class_label)
    noise, nfe_inv = invert_to_noise(denoiser, cond, x0, sigmas, INVERSION_ORDER[settings.sampler])
    targets = [(prompt, class_label, "invert")] + [(p, class_label, "invert-edit") for p in target_prompts] \
        + [(prompt, lab, "invert-edit") for lab in target_labels]
    out = []
    for p, label, kind in targets:
        den, c = (denoiser, cond) if kind == "invert" else denoiser_for(p, label)
        x = sampler(den, noise, sigmas, c, callback=callback, post_step=settings.post_step(sigmas[0]), **settings.sampler_options)
        arr = np.rint(((pipe.codec.decode(x).float().clamp(-1, 1) + 1) * 127.5)[0].permute(1, 2, 0).cpu().numpy()).astype(np.uint8)
        image, mark = pipe.finish(_pil(arr), None)
        record = pipe.record(p, negative, label, None, settings, h, sigmas)
        record.update(kind=kind, width=w, height=h, inversion_nfe=nfe_inv, nfe=sampler.nfe(sigmas, **settings.sampler_options),
                      input_image=inp.info, input_conversions=inp.notes, input_record=inp.record, resize=resize, watermark=mark)
        if kind == "invert":
            record["reconstruction_rmse"] = round(rmse(arr, inp.pixels), 4)
        else:
            record.update(source_prompt=prompt, source_class_label=class_label)
        out.append(Generated(image, None, record))
    return out
