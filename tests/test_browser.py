"""The web page in headless Chromium (Playwright): generate from a prompt, see the image and its
parameters, load parameters by dropping a diffuse PNG, inpaint with a painted mask, enter the
server's token. Screenshots go to tests/artifacts/."""

import base64
import contextlib
import io
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api")
uvicorn = pytest.importorskip("uvicorn")

from diffuse.pipeline import Pipeline  # noqa: E402
from diffuse.server import create_app  # noqa: E402

ARTIFACTS = Path(__file__).parent / "artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
CAPTIONS = ["a red circle above a blue square", "a green triangle"]
TOKEN = "browser-token"


@pytest.fixture(scope="module")
def pipe(tiny_text_model):
    return Pipeline.load(tiny_text_model({"sampler": "euler", "steps": 6, "cfg": 2.0}))


@contextlib.contextmanager
def running(app):
    """Serve ``app`` with uvicorn on a free loopback port; yields the page's URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def server_url(pipe):
    with running(create_app({"tiny-text": pipe})) as url:
        yield url


@pytest.fixture(scope="module")
def token_server_url(pipe):
    with running(create_app({"tiny-text": pipe}, token=TOKEN)) as url:
        yield url


@pytest.fixture()
def page(tmp_path):
    with playwright_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True,
                                                       args=FLAGS, viewport={"width": 1100, "height": 700})
        yield context.new_page()
        context.close()


def test_generate_shows_the_image_with_its_parameters(server_url, page):
    page.goto(server_url)
    page.wait_for_function("document.getElementById('model-info').textContent.startsWith('tiny-text')")
    assert page.input_value("#steps") == "6" and page.input_value("#sampler") == "euler" and page.input_value("#size") == "16"
    page.fill("#prompt", CAPTIONS[0])
    page.fill("#seed", "7")
    page.fill("#batch", "2")
    page.click("#generate")
    page.wait_for_selector(".card:nth-child(2) img", timeout=60_000)
    cards = page.locator(".card")
    assert cards.count() == 2
    texts = [cards.nth(i).locator(".params").inner_text() for i in range(2)]
    assert all(CAPTIONS[0] in t and "euler" in t and "6 steps" in t and "cfg 2" in t and "16x16" in t for t in texts)
    assert sorted("seed 7" in t for t in texts) == [False, True] and any("seed 8" in t for t in texts)
    assert page.evaluate("[...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth === 16)")
    assert page.inner_text("#status") == "done" and page.get_attribute("#progress", "value") == "6"
    assert page.evaluate("document.getElementById('preview').src").startswith("data:image/png;base64,")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve-page.png"), full_page=True)


def drop_gallery_png(page):
    """Drop the gallery's first PNG (the server's file, with its text chunks) onto the page."""
    page.evaluate("""async () => {
        const blob = await (await fetch(document.querySelector('.card img').src)).blob();
        const dt = new DataTransfer();
        dt.items.add(new File([blob], 'image.png', {type: 'image/png'}));
        document.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""")


def test_dropping_a_diffuse_png_loads_its_parameters(server_url, page):
    page.goto(server_url)
    page.wait_for_function("document.getElementById('model-info').textContent.startsWith('tiny-text')")
    page.fill("#prompt", CAPTIONS[1])
    page.fill("#negative_prompt", "a red circle")
    page.fill("#seed", "123")
    page.fill("#steps", "3")
    page.click("#generate")
    page.wait_for_selector(".card img", timeout=60_000)
    page.fill("#prompt", "")
    page.fill("#negative_prompt", "")
    page.fill("#seed", "0")
    page.fill("#steps", "20")
    drop_gallery_png(page)
    page.wait_for_function("document.getElementById('seed').value === '123'")
    assert page.input_value("#prompt") == CAPTIONS[1] and page.input_value("#negative_prompt") == "a red circle"
    assert page.input_value("#steps") == "3" and page.input_value("#cfg") == "2"


def test_regions_from_the_page_and_back_from_a_dropped_png(server_url, page):
    page.goto(server_url)
    page.wait_for_function("document.getElementById('model-info').textContent.startsWith('tiny-text')")
    assert not page.is_checked("#plan_layout")  # the model's default
    page.fill("#prompt", CAPTIONS[0])
    page.fill("#steps", "3")
    page.fill("#regions", "0,0,1=a red circle")
    page.click("#generate")
    page.wait_for_function("document.getElementById('error').textContent.includes('is not X0,Y0,X1,Y1=PROMPT')")
    page.fill("#regions", "0,0,0.5,1=a green triangle\n 0.5,0,1,1=a red circle ")
    page.fill("#region_background", "black")
    page.click("#generate")
    page.wait_for_selector(".card img", timeout=60_000)
    assert "regions: 2" in page.locator(".card .params").inner_text()
    page.fill("#regions", "")
    page.fill("#region_background", "")
    drop_gallery_png(page)
    page.wait_for_function("document.getElementById('regions').value !== ''")
    assert page.input_value("#regions") == "0,0,0.5,1=a green triangle\n0.5,0,1,1=a red circle"
    assert page.input_value("#region_background") == "0,0,0" and not page.is_checked("#plan_layout")


def test_inpaint_with_a_painted_mask(server_url, page, tmp_path):
    yy, xx = np.mgrid[0:16, 0:16]
    photo = np.stack([xx * 16, yy * 16, 255 - (xx + yy) * 8], -1).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    page.goto(server_url)
    page.wait_for_function("document.getElementById('model-info').textContent.startsWith('tiny-text')")
    page.click("label:has(#mode-inpaint)")
    assert page.is_hidden("#size-field") and page.is_hidden("#img2img-fields") and page.is_visible("#inpaint-fields")
    page.set_input_files("#image-file", str(tmp_path / "photo.png"))
    page.wait_for_function("document.getElementById('input-info').textContent === 'photo.png: 16x16'")
    assert page.input_value("#brush") == "2"  # an eighth of the image side
    page.fill("#prompt", CAPTIONS[1])
    page.fill("#seed", "3")
    # one horizontal stroke along image row 12, from x = 2 to x = 13
    box = page.locator("#mask-canvas").bounding_box()
    at = lambda x, y: (box["x"] + box["width"] * x / 16, box["y"] + box["height"] * y / 16)  # noqa: E731
    page.mouse.move(*at(2, 12))
    page.mouse.down()
    page.mouse.move(*at(13, 12), steps=8)
    page.mouse.up()
    page.click("#generate")
    page.wait_for_selector(".card img", timeout=60_000)
    text = page.locator(".card .params").inner_text()
    assert "inpaint" in text and CAPTIONS[1] in text and "seed 3" in text and "6 of 6 steps run" in text
    assert page.inner_text("#status") == "done" and page.get_attribute("#progress", "value") == "6"
    data = page.evaluate("""async () => {
        const bytes = new Uint8Array(await (await fetch(document.querySelector('.card img').src)).arrayBuffer());
        return btoa(String.fromCharCode(...bytes));
    }""")
    png = Image.open(io.BytesIO(base64.b64decode(data)))
    record, out = json.loads(png.text["diffuse"]), np.asarray(png)
    assert record["kind"] == "inpaint" and record["prompt"] == CAPTIONS[1] and record["seed"] == 3
    assert 0.05 < record["mask"]["replaced_fraction"] < 0.2  # a 2-pixel stroke 11 pixels long, of 256 pixels
    np.testing.assert_array_equal(out[:10], photo[:10])  # far from the stroke: exactly the input
    np.testing.assert_array_equal(out[14:], photo[14:])
    assert (out[11:13, 3:13] != photo[11:13, 3:13]).any()  # under the stroke: redrawn
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve-inpaint.png"), full_page=True)


def test_the_token_form_unlocks_the_page_and_the_docs(token_server_url, page):
    page.goto(token_server_url)
    page.wait_for_selector("#token-form:not([hidden])")
    assert page.inner_text("#model-info").endswith("missing or wrong token; send the header 'Authorization: Bearer TOKEN' "
                                                  "(enter the server's token)")
    page.fill("#token", TOKEN)
    page.click("#token-form button")
    page.wait_for_function("document.getElementById('model-info').textContent.startsWith('tiny-text')")
    assert page.is_hidden("#token-form")
    status = "async (path) => (await fetch(path)).status"  # no header: only the page's cookie
    assert page.evaluate(status, "/openapi.json") == 200 and page.evaluate(status, "/docs") == 200
    assert page.evaluate(status, "/v1/models") == 401
    # the docs page renders from the server alone (no CDN): it loads nothing from another origin
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(token_server_url + "docs")
    assert page.inner_text("h1") == "diffuse API 1" and page.is_visible("#schema-InpaintRequest")
    assert requested and all(url.startswith(token_server_url) for url in requested), requested
