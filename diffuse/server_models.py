"""The request and response models of :mod:`diffuse.server`'s HTTP API (pydantic), and their checks.

A job request is one object per job kind, told apart by ``kind`` (:data:`JobRequest`). Pydantic checks
types and ranges; ``params()`` then checks the request against the loaded model (prompt vocabulary,
sizes, uploads, through :mod:`diffuse.edit`'s own checks) and raises :class:`FieldError` naming the
field, which the server answers with 422 (413 for an upload over the byte limit).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Annotated, Any, Iterator, Literal, Optional, Union

from PIL import Image
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from . import edit
from .jobs import EditParams, GenerateParams, Upload, UploadTooLarge
from .pipeline import Pipeline, SampleSettings
from .samplers import SAMPLERS
from .schedules import SCHEDULES

MAX_PROMPT = 1000
MAX_SIZE = 1024
MAX_REGIONS = 16
MAX_UPLOAD_BYTES = 4 << 20
MAX_UPLOAD_PIXELS = 2048 * 2048

SamplerName = Literal[tuple(SAMPLERS)]  # type: ignore[valid-type]
ScheduleName = Literal[tuple(SCHEDULES)]  # type: ignore[valid-type]


class FieldError(ValueError):
    """A request value the model cannot use: answered with 422 (413 for an upload over the byte limit) naming ``field``."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(message)
        self.field, self.status = field, status


@contextlib.contextmanager
def field_errors(field: str) -> Iterator[None]:
    """Turn the ValueError of a check (the library's own message) into a FieldError naming ``field``."""
    try:
        yield
    except UploadTooLarge as e:
        raise FieldError(field, str(e), 413) from None
    except ValueError as e:  # a LayoutError knows its field
        raise FieldError(getattr(e, "field", field), str(e)) from None


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask of this server: images per job, and bytes and pixels per uploaded file."""

    max_batch: int = 8
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_upload_pixels: int = MAX_UPLOAD_PIXELS


class JobFields(BaseModel):
    """The fields every job kind takes; omitted ones take the model's sampling defaults."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = Field(None, description="a loaded model's name (GET /v1/models); default: the first")
    prompt: Optional[str] = Field(None, max_length=MAX_PROMPT, description="what to draw (text models)")
    negative_prompt: Optional[str] = Field(None, max_length=MAX_PROMPT, description="what guidance steers away from")
    class_label: Optional[int] = Field(None, ge=0, description="class label (class-conditional models)")
    seed: int = Field(0, ge=0, lt=2 ** 63, description="seed of the first image; image i uses seed + i")
    batch: int = Field(1, ge=1, le=64, description="number of images")
    sampler: Optional[SamplerName] = None  # type: ignore[valid-type]
    steps: Optional[int] = Field(None, ge=1, le=1000)
    schedule: Optional[ScheduleName] = None  # type: ignore[valid-type]
    cfg: Optional[float] = Field(None, ge=0, le=50, description="classifier-free guidance scale (1 = off)")
    cfg_interval: Optional[Union[Literal["none"], tuple[float, float]]] = Field(
        None, union_mode="left_to_right", description="[lo, hi]: guide only where lo < sigma <= hi, skipping the unconditional branch elsewhere; "
                          "\"none\": guide every step; default: the model's")

    @field_validator("cfg_interval", mode="before")
    @classmethod
    def _interval(cls, value: Any) -> Any:
        """One clear message instead of one per union branch."""
        if value is None or value == "none":
            return value
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise ValueError('give [lo, hi] (two sigmas) or "none"')
        return tuple(float(v) for v in value)

    def checked(self, pipes: dict[str, Pipeline], limits: Limits) -> tuple[str, Pipeline, SampleSettings]:
        """(model name, pipeline, sampling settings), checked against the model (FieldError naming the field otherwise)."""
        name = self.model or next(iter(pipes))
        if name not in pipes:
            raise FieldError("model", f"no model {name!r} is loaded; loaded: {', '.join(pipes)}")
        pipe = pipes[name]
        if self.batch > limits.max_batch:
            raise FieldError("batch", f"batch {self.batch} is larger than this server's --max-batch {limits.max_batch}")
        if self.seed + self.batch > 2 ** 63:
            raise FieldError("seed", f"seed + batch must stay below 2**63, got {self.seed} + {self.batch}")
        conditioning = pipe.model.cfg.conditioning
        if conditioning == "text":
            if self.class_label is not None:
                raise FieldError("class_label", f"model {name} is text-conditional; give a prompt, not a class label")
            try:
                pipe.check_prompt(self.prompt, self.negative_prompt)
            except ValueError as e:
                raise FieldError("negative_prompt" if "negative" in str(e) else "prompt", str(e)) from None
        else:
            if self.prompt is not None or self.negative_prompt is not None:
                raise FieldError("prompt", f"model {name} is {conditioning}-conditional; it takes no prompt")
            if conditioning == "class" and (self.class_label is None or self.class_label >= pipe.model.cfg.num_classes):
                raise FieldError("class_label", f"model {name} needs a class_label in 0..{pipe.model.cfg.num_classes - 1}")
        given = {k: v for k, v in (("sampler", self.sampler), ("steps", self.steps), ("schedule", self.schedule),
                                   ("cfg", self.cfg)) if v is not None}
        if self.cfg_interval is not None:
            given["cfg_interval"] = None if self.cfg_interval == "none" else tuple(self.cfg_interval)
        with field_errors("cfg_interval" if "cfg_interval" in given else "cfg"):
            settings = dataclasses.replace(pipe.defaults, **given)
        if settings.cfg != 1 and conditioning == "none":
            raise FieldError("cfg", f"model {name} is unconditional; guidance needs cfg = 1")
        return name, pipe, settings


