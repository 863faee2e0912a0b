"""Replay: regenerate an image from the generation record in its PNG and compare the pixels.

``diffuse replay IMAGE.png`` reads the ``diffuse`` JSON record (written by
:meth:`diffuse.pipeline.Pipeline.record`), loads the model it names and checks its hash,
rebuilds the sampling settings, checks that today's code gives the recorded sigmas,
regenerates the image from the recorded seed (with the recorded watermark setting) and
compares it with the file:

* on the same software (diffuse and torch versions, device type, CPU architecture) the
  image must come back bit for bit: every sampler, stochastic ones included, draws all its
  noise from the image's own seeded generator;
* elsewhere floating-point results may differ in the last bits, which sampling can
  amplify, so the image passes when the mean absolute pixel difference is at most
  ``tolerance`` (8-bit levels, default 1.0) and no more than 1% of values differ by more
  than 16 levels.

Records carry a ``kind`` ("generate" when absent). Each kind has a replayer in
:data:`REPLAYERS`; edits (img2img, inpainting) keep their input image's record under
``input_record`` and register their own replayer; a kind without one is a clear error.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image

from . import __version__
from .record import read_record

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


def replay_generate(path: Path, record: dict[str, Any], *, model: Optional[str] = None, device: str = "cpu",
                    tolerance: float = DEFAULT_TOLERANCE) -> ReplayReport:
    """Replay a text-to-image / class-conditional generation record."""
    from .pipeline import Pipeline, SampleSettings

    report = ReplayReport()
    try:
        pipe = Pipeline.load(model or record["model"], device=device)
    except FileNotFoundError as e:
        if model:
            raise
        raise FileNotFoundError(f"{e}; the record names model {record['model']!r} (hash {record['model_hash']}): "
                                f"give --model with its folder") from None
    if pipe.model_hash != record["model_hash"]:
        raise ValueError(f"the model {pipe.name} has hash {pipe.model_hash} but the image was made with {record['model_hash']}; "
                         f"give --model with the model folder the image was made with")
    report.add("model", True, f"{pipe.name}, hash {pipe.model_hash}")
    then, now = software_of(record), software_here(device)
    report.expect_exact = then == now
    differ = [f"{k} {then[k]} -> {now[k]}" for k in then if then[k] != now[k]]
    report.add("software", True, "same as the record (bit-exact expected)" if report.expect_exact else
               f"differs ({', '.join(differ)}); pixels are compared within a tolerance")
    interval = record.get("cfg_interval")
    settings = SampleSettings(sampler=record["sampler"], steps=record["steps"], schedule=record["schedule"], cfg=record["cfg"],
                              cfg_rescale=record.get("cfg_rescale", 0.0), cfg_interval=tuple(interval) if interval else None,
                              sampler_options=record.get("sampler_options") or {},
                              eps_scaling=record.get("eps_scaling", 1.0), eps_scaling_k=record.get("eps_scaling_k", 0.0),
                              dcw=record.get("dcw", 0.0))
    sigmas = settings.sigmas(pipe.model).tolist()
    same_sigmas = sigmas == record["sigmas"]
    worst = max((abs(a - b) for a, b in zip(sigmas, record["sigmas"])), default=float("inf")) if len(sigmas) == len(record["sigmas"]) else None
    report.add("sigmas", same_sigmas, f"{len(sigmas)} values, identical" if same_sigmas else
               f"today's {settings.schedule} schedule differs from the record's " +
               (f"(largest difference {worst:.3g})" if worst is not None else f"({len(sigmas)} vs {len(record['sigmas'])} values)"))
    report.add("settings", True, f"{settings.sampler}, {settings.steps} steps, {settings.schedule}, cfg {settings.cfg:g}, "
                                 f"seed {record['seed']}, {record['width']}x{record['height']}")
    watermark = record.get("watermark") or {}
    pipe.watermark = bool(watermark.get("applied", False))
    prompt, label = record.get("prompt"), record.get("class_label")
    [regenerated] = pipe.generate_batch([record["seed"]], prompts=None if prompt is None else [prompt],
                                        negative=record.get("negative_prompt"),
                                        class_labels=None if label is None else [label], settings=settings,
                                        size=record["width"])
    with Image.open(path) as im:
        expected = np.asarray(im.convert(regenerated.image.mode))
    compare_pixels(expected, np.asarray(regenerated.image), report, tolerance)
    return report


REPLAYERS: dict[str, Callable[..., ReplayReport]] = {"generate": replay_generate}


def replay(path: str | Path, *, model: Optional[str] = None, device: str = "cpu",
           tolerance: float = DEFAULT_TOLERANCE) -> ReplayReport:
    """Regenerate ``path`` from its record and compare; ValueError when it cannot be replayed."""
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
    if kind not in REPLAYERS:
        raise ValueError(f"{path} is a {kind!r} record, which this version cannot replay yet; it replays: {', '.join(REPLAYERS)}")
    return REPLAYERS[kind](path, record, model=model, device=device, tolerance=tolerance)
