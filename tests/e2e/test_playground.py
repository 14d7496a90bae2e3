"""The web playground at `/`, driven end to end in headless Chromium (Debian's chromium + chromedriver, through
Selenium) against a live service with API keys on: key entry, generate, live progress from the event stream,
the image fetched with the key as a blob, its seed, manifest and timings; cancel; problem details shown, a refused
value marked at its field and kept in view; the first status before any step; the tiny-model note; image to
image and inpainting from files picked in the page (sent as multipart). Screenshots go to each test's tmp dir."""

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageDraw

from app.routes.playground import is_tiny_model
from tests.access import Key, get, keys_env, wait_final
from tests.procs import Service

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ALICE = Key("alice")

browser_missing = not CHROMIUM.exists() or not CHROMEDRIVER.exists()
needs_browser = pytest.mark.skipif(
    browser_missing,
    reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver): "
    "run scripts/ensure_chromium.sh",
)
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:  # the page test below still runs; the browser fixture skips, saying why
    webdriver = None

CHROME_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-features=Translate,OptimizationHints,MediaRouter",
    "--disable-extensions",
    "--window-size=1280,1400",
]


@pytest.fixture(scope="module")
def svc(shared_stack: Service) -> Iterator[Service]:
    """An API with keys on, on the shared stack (its worker sends a progress event per step)."""
    s = shared_stack.view(SDXL_API_KEYS=keys_env(ALICE))
    try:
        s.start_api()
        yield s
    finally:
        s.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    if webdriver is None:
        pytest.skip("needs selenium (in the dev extra): pip install -e '.[dev]'")
    # Selenium Manager never runs (the driver path is given); these keep it from trying anyway
    os.environ.setdefault("SE_OFFLINE", "true")
    os.environ.setdefault("SE_AVOID_STATS", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.TemporaryDirectory(prefix="sdxl-chromium-")
    for arg in [*CHROME_ARGS, f"--user-data-dir={profile.name}"]:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=DriverService(str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        profile.cleanup()


def fill(driver: Any, **fields: str) -> None:
    for element_id, value in fields.items():
        el = driver.find_element(By.ID, element_id.replace("_", "-"))
        el.clear()
        el.send_keys(value)


def open_page(driver: Any, svc: Service, key: str, prompt: str, **settings: str) -> None:
    driver.get(f"{svc.url}/")
    fill(driver, api_key=key, prompt=prompt, **settings)
    Select(driver.find_element(By.ID, "refiner")).select_by_value("none")


def text_of(driver: Any, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).get_attribute("textContent")).strip()


def state(driver: Any) -> str | None:
    return driver.find_element(By.ID, "run").get_attribute("data-state")


def logged_events(driver: Any) -> list[str]:
    return [str(li.get_attribute("data-event")) for li in driver.find_elements(By.CSS_SELECTOR, "#event-log li")]


IMAGE_READY = """
const img = document.querySelector('#images img');
return img && img.src.startsWith('blob:') && img.complete && img.naturalWidth > 0
  ? {src: img.src, w: img.naturalWidth, h: img.naturalHeight, seed: img.dataset.seed} : null;
"""
# every text the status line shows, in order: setStatus replaces its text node, one childList record each
RECORD_STATUSES = """
window.statusTexts = [];
new MutationObserver((records) => {
  for (const r of records) for (const n of r.addedNodes) window.statusTexts.push(n.textContent);
}).observe(document.getElementById('status'), {childList: true});
"""
# where an element is on the screen, and whether all of it is inside the viewport
IN_VIEW = """
const r = document.getElementById(arguments[0]).getBoundingClientRect();
return {top: r.top, bottom: r.bottom, height: r.height, inner: window.innerHeight,
        inside: r.height > 0 && r.top >= 0 && r.bottom <= window.innerHeight};
"""
BLOB_SHA256 = """
const done = arguments[arguments.length - 1];
fetch(arguments[0]).then(r => r.arrayBuffer()).then(b => crypto.subtle.digest('SHA-256', b))
  .then(d => done(Array.from(new Uint8Array(d)).map(x => x.toString(16).padStart(2, '0')).join('')))
  .catch(e => done('error: ' + e));
"""


def test_page_and_assets_load_without_a_key(svc: Service) -> None:
    page = httpx.get(f"{svc.url}/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert 'src="/static/app.js"' in page.text and '<label for="api-key">' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from another site
    for name, kind in [("app.js", "text/javascript"), ("app.css", "text/css")]:
        asset = httpx.get(f"{svc.url}/static/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert "https://" not in asset.text
    # the stack's tiny model, with keys on
    assert httpx.get(f"{svc.url}/playground/config").json() == {"tiny_model": True, "open": False}
    missing = httpx.get(f"{svc.url}/static/../main.py")
    assert missing.status_code == 404
    other = httpx.get(f"{svc.url}/static/index.py")
    assert other.status_code == 404 and other.headers["content-type"].startswith("application/problem+json")
    paths = httpx.get(f"{svc.url}/openapi.json").json()["paths"]
    assert "/" not in paths and not any(p.startswith(("/static", "/playground")) for p in paths)


def test_the_tiny_model_is_told_from_its_unet_config(tiny_model: Path, tmp_path: Path) -> None:
    assert is_tiny_model(str(tiny_model / "base"))
    sdxl = tmp_path / "sdxl"
    (sdxl / "unet").mkdir(parents=True)
    (sdxl / "unet" / "config.json").write_text(json.dumps({"block_out_channels": [320, 640, 1280]}))
    assert not is_tiny_model(str(sdxl))
    assert not is_tiny_model(str(tmp_path / "nowhere"))  # not on this machine: no note rather than a wrong one
    (tmp_path / "broken" / "unet").mkdir(parents=True)
    (tmp_path / "broken" / "unet" / "config.json").write_text("{not json")
    assert not is_tiny_model(str(tmp_path / "broken"))


def save_shot(driver: Any, path: Path) -> None:
    assert driver.save_screenshot(str(path))
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_browser
def test_generate_in_the_browser_with_a_key(svc: Service, browser: Any, tmp_path: Path) -> None:
    open_page(browser, svc, ALICE.secret, "a lighthouse at dusk", width="128", height="128", steps="4", seed="4321")
    note = browser.find_element(By.ID, "model-note")  # the stack runs the tiny model: its images are noise
    WebDriverWait(browser, 10).until(lambda d: note.is_displayed())
    assert "tiny" in note.text and "noise" in note.text and "SDXL_BASE_MODEL" in note.text
    browser.execute_script(RECORD_STATUSES)
    browser.find_element(By.ID, "generate").click()

    image: dict[str, Any] = WebDriverWait(browser, 120).until(lambda d: d.execute_script(IMAGE_READY))
    assert image["src"].startswith("blob:")
    assert (image["w"], image["h"]) == (128, 128)
    assert state(browser) == "succeeded"

    gen_id = text_of(browser, "gen-id")
    gen = get(svc.url, f"/v1/generations/{gen_id}", ALICE).json()  # alice's: the page sent her key
    assert gen["status"] == "succeeded"
    assert browser.execute_async_script(BLOB_SHA256, image["src"]) == gen["images"][0]["sha256"]

    assert text_of(browser, "seed-out") == "4321" and image["seed"] == "4321"
    manifest = json.loads(text_of(browser, "manifest"))
    assert manifest == gen["manifest"]
    assert manifest["params"]["seed"] == 4321 and manifest["params"]["prompt"] == "a lighthouse at dusk"
    timings = text_of(browser, "timings")
    assert "pipeline" in timings and "total" in timings

    # progress was shown live: progress events from the stream, and the bar at its end
    events = logged_events(browser)
    assert "generation.started" in events and events[-1] == "generation.succeeded"
    assert events.count("generation.progress") >= 1
    bar = browser.find_element(By.ID, "progress")
    assert bar.get_attribute("value") == bar.get_attribute("max") == "4"
    assert text_of(browser, "status").startswith("Done")
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert browser.find_element(By.ID, "cancel").get_attribute("disabled") is not None

    # the status said what was going on before the first step, never "Step 0 of 0"
    statuses: list[str] = browser.execute_script("return window.statusTexts")
    assert statuses[0] == "Submitting…" and statuses[-1].startswith("Done"), statuses
    assert statuses[1].startswith(("Queued", "Starting on a worker")), statuses
    assert not any("of 0" in text for text in statuses), statuses
    assert any(text.startswith("Step 4 of 4") for text in statuses), statuses

    browser.execute_script("window.scrollTo(0, 0)")
    save_shot(browser, tmp_path / "success.png")

    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []  # no CSP violation, no failed request, no script error

    browser.refresh()  # the key was remembered in localStorage
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == ALICE.secret


# the live preview the page shows: decoded by the browser, at the preview's own size
PREVIEW_SHOWN = """
const img = document.querySelector('#previews img');
return img && img.complete && img.naturalWidth > 0
  ? {w: img.naturalWidth, h: img.naturalHeight, step: img.dataset.step, src: img.src.slice(0, 15)} : null;
"""


@needs_browser
def test_live_previews_are_shown(svc: Service, browser: Any) -> None:
    open_page(browser, svc, ALICE.secret, "a lighthouse", width="128", height="128", steps="10")
    browser.find_element(By.ID, "previews-on").click()
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 120).until(lambda d: d.execute_script(IMAGE_READY))
    preview = browser.execute_script(PREVIEW_SHOWN)
    assert preview == {"w": 128, "h": 128, "step": "10", "src": "data:image/webp"}
    assert logged_events(browser).count("generation.preview") == 2  # steps 5 and 10
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


@needs_browser
def test_the_adapter_and_preset_pickers(svc: Service, browser: Any, tiny_adapters: Path) -> None:
    open_page(browser, svc, ALICE.secret, "a lighthouse", width="64", height="64")
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "adapters").is_displayed())
    Select(browser.find_element(By.ID, "preset")).select_by_value("lcm")
    assert browser.find_element(By.ID, "steps").get_attribute("value") == "4"  # the preset's own
    assert browser.find_element(By.ID, "scheduler").get_attribute("disabled") is not None
    Select(browser.find_element(By.ID, "lora-name")).select_by_value("tiny-style")
    fill(browser, lora_scale="0.5")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 120).until(lambda d: d.execute_script(IMAGE_READY))
    params = get(svc.url, f"/v1/generations/{text_of(browser, 'gen-id')}", ALICE).json()["params"]
    assert (params["preset"], params["num_inference_steps"], params["scheduler"]) == ("lcm", 4, "lcm")
    assert [(x["name"], x["scale"]) for x in params["loras"]] == [("tiny-lcm", 1.0), ("tiny-style", 0.5)]
    fill(browser, lora_scale="9")  # beyond the adapter's range: marked at its field
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.ID, "lora-scale").get_attribute("aria-invalid") == "true")
    assert "between -1.0 and 1.5" in text_of(browser, "lora-scale-error")
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "422" not in e["message"]] == []


