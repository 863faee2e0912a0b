"""Replay: regenerate an image from the generation record in its PNG and compare the pixels.

``diffuse replay IMAGE.png`` reads the ``diffuse`` JSON record (written by
:meth:`diffuse.pipeline.Pipeline.record` and the edits of :mod:`diffuse.edit`), loads the
model it names and checks its hash, rebuilds the sampling settings (corrections included),
checks that today's code gives the recorded sigmas, regenerates the image from the recorded
seed (with the recorded watermark setting) and compares it with the file:

* on the same software (diffuse and torch versions, device type, CPU architecture) the
  image must come back bit for bit: every sampler, stochastic ones included, draws all its
  noise from the image's own seeded generator;
* elsewhere floating-point results may differ in the last bits, which sampling can
  amplify, so the image passes when the mean absolute pixel difference is at most
  ``tolerance`` (8-bit levels, default 1.0) and no more than 1% of values differ by more
  than 16 levels.

The denoiser runs in the recorded ``precision`` (fp32 or bf16 autocast), memory order
(``channels_last``) and, when the record says ``compile``, through torch.compile, so the
arithmetic is the one that made the image whatever this machine's defaults are; records written
before these fields existed were fp32, contiguous, uncompiled.

Records carry a ``kind`` ("generate" when absent); each kind has a replayer in
:data:`REPLAYERS`. An edit (img2img, inpaint, outpaint, invert, invert-edit) also needs its
input image, which its record identifies by ``input_image.pixels_sha256`` (the SHA-256 of
the pixels the edit read, after its mode conversion and before any resize):

* ``--input FILE`` (``input_image=``) gives it; its pixels must have the recorded hash, or
  replay stops with a one-line error naming both hashes;
* without it, when the input was itself made by diffuse, its record is chained under
  ``input_record``: replay regenerates the input from that record (recursively, through
  any chain of edits; the report's ``input/...`` lines), checks the hash, and edits it.
  On other software a regenerated input may miss the hash by a few bits; the edit is then
  compared within the tolerance.

An inpainting mask is identified the same way (``mask.pixels_sha256``, the 0/1 mask as read,
before resize and feathering) and embedded in the record as a base64 1-bit PNG when that
takes at most :data:`diffuse.edit.MASK_EMBED_LIMIT` characters; a larger mask is given with
``--mask FILE``. Outpainting masks follow from the recorded ``extend``.

Replay never writes the regenerated image and runs without the prompt filter and output
classifier: it checks what the record says was made (the record names the block list that
passed it), it makes nothing new.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from . import __version__, edit
from .pipeline import Pipeline, SampleSettings
from .record import read_record
from .regions import Layout

DEFAULT_TOLERANCE = 1.0  # mean |difference| in 8-bit levels, when bit-exactness is not expected
LARGE_DIFF, LARGE_FRACTION = 16, 0.01


@dataclass
class ReplayReport:
    """Each checked item as (name, matched, detail); ``matched`` overall; ``exact`` when pixels are bit-identical."""

    items: list[tuple[str, bool, str]] = field(default_factory=list)
    exact: bool = False
    expect_exact: bool = True

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.items.append((name, ok, detail))

    @property
    def matched(self) -> bool:
        return all(ok for _, ok, _ in self.items)

    def lines(self) -> list[str]:
        out = [f"{'match ' if ok else 'DIFFER'}  {name}: {detail}" for name, ok, detail in self.items]
        out.append("replay: the image matches its record" if self.matched else "replay: the image does NOT match its record")
        return out


def software_of(record: dict[str, Any]) -> dict[str, Optional[str]]:
    """What bit-exactness depends on, as the record saw it."""
    return {"diffuse": record.get("diffuse_version"), "torch": record.get("torch_version"),
            "device": (record.get("device") or "cpu").split(":")[0], "machine": record.get("machine")}


def software_here(device: str) -> dict[str, Optional[str]]:
    return {"diffuse": __version__, "torch": torch.__version__, "device": device.split(":")[0], "machine": platform.machine()}


def compare_pixels(expected: np.ndarray, actual: np.ndarray, report: ReplayReport, tolerance: float) -> None:
    """Add the pixel comparison to the report: bit-exact, within tolerance, or how far off."""
    if expected.shape != actual.shape:
        report.add("pixels", False, f"shape {actual.shape} regenerated vs {expected.shape} in the file")
        return
    diff = np.abs(expected.astype(np.int16) - actual.astype(np.int16))
    report.exact = not diff.any()
    if report.exact:
        report.add("pixels", True, f"bit-exact ({'x'.join(map(str, expected.shape))})")
        return
    mean, large = float(diff.mean()), float((diff > LARGE_DIFF).mean())
    detail = (f"{int((diff > 0).sum())} of {diff.size} values differ, max {int(diff.max())}, mean {mean:.3f} levels, "
              f"{100 * large:.2f}% by more than {LARGE_DIFF}")
    if report.expect_exact:
        report.add("pixels", False, detail + " (same software: bit-exact expected)")
    else:
        ok = mean <= tolerance and large <= LARGE_FRACTION
        report.add("pixels", ok, detail + f" (tolerance: mean <= {tolerance:g}, at most {100 * LARGE_FRACTION:g}% > {LARGE_DIFF})")


@dataclass
class _Job:
    """What one replay draws on: model folders to try (by hash), the device, the user's input and
    mask files (for the outermost record only), and the pipelines loaded so far."""

    models: list[str]
    device: str
    input_image: Optional[Path] = None
    mask: Optional[Path] = None
    pipelines: dict[str, Pipeline] = field(default_factory=dict)


def _pipeline(record: dict[str, Any], job: _Job, report: ReplayReport) -> Pipeline:
    """The first of --model (each given) and the record's own model whose weights have the recorded hash."""
    others = []
    for name in dict.fromkeys([*job.models, record["model"]]):
        if name not in job.pipelines:
            try:
                job.pipelines[name] = Pipeline.load(name, device=job.device)
            except FileNotFoundError:
                if name in job.models:
                    raise
                continue
        pipe = job.pipelines[name]
        if pipe.model_hash == record["model_hash"]:
            report.add("model", True, f"{pipe.name}, hash {pipe.model_hash}")
            return pipe
        others.append(f"the model {pipe.name} has hash {pipe.model_hash}")
    if not others:
        raise FileNotFoundError(f"no model {record['model']!r} here; the record names model {record['model']!r} "
                                f"(hash {record['model_hash']}): give --model with its folder")
    raise ValueError(f"{'; '.join(others)} but the image was made with {record['model_hash']}; "
                     f"give --model with the model folder the image was made with")


