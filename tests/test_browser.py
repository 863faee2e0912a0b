"""The web page in headless Chromium (Playwright): generate from a prompt, see the image and its
parameters, load parameters by dropping a diffuse PNG. Screenshots go to tests/artifacts/."""

import socket
import threading
import time
from pathlib import Path

import pytest

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


@pytest.fixture(scope="module")
def server_url(tiny_text_model):
    folder = tiny_text_model({"sampler": "euler", "steps": 6, "cfg": 2.0})
    app = create_app({"tiny-text": Pipeline.load(folder)})
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
    # drop the gallery's PNG (the server's file, with its text chunks) onto the page
    page.evaluate("""async () => {
        const blob = await (await fetch(document.querySelector('.card img').src)).blob();
        const dt = new DataTransfer();
        dt.items.add(new File([blob], 'image.png', {type: 'image/png'}));
        document.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""")
    page.wait_for_function("document.getElementById('seed').value === '123'")
    assert page.input_value("#prompt") == CAPTIONS[1] and page.input_value("#negative_prompt") == "a red circle"
    assert page.input_value("#steps") == "3" and page.input_value("#cfg") == "2"
