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
* ``GET /docs``, ``GET /openapi.json``: the API documentation (a self-contained page, :mod:`diffuse.apidocs`)
  and its schema.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import math
import secrets
import sys
import urllib.parse
from importlib import resources
from pathlib import Path
from typing import Optional

from fastapi import Depends, FastAPI, HTTPException, Path as PathParam, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from . import apidocs
from .jobs import FINAL, KINDS, Job, JobQueue, QueueFull
from .pipeline import Pipeline
from .samplers import SAMPLERS
from .schedules import SCHEDULES
from .server_models import (MAX_UPLOAD_BYTES, MAX_UPLOAD_PIXELS, Error, FieldError, ImageOut, JobCreated, JobOut, JobRequest,
                            Limits, ModelOut, ModelsOut, Progress, params_json)

JOB_ID = r"^[0-9a-f]{32}$"
TOKEN_COOKIE = "diffuse_token"


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
                id=job.id, kind=job.kind, status=job.status, params=params_json(job.params),
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
        return HTMLResponse(apidocs.render(app.openapi()))

    @app.post("/v1/jobs", status_code=202, response_model=JobCreated, dependencies=auth,
              responses={**unauthorized, 411: {"model": Error},
                         413: {"model": Error, "description": "the body, or an upload (named), is over the server's limit"},
                         429: {"model": Error, "description": "the queue is full; retry after the Retry-After header's seconds"}})
    def create_job(request: JobRequest) -> JobCreated:
        """Queue a job of one kind (generate, img2img, inpaint); answers at once with its id."""
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
        """The job's status, progress (step, NFE, ETA), queue position and results."""
        return job_out(job_or_404(job_id))

    @app.delete("/v1/jobs/{job_id}", response_model=JobOut, dependencies=auth, responses={**unauthorized, **not_found})
    def cancel_job(job_id: str = job_id_param) -> JobOut:
        """Cancel a job: a queued one is dropped, a running one stops after the current solver step."""
        job_or_404(job_id)
        return job_out(queue.cancel(job_id))

    @app.get("/v1/jobs/{job_id}/events", dependencies=auth, responses={
        **unauthorized, **not_found,
        200: {"content": {"text/event-stream": {}}, "description": "server-sent events: `progress` (the job as in "
              "GET /v1/jobs/{id}, plus `preview`, a base64 PNG of the current denoised estimate), then one final "
              "`done`, `failed` or `cancelled` event"}})
    async def job_events(job_id: str = job_id_param) -> StreamingResponse:
        """The job's changes as server-sent events, with a preview of the current estimate, until it finishes."""
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
        """Result image ``index`` as a PNG with its generation record (file names are the server's)."""
        job = job_or_404(job_id)
        if index >= len(job.pngs):
            raise HTTPException(404, f"job {job_id} has {len(job.pngs)} images (status {job.status})")
        return Response(job.pngs[index], media_type="image/png",
                        headers={"Content-Disposition": f'inline; filename="{job_id}-{index}.png"'})

    @app.get("/v1/models", response_model=ModelsOut, dependencies=auth, responses=unauthorized)
    def models() -> ModelsOut:
        """The loaded models with their sampling defaults and vocabulary; the samplers and schedules."""
        out_models = []
        for name, pipe in pipes.items():
            m = pipe.model
            builtin = m.cfg.conditioning == "text" and m.cfg.text_encoder == "builtin"  # the others take any words
            vocab = list(m.text_encoder.tokenizer.vocab) if builtin else []
            out_models.append(ModelOut(name=name, model_hash=pipe.model_hash, conditioning=m.cfg.conditioning,
                                       image_size=m.cfg.image_size * pipe.codec.factor,
                                       size_multiple=m.size_factor() * pipe.codec.factor if m.size_factor() else None,
                                       num_classes=m.cfg.num_classes if m.cfg.conditioning == "class" else 0,
                                       vocabulary=vocab, defaults=dataclasses.asdict(pipe.defaults),
                                       plan_layout=pipe.plan_layout))
        return ModelsOut(models=out_models, samplers=list(SAMPLERS), schedules=list(SCHEDULES), max_batch=max_batch)

    return app


def serve(models: list[str], *, host: str = "127.0.0.1", port: int = 7860, max_queue: int = 32, max_batch: int = 8,
          keep_jobs: int = 100, token: Optional[str] = None, max_upload_mb: float = MAX_UPLOAD_BYTES / 2 ** 20,
          max_upload_pixels: int = MAX_UPLOAD_PIXELS, out: Optional[Path] = None, device: str = "cpu",
          precision: str = "auto", channels_last: bool = True, compile: bool = False) -> None:
    """Load the models (with the fast path's ``precision``, ``channels_last`` and ``compile``, see diffuse.fastpath)
    and serve until interrupted."""
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
        print(f"{pipe.name}: {pipe.set_fast_path(precision, channels_last=channels_last, compile=compile)}", flush=True)
        pipes[pipe.name] = pipe
    app = create_app(pipes, max_queue=max_queue, max_batch=max_batch, keep_jobs=keep_jobs, token=token, out=out,
                     max_upload_bytes=int(max_upload_mb * 2 ** 20), max_upload_pixels=max_upload_pixels)
    if not is_loopback(host) and token is None:
        print(f"warning: listening on {host}, reachable from other machines, without --token: anyone who can reach "
              f"this port can use the server; pass --token SECRET or --host 127.0.0.1", file=sys.stderr)
    print(f"serving {', '.join(pipes)} on http://{host}:{port}/ (API docs at /docs)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
