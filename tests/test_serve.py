"""The HTTP job API: lifecycle, batching, cancellation, the bounded queue, validation, auth, determinism."""

import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from diffuse.pipeline import Pipeline, SampleSettings  # noqa: E402
from diffuse.server import create_app  # noqa: E402

from conftest import CAPTIONS
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def pipe(tiny_text_model):
    folder = tiny_text_model({"sampler": "dpmpp_2m", "steps": 4, "cfg": 2.0})
    return Pipeline.load(folder)


class Gate:
    """Wraps pipe.generate_batch so the worker blocks after its first solver step until released."""

    def __init__(self, pipe, monkeypatch):
        self.reached, self.release, self.calls = threading.Event(), threading.Event(), []
        self.original = original = pipe.generate_batch

        def gated(seeds, *, callback=None, **kw):
            self.calls.append(list(seeds))

            def cb(info):
                callback(info)
                self.reached.set()
                assert self.release.wait(30)
            return original(seeds, callback=cb, **kw)
        monkeypatch.setattr(pipe, "generate_batch", gated)


def client_for(pipe, **kw):
    return TestClient(create_app({pipe.name: pipe}, **kw))


def wait_done(client, job_id, headers=None):
    """Follow the job's event stream to its final event; return (events, final job)."""
    events = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events, client.get(f"/v1/jobs/{job_id}", headers=headers).json()


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_lifecycle_events_and_images_match_the_pipeline(pipe):
    with client_for(pipe) as client:
        r = client.post("/v1/jobs", json={"prompt": CAPTIONS[0], "seed": 5, "batch": 2, "sampler": "euler", "steps": 3})
        assert r.status_code == 202
        job_id = r.json()["id"]
        events, job = wait_done(client, job_id)
        assert job["status"] == "done" and job["error"] is None
        assert job["progress"] == {"step": 3, "steps": 3, "nfe": 3, "eta_s": None}  # euler: one denoiser call per step
        assert [e[0] for e in events][-1] == "done"
        steps_seen = [e[1]["progress"]["step"] for e in events if e[0] == "progress" and e[1]["status"] == "running"]
        assert steps_seen == sorted(steps_seen) and set(steps_seen) <= {0, 1, 2, 3}
        previews = [e[1]["preview"] for e in events if e[1]["preview"]]
        assert previews and png_pixels(__import__("base64").b64decode(previews[-1])).shape == (16, 16, 3)
        expected = pipe.generate_batch([5, 6], prompts=[CAPTIONS[0]] * 2, settings=SampleSettings(sampler="euler", steps=3, cfg=2.0))
        assert [im["seed"] for im in job["images"]] == [5, 6]
        for image, want in zip(job["images"], expected):
            r = client.get(image["url"])
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            np.testing.assert_array_equal(png_pixels(r.content), np.asarray(want.image))
            png = Image.open(io.BytesIO(r.content))
            assert json.loads(png.text["diffuse"]) == image["record"] == json.loads(json.dumps(want.record))
            assert png.text["parameters"].startswith(CAPTIONS[0] + "\nSteps: 3, Sampler: Euler")
        assert client.get(f"/v1/jobs/{job_id}/images/2.png").status_code == 404


def test_same_settings_are_batched_and_stay_deterministic(pipe, monkeypatch):
    gate = Gate(pipe, monkeypatch)
    with client_for(pipe, max_batch=8) as client:
        blocker = client.post("/v1/jobs", json={"prompt": CAPTIONS[2], "seed": 0, "steps": 2}).json()["id"]
        assert gate.reached.wait(30)
        a = client.post("/v1/jobs", json={"prompt": CAPTIONS[0], "seed": 3, "batch": 2, "steps": 2}).json()["id"]
        other = client.post("/v1/jobs", json={"prompt": CAPTIONS[0], "seed": 1, "steps": 3}).json()["id"]  # other settings
        b = client.post("/v1/jobs", json={"prompt": CAPTIONS[1], "seed": 9, "steps": 2}).json()["id"]
        assert client.get(f"/v1/jobs/{b}").json()["queue_position"] == 2
        gate.release.set()
        jobs = {k: wait_done(client, k)[1] for k in (blocker, a, other, b)}
    assert gate.calls == [[0], [3, 4, 9], [1]]  # a and b share a call; the 3-step job runs alone
    assert all(j["status"] == "done" for j in jobs.values())
    alone = gate.original([9], prompts=[CAPTIONS[1]], settings=SampleSettings(steps=2, cfg=2.0))[0]
    assert jobs[b]["images"][0]["record"] == json.loads(json.dumps(alone.record))