def _settings(record: dict[str, Any]) -> SampleSettings:
    return SampleSettings(sampler=record["sampler"], steps=record["steps"], schedule=record["schedule"], cfg=record["cfg"],
                          cfg_rescale=record.get("cfg_rescale", 0.0), cfg_interval=record.get("cfg_interval"),
                          sampler_options=record.get("sampler_options") or {},
                          eps_scaling=record.get("eps_scaling", 1.0), eps_scaling_k=record.get("eps_scaling_k", 0.0),
                          dcw=record.get("dcw", 0.0))


def _regenerate(record: dict[str, Any], job: _Job, report: ReplayReport) -> Image.Image:
    """Check one record's model, software and sigmas, and regenerate its image (an edit's input first)."""
    kind = record.get("kind", "generate")
    if kind not in REPLAYERS:
        raise ValueError(f"a {kind!r} record cannot be replayed by this version; it replays: {', '.join(REPLAYERS)}")
    pipe = _pipeline(record, job, report)
    then, now = software_of(record), software_here(job.device)
    report.expect_exact = then == now
    differ = [f"{k} {then[k]} -> {now[k]}" for k in then if then[k] != now[k]]
    report.add("software", True, "same as the record (bit-exact expected)" if report.expect_exact else
               f"differs ({', '.join(differ)}); pixels are compared within a tolerance")
    settings = _settings(record)
    # the recorded arithmetic: records from before the fast path sampled fp32, contiguous, uncompiled
    fast_path = {"precision": record.get("precision", "fp32"), "channels_last": record.get("channels_last", False),
                 "compile": record.get("compile", False)}
    sigmas = settings.sigmas(pipe.model).tolist()
    same_sigmas = sigmas == record["sigmas"]
    worst = max((abs(a - b) for a, b in zip(sigmas, record["sigmas"])), default=float("inf")) if len(sigmas) == len(record["sigmas"]) else None
    report.add("sigmas", same_sigmas, f"{len(sigmas)} values, identical" if same_sigmas else
               f"today's {settings.schedule} schedule differs from the record's " +
               (f"(largest difference {worst:.3g})" if worst is not None else f"({len(sigmas)} vs {len(record['sigmas'])} values)"))
    corrections = "".join([f", eps scaling {settings.eps_scaling:g} (k {settings.eps_scaling_k:g})"
                           if (settings.eps_scaling, settings.eps_scaling_k) != (1.0, 0.0) else "",
                           f", dcw {settings.dcw:g}" if settings.dcw else ""])
    interval = f" where {settings.cfg_interval[0]:g} < sigma <= {settings.cfg_interval[1]:g}" if settings.cfg_interval else ""
    report.add("settings", True, f"{kind}: {settings.sampler}, {settings.steps} steps, {settings.schedule}, cfg {settings.cfg:g}"
                                 f"{interval}{corrections}, seed {record['seed']}, {record['width']}x{record['height']}, "
                                 f"{fast_path['precision']}{', channels_last' if fast_path['channels_last'] else ''}"
                                 f"{', compiled' if fast_path['compile'] else ''}")
    source = None if kind == "generate" else _input_for(pipe, record, job, report)  # may replay a chain on this pipe
    mask = _mask_for(record, job, report) if kind == "inpaint" else None
    # this record's own way of running, set after its input's replay (which shares the pipeline)
    if hasattr(pipe.codec, "tile"):  # a latent model decodes as the record did (tiled or whole)
        pipe.codec.tile = record.get("vae_tile", 0)
    pipe.set_fast_path(**fast_path)
    pipe.watermark = bool((record.get("watermark") or {}).get("applied", False))
    pipe.prompt_filter = pipe.image_check = None  # replay makes nothing new (module docstring)
    return REPLAYERS[kind](pipe, record, settings, source, mask)


