"""The HTTP job API: lifecycle, batching, cancellation, the bounded queue, validation, auth, determinism;
edit jobs (img2img, inpaint) with uploaded images and their limits."""

import base64
import hashlib
import html
import io
import json
import re
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from diffuse import edit  # noqa: E402
from diffuse.pipeline import Pipeline, SampleSettings  # noqa: E402
from diffuse.server import create_app  # noqa: E402

from conftest import CAPTIONS
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def pipe(tiny_text_model):
    folder = tiny_text_model({"sampler": "dpmpp_2m", "steps": 4, "cfg": 2.0})
    return Pipeline.load(folder)


class Gate:
    """Wraps owner.name (pipe.generate_batch, or an edit function) so that the worker blocks after its
    first solver step until released; records the seeds of every call."""

    def __init__(self, monkeypatch, owner, name):
        self.reached, self.release, self.calls = threading.Event(), threading.Event(), []
        self.original = original = getattr(owner, name)

        def gated(*args, callback=None, **kw):
            self.calls.append(list(kw["seeds"] if "seeds" in kw else args[0]))

            def cb(info):
                callback(info)
                self.reached.set()
                assert self.release.wait(30)
            return original(*args, callback=cb, **kw)
        monkeypatch.setattr(owner, name, gated)


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
        assert previews and png_pixels(base64.b64decode(previews[-1])).shape == (16, 16, 3)
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


def test_a_latent_models_preview_is_its_decoded_estimate_at_the_output_size(tmp_path, random_model, monkeypatch):
    from test_vae import latent_model_cfg, random_vae

    from diffuse import jobs
    from diffuse.codec import VAECodec
    from diffuse.plot import to_uint8

    random_model(latent_model_cfg("vae")).save(tmp_path / "m")  # 8x8x4 latents
    VAECodec(random_vae(), scale=0.5, shift=0.1).save(tmp_path / "m" / "vae")  # factor 4: 32x32 RGB
    latent = Pipeline.load(tmp_path / "m")
    monkeypatch.setattr(jobs, "PREVIEW_SHARE", 1.0)  # decode a preview at every step
    estimates = []
    original = latent.generate_batch

    def recording(*args, callback, **kw):
        return original(*args, callback=lambda info: (estimates.append(info.denoised), callback(info)), **kw)
    monkeypatch.setattr(latent, "generate_batch", recording)
    with client_for(latent) as client:
        events, job = wait_done(client, client.post("/v1/jobs", json={"seed": 2, "steps": 3, "sampler": "euler"}).json()["id"])
        final = png_pixels(client.get(job["images"][0]["url"]).content)
    assert job["status"] == "done" and len(estimates) == 3
    preview = png_pixels(base64.b64decode(events[-1][1]["preview"]))  # the done event has the last step's preview
    assert preview.shape == final.shape == (32, 32, 3)
    np.testing.assert_array_equal(preview, to_uint8(latent.codec.decode(estimates[-1]))[0])
    # euler's last step lands on its last estimate, so the last preview is the result (up to float rounding)
    assert np.abs(preview.astype(int) - final).max() <= 1


def test_a_jobs_cfg_interval_gives_the_pipelines_image_and_none_guides_every_step(pipe):
    pixels = []
    with client_for(pipe) as client:
        for interval, expected_interval in (([0.5, 10.0], (0.5, 10.0)), ("none", None)):
            body = {"prompt": CAPTIONS[0], "seed": 3, "sampler": "euler", "steps": 3, "cfg_interval": interval}
            events, job = wait_done(client, client.post("/v1/jobs", json=body).json()["id"])
            assert job["status"] == "done"
            settings = SampleSettings(sampler="euler", steps=3, cfg=2.0, cfg_interval=expected_interval)
            (want,) = pipe.generate_batch([3], prompts=[CAPTIONS[0]], settings=settings)
            pixels.append(png_pixels(client.get(job["images"][0]["url"]).content))
            np.testing.assert_array_equal(pixels[-1], np.asarray(want.image))
            assert job["images"][0]["record"]["cfg_interval"] == json.loads(json.dumps(want.record))["cfg_interval"]
    assert not np.array_equal(*pixels)  # the interval changed the image: the field reached the sampler


