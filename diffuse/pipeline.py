"""The one place that wires model + guidance + schedule + sampler into images.

``generate(model, settings, ...)`` draws one image per seed: each image's initial noise
and every stochastic step come from its own generator, so an image depends on its seed
and settings only, never on the batch it was drawn in.
"""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from PIL import Image

from . import __version__, fastpath, rng, safety, schedules, watermark
from .codec import Codec, PixelCodec, VAECodec
from .corrections import DCW, EpsScaling, check_dcw, check_eps_scaling
from .guidance import CFGDenoiser, check_interval
from .masks import concat_without_picture
from .model import DiffusionModel
from .plot import to_uint8
from .record import file_hash, save_png
from .regions import (Color, Frames, Layout, LayoutError, Region, RegionDenoiser, blame, parse_color, planned,
                      plan_layout as grammar_layout, region_weights)
from .samplers import get_sampler
from .steps import StepInfo


@dataclass(frozen=True)
class SampleSettings:
    """How to sample: solver, steps, schedule, guidance, training-free corrections.

    ``eps_scaling`` (b) and ``eps_scaling_k`` (k): epsilon scaling with lambda(sigma) =
    b + k sigma / sigma_max (Ning et al. 2023; :class:`~diffuse.corrections.EpsScaling`);
    b = 1, k = 0 is off. ``dcw``: lambda_l of the wavelet low-band SNR-t correction
    (:class:`~diffuse.corrections.DCW`); 0 is off. ``cfg_interval`` (lo, hi): guidance only where
    lo < sigma <= hi, the unconditional branch skipped elsewhere (Kynkaanniemi et al. 2024,
    "Applying guidance in a limited interval"; :class:`~diffuse.guidance.CFGDenoiser`); None guides every step.
    """

    sampler: str = "dpmpp_2m"
    steps: int = 20
    schedule: str = "karras"
    cfg: float = 1.0  # classifier-free guidance scale (1 = off)
    cfg_rescale: float = 0.0
    cfg_interval: Optional[tuple[float, float]] = None
    sampler_options: dict = field(default_factory=dict)
    eps_scaling: float = 1.0
    eps_scaling_k: float = 0.0
    dcw: float = 0.0

    def __post_init__(self) -> None:
        get_sampler(self.sampler)
        if self.schedule not in schedules.SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; known schedules: {', '.join(schedules.SCHEDULES)}")
        if int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps}")
        if not math.isfinite(self.cfg):
            raise ValueError(f"guidance scale must be a finite number, got {self.cfg}")
        if self.cfg_interval is not None:  # a model folder's JSON gives a list; the settings hold a tuple
            object.__setattr__(self, "cfg_interval", check_interval(self.cfg_interval))
        check_eps_scaling(self.eps_scaling, self.eps_scaling_k)
        check_dcw(self.dcw)

    def sigmas(self, model: DiffusionModel) -> torch.Tensor:
        return schedules.get_sigmas(self.schedule, self.steps, model.sigma_min, model.sigma_max)

    def post_step(self, sigma_max: float) -> Optional[DCW]:
        """The samplers' ``post_step`` correction (DCW when dcw != 0, else None); ``sigma_max`` is the
        full schedule's first sigma, so a step at a given sigma gets the same correction in every job."""
        return DCW(self.dcw, sigma_max) if self.dcw != 0 else None


def guided_denoiser(model: DiffusionModel, settings: SampleSettings, batch: int, *, prompts: Optional[Sequence[str]] = None,
                    negative: Optional[Sequence[str]] = None, labels: Optional[Sequence[int]] = None,
                    concat: Optional[torch.Tensor] = None) -> tuple[Callable, Any]:
    """(denoiser, cond) for a batch: the model, wrapped in classifier-free guidance when settings.cfg != 1
    and in epsilon scaling when it is on. ``concat``: an inpainting model's [mask, masked image] (both branches)."""
    guided = settings.cfg != 1.0
    windows = model.text_windows(prompts, negative if guided else None)  # cond and uncond tokens line up
    cond = model.condition(prompts=prompts, labels=labels, windows=windows, concat=concat)
    denoiser: Callable = model
    if guided:
        if model.cfg.conditioning == "none":
            raise ValueError("guidance (cfg != 1) needs a conditional model; this model is unconditional")
        uncond = (model.condition(prompts=negative, windows=windows, concat=concat) if negative is not None
                  else model.null_condition(batch, windows, concat))
        denoiser = CFGDenoiser(model, settings.cfg, uncond, rescale=settings.cfg_rescale, interval=settings.cfg_interval)
    if settings.eps_scaling != 1.0 or settings.eps_scaling_k != 0.0:
        denoiser = EpsScaling(denoiser, settings.eps_scaling, settings.eps_scaling_k, model.sigma_max)
    return denoiser, cond


