"""The server's job queue: a bounded queue of jobs and one worker thread that runs them on the model.

A job kind is one function ``run(pipe, jobs, callback) -> list[list[Generated]]`` (one result list
per job) registered with :func:`kind`: ``generate``, ``img2img`` and ``inpaint`` (the last two call
:mod:`diffuse.edit` on an :class:`Upload`). The worker batches queued jobs of the same kind, model and
``params.batch_key()`` into one call (for edits: the same input image, mask and settings, any seeds).
Cancelling a job sets a flag that the sampler callback checks after every solver step (edits pass
the same callback through :func:`diffuse.edit.sample_from`); when every job of the running batch is
cancelled the callback raises :class:`Cancelled`, which is safe because samplers never change their
input in place.
After a step the callback also renders each job's first image's denoised estimate as a preview,
decoded through the model's codec (pixels at the result's size), within a share of the batch's time.
Finished jobs are kept up to ``keep`` of them (oldest evicted first), so memory stays bounded.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import io
import json
import math
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional, Protocol, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from . import edit
from .codec import Codec
from .pipeline import Generated, Pipeline, SampleSettings
from .plot import to_uint8
from .record import png_info
from .steps import StepInfo

FINAL = ("done", "failed", "cancelled")
# The share of a batch's time that decoding previews may take. A latent model's preview is a VAE decode: for the
# latent-shapes-t2i preset (64x64 from 16x16x4 latents) about 0.3 s per image against 0.8 s per denoiser call on
# one CPU thread, so decoding every step would add ~35%; capped, previews come every few steps instead.
PREVIEW_SHARE = 0.1


class Params(Protocol):
    model: str
    images: int

    def batch_key(self) -> Hashable: ...


class Cancelled(Exception):
    """Raised from the sampler callback when every job of the running batch is cancelled."""


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Job:
    id: str
    kind: str
    params: Any
    created: float = field(default_factory=time.time)
    status: str = "queued"
    step: int = 0
    steps: int = 0
    nfe: int = 0
    started: Optional[float] = None
    finished: Optional[float] = None
    eta_s: Optional[float] = None
    error: Optional[str] = None
    records: list[dict[str, Any]] = field(default_factory=list)  # one generation record per result image
    pngs: list[bytes] = field(default_factory=list)  # the result images as PNG files with their records
    preview: Optional[str] = None  # base64 PNG of the latest denoised estimate of the job's first image
    version: int = 0  # bumped on every change (the event stream watches it)
    cancel_requested: bool = False


Runner = Callable[[Pipeline, Sequence[Job], Callable[[StepInfo], None]], list[list[Generated]]]
KINDS: dict[str, Runner] = {}


def kind(name: str) -> Callable[[Runner], Runner]:
    """Register a job kind's runner under ``name``."""
    def register(fn: Runner) -> Runner:
        KINDS[name] = fn
        return fn
    return register


def settings_key(s: SampleSettings) -> Hashable:
    """The sampling settings as a hashable key: jobs share a batch only when these are equal."""
    return (s.sampler, s.steps, s.schedule, s.cfg, s.cfg_rescale, s.cfg_interval, tuple(sorted(s.sampler_options.items())),
            s.eps_scaling, s.eps_scaling_k, s.dcw)


@dataclass(frozen=True)
class JobParams:
    """What every job kind has: ``images`` seeds starting at ``seed``, the conditioning and the sampling settings."""

    model: str
    prompt: Optional[str]
    negative_prompt: Optional[str]
    class_label: Optional[int]
    seed: int
    images: int
    settings: SampleSettings


@dataclass(frozen=True)
class GenerateParams(JobParams):
    """A text-to-image (or class-to-image) job."""

    size: int
    regions: tuple[str, ...] = ()  # X0,Y0,X1,Y1=PROMPT, checked by Pipeline.layouts
    region_background: Optional[str] = None
    plan_layout: Optional[bool] = None  # None: the model's default

    def batch_key(self) -> Hashable:
        return (settings_key(self.settings), self.size, self.negative_prompt, self.regions, self.region_background,
                self.plan_layout)


UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")


class UploadTooLarge(ValueError):
    """An upload over the server's byte limit (answered with 413)."""