@needs_browser
def test_cancel_button_stops_a_running_generation(svc: Service, browser: Any) -> None:
    open_page(browser, svc, ALICE.secret, "cancel me", width="768", height="768", steps="100")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 60).until(lambda d: state(d) == "running")
    cancel = browser.find_element(By.ID, "cancel")
    assert cancel.is_enabled()
    cancel.click()
    WebDriverWait(browser, 60).until(lambda d: state(d) == "canceled")
    assert text_of(browser, "status") == "Canceled"
    assert logged_events(browser)[-1] == "generation.canceled"
    assert browser.find_elements(By.CSS_SELECTOR, "#images img") == []
    assert browser.find_element(By.ID, "generate").is_enabled()
    gen_id = text_of(browser, "gen-id")
    assert wait_final(svc.url, gen_id, ALICE)["status"] == "canceled"


@needs_browser
def test_problem_details_are_shown(svc: Service, browser: Any) -> None:
    open_page(browser, svc, "sdxl_not_a_key", "x", width="128", height="128", steps="4")
    browser.find_element(By.ID, "generate").click()
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, 30).until(lambda d: error.is_displayed())
    assert error.text == "the API key is not valid"
    assert browser.switch_to.active_element.get_attribute("id") == "api-key"

    fill(browser, api_key=ALICE.secret, width="130")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 30).until(lambda d: "multiple of 8" in error.text)
    assert "`width`" in error.text and "130" in error.text
    assert browser.find_element(By.ID, "generate").is_enabled()


