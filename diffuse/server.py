"""``diffuse serve``: an HTTP job API (FastAPI) and a web page; no diffusion logic here.

Routes (every route but the page ``/`` needs ``Authorization: Bearer TOKEN`` when the server has a token;
``/docs`` and ``/openapi.json`` also take it from the ``diffuse_token`` cookie that the page sets, so a
browser can open them):

* ``POST /v1/jobs``: queue a job (JSON; ``kind`` is ``generate`` (default), ``img2img`` or ``inpaint``; every
  field but the prompt or class label and the edit's images is optional); 202 ``{"id"}``, 429 with
  ``Retry-After`` when ``max_queue`` jobs are waiting, 422 naming the bad field. Edit images travel in
  the JSON as base64 (a data URL or bare); an upload over the byte limit gets 413, over the pixel
  limit 422 (checked from the file header, before decoding).
* ``GET /v1/jobs/{id}``: status (queued, running, done, failed, cancelled), progress (step, NFE, ETA), results.
* ``GET /v1/jobs/{id}/events``: server-sent events, one per change, with a small preview PNG (base64).
* ``DELETE /v1/jobs/{id}``: cancel; a running job stops after the current solver step.
* ``GET /v1/jobs/{id}/images/{n}.png``: result n, a PNG with the generation record (names are the server's).
* ``GET /v1/models``: the loaded models, their sampling defaults, samplers and schedules.
* ``GET /docs``, ``GET /openapi.json``: the interactive API documentation and its schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import math
import secrets
import sys
import urllib.parse
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Optional, Union

from fastapi import Depends, FastAPI, HTTPException, Path as PathParam, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from . import edit
from .jobs import FINAL, KINDS, EditParams, GenerateParams, Job, JobQueue, QueueFull, Upload, UploadTooLarge
from .pipeline import Pipeline, SampleSettings
from .samplers import SAMPLERS
from .schedules import SCHEDULES

JOB_ID = r"^[0-9a-f]{32}$"
MAX_PROMPT = 1000
MAX_SIZE = 1024
MAX_UPLOAD_BYTES = 4 << 20
MAX_UPLOAD_PIXELS = 2048 * 2048
TOKEN_COOKIE = "diffuse_token"

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
    except ValueError as e:
        raise FieldError(field, str(e)) from None


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
        settings = dataclasses.replace(pipe.defaults, **given)
        if settings.cfg != 1 and conditioning == "none":
            raise FieldError("cfg", f"model {name} is unconditional; guidance needs cfg = 1")
        return name, pipe, settings


class GenerateRequest(JobFields):
    """A text-to-image (or class-to-image) job."""

    kind: Literal["generate"] = "generate"
    size: Optional[int] = Field(None, ge=1, le=MAX_SIZE, description="image width = height in pixels; default: native")

    def params(self, pipes: dict[str, Pipeline], limits: Limits) -> GenerateParams:
        name, pipe, settings = self.checked(pipes, limits)
        with field_errors("size"):
            size = pipe.check_size(self.size or pipe.model.cfg.image_size * pipe.codec.factor)
        return GenerateParams(name, self.prompt, self.negative_prompt, self.class_label, self.seed, self.batch, settings, size)


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
            edit._fit(pipe, edit.read_image(image, pipe.codec.image_channels), self.resize)
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


class ModelsOut(BaseModel):
    models: list[ModelOut]
    samplers: list[str]
    schedules: list[str]
    max_batch: int


class Error(BaseModel):
    detail: str


def _params_json(params: Any) -> dict[str, Any]:
    """A job's parameters as JSON: the settings inline, uploads as their summary (never their bytes)."""
    d = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
    d.update(dataclasses.asdict(d.pop("settings")))
    return {k: v.summary() if isinstance(v, Upload) else v for k, v in d.items()}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(pipes: dict[str, Pipeline], *, max_queue: int = 32, max_batch: int = 8, keep_jobs: int = 100,
               token: Optional[str] = None, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               max_upload_pixels: int = MAX_UPLOAD_PIXELS, max_body: Optional[int] = None,
               out: Optional[Path] = None) -> FastAPI:
    """The FastAPI app over loaded pipelines; its worker thread runs while the app's lifespan does.

    ``max_body`` (bytes) defaults to room for two uploads (image and mask, base64) plus 1 MB of other fields.
    """
    if not pipes:
        raise ValueError("give at least one model")
    if max_upload_bytes < 1 or max_upload_pixels < 1:
        raise ValueError("--max-upload-mb and --max-upload-pixels must be > 0")
    limits = Limits(max_batch, max_upload_bytes, max_upload_pixels)
    if max_body is None:
        max_body = 2 * 4 * math.ceil(max_upload_bytes / 3) + (1 << 20)

    def save(job: Job) -> None:
        for i, data in enumerate(job.pngs):
            (out / f"{job.id}-{i}.png").write_bytes(data)

    queue = JobQueue(pipes, max_queue=max_queue, max_batch=max_batch, keep=keep_jobs, on_result=save if out else None)

    async def lifespan(app: FastAPI):
        queue.start()
        yield
        queue.stop()

    # the docs and schema routes are ours (below), so that they check the token like every other route
    app = FastAPI(title="diffuse", version="1", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  description="Queue image-generation and editing jobs (generate, img2img, inpaint), follow their "
                              "progress, fetch their images.")
    app.state.queue = queue
    bearer = HTTPBearer(auto_error=False)

    def check_token(given: Optional[str]) -> None:
        if token is not None and (given is None or not secrets.compare_digest(given.encode(), token.encode())):
            raise HTTPException(401, "missing or wrong token; send the header 'Authorization: Bearer TOKEN'",
                                headers={"WWW-Authenticate": "Bearer"})

    def authorized(creds: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        check_token(creds.credentials if creds else None)

    def authorized_docs(request: Request, creds: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        """The header, or the page's SameSite=Strict cookie (read-only routes only, so it cannot submit jobs)."""
        cookie = request.cookies.get(TOKEN_COOKIE)
        check_token(creds.credentials if creds else None if cookie is None else urllib.parse.unquote(cookie))

    auth = [Depends(authorized)]
    unauthorized = {401: {"model": Error, "description": "missing or wrong bearer token (servers started with --token)"}}
    not_found = {404: {"model": Error, "description": "no such job (or it was evicted)"}}

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return JSONResponse({"detail": "send a Content-Length header"}, status_code=411)
            if int(length) > max_body:
                return JSONResponse({"detail": f"request body of {length} bytes is over the limit of {max_body}"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        detail = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            if loc[:1] == ["body"] and loc[1:2] and loc[1] in KINDS:  # the job kind's tag in the union
                loc = ["body"] + loc[2:]
            msg = err["msg"]
            if err["type"] == "union_tag_invalid":
                loc, msg = ["body", "kind"], f"unknown job kind {err['ctx']['tag']!r}; known kinds: {', '.join(KINDS)}"
            elif err["type"] == "union_tag_not_found":
                msg = "send a JSON object, e.g. {\"prompt\": \"a red circle\"}"
            field = ".".join(loc[1:] if loc[:1] == ["body"] else loc) or "body"
            detail.append({"loc": loc, "msg": f"{field}: {msg}", "type": err["type"]})
        return JSONResponse({"detail": detail}, status_code=422)

    def job_or_404(job_id: str) -> Job:
        job = queue.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}; finished jobs are kept until {keep_jobs} newer ones finish")
        return job

    def job_out(job: Job) -> JobOut:
        with queue.lock:
            position = next((i for i, j in enumerate(queue.queue) if j is job), None)
            return JobOut(
                id=job.id, kind=job.kind, status=job.status, params=_params_json(job.params),
                progress=Progress(step=job.step, steps=job.steps, nfe=job.nfe, eta_s=job.eta_s),
                queue_position=position, error=job.error, created=job.created, started=job.started, finished=job.finished,
                images=[ImageOut(url=f"/v1/jobs/{job.id}/images/{i}.png", seed=r["seed"], record=r)
                        for i, r in enumerate(job.records)])

    job_id_param = PathParam(pattern=JOB_ID, description="a job id from POST /v1/jobs")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(resources.files("diffuse").joinpath("web/index.html").read_text(encoding="utf-8"))

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(authorized_docs)])
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=[Depends(authorized_docs)])
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="diffuse API")

    @app.post("/v1/jobs", status_code=202, response_model=JobCreated, dependencies=auth,
              responses={**unauthorized, 411: {"model": Error},
                         413: {"model": Error, "description": "the body, or an upload (named), is over the server's limit"},
                         429: {"model": Error, "description": "the queue is full; retry after the Retry-After header's seconds"}})
    def create_job(request: JobRequest) -> JobCreated:
        try:
            params = request.params(pipes, limits)
        except FieldError as e:
            if e.status == 413:
                return JSONResponse({"detail": f"{e.field}: {e}"}, status_code=413)
            return JSONResponse({"detail": [{"loc": ["body", e.field], "msg": f"{e.field}: {e}", "type": "value_error"}]},
                                status_code=422)
        try:
            job = queue.submit(request.kind, params)
        except QueueFull as e:
            return JSONResponse({"detail": str(e)}, status_code=429, headers={"Retry-After": str(e.retry_after)})
        return JobCreated(id=job.id, status=job.status)

    @app.get("/v1/jobs/{job_id}", response_model=JobOut, dependencies=auth, responses={**unauthorized, **not_found})
    def get_job(job_id: str = job_id_param) -> JobOut:
        return job_out(job_or_404(job_id))

    @app.delete("/v1/jobs/{job_id}", response_model=JobOut, dependencies=auth, responses={**unauthorized, **not_found})
    def cancel_job(job_id: str = job_id_param) -> JobOut:
        job_or_404(job_id)
        return job_out(queue.cancel(job_id))

    @app.get("/v1/jobs/{job_id}/events", dependencies=auth, responses={
        **unauthorized, **not_found,
        200: {"content": {"text/event-stream": {}}, "description": "server-sent events: `progress` (the job as in "
              "GET /v1/jobs/{id}, plus `preview`, a base64 PNG of the current denoised estimate), then one final "
              "`done`, `failed` or `cancelled` event"}})
    async def job_events(job_id: str = job_id_param) -> StreamingResponse:
        job_or_404(job_id)

        async def stream():
            seen = -1
            while True:
                job = queue.get(job_id)
                if job is None:
                    yield "event: gone\ndata: {}\n\n"
                    return
                if job.version != seen:
                    seen = job.version
                    data = job_out(job).model_dump()
                    data["preview"] = job.preview
                    name = job.status if job.status in FINAL else "progress"
                    yield f"event: {name}\ndata: {json.dumps(data)}\n\n"
                    if job.status in FINAL:
                        return
                await asyncio.sleep(0.1)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/jobs/{job_id}/images/{index}.png", dependencies=auth, response_class=Response,
             responses={**unauthorized, 404: {"model": Error, "description": "no such job or image"},
                        200: {"content": {"image/png": {}}, "description": "PNG with `parameters` and `diffuse` text chunks"}})
    def job_image(job_id: str = job_id_param, index: int = PathParam(ge=0)) -> Response:
        job = job_or_404(job_id)
        if index >= len(job.pngs):
            raise HTTPException(404, f"job {job_id} has {len(job.pngs)} images (status {job.status})")
        return Response(job.pngs[index], media_type="image/png",
                        headers={"Content-Disposition": f'inline; filename="{job_id}-{index}.png"'})

    @app.get("/v1/models", response_model=ModelsOut, dependencies=auth, responses=unauthorized)
    def models() -> ModelsOut:
        out_models = []
        for name, pipe in pipes.items():
            m = pipe.model
            vocab = list(m.text_encoder.tokenizer.vocab) if m.cfg.conditioning == "text" and hasattr(m.text_encoder, "tokenizer") else []
            out_models.append(ModelOut(name=name, model_hash=pipe.model_hash, conditioning=m.cfg.conditioning,
                                       image_size=m.cfg.image_size * pipe.codec.factor,
                                       size_multiple=m.size_factor() * pipe.codec.factor if m.size_factor() else None,
                                       num_classes=m.cfg.num_classes if m.cfg.conditioning == "class" else 0,
                                       vocabulary=vocab, defaults=dataclasses.asdict(pipe.defaults)))
        return ModelsOut(models=out_models, samplers=list(SAMPLERS), schedules=list(SCHEDULES), max_batch=max_batch)

    return app