class GenerateRequest(JobFields):
    """A text-to-image (or class-to-image) job."""

    kind: Literal["generate"] = "generate"
    size: Optional[int] = Field(None, ge=1, le=MAX_SIZE, description="image width = height in pixels; default: native")
    regions: list[str] = Field(default_factory=list, max_length=MAX_REGIONS,
                               description="regional prompts, each X0,Y0,X1,Y1=PROMPT (a box in fractions of the canvas, "
                                           "0,0 the top left), e.g. 0,0,1,0.5=a red circle at the top")
    region_background: Optional[str] = Field(None, max_length=32, description="isolate the regions over this background "
                                             "color (black, #rrggbb or R,G,B); default: shared paths")
    plan_layout: Optional[bool] = Field(None, description="shapes models: lay the prompt out as isolated regions "
                                        "(two objects, a count, one object); default: the model's")

    def params(self, pipes: dict[str, Pipeline], limits: Limits) -> GenerateParams:
        name, pipe, settings = self.checked(pipes, limits)
        with field_errors("size"):
            size = pipe.check_size(self.size or pipe.model.cfg.image_size * pipe.codec.factor)
        with field_errors("regions"):  # a LayoutError names its own field
            pipe.layouts([self.prompt] * self.batch, range(self.seed, self.seed + self.batch), size, self.regions,
                         self.region_background, self.plan_layout, require_plan=True)
        return GenerateParams(name, self.prompt, self.negative_prompt, self.class_label, self.seed, self.batch, settings, size,
                              tuple(self.regions), self.region_background, self.plan_layout)


UPLOAD = "base64 of a PNG, JPEG or WebP file, bare or as a data URL (data:image/png;base64,...)"


class EditFields(JobFields):
    """The fields img2img and inpaint share: the input image (the result has its size)."""

    image: str = Field(description=f"the input image: {UPLOAD}; a size the model makes unless resize is true")
    resize: bool = Field(False, description="resample a square image of another size to the model's native size")

    def edit_params(self, pipes: dict[str, Pipeline], limits: Limits, strength: float) -> tuple[EditParams, Image.Image]:
        """The job's parameters and the decoded input, checked by diffuse.edit's own checks."""
        name, pipe, settings = self.checked(pipes, limits)
        with field_errors("strength"):
            edit.steps_for_strength(strength, settings.steps)
        with field_errors("image"):
            upload, image = Upload.decode(self.image, "image", max_bytes=limits.max_upload_bytes,
                                          max_pixels=limits.max_upload_pixels)
            edit.fit_input(pipe, image, self.resize)
        return EditParams(name, self.prompt, self.negative_prompt, self.class_label, self.seed, self.batch, settings, upload,
                          strength, self.resize), image