@needs_browser
def test_a_refused_value_is_marked_at_its_field_and_kept_in_view(svc: Service, browser: Any, tmp_path: Path) -> None:
    # a phone-sized window: one column, the Result section (and its error box) far below the form
    browser.set_window_size(480, 800)
    open_page(browser, svc, ALICE.secret, "x", width="1001", height="128", steps="4")
    browser.find_element(By.ID, "generate").click()
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, 30).until(lambda d: error.is_displayed())
    assert "`width` must be a multiple of 8 but is 1001" in error.text

    width = browser.find_element(By.ID, "width")
    assert width.get_attribute("aria-invalid") == "true"
    message = browser.find_element(By.ID, "width-error")
    assert message.text == "must be a multiple of 8 but is 1001"
    assert "width-error" in str(width.get_attribute("aria-describedby")).split()
    assert browser.switch_to.active_element.get_attribute("id") == "width"
    for element_id in ("width", "width-error"):  # the field and its message are on screen, not scrolled away
        where = browser.execute_script(IN_VIEW, element_id)
        assert where["inside"], (element_id, where)
    assert browser.find_element(By.ID, "height").get_attribute("aria-invalid") is None  # only the one named
    save_shot(browser, tmp_path / "error.png")

    # editing the field takes its mark away; a valid value then succeeds with no mark left
    fill(browser, width="128")
    assert width.get_attribute("aria-invalid") is None and browser.find_elements(By.ID, "width-error") == []
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 120).until(lambda d: d.execute_script(IMAGE_READY))
    assert not error.is_displayed()
    assert browser.find_elements(By.CSS_SELECTOR, "[aria-invalid]") == []


