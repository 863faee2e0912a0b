"""Load test of `diffuse serve`: concurrent clients on loopback, bounded in count and time.

Starts `diffuse serve` in a child process on 127.0.0.1, then runs --clients concurrent clients; each
submits --jobs-per-client jobs one after another (one image each) and follows each accepted job's
event stream to its end. Job kinds rotate through --kinds (client c's job k is kind (c + k) mod the
number of kinds); an img2img or inpaint job uploads a rendered shapes scene (diffuse/shapes.py, its
seed the job's) at the model's native size, and inpaint a mask replacing the right half. A job
refused with 429 is counted and the client waits Retry-After (at most 5 s) before its next job.
Checks that every submission was either accepted and finished `done` with the image it asked for
(kind, prompt and seed in the PNG's record; for edits the upload's hash), or refused with 429: none
lost, none duplicated. Prints throughput, latency percentiles (submit to final event) and the
server's peak RSS, overall and per kind.

    nice -n 10 python bench/serve.py --model shapes --clients 50 --jobs-per-client 2 --steps 8
    nice -n 10 python bench/serve.py --kinds generate,img2img,inpaint
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffuse import shapes  # noqa: E402
from diffuse.edit import steps_for_strength  # noqa: E402

HOST = "127.0.0.1"
KINDS = ("generate", "img2img", "inpaint")
STRENGTH = 0.75  # img2img


def png_b64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def job_body(kind: str, prompt: str, seed: int, steps: int, size: int) -> dict:
    """The request for one job; an edit uploads the shapes scene of its seed (inpaint: right half replaced)."""
    body = {"kind": kind, "prompt": prompt, "seed": seed, "steps": steps}
    if kind != "generate":
        body["image"] = png_b64(shapes.render(shapes.sample(seed).scene, size))
    if kind == "img2img":
        body["strength"] = STRENGTH
    if kind == "inpaint":
        mask = np.zeros((size, size), np.uint8)
        mask[:, size // 2:] = 255
        body["mask"] = png_b64(mask)
    return body


def upload_hash(body: dict) -> str:
    return hashlib.sha256(base64.b64decode(body["image"])).hexdigest()[:10]


async def follow(client: httpx.AsyncClient, job_id: str) -> dict:
    final = None
    async with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        r.raise_for_status()
        name = None
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and name in ("done", "failed", "cancelled"):
                final = json.loads(line[6:])
    if final is None:
        raise RuntimeError(f"job {job_id}: the event stream ended without a final event")
    return final


async def one_client(base: str, client_index: int, prompts: list[str], args: argparse.Namespace, size: int,
                     log: list[dict]) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(600.0)) as client:
        for k in range(args.jobs_per_client):
            seed = 1000 * client_index + k
            prompt = prompts[seed % len(prompts)]
            kind = args.kinds[(client_index + k) % len(args.kinds)]
            body = job_body(kind, prompt, seed, args.steps, size)
            start = time.perf_counter()
            r = await client.post("/v1/jobs", json=body)
            entry = {"kind": kind, "seed": seed, "prompt": prompt, "status_code": r.status_code,
                     "upload": upload_hash(body) if "image" in body else None}
            log.append(entry)
            if r.status_code == 429:
                await asyncio.sleep(min(5.0, float(r.headers["Retry-After"])))
                continue
            r.raise_for_status()
            entry["id"] = r.json()["id"]
            job = await follow(client, entry["id"])
            entry["latency"] = time.perf_counter() - start
            entry["status"] = job["status"]
            entry["records"] = [im["record"] for im in job["images"]]


async def run_clients(base: str, args: argparse.Namespace, prompts: list[str], size: int) -> list[dict]:
    log: list[dict] = []
    tasks = [one_client(base, c, prompts, args, size, log) for c in range(args.clients)]
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=args.time_limit)
    return log


def as_asked(entry: dict) -> bool:
    """Whether an accepted job finished with the one image it asked for (for edits: of its upload)."""
    if entry["status"] != "done" or len(entry["records"]) != 1:
        return False
    record = entry["records"][0]
    upload = record.get("input_image", {}).get("sha256")
    return (record["kind"], record["seed"], record["prompt"], upload) == (entry["kind"], entry["seed"], entry["prompt"],
                                                                          entry["upload"])


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-quantile of sorted values (nearest rank); nan when there are none."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/PID/status")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--jobs-per-client", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--time-limit", type=float, default=900.0, help="seconds before the run is abandoned")
    ap.add_argument("--kinds", default="generate", help=f"comma-separated job kinds to rotate through, of: {','.join(KINDS)}")
    args = ap.parse_args()
    if args.clients > 200 or args.jobs_per_client > 20:
        raise SystemExit("keep it bounded: at most 200 clients and 20 jobs per client")
    args.kinds = args.kinds.split(",")
    unknown = [k for k in args.kinds if k not in KINDS]
    if unknown:
        raise SystemExit(f"--kinds: unknown job kind {unknown[0]!r}; known kinds: {', '.join(KINDS)}")
    if "img2img" in args.kinds:
        try:
            steps_for_strength(STRENGTH, args.steps)
        except ValueError as e:
            raise SystemExit(f"--steps: img2img at strength {STRENGTH}: {e}") from None

    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    server = subprocess.Popen([sys.executable, "-m", "diffuse", "serve", "--model", args.model, "--host", HOST, "--port", str(port),
                               "--max-queue", str(args.max_queue), "--max-batch", str(args.max_batch)], env=env)
    base = f"http://{HOST}:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                httpx.get(base + "/v1/models", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.2)
        rss_idle = peak_rss_mb(server.pid)
        size = httpx.get(base + "/v1/models", timeout=10).json()["models"][0]["image_size"]
        prompts = [p for p, _ in shapes.eval_prompts(20, 0)]
        start = time.perf_counter()
        log = asyncio.run(run_clients(base, args, prompts, size))
        wall = time.perf_counter() - start
        rss_peak = peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(30)

    attempts = args.clients * args.jobs_per_client
    accepted = [e for e in log if e["status_code"] == 202]
    refused = [e for e in log if e["status_code"] == 429]
    other = [e for e in log if e["status_code"] not in (202, 429)]
    ids = [e["id"] for e in accepted]
    assert len(log) == attempts, f"{attempts - len(log)} submissions lost"
    assert not other, f"unexpected answers: {sorted({e['status_code'] for e in other})}"
    assert len(set(ids)) == len(ids), "a job id was handed out twice"
    wrong = [e for e in accepted if not as_asked(e)]
    assert not wrong, f"{len(wrong)} jobs did not finish with the image they asked for, e.g. {wrong[0]}"

    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"{time.strftime('%Y-%m-%d')} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads {threads}, niceness {os.nice(0)}")
    print(f"model {args.model}, {args.steps} steps, {args.clients} clients x {args.jobs_per_client} jobs, "
          f"--max-queue {args.max_queue} --max-batch {args.max_batch}")
    lat = sorted(e["latency"] for e in accepted)
    print("| kinds | submitted | done | 429 | lost or duplicated | wall s | images/s | p50 latency s | p99 latency s | "
          "server RSS idle MB | server peak RSS MB |")
    print(f"| {','.join(args.kinds)} | {attempts} | {len(accepted)} | {len(refused)} | 0 | {wall:.1f} | {len(accepted) / wall:.2f} | "
          f"{percentile(lat, 0.5):.2f} | {percentile(lat, 0.99):.2f} | {rss_idle:.0f} | {rss_peak:.0f} |")
    if len(args.kinds) > 1:
        print("\n| kind | submitted | done | 429 | p50 latency s | p99 latency s |\n|---|---|---|---|---|---|")
        for kind in args.kinds:
            mine = [e for e in log if e["kind"] == kind]
            lat = sorted(e["latency"] for e in mine if e["status_code"] == 202)
            print(f"| {kind} | {len(mine)} | {len(lat)} | {sum(e['status_code'] == 429 for e in mine)} | "
                  f"{percentile(lat, 0.5):.2f} | {percentile(lat, 0.99):.2f} |")


if __name__ == "__main__":
    main()
