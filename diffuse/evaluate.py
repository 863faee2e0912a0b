"""Evaluation of models and images: prompt adherence on the shapes world (GenEval-style), and
FID / KID / precision-recall against a dataset (metric core in :mod:`diffuse.fid`).

Adherence: each image is judged against its prompt by the exact scorer in ``adherence``
(objects with the right shape and color, exact counts, positions and relations), and the
verdicts are reported per family (``shapes.EVAL_FAMILIES``) with percentile-bootstrap 95%
intervals. Images come either from a model (``adherence_run``: one image per evaluation
prompt, image i from seed ``seed_base + i``, so a run is reproducible and independent of the
batch size) or from a folder of images made by any tool (``read_prompted_folder``).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from . import adherence, shapes
from .data import read_jsonl
from .pipeline import Generated, Pipeline, SampleSettings
from .plot import to_uint8
from .record import read_record
from .steps import StepInfo

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PROMPTS_FILE = "prompts.jsonl"


# ---------------------------------------------------------------------------- images from a model


def check_adherence_model(pipe: Pipeline, prompts: Sequence[str]) -> None:
    """Refuse models that cannot be scored for adherence: not text-to-RGB, or missing shapes words."""
    cfg = pipe.model.cfg
    if cfg.conditioning != "text":
        kind = "class-conditional" if cfg.conditioning == "class" else "unconditional"
        raise ValueError(f"model {pipe.name} is {kind}; adherence scores images against text prompts, "
                         "so it needs a text-to-image model of the shapes world")
    if cfg.channels != 3:
        raise ValueError(f"model {pipe.name} makes {cfg.channels}-channel images; adherence needs RGB images of the shapes world")
    unknown = sorted({w for p in prompts for w in pipe.model.text_encoder.unknown_words(p)})
    if unknown:
        raise ValueError(f"model {pipe.name} was not trained on the shapes world: it never saw the words {', '.join(unknown)}")


@dataclass
class AdherenceRun:
    """One model evaluated with one set of sampling settings."""

    settings: SampleSettings
    seeds: list[int]
    generated: list[Generated]
    report: adherence.Report


def adherence_run(pipe: Pipeline, prompts: Sequence[str], families: Sequence[str], settings: SampleSettings, *,
                  seed_base: int = 0, batch_size: int = 16, n_boot: int = 1000,
                  callback: Optional[Callable[[StepInfo], None]] = None, plan_layout: Optional[bool] = None) -> AdherenceRun:
    """Generate image i from ``prompts[i]`` with seed ``seed_base + i`` (its layout planned where it can be when
    ``plan_layout``, by default the model's) and score it."""
    seeds = [seed_base + i for i in range(len(prompts))]
    generated = pipe.generate_batch(seeds, prompts=list(prompts), settings=settings, batch_size=batch_size, callback=callback,
                                    plan_layout=plan_layout)
    report = adherence.evaluate([np.asarray(g.image.convert("RGB")) for g in generated], prompts, families, n_boot=n_boot)
    return AdherenceRun(settings, seeds, generated, report)


# ---------------------------------------------------------------------------- images from a folder


@dataclass(frozen=True)
class PromptedImage:
    """An image file with the prompt it was made from and the family that prompt tests."""

    path: Path
    image: np.ndarray  # uint8 [H, W, 3]
    prompt: str
    family: str


def _read_prompts_file(folder: Path) -> dict[str, dict[str, str]]:
    """``folder/prompts.jsonl`` lines {"file_name", "prompt"[, "family"]} keyed by file name."""
    path = folder / PROMPTS_FILE
    if not path.exists():
        return {}
    out = {}
    for name, row in read_jsonl(path, ("prompt",)).items():
        entry = {"prompt": str(row["prompt"]), **({"family": str(row["family"])} if "family" in row else {})}
        if "family" in entry and entry["family"] not in shapes.EVAL_FAMILIES:
            raise ValueError(f"{path}: {name}: unknown family {entry['family']!r}; expected one of {', '.join(shapes.EVAL_FAMILIES)}")
        if not (folder / name).is_file():
            raise ValueError(f"{path}: {name} is not a file in {folder}")
        out[name] = entry
    return out


def _embedded_prompt(path: Path, im: Image.Image) -> Optional[str]:
    """The prompt of a PNG's diffuse record, else the first line of its AUTOMATIC1111 ``parameters``."""
    record = read_record(path)
    if record and record.get("prompt"):
        return record["prompt"]
    parameters = getattr(im, "text", {}).get("parameters", "")
    return parameters.split("\n", 1)[0].strip() or None


def read_prompted_folder(folder: Path, *, skip_unprompted: bool = False) -> list[PromptedImage]:
    """Every image in ``folder`` (sorted by name) with its prompt and family.

    The prompt comes from ``prompts.jsonl`` (which may also give the family), else from the
    PNG's diffuse record or AUTOMATIC1111 ``parameters`` chunk. The family, unless given,
    is ``shapes.prompt_family(prompt)``. An image without a prompt is an error naming it,
    or is skipped with a warning when ``skip_unprompted``; an unreadable image or a prompt
    outside the shapes grammar is always an error naming the file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"no folder {folder}")
    listed = _read_prompts_file(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)})")
    out = []
    for path in files:
        try:
            with Image.open(path) as im:
                im.load()
                prompt = listed.get(path.name, {}).get("prompt") or _embedded_prompt(path, im)
                image = np.asarray(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"cannot read image {path}: {e}") from None
        if prompt is None:
            message = (f"{path} has no prompt: no {PROMPTS_FILE} entry, no diffuse record and no "
                       "AUTOMATIC1111 parameters")
            if not skip_unprompted:
                raise ValueError(message + "; add it to prompts.jsonl or pass --skip-unprompted")
            warnings.warn(message + "; skipped")
            continue
        try:
            family = listed.get(path.name, {}).get("family") or shapes.prompt_family(prompt)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        out.append(PromptedImage(path, image, prompt, family))
    if not out:
        raise ValueError(f"no image in {folder} has a prompt")
    return out


def score_folder(items: Sequence[PromptedImage], n_boot: int = 1000) -> tuple[list[PromptedImage], adherence.Report]:
    """Score folder images; items and report in ``EVAL_FAMILIES`` order (then by file name)."""
    items = sorted(items, key=lambda it: (shapes.EVAL_FAMILIES.index(it.family), it.path.name))
    report = adherence.evaluate([it.image for it in items], [it.prompt for it in items], [it.family for it in items],
                                n_boot=n_boot)
    return items, report


# ---------------------------------------------------------------------------- reports


def _describe(d: adherence.Detection) -> str:
    return f"{d.size} {d.color or 'unknown-color'} {d.shape or 'unknown-shape'} in cell {d.cell}"


def report_json(report: adherence.Report, prompts: Sequence[str], families: Sequence[str],
                keys: dict[str, Sequence[Any]]) -> dict[str, Any]:
    """Per-family accuracy with interval, overall, and one entry per image.

    ``keys`` adds per-image fields (e.g. {"seed": seeds} or {"file": names}).
    """
    rows = (*report.families, report.overall)
    items = [{"index": i, "prompt": p, "family": f, **{k: v[i] for k, v in keys.items()}, "ok": verdict.ok,
              "reason": verdict.reason, "detected": [_describe(d) for d in verdict.detections]}
             for i, (p, f, verdict) in enumerate(zip(prompts, families, report.verdicts))]
    return {
        "families": {s.family: {k: v for k, v in dataclasses.asdict(s).items() if k != "family"} for s in rows[:-1]},
        "overall": {k: v for k, v in dataclasses.asdict(report.overall).items() if k != "family"},
        "items": items,
    }


def sweep_table(runs: Sequence[AdherenceRun]) -> str:
    """Accuracy per family and overall (with its 95% interval) for each guidance scale."""
    names = [s.family for s in runs[0].report.families]
    header = f"{'cfg':>5}  " + " ".join(f"{n:>{max(6, len(n))}}" for n in names) + f"  {'overall':>7}  95% interval"
    lines = [header, "-" * len(header)]
    for run in runs:
        accs = " ".join(f"{s.accuracy:>{max(6, len(s.family))}.3f}" for s in run.report.families)
        o = run.report.overall
        lines.append(f"{run.settings.cfg:>5g}  {accs}  {o.accuracy:>7.3f}  [{o.low:.3f}, {o.high:.3f}]")
    return "\n".join(lines)


def best_run(runs: Sequence[AdherenceRun]) -> AdherenceRun:
    """The run with the highest overall accuracy (the first one on ties)."""
    return max(runs, key=lambda r: r.report.overall.accuracy)


# ---------------------------------------------------------------------------- FID / KID / precision-recall


MAX_DEFAULT_REFERENCE = 10_000  # the procedural shapes set is 'infinite'; without --n take this many


def reference_count(ref: str, size: int, n: Optional[int] = None) -> int:
    """How many images :func:`reference_set` takes: ``n``, else the whole set up to MAX_DEFAULT_REFERENCE."""
    from .data import make_dataset

    return min(n or MAX_DEFAULT_REFERENCE, len(make_dataset(ref, size)))


def reference_set(ref: str, size: int, n: Optional[int] = None) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The first :func:`reference_count` images of a dataset spec as uint8 [N, H, W, C], with their
    items' conditions (label / caption), through the same dataset code the trainer uses."""
    from .data import make_dataset

    dataset = make_dataset(ref, size)
    count = min(n or MAX_DEFAULT_REFERENCE, len(dataset))
    items = [dataset[i] for i in range(count)]
    images = to_uint8(torch.stack([it["image"] for it in items]))  # [N, H, W, C]
    return images, [{k: v for k, v in it.items() if k != "image"} for it in items]


def fid_run(pipe: Pipeline, ref: str, settings: SampleSettings, *, n: Optional[int] = None, seed_base: int = 0,
            batch_size: int = 32, n_boot: int = 200, callback: Optional[Callable[[StepInfo], None]] = None) -> Any:
    """FID/KID/precision-recall of ``n`` images from ``pipe`` against dataset ``ref`` at the model's size.

    Image i is conditioned like reference image i (its class label or caption), so generated and
    reference sets have the same condition mix; image i uses seed ``seed_base + i``.
    """
    from .fid import fid_against_reference

    cfg = pipe.model.cfg
    reference, conditions = reference_set(ref, cfg.image_size, n)
    if reference.shape[-1] != cfg.channels:
        raise ValueError(f"reference {ref!r} has {reference.shape[-1]} channels but model {pipe.name} makes {cfg.channels}")
    seeds = [seed_base + i for i in range(len(reference))]
    labels = [c["label"] for c in conditions] if cfg.conditioning == "class" else None
    prompts = [c["caption"] for c in conditions] if cfg.conditioning == "text" else None
    if (cfg.conditioning == "class" and None in labels) or (cfg.conditioning == "text" and None in prompts):
        raise ValueError(f"reference {ref!r} lacks the {'labels' if labels else 'captions'} that model {pipe.name} is conditioned on")
    generated = pipe.generate_batch(seeds, prompts=prompts, class_labels=labels, settings=settings, batch_size=batch_size,
                                    callback=callback)
    images = np.stack([np.asarray(g.image)[..., None] if g.image.mode == "L" else np.asarray(g.image) for g in generated])
    return fid_against_reference(images, f"{ref.replace(':', '_').replace('/', '_')}-{cfg.image_size}", reference, n_boot=n_boot)


def fid_of_folder(folder: Path, ref: str, *, n_boot: int = 200) -> Any:
    """FID/KID/precision-recall of the images in ``folder`` (any tool's; resized like the reference by the
    feature network's single resize path) against all of dataset ``ref`` at the images' size."""
    from .fid import fid_against_reference

    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if Path(folder).is_dir() else []
    if not paths:
        raise ValueError(f"no images (png, jpg, webp, bmp) in {folder}")
    arrays = []
    for p in paths:
        try:
            with Image.open(p) as im:
                arrays.append(np.asarray(im.convert("RGB")))
        except OSError as e:
            raise ValueError(f"cannot read image {p}: {e}") from None
    sizes = {a.shape for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"images in {folder} have different sizes {sorted(sizes)}; FID needs one size")
    images = np.stack(arrays)
    reference, _ = reference_set(ref, images.shape[1])  # grayscale references are replicated to RGB by the network
    return fid_against_reference(images, f"{ref.replace(':', '_').replace('/', '_')}-{images.shape[1]}", reference, n_boot=n_boot)