@torch.no_grad()
def generate(model: DiffusionModel, settings: SampleSettings, seeds: Sequence[int], *,
             prompts: Optional[Sequence[str]] = None, negative: Optional[Sequence[str]] = None,
             labels: Optional[Sequence[int]] = None, size: Optional[int] = None,
             callback: Optional[Callable[[StepInfo], None]] = None, codec: Optional[Codec] = None,
             layouts: Optional[Sequence[Layout]] = None) -> torch.Tensor:
    """Sample len(seeds) images [B, C, H, W] in [-1, 1] (float32); ``size`` is in pixels.

    With a latent ``codec`` the sampler runs on latents [B, latent_channels, size/f, size/f]
    (the model's own channels and side) and the result is decoded to pixels. ``layouts`` (text models):
    image i's regions, each a prompt for a box, fused with the whole prompt per pixel at every step, or
    isolated over a background color (:mod:`diffuse.regions`); images may have different layouts, or none.
    """
    device = next(model.parameters()).device
    codec = codec or PixelCodec(model.cfg.channels)
    res = size // codec.factor if size else model.cfg.image_size
    batch = len(seeds)
    concat = concat_without_picture(model.cfg.inpainting, codec, batch, res * codec.factor, device)
    denoiser, cond = guided_denoiser(model, settings, batch, prompts=prompts, negative=negative, labels=labels, concat=concat)
    if layouts is not None and any(lay.regions for lay in layouts):
        denoiser, cond = regional_denoiser(model, settings, (denoiser, cond), prompts, layouts, negative, concat, res,
                                           seeds, codec), None
    sigmas = settings.sigmas(model)
    post_step = settings.post_step(float(sigmas[0]))
    generators = rng.generators_for(seeds, "cpu")
    x = rng.randn((batch, model.cfg.channels, res, res), generators, device=device) * float(sigmas[0])
    sampler = get_sampler(settings.sampler)
    out = sampler(denoiser, x, sigmas, cond, generator=generators, callback=callback, post_step=post_step,
                  **settings.sampler_options)
    return codec.decode(out).clamp(-1, 1)


def regional_denoiser(model: DiffusionModel, settings: SampleSettings, whole: tuple[Callable, Any],
                      prompts: Optional[Sequence[str]], layouts: Sequence[Layout], negative: Optional[Sequence[str]],
                      concat: Optional[torch.Tensor], side: int, seeds: Sequence[int], codec: Codec) -> RegionDenoiser:
    """The whole prompts' guided denoiser ``whole`` fused with image i's layouts[i] per pixel. Region k of every
    image is path k; all paths run in one batch of (regions x images), an image with fewer regions running its whole
    prompt in the paths it lacks, with weight 0. An isolated layout's background is the codec's encoding of its
    color; its path k's outside noise comes from stream k + 1 of the image's seed."""
    if model.cfg.conditioning != "text" or prompts is None:
        raise ValueError("regional prompts need a text model and its prompts")
    if len(layouts) != len(prompts):
        raise ValueError(f"got layouts for {len(layouts)} images and {len(prompts)} prompts; give one per image")
    per_image = [region_weights([r.box for r in lay.regions], side) for lay in layouts]  # [1 + R_i, 1, 1, side, side] each
    n_paths = max(len(lay.regions) for lay in layouts)
    # virtual image k * B + i: region k of image i
    by_path = [[lay.regions[k] if k < len(lay.regions) else None for lay in layouts] for k in range(n_paths)]
    texts = [r.prompt if r is not None else p for path in by_path for r, p in zip(path, prompts)]
    regions = guided_denoiser(model, settings, len(texts), prompts=texts,
                              negative=None if negative is None else list(negative) * n_paths,
                              concat=None if concat is None else concat.repeat(n_paths, 1, 1, 1))
    weights = torch.stack([torch.cat([w[k] if k < len(w) else torch.zeros_like(w[0]) for w in per_image])
                           for k in range(1 + n_paths)])  # [1 + R, B, 1, side, side]
    frames = Frames.of([r for path in by_path for r in path], side)
    isolated = torch.tensor([lay.background is not None for lay in layouts])
    if not bool(isolated.any()):
        return RegionDenoiser(whole, regions, weights, frames=frames)
    device = next(model.parameters()).device
    colors = [lay.background or (0, 0, 0) for lay in layouts]  # a shared image's background is never used
    encoded = {c: background_latent(codec, c, side, device) for c in set(colors)}  # one encode per color, not per image
    background = torch.cat([encoded[c] for c in colors])
    shape = (len(seeds), model.cfg.channels, side, side)
    noise = torch.cat([rng.randn(shape, rng.stream_generators(seeds, k + 1), device=device) for k in range(n_paths)])
    return RegionDenoiser(whole, regions, weights, background=background, isolated=isolated, outside_noise=noise,
                          frames=frames)


