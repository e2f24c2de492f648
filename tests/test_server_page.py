"""The server's browser page (``ldm/server/static``) driven in a real headless Chromium through Selenium.

The real server runs with the shipped default model; every image the page shows is compared with the one the API
returns for the request the page sent (captured from the page's own ``fetch``), so the page is checked for what it
sends as well as for what it shows. Skips when Chromium, chromedriver, Selenium or the server package are absent.
"""
from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytest
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run")
PROMPT = "a red circle on a blue background"
SIZE = 128  # small: the 2-core CI machine runs every generation of this module in well under a minute

for _module in ("fastapi", "uvicorn"):
    pytest.importorskip(_module, reason="the server needs its extra: pip install -e '.[server]'")
from server_fixture import _no_network, make_config, start_server  # noqa: E402,F401  (_no_network: loopback allowed)


# ---- fixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real server on the shipped default model, with a live preview at most every 0.2 s."""
    running = start_server(make_config(tmp_path_factory.mktemp("page-server"), preview_interval=0.2))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium (fresh profile) driven by chromedriver."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            pytest.skip(f"{path} is not installed (Debian packages chromium and chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_window_size(1280, 1000)
    yield driver
    driver.quit()


class Page:
    """The opened page: set controls, generate, watch progress, read the gallery, replay requests."""

    def __init__(self, driver, base: str):
        self.d, self.base = driver, base

    # controls
    def el(self, element_id: str):
        return self.d.find_element("id", element_id)

    def js(self, script: str, *args: Any) -> Any:
        return self.d.execute_script(script, *args)

    def type(self, element_id: str, value: Any) -> None:
        element = self.el(element_id)
        element.clear()
        element.send_keys(str(value))

    def slide(self, element_id: str, value: float) -> None:
        self.js("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input', {bubbles: true}));",
                self.el(element_id), str(value))

    def fill(self, **fields: Any) -> None:
        for name, value in fields.items():
            self.type(name, value)

    # requests
    def requests(self) -> list[dict]:
        """Bodies of the POST requests the page sent since it was opened, parsed, with their path."""
        return [dict(json.loads(r["body"]), _path=r["url"]) for r in self.js("return window.__sent")]

    def api(self, path: str, payload: Optional[dict] = None) -> tuple[int, Any]:
        """(status, JSON body) of a request straight to the server."""
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.base + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def send(self, sent: dict) -> tuple[int, Any]:
        """(status, JSON body) of a request the page sent, sent again by the test."""
        return self.api(sent["_path"], {k: v for k, v in sent.items() if k != "_path"})

    def replay(self, sent: dict) -> dict:
        """The server's answer to a request the page sent, which must succeed."""
        status, answer = self.send(sent)
        assert status == 200, answer
        return answer

    # running
    def generate(self, watch: Callable[[], None] = lambda: None) -> str:
        """Click Generate, call ``watch()`` while the request runs; the status line at the end."""
        self.el("generate").click()
        return self.wait(watch)

    def wait(self, watch: Callable[[], None] = lambda: None, timeout: float = 240) -> str:
        """Wait for the running request to end (Generate enabled again); the status line then."""
        deadline = time.time() + timeout
        while self.el("generate").get_attribute("disabled") is not None:
            assert time.time() < deadline, "the request did not finish"
            watch()
            time.sleep(0.03)
        return self.el("progress-text").text

    def cards(self) -> list:
        """Gallery cards, newest first."""
        return self.d.find_elements("css selector", "#gallery figure.card")

    def error(self) -> Optional[str]:
        return None if self.el("error").get_attribute("hidden") is not None else self.el("error-text").text


@pytest.fixture
def page(browser, server) -> Page:
    """The page freshly opened (an empty gallery), its lists loaded, its POST bodies recorded."""
    browser.get_log("browser")  # forget what earlier tests logged
    browser.get(server.url + "/")
    p = Page(browser, server.url)
    deadline = time.time() + 30
    while p.js("return document.body.dataset.ready") != "true":
        assert time.time() < deadline, "the page never finished loading its choices"
        time.sleep(0.05)
    p.js("""window.__sent = [];
            const original = window.fetch;
            window.fetch = (url, options) => {
              if (options && options.method === 'POST' && options.body && !String(url).startsWith('/internal/'))
                window.__sent.push({url: String(url), body: options.body});  // not the progress polls
              return original(url, options);
            };""")
    return p


# ---- helpers ----------------------------------------------------------------------------------------------------

def pixels(data: str) -> np.ndarray:
    """A base64 PNG (or data URL) as an RGB array."""
    text = data.split(",", 1)[1] if data.startswith("data:") else data
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


def card_image(card) -> np.ndarray:
    return pixels(card.find_element("css selector", "img.gallery-image").get_attribute("src"))


def card_text(card) -> str:
    return card.find_element("css selector", ".infotext").text


def small_run(page: Page, seed: int, steps: int = 8, **extra: Any) -> None:
    page.fill(prompt=PROMPT, steps=steps, seed=seed, width=SIZE, height=SIZE, **extra)


# ---- tests ------------------------------------------------------------------------------------------------------

def test_page_choices_labels_and_narrow_layout(page):
    _, samplers = page.api("/sdapi/v1/samplers")
    _, schedulers = page.api("/sdapi/v1/schedulers")
    _, models = page.api("/sdapi/v1/sd-models")
    shown = page.js("return [...document.querySelectorAll('#sampler_name option')].map(o => o.value)")
    assert shown == [s["name"] for s in samplers]
    shown = page.js("return [...document.querySelectorAll('#scheduler option')].map(o => o.value)")
    assert shown == [s.get("label") or s["name"] for s in schedulers]
    _, options = page.api("/sdapi/v1/options")
    shown = page.js("return [...document.querySelectorAll('#sd_model_checkpoint option')].map(o => o.textContent)")
    assert shown == [m["title"] for m in models] and len(shown) >= 2
    (current,) = [m for m in models if m["title"] == options["sd_model_checkpoint"]]
    assert page.el("sd_model_checkpoint").get_attribute("value") == current["model_name"]

    unlabeled = page.js("""return [...document.querySelectorAll('input, select, textarea, button')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
        .map(e => e.id || e.outerHTML)""")
    assert unlabeled == []
    ids = page.js("return [...document.querySelectorAll('[id]')].map(e => e.id)")
    assert len(ids) == len(set(ids))
    assert not [entry for entry in page.d.get_log("browser") if entry["level"] == "SEVERE"]

    page.d.set_window_size(380, 900)
    try:
        overflow = page.js("return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0
        assert page.el("generate").is_displayed() and page.el("prompt").size["width"] > 250
    finally:
        page.d.set_window_size(1280, 1000)


def test_txt2img_shows_progress_preview_and_gallery(page):
    small_run(page, seed=1234, steps=16, batch_size=2)
    seen: list[tuple[float, int, str]] = []  # (progress bar value, length of the shown preview's src, status line)

    def watch() -> None:
        seen.append(tuple(page.js(
            "const p = document.getElementById('preview');"
            "return [document.getElementById('progress-bar').value,"
            "        p.hidden ? 0 : (p.getAttribute('src') || '').length,"
            "        document.getElementById('progress-text').textContent]")))

    status = page.generate(watch)

    assert page.error() is None
    assert status.startswith("Done: 2 images"), status
    moving = [value for value, _, _ in seen if 0 < value < 100]
    assert len(set(moving)) >= 2, seen  # the bar moved through intermediate values while the request ran
    assert moving == sorted(moving)
    assert any(length > 100 for _, length, _ in seen), "no live preview image was shown"
    assert any(re.fullmatch(r"step ([1-9]|1[0-6])/16 · \d+% · ETA \d+\.\d s", text) for _, _, text in seen), seen

    (sent,) = page.requests()
    assert sent["_path"] == "/sdapi/v1/txt2img"
    assert {k: sent[k] for k in ("prompt", "steps", "seed", "width", "height", "batch_size", "n_iter")} == dict(
        prompt=PROMPT, steps=16, seed=1234, width=SIZE, height=SIZE, batch_size=2, n_iter=1)
    assert sent["sampler_name"] == page.el("sampler_name").get_attribute("value")
    answer = page.replay(sent)
    info = json.loads(answer["info"])

    cards = page.cards()
    assert len(cards) == 2 and page.el("gallery-count").text == "2"
    for card, image, text, seed in zip(reversed(cards), answer["images"], info["infotexts"], (1234, 1235)):
        assert card_text(card) == text  # newest first: the first image of the batch is the last card
        assert text.startswith(PROMPT) and f"Seed: {seed}," in text and "Steps: 16," in text
        assert f"Size: {SIZE}x{SIZE}" in text
        np.testing.assert_array_equal(card_image(card), pixels(image))
    assert card_image(cards[0]).shape == (SIZE, SIZE, 3)

    cards[0].find_element("css selector", ".use-seed").click()
    assert page.el("seed").get_attribute("value") == "1235"
    page.el("seed-reuse").click()
    assert page.el("seed").get_attribute("value") == "1234"


def test_server_and_form_errors_are_readable(page):
    small_run(page, seed=1, steps=0)
    assert page.generate().startswith("Failed")
    (sent,) = page.requests()
    status, answer = page.send(sent)
    assert status == 422, answer
    shown = page.error()
    detail = answer["detail"]
    for message in ([detail] if isinstance(detail, str) else [item["msg"] for item in detail]):
        assert message in shown
    assert "steps" in shown
    assert page.cards() == []

    page.fill(steps=4, width=100)  # not a multiple of 8
    assert page.generate().startswith("Failed")
    status, answer = page.send(page.requests()[-1])
    assert status == 422 and isinstance(answer["detail"], str)
    assert page.error() == answer["detail"] and "100" in answer["detail"]

    page.type("cfg_scale", "")
    page.el("generate").click()
    assert page.error() == "CFG scale: enter a number."
    assert len(page.requests()) == 2  # nothing was sent for the form error
    page.el("error-close").click()
    assert page.error() is None


def test_interrupt_ends_a_long_run_early(page):
    page.fill(prompt=PROMPT, steps=150, seed=5, width=SIZE, height=SIZE, n_iter=4)
    started = time.time()
    page.el("generate").click()
    fraction = 0.0
    while fraction <= 0:
        assert time.time() - started < 120, "no progress reported"
        fraction = float(page.el("progress-bar").get_attribute("value")) / 100
        time.sleep(0.05)
    assert re.match(r"batch 1/4 · step \d+/150 · \d+%", page.el("progress-text").text), page.el("progress-text").text
    assert page.el("interrupt").is_enabled()
    clicked = time.time()
    page.el("interrupt").click()
    status = page.wait()
    stopped_after = time.time() - clicked
    remaining = (clicked - started) * (1 - fraction) / fraction  # at the rate seen so far
    assert stopped_after < remaining / 3, (stopped_after, remaining)
    assert status.startswith("Interrupted"), status
    assert page.error() is None
    assert 1 <= len(page.cards()) < 4  # the images it had, not the four batches asked for
    assert not page.el("interrupt").is_enabled()


def test_a_queued_request_shows_its_place_and_interrupt_withdraws_only_it(page):
    """Behind another client's job the page says it waits (its own task id); Interrupt then withdraws the page's
    request and leaves the other client's job running."""
    other: list = []
    client = threading.Thread(target=lambda: other.append(page.api("/sdapi/v1/txt2img", {
        "prompt": PROMPT, "seed": 9, "width": SIZE, "height": SIZE, "steps": 150, "force_task_id": "task(other)"})))
    client.start()
    deadline = time.time() + 60
    while not page.api("/internal/progress", {"id_task": "task(other)"})[1]["active"]:
        assert time.time() < deadline, "the other client's job never started"
        time.sleep(0.05)
    page.fill(prompt=PROMPT, steps=4, width=SIZE, height=SIZE)
    page.el("generate").click()
    while page.el("progress-text").text != "In queue: 1/1":
        assert time.time() < deadline, page.el("progress-text").text
        time.sleep(0.05)
    (sent,) = page.requests()
    assert sent["force_task_id"].startswith("task(page-")
    page.el("interrupt").click()
    status = page.wait(timeout=60)
    assert status.startswith("Interrupted: withdrawn"), status
    assert page.error() is None and not page.cards()
    withdrawn = time.time() + 10  # the server notices the closed request and drops the queued job
    while page.api("/internal/progress", {"id_task": sent["force_task_id"]})[1]["queued"]:
        assert time.time() < withdrawn, "the page's request stayed in the queue"
        time.sleep(0.1)
    assert page.api("/sdapi/v1/progress")[1]["state"]["queue_pending"] == 0
    running = page.api("/internal/progress", {"id_task": "task(other)"})[1]
    assert running["active"] and not page.api("/sdapi/v1/progress")[1]["state"]["interrupted"]
    page.api("/sdapi/v1/interrupt", {})
    client.join(60)
    assert other and other[0][0] == 200 and json.loads(other[0][1]["info"])["interrupted"] is True


def test_init_image_from_a_file(page, tmp_path):
    picture = np.zeros((64, 96, 3), np.uint8)
    picture[:, :48] = (200, 30, 30)
    Image.fromarray(picture).save(tmp_path / "init.png")
    page.el("tab-img2img").click()
    page.el("init-image-file").send_keys(str(tmp_path / "init.png"))
    deadline = time.time() + 10
    while page.el("width").get_attribute("value") != "96":
        assert time.time() < deadline, "the chosen file never became the init image"
        time.sleep(0.05)
    assert page.el("height").get_attribute("value") == "64"
    np.testing.assert_array_equal(pixels(page.el("init-image").get_attribute("src")), picture)
    assert page.js("const c = document.getElementById('mask-canvas'); return [c.width, c.height]") == [96, 64]


def test_send_to_img2img_and_generate(page):
    small_run(page, seed=7)
    page.generate()
    (card,) = page.cards()
    card.find_element("css selector", ".send-img2img").click()
    assert page.el("tab-img2img").get_attribute("aria-selected") == "true"
    assert page.el("panel-img2img").is_displayed() and page.el("init-image").is_displayed()
    source = card.find_element("css selector", "img.gallery-image").get_attribute("src")
    assert page.el("init-image").get_attribute("src") == source
    assert page.el("width").get_attribute("value") == str(SIZE)

    page.slide("denoising_strength", 0.5)
    assert page.el("denoising_strength-value").text == "0.5"
    assert page.generate().startswith("Done: 1 image")
    sent = page.requests()[-1]
    assert sent["_path"] == "/sdapi/v1/img2img" and sent["denoising_strength"] == 0.5 and "mask" not in sent
    np.testing.assert_array_equal(pixels(sent["init_images"][0]), card_image(card))

    newest = page.cards()[0]
    answer = page.replay(sent)
    assert card_text(newest) == json.loads(answer["info"])["infotexts"][0]
    assert "Denoising strength: 0.5" in card_text(newest)
    np.testing.assert_array_equal(card_image(newest), pixels(answer["images"][0]))
    changed = float(np.abs(card_image(newest).astype(int) - card_image(card)).mean())
    assert changed > 0.5, changed  # img2img did change the image

    page.el("tab-txt2img").click()
    assert not page.el("panel-img2img").is_displayed()
    page.generate()
    assert page.requests()[-1]["_path"] == "/sdapi/v1/txt2img" and "init_images" not in page.requests()[-1]


def _capsule(shape: tuple[int, int], a: tuple[float, float], b: tuple[float, float], radius: float) -> np.ndarray:
    """Pixels (by centre) within ``radius`` of the segment a-b: the stroke of a round brush."""
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]] + 0.5
    (ax, ay), (bx, by) = a, b
    t = np.clip(((xs - ax) * (bx - ax) + (ys - ay) * (by - ay)) / max((bx - ax) ** 2 + (by - ay) ** 2, 1e-9), 0, 1)
    return np.hypot(xs - (ax + t * (bx - ax)), ys - (ay + t * (by - ay))) <= radius