@dataclass(frozen=True)
class Upload:
    """An uploaded image file, kept as its bytes (within the server's limits) until its job runs."""

    data: bytes = field(repr=False)
    sha256: str  # first 10 hex digits, as record.file_hash gives for files
    width: int
    height: int
    format: str

    @classmethod
    def decode(cls, text: str, what: str, *, max_bytes: int, max_pixels: int) -> tuple["Upload", Image.Image]:
        """A base64 image (bare, or a ``data:image/...;base64,`` URL) and its decoded image. The pixel
        count is checked from the file's header before any pixel is decoded (decompression bombs)."""
        if text.startswith("data:"):
            head, comma, text = text.partition(",")
            if not comma or not head.endswith(";base64"):
                raise ValueError(f"the {what} is a data URL without base64 data; send data:image/png;base64,...")
        try:
            data = base64.b64decode("".join(text.split()), validate=True)
        except binascii.Error:
            raise ValueError(f"the {what} is not valid base64; send the file's bytes base64-encoded (or as a data: URL)") from None
        if len(data) > max_bytes:
            raise UploadTooLarge(f"the {what} is {len(data)} bytes, over this server's limit of {max_bytes} bytes "
                                 f"(--max-upload-mb); send a smaller file")
        too_many = f"more than this server's limit of {max_pixels} pixels (--max-upload-pixels); shrink it first"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
            if im.width * im.height > max_pixels:
                raise ValueError(f"the {what} is {im.width}x{im.height} ({im.width * im.height} pixels), {too_many}")
            im.load()
        except UnidentifiedImageError:
            raise ValueError(f"the {what} is not a PNG, JPEG or WebP image; upload one of those") from None
        except Image.DecompressionBombError:
            raise ValueError(f"the {what} has {too_many}") from None
        except (OSError, SyntaxError) as e:
            raise ValueError(f"cannot decode the {what}: {e}") from None
        image_record(im, what)
        return cls(data, hashlib.sha256(data).hexdigest()[:10], im.width, im.height, im.format), im

    def open(self) -> Image.Image:
        im = Image.open(io.BytesIO(self.data), formats=UPLOAD_FORMATS)
        im.load()
        return im

    def summary(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "bytes": len(self.data), "width": self.width, "height": self.height, "format": self.format}


def image_record(im: Image.Image, what: str) -> Optional[dict[str, Any]]:
    """The diffuse record an uploaded PNG carries (None when it has none)."""
    text = im.text.get("diffuse") if isinstance(getattr(im, "text", None), dict) else None
    try:
        return None if text is None else json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"the {what}'s 'diffuse' text chunk is not valid JSON; save the image without it") from None


@dataclass(frozen=True)
class EditParams(JobParams):
    """An img2img or inpaint job (see :mod:`diffuse.edit`) on one uploaded image."""

    image: Upload
    strength: float
    resize: bool
    mask: Optional[Upload] = None  # inpaint: white = replace, black = keep
    binarize: bool = False
    feather: int = 0
    jumps: int = 0
    jump_length: int = 10

    def batch_key(self) -> Hashable:
        return (settings_key(self.settings), self.prompt, self.negative_prompt, self.class_label, self.image.sha256,
                self.mask.sha256 if self.mask else None, self.strength, self.resize, self.binarize, self.feather, self.jumps,
                self.jump_length)


def _seeds(jobs: Sequence[Job]) -> list[int]:
    return [s for job in jobs for s in range(job.params.seed, job.params.seed + job.params.images)]


def _split(jobs: Sequence[Job], out: list[Generated]) -> list[list[Generated]]:
    """One result list per job, from the batch's results in job order."""
    split, start = [], 0
    for job in jobs:
        split.append(out[start:start + job.params.images])
        start += job.params.images
    return split


@kind("generate")
def run_generate(pipe: Pipeline, jobs: Sequence[Job], callback: Callable[[StepInfo], None]) -> list[list[Generated]]:
    seeds = _seeds(jobs)
    prompts = [job.params.prompt for job in jobs for _ in range(job.params.images)]
    labels = [job.params.class_label for job in jobs for _ in range(job.params.images)]
    first: GenerateParams = jobs[0].params
    out = pipe.generate_batch(seeds, prompts=None if prompts[0] is None else prompts, negative=first.negative_prompt,
                              class_labels=None if labels[0] is None else labels, settings=first.settings,
                              size=first.size, batch_size=len(seeds), callback=callback, regions=first.regions,
                              region_background=first.region_background, plan_layout=first.plan_layout)
    return _split(jobs, out)