@needs_browser
def test_a_missing_prompt_is_marked_at_the_prompt(svc: Service, browser: Any) -> None:
    browser.set_window_size(480, 800)
    open_page(browser, svc, ALICE.secret, "x")
    browser.find_element(By.ID, "prompt").clear()
    browser.find_element(By.ID, "generate").click()
    assert browser.find_element(By.ID, "prompt").get_attribute("aria-invalid") == "true"
    assert "required" in text_of(browser, "prompt-error")
    assert browser.execute_script(IN_VIEW, "prompt-error")["inside"]
    assert browser.switch_to.active_element.get_attribute("id") == "prompt"


def write_png(path: Path, size: tuple[int, int], mask: bool = False) -> str:
    """A gradient picture, or a mask (black, a white rectangle in the middle), as a PNG file; its sha256."""
    w, h = size
    if mask:
        img = Image.new("L", size, 0)
        ImageDraw.Draw(img).rectangle((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=255)
    else:
        img = Image.new("RGB", size)
        img.putdata([(x * 255 // w, y * 255 // h, 96) for y in range(h) for x in range(w)])
    img.save(path, format="PNG")
    return hashlib.sha256(path.read_bytes()).hexdigest()


PREVIEW_SIZE = """
const t = document.getElementById('image-thumb');
return t.dataset.width ? [Number(t.dataset.width), Number(t.dataset.height)] : null;
"""


def pick_image(driver: Any, path: Path, size: tuple[int, int]) -> None:
    driver.find_element(By.ID, "image").send_keys(str(path))
    assert WebDriverWait(driver, 10).until(lambda d: d.execute_script(PREVIEW_SIZE)) == list(size)
    assert f"{path.name} · {size[0]}×{size[1]}" in text_of(driver, "image-info")


def run_with_image(driver: Any, svc: Service, tmp_path: Path, name: str, **files: Path) -> dict[str, Any]:
    """Submit what the page holds; the image shown and the generation (read back with alice's key)."""
    driver.find_element(By.ID, "generate").click()
    image: dict[str, Any] = WebDriverWait(driver, 120).until(lambda d: d.execute_script(IMAGE_READY))
    assert state(driver) == "succeeded"
    driver.execute_script("window.scrollTo(0, 0)")  # the screenshot shows the result, not the button clicked
    shot = tmp_path / f"{name}.png"
    assert driver.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gen = get(svc.url, f"/v1/generations/{text_of(driver, 'gen-id')}", ALICE).json()
    assert gen["status"] == "succeeded"
    assert driver.execute_async_script(BLOB_SHA256, image["src"]) == gen["images"][0]["sha256"]
    assert json.loads(text_of(driver, "manifest")) == gen["manifest"]
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
    return {"image": image, "gen": gen}


@needs_browser
def test_image_to_image_from_a_picked_file(svc: Service, browser: Any, tmp_path: Path) -> None:
    digest = write_png(tmp_path / "photo.png", (160, 128))
    open_page(browser, svc, ALICE.secret, "the same at night", steps="4", seed="21")
    assert browser.find_element(By.ID, "mask").get_attribute("disabled") is not None  # no image yet
    pick_image(browser, tmp_path / "photo.png", (160, 128))
    # the size now follows the image: width and height are emptied, mask and strength enabled
    assert browser.find_element(By.ID, "width").get_attribute("value") == ""
    assert browser.find_element(By.ID, "height").get_attribute("value") == ""
    assert browser.find_element(By.ID, "mask").is_enabled() and browser.find_element(By.ID, "strength").is_enabled()
    fill(browser, strength="0.6")

    out = run_with_image(browser, svc, tmp_path, "img2img")
    image, gen = out["image"], out["gen"]
    assert (image["w"], image["h"]) == (160, 128)  # the input's size
    assert gen["manifest"]["mode"] == "img2img"
    assert gen["manifest"]["inputs"]["image"]["sha256"] == digest
    assert gen["params"]["strength"] == 0.6 and gen["params"]["seed"] == 21
    assert text_of(browser, "mode-out") == "image to image"

    browser.find_element(By.ID, "clear-image").click()  # back to text to image, its defaults restored
    assert browser.find_element(By.ID, "image-preview").is_displayed() is False
    assert browser.find_element(By.ID, "width").get_attribute("value") == "1024"
    assert browser.find_element(By.ID, "mask").get_attribute("disabled") is not None
    assert browser.find_element(By.ID, "strength").get_attribute("value") == ""


@needs_browser
def test_inpainting_from_a_picked_image_and_mask(svc: Service, browser: Any, tmp_path: Path) -> None:
    image_digest = write_png(tmp_path / "room.png", (128, 96))
    mask_digest = write_png(tmp_path / "room-mask.png", (128, 96), mask=True)
    open_page(browser, svc, ALICE.secret, "a window in the wall", steps="4")
    pick_image(browser, tmp_path / "room.png", (128, 96))
    browser.find_element(By.ID, "mask").send_keys(str(tmp_path / "room-mask.png"))

    out = run_with_image(browser, svc, tmp_path, "inpaint")
    image, gen = out["image"], out["gen"]
    assert (image["w"], image["h"]) == (128, 96)
    inputs = gen["manifest"]["inputs"]
    assert inputs["image"]["sha256"] == image_digest and inputs["mask_image"]["sha256"] == mask_digest
    assert gen["manifest"]["mode"] == "inpaint" and gen["params"]["strength"] == 0.9999  # the default
    assert text_of(browser, "mode-out") == "inpainting"


@needs_browser
def test_an_image_of_an_unusable_size_shows_the_nearest_valid_one(svc: Service, browser: Any, tmp_path: Path) -> None:
    write_png(tmp_path / "odd.png", (100, 100))
    open_page(browser, svc, ALICE.secret, "x", steps="4")
    pick_image(browser, tmp_path / "odd.png", (100, 100))
    browser.find_element(By.ID, "generate").click()
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, 30).until(lambda d: error.is_displayed())
    assert "`image` is 100x100" in error.text and "the nearest valid size is 96x96" in error.text
    assert browser.find_element(By.ID, "image").get_attribute("aria-invalid") == "true"  # the picker is marked
    assert "the nearest valid size is 96x96" in text_of(browser, "image-error")
    assert browser.find_elements(By.CSS_SELECTOR, "#images img") == []
    assert browser.find_element(By.ID, "generate").is_enabled()
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(str(tmp_path / "odd-size.png"))

    fill(browser, width="96", height="96")  # a size given: the image is resized to it
    browser.find_element(By.ID, "generate").click()
    image = WebDriverWait(browser, 120).until(lambda d: d.execute_script(IMAGE_READY))
    assert (image["w"], image["h"]) == (96, 96)
    assert not error.is_displayed()


def test_the_service_under_test_has_keys_on(svc: Service) -> None:
    """So the browser tests prove the page sends the key: without one the API refuses."""
    assert httpx.get(f"{svc.url}/v1/generations").status_code == 401
    assert get(svc.url, "/v1/generations", ALICE).status_code == 200