class Img2ImgRequest(EditFields):
    """SDEdit: the input noised to the sigma ``strength`` selects, then denoised (diffuse.edit.img2img)."""

    kind: Literal["img2img"]
    strength: float = Field(0.75, gt=0, le=1, description="fraction of the schedule to run; 1 redraws everything")

    def params(self, pipes: dict[str, Pipeline], limits: Limits) -> EditParams:
        return self.edit_params(pipes, limits, self.strength)[0]


class InpaintRequest(EditFields):
    """Replace the mask's white region and keep the rest exactly (diffuse.edit.inpaint)."""

    kind: Literal["inpaint"]
    mask: str = Field(description=f"the mask, of the image's size: {UPLOAD}; white = replace, black = keep")
    strength: float = Field(1.0, gt=0, le=1, description="fraction of the schedule to run (1: the replaced region from noise)")
    feather: int = Field(0, ge=0, le=128, description="soften the mask edge inward over this many pixels")
    jumps: int = Field(0, ge=0, le=20, description="RePaint resampling: rerun each block of steps this many more times")
    jump_length: int = Field(10, ge=1, le=1000, description="RePaint block length in steps")
    binarize: bool = Field(False, description="threshold a mask with gray pixels at 50% (otherwise an error)")

    def params(self, pipes: dict[str, Pipeline], limits: Limits) -> EditParams:
        params, image = self.edit_params(pipes, limits, self.strength)
        with field_errors("mask"):
            mask, mask_image = Upload.decode(self.mask, "mask", max_bytes=limits.max_upload_bytes,
                                             max_pixels=limits.max_upload_pixels)
            edit.read_mask(mask_image, image.size, binarize=self.binarize)
        return dataclasses.replace(params, mask=mask, binarize=self.binarize, feather=self.feather, jumps=self.jumps,
                                   jump_length=self.jump_length)


def _kind_of(body: Any) -> Any:
    return body.get("kind", "generate") if isinstance(body, dict) else getattr(body, "kind", None)


JobRequest = Annotated[Union[Annotated[GenerateRequest, Tag("generate")], Annotated[Img2ImgRequest, Tag("img2img")],
                             Annotated[InpaintRequest, Tag("inpaint")]], Discriminator(_kind_of)]


class JobCreated(BaseModel):
    id: str
    status: str


class Progress(BaseModel):
    step: int = Field(description="solver steps done in the running batch")
    steps: int = Field(description="solver steps of the batch (0 until it starts)")
    nfe: int = Field(description="denoiser evaluations so far")
    eta_s: Optional[float] = Field(description="estimated seconds left while running")


class ImageOut(BaseModel):
    url: str
    seed: int
    record: dict[str, Any] = Field(description="the generation record the PNG carries")


class JobOut(BaseModel):
    id: str
    kind: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    params: dict[str, Any]
    progress: Progress
    queue_position: Optional[int] = Field(description="jobs ahead of this one while queued")
    error: Optional[str]
    images: list[ImageOut]
    created: float
    started: Optional[float]
    finished: Optional[float]


class ModelOut(BaseModel):
    name: str
    model_hash: str
    conditioning: str
    image_size: int = Field(description="native width = height in pixels")
    size_multiple: Optional[int] = Field(description="other sizes must be multiples of this (None: native only)")
    num_classes: int
    vocabulary: list[str]
    defaults: dict[str, Any]
    plan_layout: bool = Field(description="whether generate jobs plan the layout when the request does not say")


class ModelsOut(BaseModel):
    models: list[ModelOut]
    samplers: list[str]
    schedules: list[str]
    max_batch: int


class Error(BaseModel):
    detail: str


def params_json(params: Any) -> dict[str, Any]:
    """A job's parameters as JSON: the settings inline, uploads as their summary (never their bytes)."""
    d = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
    d.update(dataclasses.asdict(d.pop("settings")))
    return {k: v.summary() if isinstance(v, Upload) else v for k, v in d.items()}