def test_paint_a_mask_and_inpaint(page):
    from selenium.webdriver.common.action_chains import ActionChains

    small_run(page, seed=11)
    page.generate()
    (card,) = page.cards()
    original = card_image(card)
    card.find_element("css selector", ".send-img2img").click()
    tools = ("brush-size", "mask_blur", "inpaint_full_res", "mask-clear")
    assert not any(page.el(tool).is_displayed() for tool in tools)  # the mask tools appear with inpaint
    page.el("inpaint").click()
    assert all(page.el(tool).is_displayed() for tool in tools)
    brush = 24  # canvas (= init image) pixels
    page.slide("brush-size", brush)

    canvas = page.el("mask-canvas")
    scale = SIZE / canvas.size["width"]  # image pixels per CSS pixel: the image is shown at the panel's width
    assert abs(scale - SIZE / page.el("init-image").size["width"]) < 1e-6 and scale < 0.6
    half = 30  # the stroke: 60 image pixels through the centre, drawn in two moves
    ActionChains(page.d).move_to_element_with_offset(canvas, round(-half / scale), 0).click_and_hold() \
        .move_by_offset(round(half / scale), 0).move_by_offset(round(half / scale), 0).release().perform()
    mask = pixels(page.js("return window.ldmPage.maskBase64()"))[..., 0]
    assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) == {0, 255}
    centre = SIZE / 2

    def stroke(radius: float) -> np.ndarray:
        return _capsule(mask.shape, (centre - half, centre), (centre + half, centre), radius)

    inner, outer = stroke(brush / 2 - 2), stroke(brush / 2 + 2)
    assert (mask[inner] == 255).all() and (mask[~outer] == 0).all()  # white exactly where painted
    assert abs((mask == 255).sum() - stroke(brush / 2).sum()) < 0.1 * stroke(brush / 2).sum()

    page.fill(prompt="a yellow square on a purple background")
    page.slide("denoising_strength", 1)
    page.slide("mask_blur", 2)
    assert page.generate().startswith("Done: 1 image")
    sent = page.requests()[-1]
    assert sent["_path"] == "/sdapi/v1/img2img"
    assert sent["mask_blur"] == 2 and sent["inpaint_full_res"] is False and sent["denoising_strength"] == 1
    assert "Mask blur: 2" in card_text(page.cards()[0])
    np.testing.assert_array_equal(pixels(sent["mask"])[..., 0], mask)
    answer = page.replay(sent)
    result = card_image(page.cards()[0])
    np.testing.assert_array_equal(result, pixels(answer["images"][0]))
    change = np.abs(result.astype(int) - original).max(axis=2)
    far = ~stroke(brush / 2 + 16)  # beyond the mask's blur
    far_change, inner_change = int(change[far].max()), float(change[inner].mean())
    assert far_change <= 2, f"pixels far from the mask changed by up to {far_change}"
    assert inner_change > 20, f"the masked area was hardly repainted (mean change {inner_change:.1f})"

    page.el("mask-clear").click()
    assert page.js("return window.ldmPage.maskBase64()") is None
    page.el("generate").click()
    assert "mask is empty" in page.error()
    page.el("inpaint").click()
    assert not page.el("mask-canvas").is_displayed()


def test_switch_model(page):
    from selenium.webdriver.support.ui import Select

    before = page.api("/sdapi/v1/options")[1]["sd_model_checkpoint"]
    (other,) = [m for m in page.api("/sdapi/v1/sd-models")[1] if m["title"] != before][:1]
    try:
        Select(page.el("sd_model_checkpoint")).select_by_value(other["model_name"])
        assert page.wait().startswith("Model"), page.el("progress-text").text
        assert page.error() is None
        assert page.requests() == [{"sd_model_checkpoint": other["model_name"], "_path": "/sdapi/v1/options"}]
        now = page.api("/sdapi/v1/options")[1]["sd_model_checkpoint"]
        assert now != before and now.startswith(other["model_name"])
        selected = page.js("return document.getElementById('sd_model_checkpoint').selectedOptions[0].textContent")
        assert selected == now  # the list was read again: the title now has the hash
        small_run(page, seed=3, steps=2)
        page.generate()
        assert card_text(page.cards()[0]).endswith(f"Model: {Path(other['filename']).stem}")  # made by that model
    finally:
        page.api("/sdapi/v1/options", {"sd_model_checkpoint": before})