def test_cancel_mid_sampling_then_the_next_job_runs(pipe, monkeypatch):
    gate = Gate(pipe, monkeypatch)
    with client_for(pipe) as client:
        running = client.post("/v1/jobs", json={"prompt": CAPTIONS[0], "steps": 4}).json()["id"]
        queued = client.post("/v1/jobs", json={"prompt": CAPTIONS[1], "steps": 4, "sampler": "heun"}).json()["id"]
        assert gate.reached.wait(30)
        assert client.get(f"/v1/jobs/{running}").json()["status"] == "running"
        r = client.delete(f"/v1/jobs/{running}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        cancelled_queued = client.delete(f"/v1/jobs/{queued}").json()
        assert cancelled_queued["status"] == "cancelled" and cancelled_queued["progress"]["nfe"] == 0
        gate.release.set()
        after = client.post("/v1/jobs", json={"prompt": CAPTIONS[2], "steps": 2}).json()["id"]
        assert wait_done(client, after)[1]["status"] == "done"
        job = client.get(f"/v1/jobs/{running}").json()
    # stopped by the callback after the first of 4 steps (dpmpp_2m: 1 NFE), no images
    assert job["status"] == "cancelled" and job["progress"]["step"] == 1 and job["progress"]["nfe"] == 1 and job["images"] == []
    assert len(gate.calls) == 2  # the cancelled queued job never ran


def test_full_queue_answers_429_with_retry_after(pipe, monkeypatch):
    gate = Gate(pipe, monkeypatch)
    with client_for(pipe, max_queue=2) as client:
        ids = [client.post("/v1/jobs", json={"prompt": CAPTIONS[0], "steps": 2}).json()["id"]]
        assert gate.reached.wait(30)  # the first job is running, so the queue is empty again
        ids += [client.post("/v1/jobs", json={"prompt": CAPTIONS[0], "seed": s, "steps": 3}).json()["id"] for s in (1, 2)]
        r = client.post("/v1/jobs", json={"prompt": CAPTIONS[0], "steps": 3})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1 and "queue is full" in r.json()["detail"]
        gate.release.set()
        assert [wait_done(client, i)[1]["status"] for i in ids] == ["done"] * 3
        assert client.post("/v1/jobs", json={"prompt": CAPTIONS[0], "steps": 2}).status_code == 202


def test_a_failing_job_reports_its_error_and_the_worker_goes_on(pipe, monkeypatch, tmp_path):
    original = pipe.generate_batch

    def flaky(seeds, **kw):
        if seeds == [666]:
            raise RuntimeError("out of memory")
        return original(seeds, **kw)
    monkeypatch.setattr(pipe, "generate_batch", flaky)
    with client_for(pipe, out=tmp_path) as client:
        bad = client.post("/v1/jobs", json={"prompt": CAPTIONS[0], "seed": 666, "steps": 1}).json()["id"]
        good = client.post("/v1/jobs", json={"prompt": CAPTIONS[0], "seed": 1, "steps": 2}).json()["id"]
        bad_job, good_job = wait_done(client, bad)[1], wait_done(client, good)[1]
        png = client.get(good_job["images"][0]["url"]).content
    assert bad_job["status"] == "failed" and bad_job["error"] == "RuntimeError: out of memory" and bad_job["images"] == []
    assert good_job["status"] == "done"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{good}-0.png"]  # --out: the server's names
    assert (tmp_path / f"{good}-0.png").read_bytes() == png


def test_cli_serve_bad_flags_are_one_line_errors(capsys):
    from diffuse.cli import main

    assert main(["serve", "--port", "70000"]) == 2
    assert capsys.readouterr().err == "error: --port must be in 1..65535, got 70000\n"
    assert main(["serve", "--token", "abc"]) == 2
    assert "--token must be at least 8 characters" in capsys.readouterr().err


def test_finished_jobs_are_evicted_past_the_limit(pipe):
    with client_for(pipe, keep_jobs=2) as client:
        ids = [client.post("/v1/jobs", json={"prompt": CAPTIONS[0], "seed": s, "steps": 1}).json()["id"] for s in range(4)]
        for i in ids[2:]:
            wait_done(client, i)
        assert [client.get(f"/v1/jobs/{i}").status_code for i in ids] == [404, 404, 200, 200]
        assert "kept until 2 newer" in client.get(f"/v1/jobs/{ids[0]}").json()["detail"]


@pytest.mark.parametrize("body, field, words", [
    ({"prompt": CAPTIONS[0], "steps": 0}, "steps", "greater than or equal to 1"),
    ({"prompt": CAPTIONS[0], "steps": "many"}, "steps", "integer"),
    ({"prompt": CAPTIONS[0], "sampler": "magic"}, "sampler", "euler"),
    ({"prompt": CAPTIONS[0], "cfg": 99}, "cfg", "less than or equal to 50"),
    ({"prompt": CAPTIONS[0], "batch": 9}, "batch", "--max-batch 8"),
    ({"prompt": CAPTIONS[0], "size": 17}, "size", "cannot make 17x17"),
    ({"prompt": "a purple dragon"}, "prompt", "purple, dragon"),
    ({"prompt": CAPTIONS[0], "negative_prompt": "a dragon"}, "negative_prompt", "dragon"),
    ({"prompt": "  "}, "prompt", "empty"),
    ({"prompt": "a" * 1001}, "prompt", "at most 1000 characters"),
    ({"prompt": CAPTIONS[0], "class_label": 3}, "class_label", "text-conditional"),
    ({"prompt": CAPTIONS[0], "model": "other"}, "model", "no model 'other'"),
    ({"prompt": CAPTIONS[0], "seed": -1}, "seed", "greater than or equal to 0"),
    ({"prompt": CAPTIONS[0], "out": "/etc/passwd"}, "out", "Extra inputs are not permitted"),
])
def test_validation_errors_name_the_field(pipe, body, field, words):
    with client_for(pipe) as client:
        r = client.post("/v1/jobs", json=body)
    assert r.status_code == 422
    (err,) = r.json()["detail"]
    assert err["loc"][-1] == field and err["msg"].startswith(field + ": ") and words in err["msg"]


def test_body_limits(pipe):
    with client_for(pipe, max_body=2000) as client:
        r = client.post("/v1/jobs", content=json.dumps({"prompt": "x" * 3000}), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "over the limit of 2000" in r.json()["detail"]
        assert client.post("/v1/jobs", content=b"{", headers={"content-type": "application/json"}).status_code == 422


def test_token_guards_every_route_but_the_page(pipe):
    good = {"Authorization": f"Bearer {TOKEN}"}
    with client_for(pipe, token=TOKEN) as client:
        page = client.get("/")
        assert page.status_code == 200 and "<title>diffuse</title>" in page.text
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/" + "0" * 32),
                             ("DELETE", "/v1/jobs/" + "0" * 32), ("GET", "/v1/jobs/" + "0" * 32 + "/events"),
                             ("GET", "/v1/jobs/" + "0" * 32 + "/images/0.png")]:
            for headers in (None, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN}):
                r = client.request(method, path, headers=headers, json={"prompt": CAPTIONS[0]} if method == "POST" else None)
                assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", (method, path, headers)
        r = client.post("/v1/jobs", json={"prompt": CAPTIONS[0], "steps": 1}, headers=good)
        assert r.status_code == 202
        assert wait_done(client, r.json()["id"], headers=good)[1]["status"] == "done"
        models = client.get("/v1/models", headers=good).json()
    assert models["models"][0]["name"] == pipe.name and models["models"][0]["defaults"]["steps"] == 4
    assert set(models["models"][0]["vocabulary"]) >= {"red", "circle", "triangle"} and "dpmpp_2m" in models["samplers"]