def serve(models: list[str], *, host: str = "127.0.0.1", port: int = 7860, max_queue: int = 32, max_batch: int = 8,
          keep_jobs: int = 100, token: Optional[str] = None, max_upload_mb: float = MAX_UPLOAD_BYTES / 2 ** 20,
          max_upload_pixels: int = MAX_UPLOAD_PIXELS, out: Optional[Path] = None, device: str = "cpu") -> None:
    """Load the models and serve until interrupted."""
    import uvicorn

    if not 0 < port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    if token is not None and len(token) < 8:
        raise ValueError("--token must be at least 8 characters")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    pipes: dict[str, Pipeline] = {}
    for name in models:
        pipe = Pipeline.load(name, device=device)
        if pipe.name in pipes:
            raise ValueError(f"two models are named {pipe.name!r}; give each model once")
        pipes[pipe.name] = pipe
    app = create_app(pipes, max_queue=max_queue, max_batch=max_batch, keep_jobs=keep_jobs, token=token, out=out,
                     max_upload_bytes=int(max_upload_mb * 2 ** 20), max_upload_pixels=max_upload_pixels)
    if not is_loopback(host) and token is None:
        print(f"warning: listening on {host}, reachable from other machines, without --token: anyone who can reach "
              f"this port can use the server; pass --token SECRET or --host 127.0.0.1", file=sys.stderr)
    print(f"serving {', '.join(pipes)} on http://{host}:{port}/ (API docs at /docs)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