def background_latent(codec: Codec, color: Color, side: int, device: torch.device | str) -> torch.Tensor:
    """[1, C, side, side]: the model-space image of a canvas of one ``color`` (RGB 0-255)."""
    f = codec.factor
    rgb = torch.tensor(color, dtype=torch.float32, device=device) / 127.5 - 1
    return codec.encode(rgb[None, :, None, None].expand(1, 3, side * f, side * f).contiguous())


# ---------------------------------------------------------------- the user-facing pipeline

MODELS_DIR = Path(__file__).parent / "models"


def resolve_model(name_or_path: str | Path) -> Path:
    """A shipped model's name (``shapes``, ``digits``) or a model folder's path -> the folder."""
    shipped = MODELS_DIR / str(name_or_path)
    if shipped.is_dir():
        return shipped
    path = Path(name_or_path)
    if path.is_dir():
        return path
    names = sorted(p.name for p in MODELS_DIR.iterdir() if p.is_dir()) if MODELS_DIR.is_dir() else []
    raise FileNotFoundError(f"no model {str(name_or_path)!r}: not a shipped model ({', '.join(names) or 'none installed'}) "
                            f"and not a model folder")


@dataclass
class Generated:
    """One generated image with the record that regenerates it."""

    image: Image.Image
    seed: int
    record: dict[str, Any]

    def save(self, path: Path, *, overwrite: bool = False) -> Path:
        return save_png(self.image, path, self.record, overwrite=overwrite)