def _edit_options(jobs: Sequence[Job], callback: Callable[[StepInfo], None]) -> dict[str, Any]:
    """The options img2img and inpaint share, for the batch's seeds in one call."""
    p: EditParams = jobs[0].params
    seeds = _seeds(jobs)
    return dict(negative=p.negative_prompt, class_label=p.class_label, seeds=seeds, settings=p.settings,
                strength=p.strength, resize=p.resize, batch_size=len(seeds), callback=callback)


def _edit_results(jobs: Sequence[Job], image: Image.Image, out: list[Generated]) -> list[list[Generated]]:
    """The edit's results per job; their records name the uploads by hash (the server keeps no file names)
    and carry the input image's own record, so an image's history survives the edit."""
    p: EditParams = jobs[0].params
    for g in out:
        g.record["input_image"].update(sha256=p.image.sha256, format=p.image.format)
        g.record["input_record"] = image_record(image, "image")
        if p.mask is not None:
            g.record["mask"]["sha256"] = p.mask.sha256
    return _split(jobs, out)


@kind("img2img")
def run_img2img(pipe: Pipeline, jobs: Sequence[Job], callback: Callable[[StepInfo], None]) -> list[list[Generated]]:
    p: EditParams = jobs[0].params
    image = p.image.open()
    return _edit_results(jobs, image, edit.img2img(pipe, image, p.prompt, **_edit_options(jobs, callback)))


@kind("inpaint")
def run_inpaint(pipe: Pipeline, jobs: Sequence[Job], callback: Callable[[StepInfo], None]) -> list[list[Generated]]:
    p: EditParams = jobs[0].params
    image = p.image.open()
    out = edit.inpaint(pipe, image, p.mask.open(), p.prompt, feather_px=p.feather, binarize=p.binarize, jumps=p.jumps,
                       jump_length=p.jump_length, **_edit_options(jobs, callback))
    return _edit_results(jobs, image, out)


def png_bytes(g: Generated) -> bytes:
    """The image as PNG bytes with its two record chunks (the same file `diffuse generate` writes)."""
    buf = io.BytesIO()
    g.image.save(buf, format="PNG", pnginfo=png_info(g.record))
    return buf.getvalue()


def preview_pngs(codec: Codec, denoised: torch.Tensor) -> list[str]:
    """Base64 PNGs of denoised estimates [B, C, h, w] in the model's space, decoded to pixels by its codec
    (a latent model's VAE), so a preview has the result's pixel size and colors."""
    pngs = []
    for arr in to_uint8(codec.decode(denoised)):
        buf = io.BytesIO()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
        pngs.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return pngs


