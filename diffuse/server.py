"""``diffuse serve``: an HTTP job API (FastAPI) and a web page; no diffusion logic here.

Routes (every route but the page ``/`` needs ``Authorization: Bearer TOKEN`` when the server has a token):

* ``POST /v1/jobs``: queue a job (JSON; every field but the prompt or class label is optional); 202 ``{"id"}``,
  429 with ``Retry-After`` when ``max_queue`` jobs are waiting, 422 naming the bad field.
* ``GET /v1/jobs/{id}``: status (queued, running, done, failed, cancelled), progress (step, NFE, ETA), results.
* ``GET /v1/jobs/{id}/events``: server-sent events, one per change, with a small preview PNG (base64).
* ``DELETE /v1/jobs/{id}``: cancel; a running job stops after the current solver step.
* ``GET /v1/jobs/{id}/images/{n}.png``: result n, a PNG with the generation record (names are the server's).
* ``GET /v1/models``: the loaded models, their sampling defaults, samplers and schedules.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import secrets
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

from fastapi import Depends, FastAPI, HTTPException, Path as PathParam, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from .jobs import FINAL, GenerateParams, Job, JobQueue, QueueFull
from .pipeline import Pipeline
from .samplers import SAMPLERS
from .schedules import SCHEDULES

JOB_ID = r"^[0-9a-f]{32}$"
MAX_PROMPT = 1000
MAX_SIZE = 1024

SamplerName = Literal[tuple(SAMPLERS)]  # type: ignore[valid-type]
ScheduleName = Literal[tuple(SCHEDULES)]  # type: ignore[valid-type]


class FieldError(ValueError):
    """A request value the model cannot use: answered with 422 naming ``field``."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class GenerateRequest(BaseModel):
    """A text-to-image (or class-to-image) job; omitted fields take the model's sampling defaults."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["generate"] = "generate"
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
    size: Optional[int] = Field(None, ge=1, le=MAX_SIZE, description="image width = height in pixels; default: native")

    def params(self, pipes: dict[str, Pipeline], max_batch: int) -> GenerateParams:
        """The job's parameters, checked against the model (FieldError naming the field otherwise)."""
        name = self.model or next(iter(pipes))
        if name not in pipes:
            raise FieldError("model", f"no model {name!r} is loaded; loaded: {', '.join(pipes)}")
        pipe = pipes[name]
        if self.batch > max_batch:
            raise FieldError("batch", f"batch {self.batch} is larger than this server's --max-batch {max_batch}")
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
        try:
            size = pipe.check_size(self.size or pipe.model.cfg.image_size)
        except ValueError as e:
            raise FieldError("size", str(e)) from None
        return GenerateParams(name, self.prompt, self.negative_prompt, self.class_label, self.seed, self.batch, settings, size)


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
    image_size: int
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
    d = dataclasses.asdict(params)
    d.update(d.pop("settings"))
    return d


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(pipes: dict[str, Pipeline], *, max_queue: int = 32, max_batch: int = 8, keep_jobs: int = 100,
               token: Optional[str] = None, max_body: int = 1 << 20, out: Optional[Path] = None) -> FastAPI:
    """The FastAPI app over loaded pipelines; its worker thread runs while the app's lifespan does."""
    if not pipes:
        raise ValueError("give at least one model")

    def save(job: Job) -> None:
        for i, data in enumerate(job.pngs):
            (out / f"{job.id}-{i}.png").write_bytes(data)

    queue = JobQueue(pipes, max_queue=max_queue, max_batch=max_batch, keep=keep_jobs, on_result=save if out else None)

    async def lifespan(app: FastAPI):
        queue.start()
        yield
        queue.stop()

    app = FastAPI(title="diffuse", version="1", lifespan=lifespan,
                  description="Queue image-generation jobs, follow their progress, fetch their images.")
    app.state.queue = queue
    bearer = HTTPBearer(auto_error=False)

    def authorized(creds: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        if token is None:
            return
        if creds is None or not secrets.compare_digest(creds.credentials.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong token; send the header 'Authorization: Bearer TOKEN'",
                                headers={"WWW-Authenticate": "Bearer"})

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
            loc = [str(p) for p in err["loc"] if p != "body"]
            field = ".".join(loc) or "body"
            detail.append({"loc": list(err["loc"]), "msg": f"{field}: {err['msg']}", "type": err["type"]})
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

    @app.post("/v1/jobs", status_code=202, response_model=JobCreated, dependencies=auth,
              responses={**unauthorized, 411: {"model": Error}, 413: {"model": Error},
                         429: {"model": Error, "description": "the queue is full; retry after the Retry-After header's seconds"}})
    def create_job(request: GenerateRequest) -> JobCreated:
        try:
            params = request.params(pipes, max_batch)
        except FieldError as e:
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
                                       image_size=m.cfg.image_size, size_multiple=m.size_factor(),
                                       num_classes=m.cfg.num_classes if m.cfg.conditioning == "class" else 0,
                                       vocabulary=vocab, defaults=dataclasses.asdict(pipe.defaults)))
        return ModelsOut(models=out_models, samplers=list(SAMPLERS), schedules=list(SCHEDULES), max_batch=max_batch)

    return app


def serve(models: list[str], *, host: str = "127.0.0.1", port: int = 7860, max_queue: int = 32, max_batch: int = 8,
          keep_jobs: int = 100, token: Optional[str] = None, out: Optional[Path] = None, device: str = "cpu") -> None:
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
    app = create_app(pipes, max_queue=max_queue, max_batch=max_batch, keep_jobs=keep_jobs, token=token, out=out)
    if not is_loopback(host) and token is None:
        print(f"warning: listening on {host}, reachable from other machines, without --token: anyone who can reach "
              f"this port can use the server; pass --token SECRET or --host 127.0.0.1", file=sys.stderr)
    print(f"serving {', '.join(pipes)} on http://{host}:{port}/ (API docs at /docs)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