class Pipeline:
    """Load a model once, then generate images from prompts or class labels.

    >>> pipe = Pipeline.load("shapes")
    >>> images = pipe("a red circle above a blue square", seeds=[0, 1, 2, 3])
    >>> images[0].save("out.png")
    """

    def __init__(self, model: DiffusionModel, name: str, model_hash: str, defaults: Optional[dict[str, Any]] = None,
                 device: str = "cpu", codec: Optional[Codec] = None):
        self.model = model.to(device)
        # images <-> the space the model denoises (pixels, or a VAE's latents); generate and edits use it
        self.codec: Codec = codec or PixelCodec(model.cfg.channels)
        self.name = name
        self.model_hash = model_hash
        defaults = dict(defaults or {})
        # the folder's "sampling" block may also say that layouts are planned for this model by default (shapes)
        self.plan_layout = bool(defaults.pop("plan_layout", False))
        self.defaults = SampleSettings(**defaults)
        self.device = device
        self.prompt_filter: Optional[safety.PromptFilter] = safety.PromptFilter.default()  # None: no block list
        self.image_check: Optional[safety.ImageCheck] = None  # output classifier hook (none ships)
        self.watermark = True  # invisible watermark on images of at least 256x256 (recorded either way)

    @classmethod
    def load(cls, name_or_path: str | Path = "shapes", device: str = "cpu", vae_tile: int = 0, precision: str = "auto",
             channels_last: bool = True, compile: bool = False) -> "Pipeline":
        """Load a shipped model by name or a model folder by path; its config's "sampling" block sets the defaults.

        ``vae_tile``: for a latent model, decode latents larger than this many latents on a side in
        tiles with global GroupNorm statistics (bounded memory, same image; 0: whole decodes).
        ``precision``, ``channels_last`` and ``compile``: the fast path (:meth:`set_fast_path`).
        """
        folder = resolve_model(name_or_path)
        # a backbone stored in bf16 stays bf16 when sampling in bf16: half the memory, the same images
        model, config = DiffusionModel.load(folder, keep_bf16=fastpath.resolve_precision(precision, device)[0] == "bf16")
        if vae_tile < 0:
            raise ValueError(f"--vae-tile must be >= 0 (0: no tiling), got {vae_tile}")
        codec = VAECodec.load(folder / model.cfg.codec, tile=vae_tile) if model.cfg.codec else None
        pipe = cls(model, folder.name, file_hash(folder / "model.safetensors"), config.get("sampling"), device, codec)
        pipe.set_fast_path(precision, channels_last=channels_last, compile=compile)
        return pipe

    def set_fast_path(self, precision: str = "auto", *, channels_last: bool = True, compile: bool = False) -> str:
        """Sample with the denoiser in ``precision`` (auto, fp32 or bf16; auto picks bf16 only where it is fast),
        its convolutions in ``channels_last`` memory order and, with ``compile``, through torch.compile (see
        :mod:`diffuse.fastpath`). All three are recorded in every image's record. Returns the choice and why,
        e.g. "fp32 (auto: this CPU has no native bf16 ...), channels_last"."""
        choice, why = fastpath.resolve_precision(precision, self.device)
        if compile:
            fastpath.check_compile(self.device)
        self.model.set_fast_path(choice, channels_last=channels_last, compile=compile)
        return f"{choice} ({why}){', channels_last' if channels_last else ''}{', compiled' if compile else ''}"

    def check_size(self, size: int) -> int:
        """The model's native size, or another size its backbone can make (a clear error otherwise)."""
        native = self.model.cfg.image_size * self.codec.factor
        if size == native:
            return size
        factor = (self.model.size_factor() or 0) * self.codec.factor or None
        if factor is None or size < factor or size % factor:
            can = f"multiples of {factor}" if factor else f"only {native}"
            raise ValueError(f"this model cannot make {size}x{size} images; it makes {native}x{native} ({can})")
        return size

    def __call__(self, prompt: Optional[str] = None, *, negative: Optional[str] = None, class_label: Optional[int] = None,
                 seeds: Sequence[int] | str | int = 0, settings: Optional[SampleSettings] = None, size: Optional[int] = None,
                 batch_size: int = 8, callback: Optional[Callable[[StepInfo], None]] = None,
                 regions: Sequence[Region | str] = (), region_background: Optional[Color | str] = None,
                 plan_layout: Optional[bool] = None) -> list[Generated]:
        seed_list = rng.parse_seeds(seeds)
        n = len(seed_list)
        return self.generate_batch(seed_list, prompts=None if prompt is None else [prompt] * n, negative=negative,
                                   class_labels=None if class_label is None else [class_label] * n, settings=settings,
                                   size=size, batch_size=batch_size, callback=callback, regions=regions,
                                   region_background=region_background, plan_layout=plan_layout)

    def generate_batch(self, seeds: Sequence[int], *, prompts: Optional[Sequence[str]] = None, negative: Optional[str] = None,
                       class_labels: Optional[Sequence[int]] = None, settings: Optional[SampleSettings] = None,
                       size: Optional[int] = None, batch_size: int = 8,
                       callback: Optional[Callable[[StepInfo], None]] = None,
                       regions: Sequence[Region | str] = (), region_background: Optional[Color | str] = None,
                       plan_layout: Optional[bool] = None) -> list[Generated]:
        """One image per seed, image i from ``prompts[i]`` (or ``class_labels[i]``); a batch may mix prompts.

        Image i depends only on its prompt, seed and settings, not on ``batch_size`` or its neighbors.
        Layouts (``regions``, ``region_background``, ``plan_layout``): see :meth:`layouts`. Each record lists its
        regions and background.
        """
        settings = settings or self.defaults
        seeds = rng.parse_seeds(seeds)
        for name, values in (("prompts", prompts), ("class_labels", class_labels)):
            if values is not None and len(values) != len(seeds):
                raise ValueError(f"got {len(values)} {name} for {len(seeds)} seeds; give one per seed")
        res = self.check_size(size or self.model.cfg.image_size * self.codec.factor)
        for prompt in dict.fromkeys(prompts or [None]):
            self.check_prompt(prompt, negative)
        per_image = self.layouts(prompts, seeds, res, regions, region_background, plan_layout)
        planning = self.planning(plan_layout, bool(regions))
        sigma_list = settings.sigmas(self.model).tolist()
        out: list[Generated] = []
        for start in range(0, len(seeds), batch_size):
            chunk = seeds[start:start + batch_size]
            chunk_prompts = prompts[start:start + batch_size] if prompts is not None else None
            chunk_labels = class_labels[start:start + batch_size] if class_labels is not None else None
            chunk_layouts = per_image[start:start + batch_size]
            images = generate(self.model, settings, chunk, size=res, callback=callback, prompts=chunk_prompts,
                              negative=[negative] * len(chunk) if negative is not None else None, labels=chunk_labels,
                              codec=None if isinstance(self.codec, PixelCodec) else self.codec, layouts=chunk_layouts)
            for i, (seed, arr) in enumerate(zip(chunk, to_uint8(images))):
                image, mark = self.finish(Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr), seed)
                prompt = chunk_prompts[i] if chunk_prompts is not None else None
                label = chunk_labels[i] if chunk_labels is not None else None
                out.append(Generated(image, seed, {**self.record(prompt, negative, label, seed, settings, res, sigma_list),
                                                   **chunk_layouts[i].to_record(), "plan_layout": planning,
                                                   "watermark": mark}))
        return out

    def finish(self, image: Image.Image, seed: Optional[int]) -> tuple[Image.Image, dict[str, Any]]:
        """Every result image (generated or edited) on its way out: the output classifier hook, then the
        invisible watermark; returns (image, the record's ``watermark`` entry)."""
        safety.check_image(self.image_check, image, seed)
        return watermark.mark_generated(image, self.watermark)

    # edits (diffuse.edit): the input is encoded with self.codec, edited in model space and decoded
    def img2img(self, image: Any, prompt: Optional[str] = None, **options: Any) -> list[Generated]:
        """SDEdit at ``strength`` (see :func:`diffuse.edit.img2img`): one image per seed."""
        from .edit import img2img
        return img2img(self, image, prompt, **options)

    def inpaint(self, image: Any, mask: Any, prompt: Optional[str] = None, **options: Any) -> list[Generated]:
        """Replace the mask's white region, keep the rest exactly (see :func:`diffuse.edit.inpaint`)."""
        from .edit import inpaint
        return inpaint(self, image, mask, prompt, **options)

    def outpaint(self, image: Any, extend: Any, prompt: Optional[str] = None, **options: Any) -> list[Generated]:
        """Extend the canvas, e.g. ``extend="left=16,right=16"`` (see :func:`diffuse.edit.outpaint`)."""
        from .edit import outpaint
        return outpaint(self, image, extend, prompt, **options)

    def invert(self, image: Any, prompt: Optional[str] = None, **options: Any) -> list[Generated]:
        """[reconstruction, one image per target prompt] from the image's inverted noise (see :func:`diffuse.edit.invert`)."""
        from .edit import invert
        return invert(self, image, prompt, **options)

    def check_prompt(self, prompt: Optional[str], negative: Optional[str]) -> list[str]:
        """Refuse prompts the block list forbids (naming the rule), empty prompts and words the model never learned;
        return notes on how the accepted prompts are encoded (a long CLIP prompt's windows) for the user."""
        if self.prompt_filter is not None:
            self.prompt_filter.check(prompt, "prompt")
            self.prompt_filter.check(negative, "negative prompt")
        if self.model.cfg.conditioning != "text":
            return []
        if prompt is None or not prompt.strip():
            raise ValueError("the prompt is empty; describe the image, e.g. \"a red circle above a blue square\"")
        for text, what in ((prompt, "prompt"), (negative, "negative prompt")):
            unknown = self.model.text_encoder.unknown_words(text) if text else []
            if unknown:
                raise ValueError(f"the {what} has words this model never saw in training: {', '.join(unknown)}; "
                                 f"rephrase with words from its vocabulary (see `diffuse info {self.name}`)")
        assert self.model.text_encoder is not None
        return [f"{what}: {note}" for text, what in ((prompt, "prompt"), (negative, "negative prompt")) if text
                for note in self.model.text_encoder.prompt_warnings(text)]

    def planning(self, plan_layout: Optional[bool], has_regions: bool = False) -> bool:
        """Whether layouts are planned: ``plan_layout`` if given, else the model's default unless regions are given."""
        return self.plan_layout and not has_regions if plan_layout is None else plan_layout

    def layouts(self, prompts: Optional[Sequence[Optional[str]]], seeds: Sequence[int], size: int,
                regions: Sequence[Region | str] = (), region_background: Optional[Color | str] = None,
                plan_layout: Optional[bool] = None, *, require_plan: bool = False) -> list[Layout]:
        """The layouts of the images of ``seeds`` at ``size`` pixels, checked. ``regions``:
        :class:`~diffuse.regions.Region` or ``"X0,Y0,X1,Y1=PROMPT"`` strings, the same for every image;
        ``region_background`` (RGB or a color such as "black"): their paths are isolated over that background
        (default: shared paths, the whole prompt where no box reaches). When planning (:meth:`planning`: ``plan_layout``,
        by default the model's folder's when no regions are given), each prompt that
        :func:`~diffuse.regions.plan_layout` can plan (shapes world: two objects, a count, one object) gets its
        planned layout, which may depend on the image's seed, and the others none; with ``require_plan`` and
        ``plan_layout=True`` (a request that asks for a plan) a prompt it cannot plan is an error instead.
        Errors: a one-line :class:`~diffuse.regions.LayoutError` naming the argument at fault."""
        with blame("regions"):
            given = tuple(r if isinstance(r, Region) else Region.parse(r) for r in regions)
        if given and plan_layout:
            raise LayoutError("plan_layout", "give regions or plan_layout, not both")
        with blame("region_background"):
            background = parse_color(region_background) if isinstance(region_background, str) else region_background
        if background is not None and not given:
            raise LayoutError("region_background", "a region background applies to regions; give at least one region")
        with blame("regions" if given else "plan_layout"):
            if require_plan and plan_layout:
                out = [grammar_layout(p or "", seed) for p, seed in zip(prompts or [None] * len(seeds), seeds)]
            elif self.planning(plan_layout, bool(given)):
                out = [planned(p, seed) for p, seed in zip(prompts or [None] * len(seeds), seeds)]
            else:
                out = [Layout(given, background)] * len(seeds)
            self.check_regions(list(dict.fromkeys(r for lay in out for r in lay.regions)), size)
        return out

    def check_regions(self, regions: Sequence[Region], size: int) -> None:
        """Refuse regional prompts on a model without text, region prompts :meth:`check_prompt` refuses (naming
        the region) and boxes that cover no pixel of a ``size`` x ``size`` image."""
        if regions and self.model.cfg.conditioning != "text":
            raise ValueError(f"regional prompts need a text model; {self.name} is not one")
        for region in regions:
            try:
                self.check_prompt(region.prompt, None)
            except ValueError as e:
                raise ValueError(f"region {region.spec()}: {e}") from None
        region_weights([r.box for r in regions], size // self.codec.factor)

    def record(self, prompt: Optional[str], negative: Optional[str], class_label: Optional[int], seed: int,
               settings: SampleSettings, size: int, sigmas: list[float]) -> dict[str, Any]:
        return {
            "kind": "generate", "prompt": prompt, "negative_prompt": negative, "class_label": class_label, "seed": seed,
            "sampler": settings.sampler, "sampler_options": settings.sampler_options, "steps": settings.steps,
            "schedule": settings.schedule, "sigmas": sigmas, "cfg": settings.cfg,
            "cfg_rescale": settings.cfg_rescale, "cfg_interval": settings.cfg_interval, "eps_scaling": settings.eps_scaling,
            "eps_scaling_k": settings.eps_scaling_k, "dcw": settings.dcw, "width": size, "height": size,
            "vae_tile": getattr(self.codec, "tile", 0), "precision": self.model.precision,
            "channels_last": self.model.channels_last, "compile": self.model.compiled,
            "model": self.name, "model_hash": self.model_hash, "diffuse_version": __version__, "torch_version": torch.__version__,
            "device": self.device, "machine": platform.machine(),
            "prompt_filter": self.prompt_filter.summary() if self.prompt_filter is not None else None,
            "image_check": getattr(self.image_check, "__name__", type(self.image_check).__name__) if self.image_check else None,
        }