class JobQueue:
    """At most ``max_queue`` queued jobs; one worker thread runs batches of up to ``max_batch`` images."""

    def __init__(self, pipes: dict[str, Pipeline], *, max_queue: int = 32, max_batch: int = 8, keep: int = 100,
                 on_result: Optional[Callable[[Job], None]] = None):
        if max_queue < 1 or max_batch < 1 or keep < 1:
            raise ValueError("--max-queue, --max-batch and --keep-jobs must be >= 1")
        self.pipes = pipes
        self.max_queue, self.max_batch, self.keep = max_queue, max_batch, keep
        self.on_result = on_result
        self.jobs: "collections.OrderedDict[str, Job]" = collections.OrderedDict()
        self.queue: collections.deque[Job] = collections.deque()
        self.lock = threading.Condition()
        self.thread: Optional[threading.Thread] = None
        self.stopping = False
        self.seconds_per_image = 1.0  # running mean of measured batch times for Retry-After; 1 s until the first batch

    # ------------------------------------------------ client side

    def submit(self, kind_name: str, params: Params) -> Job:
        if kind_name not in KINDS:
            raise ValueError(f"unknown job kind {kind_name!r}; known kinds: {', '.join(KINDS)}")
        with self.lock:
            if len(self.queue) >= self.max_queue:
                # a place frees up when the worker takes the next batch, i.e. when the running batch ends
                raise QueueFull(max(1, math.ceil(self.seconds_per_image * self.max_batch)))
            job = Job(uuid.uuid4().hex, kind_name, params)
            self.jobs[job.id] = job
            self.queue.append(job)
            self.lock.notify_all()
            return job

    def get(self, job_id: str) -> Optional[Job]:
        with self.lock:
            return self.jobs.get(job_id)

    def cancel(self, job_id: str) -> Optional[Job]:
        """Cancel a queued or running job (a finished job is left as it is)."""
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None or job.status in FINAL:
                return job
            job.cancel_requested = True
            if job in self.queue:
                self.queue.remove(job)
            self._finish(job, "cancelled")
            return job

    # ------------------------------------------------ worker side

    def start(self) -> None:
        self.stopping = False
        self.thread = threading.Thread(target=self._work, name="diffuse-worker", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            for job in list(self.queue):
                self._finish(job, "cancelled")
            self.queue.clear()
            for job in self.jobs.values():
                job.cancel_requested = True
            self.lock.notify_all()
        if self.thread is not None:
            self.thread.join()

    def _finish(self, job: Job, status: str, error: Optional[str] = None) -> None:
        """Mark a job finished (lock held) and evict the oldest finished jobs beyond ``keep``."""
        job.status, job.error, job.finished, job.eta_s = status, error, time.time(), None
        job.version += 1
        self.lock.notify_all()
        finished = [j for j in self.jobs.values() if j.status in FINAL]
        for old in finished[:max(0, len(finished) - self.keep)]:
            del self.jobs[old.id]

    def _next_batch(self) -> list[Job]:
        """The oldest queued job and the queued jobs that can share its call (lock held)."""
        head = self.queue.popleft()
        batch, total = [head], head.params.images
        key = (head.kind, head.params.model, head.params.batch_key())
        for job in list(self.queue):
            if total + job.params.images <= self.max_batch and (job.kind, job.params.model, job.params.batch_key()) == key:
                self.queue.remove(job)
                batch.append(job)
                total += job.params.images
        now = time.time()
        for job in batch:
            job.status, job.started = "running", now
            job.version += 1
        return batch

    def _work(self) -> None:
        while True:
            with self.lock:
                while not self.queue and not self.stopping:
                    self.lock.wait()
                if self.stopping:
                    return
                batch = self._next_batch()
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        pipe = self.pipes[batch[0].params.model]
        first = [sum(j.params.images for j in batch[:k]) for k in range(len(batch))]  # each job's first image in the batch
        start, preview_s = time.perf_counter(), 0.0

        def callback(info: StepInfo) -> None:
            nonlocal preview_s
            with self.lock:
                live = [k for k, job in enumerate(batch) if not job.cancel_requested]
            if not live:
                raise Cancelled()
            # previews (decoded outside the lock) take at most PREVIEW_SHARE of the batch's time; the first step's always
            previews: dict[int, str] = {}
            if preview_s <= PREVIEW_SHARE * (time.perf_counter() - start):
                t0 = time.perf_counter()
                previews = dict(zip(live, preview_pngs(pipe.codec, info.denoised[[first[k] for k in live]])))
                preview_s += time.perf_counter() - t0
            elapsed = time.perf_counter() - start
            with self.lock:
                for k, job in enumerate(batch):
                    if not job.cancel_requested:
                        job.step, job.steps, job.nfe = info.i + 1, info.n, info.nfe
                        job.eta_s = elapsed / (info.i + 1) * (info.n - info.i - 1)
                        job.preview = previews.get(k, job.preview)
                        job.version += 1
                self.lock.notify_all()

        try:
            results = KINDS[batch[0].kind](pipe, batch, callback)
        except Cancelled:
            return
        except Exception as e:  # a job's failure is reported on the job; the worker keeps serving
            with self.lock:
                for job in batch:
                    if job.status not in FINAL:
                        self._finish(job, "failed", f"{type(e).__name__}: {e}")
            return
        pngs = [[png_bytes(g) for g in r] for r in results]
        with self.lock:
            images = sum(len(r) for r in results)
            self.seconds_per_image = 0.5 * self.seconds_per_image + 0.5 * (time.perf_counter() - start) / max(1, images)
            for job, result, data in zip(batch, results, pngs):
                if job.status in FINAL:  # cancelled while its batch-mates ran on
                    continue
                job.records, job.pngs = [g.record for g in result], data
                job.step = job.steps
                self._finish(job, "done")
        if self.on_result is not None:
            for job in batch:
                if job.status == "done":
                    self.on_result(job)