@pytest.mark.parametrize("path", ["/v1/jobs/..%2F..%2Fetc%2Fpasswd", "/v1/jobs/../../etc/passwd",
                                  "/v1/jobs/" + "0" * 32 + "/images/..%2Fsecret.png", "/v1/jobs/" + "0" * 32 + "/images/-1.png",
                                  "/v1/jobs/" + "0" * 32 + "/images/%2Fetc%2Fpasswd.png", "/v1/jobs/ABC/events"])
def test_path_like_names_are_rejected(pipe, path):
    with client_for(pipe) as client:
        r = client.get(path)
    assert r.status_code in (404, 422)
    assert "root:" not in r.text


def test_openapi_schema_matches_the_routes(pipe):
    with client_for(pipe) as client:
        schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert set(paths) == {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/images/{index}.png",
                          "/v1/models"}
    assert set(paths["/v1/jobs"]["post"]["responses"]) >= {"202", "401", "413", "422", "429"}
    assert set(paths["/v1/jobs/{job_id}"]) == {"get", "delete"}
    assert "text/event-stream" in paths["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    assert "image/png" in paths["/v1/jobs/{job_id}/images/{index}.png"]["get"]["responses"]["200"]["content"]
    request = schema["components"]["schemas"]["GenerateRequest"]
    assert request["additionalProperties"] is False
    assert set(request["properties"]) == {"kind", "model", "prompt", "negative_prompt", "class_label", "seed", "batch",
                                          "sampler", "steps", "schedule", "cfg", "size"}
    assert request["properties"]["steps"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 1000}
    status = schema["components"]["schemas"]["JobOut"]["properties"]["status"]
    assert status["enum"] == ["queued", "running", "done", "failed", "cancelled"]


def test_non_loopback_without_token_warns(monkeypatch, capsys, pipe):
    import uvicorn

    from diffuse import server

    monkeypatch.setattr(server.Pipeline, "load", classmethod(lambda cls, name, device="cpu": pipe))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    server.serve(["x"], host="0.0.0.0")
    assert "warning: listening on 0.0.0.0" in capsys.readouterr().err
    server.serve(["x"], host="0.0.0.0", token=TOKEN)
    server.serve(["x"], host="127.0.0.1")
    assert "warning" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least 8 characters"):
        server.serve(["x"], token="short")
