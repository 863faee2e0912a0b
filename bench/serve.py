"""Load test of `diffuse serve`: concurrent clients on loopback, bounded in count and time.

Starts `diffuse serve` in a child process on 127.0.0.1, then runs --clients concurrent clients; each
submits --jobs-per-client jobs one after another (one image each) and follows each accepted job's
event stream to its end. A job refused with 429 is counted and the client waits Retry-After (at most
5 s) before its next job. Checks that every submission was either accepted and finished `done` with
the image it asked for (prompt and seed in the PNG's record), or refused with 429: none lost, none
duplicated. Prints throughput, latency percentiles (submit to final event) and the server's peak RSS.

    nice -n 10 python bench/serve.py --model shapes --clients 50 --jobs-per-client 2 --steps 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffuse.shapes import eval_prompts  # noqa: E402

HOST = "127.0.0.1"


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


async def one_client(base: str, n_jobs: int, first_seed: int, prompts: list[str], steps: int, log: list[dict]) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(600.0)) as client:
        for k in range(n_jobs):
            seed = first_seed + k
            prompt = prompts[seed % len(prompts)]
            start = time.perf_counter()
            r = await client.post("/v1/jobs", json={"prompt": prompt, "seed": seed, "steps": steps})
            entry = {"seed": seed, "prompt": prompt, "status_code": r.status_code}
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


async def run_clients(base: str, args: argparse.Namespace, prompts: list[str]) -> list[dict]:
    log: list[dict] = []
    tasks = [one_client(base, args.jobs_per_client, 1000 * c, prompts, args.steps, log) for c in range(args.clients)]
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=args.time_limit)
    return log


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
    args = ap.parse_args()
    if args.clients > 200 or args.jobs_per_client > 20:
        raise SystemExit("keep it bounded: at most 200 clients and 20 jobs per client")

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
        prompts = [p for p, _ in eval_prompts(20, 0)]
        start = time.perf_counter()
        log = asyncio.run(run_clients(base, args, prompts))
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
    wrong = [e for e in accepted if e["status"] != "done" or len(e["records"]) != 1
             or (e["records"][0]["seed"], e["records"][0]["prompt"]) != (e["seed"], e["prompt"])]
    assert not wrong, f"{len(wrong)} jobs did not finish with the image they asked for, e.g. {wrong[0]}"
    lat = sorted(e["latency"] for e in accepted)
    pct = lambda q: lat[min(len(lat) - 1, round(q * (len(lat) - 1)))]  # noqa: E731

    print(f"{time.strftime('%Y-%m-%d')} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads default, niceness {os.nice(0)}")
    print(f"model {args.model}, {args.steps} steps, {args.clients} clients x {args.jobs_per_client} jobs, "
          f"--max-queue {args.max_queue} --max-batch {args.max_batch}")
    print(f"| submitted | done | 429 | lost or duplicated | wall s | images/s | p50 latency s | p99 latency s | "
          f"server RSS idle MB | server peak RSS MB |")
    print(f"| {attempts} | {len(accepted)} | {len(refused)} | 0 | {wall:.1f} | {len(accepted) / wall:.2f} | {pct(0.5):.2f} | "
          f"{pct(0.99):.2f} | {rss_idle:.0f} | {rss_peak:.0f} |")


if __name__ == "__main__":
    main()