def test_a_jobs_regions_give_the_pipelines_image_and_are_recorded(pipe):
    regions = ["0,0,0.5,1=a green triangle", "0.5,0,1,1=a red circle"]
    with client_for(pipe) as client:
        for background in (None, "black"):
            body = {"prompt": CAPTIONS[0], "seed": 4, "steps": 3, "regions": regions, "region_background": background}
            events, job = wait_done(client, client.post("/v1/jobs", json=body).json()["id"])
            assert job["status"] == "done"
            (want,) = pipe.generate_batch([4], prompts=[CAPTIONS[0]], settings=SampleSettings(sampler="dpmpp_2m", steps=3, cfg=2.0),
                                          regions=regions, region_background=background)
            np.testing.assert_array_equal(png_pixels(client.get(job["images"][0]["url"]).content), np.asarray(want.image))
            record = job["images"][0]["record"]
            assert [r["prompt"] for r in record["regions"]] == ["a green triangle", "a red circle"]
            assert record["region_background"] == (None if background is None else [0, 0, 0])


def test_same_settings_are_batched_and_stay_deterministic(pipe, monkeypatch):
    gate = Gate(monkeypatch, pipe, "generate_batch")
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
    gate = Gate(monkeypatch, pipe, "generate_batch")
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
    gate = Gate(monkeypatch, pipe, "generate_batch")
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
    ({"prompt": CAPTIONS[0], "cfg_interval": [5.0, 1.0]}, "cfg_interval", "5"),
    ({"prompt": CAPTIONS[0], "cfg_interval": [1.0]}, "cfg_interval", 'give [lo, hi] (two sigmas) or "none"'),
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
    ({"prompt": CAPTIONS[0], "regions": ["0,0,1=a red circle"]}, "regions", "is not X0,Y0,X1,Y1=PROMPT"),
    ({"prompt": CAPTIONS[0], "regions": ["0,0,1,1=a purple dragon"]}, "regions", "purple, dragon"),
    ({"prompt": CAPTIONS[0], "regions": ["0,0,1,1=a red circle"] * 17}, "regions", "at most 16 items"),
    ({"prompt": CAPTIONS[0], "region_background": "black"}, "region_background", "give at least one region"),
    ({"prompt": CAPTIONS[0], "regions": ["0,0,1,1=a red circle"], "region_background": "dark"}, "region_background",
     "color 'dark' is not"),
    ({"prompt": CAPTIONS[0], "regions": ["0,0,1,1=a red circle"], "plan_layout": True}, "plan_layout", "not both"),
    ({"prompt": "two yellow squares", "plan_layout": True}, "plan_layout", "at the top right: the prompt has words"),
    ({"prompt": CAPTIONS[1] + " above two yellow squares", "plan_layout": True}, "plan_layout", "cannot plan a layout"),
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
        for method, path in [("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/v1/models"), ("POST", "/v1/jobs"),
                             ("GET", "/v1/jobs/" + "0" * 32),
                             ("DELETE", "/v1/jobs/" + "0" * 32), ("GET", "/v1/jobs/" + "0" * 32 + "/events"),
                             ("GET", "/v1/jobs/" + "0" * 32 + "/images/0.png")]:
            for headers in (None, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN}):
                r = client.request(method, path, headers=headers, json={"prompt": CAPTIONS[0]} if method == "POST" else None)
                assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", (method, path, headers)
        r = client.post("/v1/jobs", json={"prompt": CAPTIONS[0], "steps": 1}, headers=good)
        assert r.status_code == 202
        assert wait_done(client, r.json()["id"], headers=good)[1]["status"] == "done"
        models = client.get("/v1/models", headers=good).json()
        assert client.get("/openapi.json", headers=good).json()["paths"]
        assert "<h1>diffuse API 1</h1>" in client.get("/docs", headers=good).text
        # the page's cookie opens the docs in a browser, but it is no token for the job routes
        client.cookies.set("diffuse_token", TOKEN)
        assert client.get("/docs").status_code == 200 and client.get("/openapi.json").status_code == 200
        assert client.get("/v1/models").status_code == 401
        assert client.post("/v1/jobs", json={"prompt": CAPTIONS[0]}).status_code == 401
        client.cookies.set("diffuse_token", "wrong-token")
        assert client.get("/openapi.json").status_code == 401
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
    body = paths["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    kinds = {"GenerateRequest": "generate", "Img2ImgRequest": "img2img", "InpaintRequest": "inpaint"}
    assert body["oneOf"] == [{"$ref": f"#/components/schemas/{name}"} for name in kinds]
    schemas = schema["components"]["schemas"]
    common = {"kind", "model", "prompt", "negative_prompt", "class_label", "seed", "batch", "sampler", "steps", "schedule", "cfg",
              "cfg_interval"}
    fields = {"GenerateRequest": {"size", "regions", "region_background", "plan_layout"}, "Img2ImgRequest": {"image", "resize", "strength"},
              "InpaintRequest": {"image", "resize", "mask", "strength", "feather", "jumps", "jump_length", "binarize"}}
    for name, kind in kinds.items():
        request = schemas[name]
        assert request["additionalProperties"] is False and set(request["properties"]) == common | fields[name]
        assert request["properties"]["kind"]["const"] == kind
        assert request["properties"]["steps"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 1000}
    assert set(schemas["InpaintRequest"]["required"]) == {"kind", "image", "mask"}
    assert schemas["Img2ImgRequest"]["properties"]["strength"] == {"type": "number", "exclusiveMinimum": 0.0, "maximum": 1.0,
                                                                  "default": 0.75, "title": "Strength",
                                                                  "description": "fraction of the schedule to run; 1 redraws everything"}
    status = schema["components"]["schemas"]["JobOut"]["properties"]["status"]
    assert status["enum"] == ["queued", "running", "done", "failed", "cancelled"]


def test_docs_page_is_self_contained_and_shows_every_route_kind_and_field(pipe):
    with client_for(pipe) as client:
        schema = client.get("/openapi.json").json()
        r = client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    # nothing from elsewhere: no absolute URL, no script, every link inside the page or the server
    assert not re.search(r"https?:|<script|@import|url\(", page, re.I)
    links = re.findall(r'(?:href|src)="([^"]*)"', page)
    assert links and all(re.match(r"#|/(?!/)", link) for link in links), links
    for path, ops in schema["paths"].items():
        for method in ops:
            assert f'<span class="method">{method.upper()}</span> {html.escape(path)}</h3>' in page
    assert 'one of <a href="#schema-GenerateRequest">GenerateRequest</a> or <a href="#schema-Img2ImgRequest">' in page

    def section(name):
        start = page.index(f'<h3 id="schema-{name}">')
        return page[start:page.find("<h3", start + 1)]
    for name in ("GenerateRequest", "Img2ImgRequest", "InpaintRequest", "JobOut"):
        rows = re.findall(r"<tr><td>(?:<span class=\"required\">)?(\w+)", section(name))
        assert rows == list(schema["components"]["schemas"][name]["properties"]), name
    assert ('<tr><td>strength</td><td>number</td><td>&gt; <code>0</code>, &lt;= <code>1</code></td><td><code>0.75</code></td>'
            '<td>fraction of the schedule to run; 1 redraws everything</td></tr>') in section("Img2ImgRequest")
    assert '<td><span class="required">mask</span></td><td>string</td>' in section("InpaintRequest")
    assert ('<tr><td>seed</td><td>integer</td><td>&gt;= <code>0</code>, &lt; <code>9223372036854775808</code></td>'
            '<td><code>0</code></td>') in section("GenerateRequest")


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


# ---------------------------------------------------------------- edit jobs

YY, XX = np.mgrid[0:16, 0:16]
PHOTO = np.stack([XX * 16, YY * 16, 255 - (XX + YY) * 8], -1).astype(np.uint8)  # gradients and a red square
PHOTO[4:9, 5:11] = (250, 20, 30)
RIGHT_HALF = np.zeros((16, 16), np.uint8)
RIGHT_HALF[:, 8:] = 255
EULER4 = {"sampler": "euler", "steps": 4}


def png_file(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes, data_url: bool = False) -> str:
    text = base64.b64encode(data).decode("ascii")
    return "data:image/png;base64," + text if data_url else text


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with a few bytes of pixel data (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def served_record(local_record: dict, upload: bytes) -> dict:
    """What the server records for an edit of ``upload``: the local API's record, the upload named by hash."""
    want = json.loads(json.dumps(local_record))
    want["input_image"].update(sha256=hashlib.sha256(upload).hexdigest()[:10], format="PNG")
    return want


def test_img2img_job_matches_the_edit_api_and_resizes_only_when_asked(pipe):
    upload = png_file(PHOTO)
    body = {"kind": "img2img", "prompt": CAPTIONS[1], "image": b64(upload, data_url=True), "strength": 0.5, "seed": 3,
            "batch": 2, **EULER4}
    with client_for(pipe) as client:
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        events, job = wait_done(client, job_id)
        pngs = [client.get(im["url"]).content for im in job["images"]]
        big = client.post("/v1/jobs", json={**body, "image": b64(png_file(np.repeat(PHOTO, 2, 0).repeat(2, 1))),
                                            "resize": True, "batch": 1}).json()["id"]
        resized = wait_done(client, big)[1]
    assert job["kind"] == "img2img" and job["status"] == "done"
    assert job["progress"] == {"step": 2, "steps": 2, "nfe": 2, "eta_s": None}  # strength 0.5 of 4 euler steps
    assert job["params"]["image"] == {"sha256": hashlib.sha256(upload).hexdigest()[:10], "bytes": len(upload),
                                      "width": 16, "height": 16, "format": "PNG"}
    assert any(e[1]["preview"] for e in events)
    expected = edit.img2img(pipe, Image.open(io.BytesIO(upload)), CAPTIONS[1], strength=0.5, seeds=[3, 4],
                            settings=SampleSettings(sampler="euler", steps=4, cfg=2.0))
    for image, png, want in zip(job["images"], pngs, expected):
        np.testing.assert_array_equal(png_pixels(png), np.asarray(want.image))
        assert image["record"] == json.loads(Image.open(io.BytesIO(png)).text["diffuse"]) == served_record(want.record, upload)
        assert image["record"]["kind"] == "img2img" and image["record"]["steps_run"] == 2
        assert Image.open(io.BytesIO(png)).text["parameters"].endswith("Denoising strength: 0.5")
    assert resized["status"] == "done"
    assert resized["images"][0]["record"]["input_conversions"] == ["resized the 32x32 image to 16x16 (Lanczos)"]


def test_inpaint_job_keeps_unmasked_pixels_exactly_and_chains_records(pipe):
    first = png_file(PHOTO)
    body = {"kind": "inpaint", "prompt": CAPTIONS[1], "mask": b64(png_file(RIGHT_HALF)), "seed": 5, "jumps": 1,
            "jump_length": 2, **EULER4}
    with client_for(pipe) as client:
        done = wait_done(client, client.post("/v1/jobs", json={**body, "image": b64(first)}).json()["id"])[1]
        second = client.get(done["images"][0]["url"]).content  # a diffuse PNG, inpainted again: its record travels
        again = wait_done(client, client.post("/v1/jobs", json={**body, "image": b64(second)}).json()["id"])[1]
        png = client.get(again["images"][0]["url"]).content
    assert done["status"] == again["status"] == "done"
    assert done["progress"]["steps"] == 6  # RePaint: blocks (0, 2) twice, then (2, 4)
    out = png_pixels(second)
    np.testing.assert_array_equal(out[:, :8], PHOTO[:, :8])  # kept: exactly the input
    assert np.abs(out[:, 8:].astype(int) - PHOTO[:, 8:]).mean() > 10  # replaced: redrawn
    [want] = edit.inpaint(pipe, Image.open(io.BytesIO(first)), RIGHT_HALF // 255, CAPTIONS[1], seeds=[5], jumps=1,
                          jump_length=2, settings=SampleSettings(sampler="euler", steps=4, cfg=2.0))
    np.testing.assert_array_equal(out, np.asarray(want.image))
    record = done["images"][0]["record"]
    assert record["mask"]["replaced_fraction"] == 0.5
    assert record["mask"]["sha256"] == hashlib.sha256(png_file(RIGHT_HALF)).hexdigest()[:10]
    assert record["input_record"] is None and again["images"][0]["record"]["input_record"] == record
    np.testing.assert_array_equal(png_pixels(png)[:, :8], PHOTO[:, :8])


def test_cancel_an_edit_mid_sampling_and_batch_edits_of_one_image(pipe, monkeypatch):
    gate = Gate(monkeypatch, edit, "img2img")
    image = b64(png_file(PHOTO))
    body = {"kind": "img2img", "prompt": CAPTIONS[0], "image": image, "strength": 1.0, **EULER4}
    with client_for(pipe) as client:
        running = client.post("/v1/jobs", json=body).json()["id"]
        assert gate.reached.wait(30)
        same = [client.post("/v1/jobs", json={**body, "seed": s}).json()["id"] for s in (5, 7)]
        other = client.post("/v1/jobs", json={**body, "strength": 0.5, "seed": 9}).json()["id"]  # other settings
        r = client.delete(f"/v1/jobs/{running}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        gate.release.set()
        jobs = [wait_done(client, i)[1] for i in [*same, other]]
        cancelled = client.get(f"/v1/jobs/{running}").json()
    # stopped by the callback after the first of 4 steps (euler: 1 NFE), no images
    assert cancelled["status"] == "cancelled" and cancelled["images"] == []
    assert (cancelled["progress"]["step"], cancelled["progress"]["nfe"]) == (1, 1)
    assert gate.calls == [[0], [5, 7], [9]] and [j["status"] for j in jobs] == ["done"] * 3


GIF = png_file(PHOTO, "GIF")
NOT_SQUARE, SIDE_17 = png_file(PHOTO[:8]), png_file(np.zeros((17, 17, 3), np.uint8))
GRAY_MASK = RIGHT_HALF.copy()
GRAY_MASK[0, 0] = 77


@pytest.mark.parametrize("change, limits, field, words", [
    ({"image": "%%% not base64"}, {}, "image", "not valid base64"),
    ({"image": b64(b"not a picture")}, {}, "image", "not a PNG, JPEG or WebP image"),
    ({"image": b64(GIF)}, {}, "image", "not a PNG, JPEG or WebP image"),
    ({"image": "data:image/png,abc"}, {}, "image", "data URL without base64"),
    ({}, {"max_upload_pixels": 255}, "image", "16x16 (256 pixels), more than this server's limit of 255 pixels"),
    ({"image": b64(png_header_only(3000, 3000))}, {}, "image", "3000x3000 (9000000 pixels), more than this server's limit"),
    ({"image": b64(png_header_only(100_000, 100_000))}, {}, "image", "has more than this server's limit of 4194304 pixels"),
    ({"image": b64(NOT_SQUARE)}, {}, "image", "16x8 but this model makes square images"),
    ({"image": b64(SIDE_17)}, {}, "image", "cannot make 17x17 images; it makes 16x16 (multiples of 2); pass --resize (resize=True)"),
    ({"mask": b64(NOT_SQUARE)}, {}, "mask", "the mask is 16x8 but the image is 16x16"),
    ({"mask": b64(png_file(np.zeros((16, 16), np.uint8)))}, {}, "mask", "the mask is all black"),
    ({"mask": b64(png_file(np.full((16, 16), 255, np.uint8)))}, {}, "mask", "the mask is all white"),
    ({"mask": b64(png_file(GRAY_MASK))}, {}, "mask", "1 gray pixels"),
    ({"mask": None}, {}, "mask", "Field required"),
    ({"strength": 0.2}, {}, "strength", "strength 0.2 with 4 steps runs 0 steps"),
    ({"strength": 0}, {}, "strength", "greater than 0"),
    ({"feather": -1}, {}, "feather", "greater than or equal to 0"),
    ({"prompt": "a nude circle"}, {}, "prompt", "refused by block rule word: nude"),
    ({"size": 16}, {}, "size", "Extra inputs are not permitted"),
    ({"kind": "upscale"}, {}, "kind", "unknown job kind 'upscale'; known kinds: generate, img2img, inpaint"),
])
def test_edit_request_errors_name_the_field(pipe, change, limits, field, words):
    body = {"kind": "inpaint", "prompt": CAPTIONS[0], "image": b64(png_file(PHOTO)), "mask": b64(png_file(RIGHT_HALF)),
            **EULER4, **change}
    with client_for(pipe, **limits) as client:
        r = client.post("/v1/jobs", json={k: v for k, v in body.items() if v is not None})
    assert r.status_code == 422, r.text
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", field] and err["msg"].startswith(field + ": ") and words in err["msg"], err


def test_uploads_over_the_byte_limit_get_413_naming_the_field(pipe):
    image, mask = png_file(PHOTO), png_file(RIGHT_HALF)
    body = {"kind": "inpaint", "prompt": CAPTIONS[0], "image": b64(image), "mask": b64(mask)}
    with client_for(pipe, max_upload_bytes=len(mask)) as client:
        r = client.post("/v1/jobs", json=body)
        assert r.status_code == 413
        assert r.json()["detail"] == (f"image: the image is {len(image)} bytes, over this server's limit of {len(mask)} bytes "
                                      f"(--max-upload-mb); send a smaller file")
        assert client.post("/v1/jobs", json={**body, "image": b64(mask)}).status_code == 202  # within the limit
    limit = 2 * 4 * -(-len(image) // 3) + 2 ** 20  # the body limit follows the upload limit: two uploads in base64 + 1 MB
    with client_for(pipe, max_upload_bytes=len(image)) as client:
        for size in (limit, limit + 1):
            padding = size - len(json.dumps({**body, "image": ""}))  # valid base64 (a multiple of 4), then JSON whitespace
            content = json.dumps({**body, "image": "A" * (padding - padding % 4)}) + " " * (padding % 4)
            r = client.post("/v1/jobs", content=content, headers={"content-type": "application/json"})
            assert r.status_code == 413
            assert r.json()["detail"].startswith("image: the image is" if size == limit else
                                                 f"request body of {limit + 1} bytes is over the limit of {limit}")