Source = Path | Image.Image  # an edit's input: the user's file or the image regenerated from the chained record


def _input_for(pipe: Pipeline, record: dict[str, Any], job: _Job, report: ReplayReport) -> Source:
    """An edit's input: the --input file (hash checked), or regenerated from the chained record."""
    info, kind = record.get("input_image") or {}, record["kind"]
    want = info.get("pixels_sha256")
    if want is None:
        raise ValueError(f"this {kind} record does not identify its input by pixel hash (it was written before edits "
                         f"recorded one), so it cannot be replayed; redo the edit with this version")
    described = f"{info.get('file') or 'an in-memory image'}, {info.get('width')}x{info.get('height')} {info.get('mode')}"
    channels = pipe.codec.image_channels
    if job.input_image is not None:
        got = edit.read_image(job.input_image, channels).info["pixels_sha256"]
        if got != want:
            raise ValueError(f"--input {job.input_image} is not this {kind}'s input: its pixels hash to {got[:16]}, the "
                             f"recorded input's ({described}) to {want[:16]}; give the image the edit was made from")
        report.add("input", True, f"{job.input_image} has the recorded pixels (sha256 {want[:16]})")
        return job.input_image
    chained = record.get("input_record")
    if chained is None:
        raise ValueError(f"this {kind} record's input ({described}) carries no diffuse record to regenerate it from; "
                         f"give the input image with --input FILE")
    nested = ReplayReport()
    image = _regenerate(chained, _Job(job.models, job.device, pipelines=job.pipelines), nested)
    for name, ok, detail in nested.items:
        report.add(f"input/{name}", ok, detail)
    got = edit.read_image(image, channels).info["pixels_sha256"]
    what = f"regenerated from its chained {chained.get('kind', 'generate')} record"
    if got == want:
        report.add("input", True, f"{what}: the recorded pixels (sha256 {want[:16]})")
    elif nested.expect_exact:
        report.add("input", False, f"{what}, but its pixels hash to {got[:16]}, not the recorded {want[:16]} (same software: "
                                   f"bit-exact expected; if the input file was changed after it was made, give it with --input)")
    else:
        report.expect_exact = False
        report.add("input", True, f"{what} on other software: its pixels hash to {got[:16]}, not the recorded {want[:16]}, "
                                  f"so the edit is compared within the tolerance")
    return image


def _mask_for(record: dict[str, Any], job: _Job, report: ReplayReport) -> np.ndarray:
    """An inpainting mask (0/1 [H, W] at the input's size): the --mask file or the embedded one, hash checked."""
    info = record["mask"]
    want = info.get("pixels_sha256")
    if job.mask is not None:
        size = (record["input_image"]["width"], record["input_image"]["height"])
        mask, _ = edit.read_mask(job.mask, size, binarize=True)
        got = edit.mask_hash(mask)
        if got != want:
            raise ValueError(f"--mask {job.mask} is not this inpaint's mask: it hashes to {got[:16]}, the recorded mask "
                             f"({info.get('file') or 'an array'}) to {want[:16]}; give the mask the edit was made with")
        report.add("mask", True, f"{job.mask} is the recorded mask (sha256 {want[:16]})")
        return mask
    if not info.get("embedded"):
        raise ValueError(f"this inpaint record keeps only its mask's hash (the mask {info.get('file') or ''} took more than "
                         f"{edit.MASK_EMBED_LIMIT} characters to embed); give the mask with --mask FILE")
    mask = edit.decode_mask(info["embedded"])
    if edit.mask_hash(mask) != want:
        raise ValueError("the record's embedded mask does not have the recorded hash (the record is damaged); "
                         "give the mask with --mask FILE")
    report.add("mask", True, f"embedded in the record ({len(info['embedded'])} base64 characters, sha256 {want[:16]})")
    return mask


def _conditioning(record: dict[str, Any], settings: SampleSettings) -> dict[str, Any]:
    return {"negative": record.get("negative_prompt"), "class_label": record.get("class_label"), "seeds": [record["seed"]],
            "settings": settings}


def _replay_generate(pipe: Pipeline, record: dict[str, Any], settings: SampleSettings, source: Source,
                    mask: Optional[np.ndarray]) -> Image.Image:
    prompt, label = record.get("prompt"), record.get("class_label")
    layout = Layout.from_record(record)
    [g] = pipe.generate_batch([record["seed"]], prompts=None if prompt is None else [prompt],
                              negative=record.get("negative_prompt"), class_labels=None if label is None else [label],
                              settings=settings, size=record["width"], regions=layout.regions,
                              region_background=layout.background, plan_layout=False)  # the record holds the layout
    return g.image


def _replay_img2img(pipe: Pipeline, record: dict[str, Any], settings: SampleSettings, source: Source,
                    mask: Optional[np.ndarray]) -> Image.Image:
    [g] = edit.img2img(pipe, source, record["prompt"], strength=record["denoising_strength"], resize=record["resize"],
                       **_conditioning(record, settings))
    return g.image


def _replay_inpaint(pipe: Pipeline, record: dict[str, Any], settings: SampleSettings, source: Source,
                    mask: Optional[np.ndarray]) -> Image.Image:
    [g] = edit.inpaint(pipe, source, mask, record["prompt"], strength=record["denoising_strength"],
                       feather_px=record["mask"]["feather"], jumps=record["jumps"], jump_length=record["jump_length"] or 1,
                       resize=record["resize"], **_conditioning(record, settings))
    return g.image


def _replay_outpaint(pipe: Pipeline, record: dict[str, Any], settings: SampleSettings, source: Source,
                    mask: Optional[np.ndarray]) -> Image.Image:
    [g] = edit.outpaint(pipe, source, record["extend"], record["prompt"], feather_px=record["mask"]["feather"],
                        jumps=record["jumps"], jump_length=record["jump_length"] or 1, **_conditioning(record, settings))
    return g.image


def _replay_invert(pipe: Pipeline, record: dict[str, Any], settings: SampleSettings, source: Source,
                    mask: Optional[np.ndarray]) -> Image.Image:
    """The reconstruction ("invert"), or the redraw from the inverted noise ("invert-edit") with the
    target label when it differs from the source's, else with the target prompt."""
    common = {"negative": record.get("negative_prompt"), "settings": settings, "resize": record["resize"]}
    if record["kind"] == "invert":
        return edit.invert(pipe, source, record["prompt"], class_label=record["class_label"], **common)[0].image
    label, source_label = record["class_label"], record["source_class_label"]
    target = {"target_labels": [label]} if label != source_label else {"target_prompts": [record["prompt"]]}
    return edit.invert(pipe, source, record["source_prompt"], class_label=source_label, **target, **common)[1].image


REPLAYERS: dict[str, Callable[..., Image.Image]] = {
    "generate": _replay_generate, "img2img": _replay_img2img, "inpaint": _replay_inpaint, "outpaint": _replay_outpaint,
    "invert": _replay_invert, "invert-edit": _replay_invert,
}


def replay(path: str | Path, *, model: Optional[str | Sequence[str]] = None, device: str = "cpu",
           tolerance: float = DEFAULT_TOLERANCE, input_image: Optional[str | Path] = None,
           mask: Optional[str | Path] = None) -> ReplayReport:
    """Regenerate ``path`` from its record and compare; ValueError when it cannot be replayed.

    ``model``: model folders (or shipped names) to try before the record's own, matched by hash
    (several for a chain of edits made with different models). ``input_image`` / ``mask``: an
    edit's input and inpainting mask files, checked against the record's pixel hashes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        record = read_record(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read a generation record from {path} ({e}); replay needs a PNG written by diffuse") from None
    if record is None:
        raise ValueError(f"{path} has no diffuse generation record (its 'diffuse' PNG text chunk); "
                         f"only images written by diffuse can be replayed, and saving as JPEG drops the record")
    if not tolerance >= 0:
        raise ValueError(f"--tolerance must be >= 0, got {tolerance}")
    kind = record.get("kind", "generate")
    if input_image is not None and kind == "generate":
        raise ValueError(f"--input only applies to edits; {path} is a generate record")
    if mask is not None and kind != "inpaint":
        raise ValueError(f"--mask only applies to inpainting; {path} is a {kind} record")
    models = [str(model)] if isinstance(model, (str, Path)) else [str(m) for m in model or []]
    report = ReplayReport()
    regenerated = _regenerate(record, _Job(models, device, None if input_image is None else Path(input_image),
                                           None if mask is None else Path(mask)), report)
    with Image.open(path) as im:
        expected = np.asarray(im.convert(regenerated.mode))
    compare_pixels(expected, np.asarray(regenerated), report, tolerance)
    return report
