"""The web page at `/` in a real browser: Debian's headless Chromium driven by Selenium, against a real
`python -m server` process on 127.0.0.1 with tiny synthetic checkpoints (64×64 images, 2 steps).

Queue and history tests skip with a reason while the server has no `/sd15/v1/jobs`. Screenshots (desktop and
phone, light and dark) land in `screenshots/` (git-ignored)."""
from __future__ import annotations

import base64
import io
import json
import os
import time

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

requests = pytest.importorskip("requests")
selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from test_reliability_live import LiveServer  # noqa: E402

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not (os.path.exists("/usr/bin/chromium") and os.path.exists("/usr/bin/chromedriver")),
                                 reason="needs Debian's chromium and chromium-driver (apt-get install)")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUTH = ("admin", "s3cret-page")
SHOTS = os.path.join(ROOT, "screenshots")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real server process over tiny checkpoints and one broken file (saved images go to its own folder)."""
    def add_broken(folders):
        with open(os.path.join(folders["ckpt_dir"], "broken.safetensors"), "wb") as f:
            f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + b"\0" * 64)
    live = LiveServer(tmp_path_factory.mktemp("browser"), auth=AUTH, prepare=add_broken)
    try:
        yield live.url
    finally:
        live.stop(timeout=20)


@pytest.fixture
def browser(server):
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    driver.set_window_size(1400, 900)
    token = base64.b64encode(f"{AUTH[0]}:{AUTH[1]}".encode()).decode()
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver, url):
    driver.get(url + "/")
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        "return document.body.classList.contains('ready') && document.getElementById('sampler_name').options.length > 0"))


def set_field(driver, element_id, value):
    driver.execute_script("""
        const el = document.getElementById(arguments[0]);
        if (el.type === 'checkbox') el.checked = arguments[1]; else el.value = String(arguments[1]);
        el.dispatchEvent(new Event('input', {bubbles: true})); el.dispatchEvent(new Event('change', {bubbles: true}));
    """, element_id, value)


def field(driver, element_id):
    return driver.execute_script(
        "const el = document.getElementById(arguments[0]); return el.type === 'checkbox' ? el.checked : el.value;",
        element_id)


def wait_result(driver, timeout=120):
    """The shown result image (data URL) once the result actions appear; fails on an error message."""
    def done(d):
        err = d.execute_script("const e = document.getElementById('error'); return e.hidden ? null : e.textContent")
        if err:
            pytest.fail(f"page error: {err}")
        return d.execute_script("return !document.getElementById('result-actions').hidden")
    WebDriverWait(driver, timeout).until(done)
    return driver.execute_script("return document.getElementById('preview').src")


def data_url_image(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def png_bytes(image: Image.Image, text: str | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    if text:
        info.add_text("parameters", text)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def drop_file(driver, data: bytes, target_css="body", name="image.png"):
    """Drop a file on an element the way a browser does (a `drop` event carrying a DataTransfer)."""
    driver.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], arguments[2], {type: 'image/png'}));
        const target = document.querySelector(arguments[1]);
        target.dispatchEvent(new DragEvent('dragover', {bubbles: true, cancelable: true, dataTransfer: dt}));
        target.dispatchEvent(new DragEvent('drop', {bubbles: true, cancelable: true, dataTransfer: dt}));
    """, base64.b64encode(data).decode(), target_css, name)


def console_errors(driver):
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


SMALL = {"steps": 2, "width": 64, "height": 64}


# =============================================================================================

def test_page_needs_credentials(server):
    for path in ("/", "/static/app.js", "/static/style.css", "/sd15/v1/history"):
        r = requests.get(server + path)
        assert r.status_code == 401 and r.json()["detail"] == "Not authenticated", path
    assert requests.get(server + "/", auth=(AUTH[0], "wrong")).status_code == 401
    assert requests.get(server + "/", auth=AUTH).status_code == 200


def test_generate_with_ctrl_enter_matches_the_api(server, browser):
    open_page(browser, server)
    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys("a red fox in the snow")
    for key, value in {**SMALL, "seed": 1234, "cfg_scale": 6.5}.items():
        set_field(browser, key, value)
    set_field(browser, "sampler_name", "Euler a")
    prompt.send_keys(Keys.CONTROL, Keys.ENTER)
    shown = data_url_image(wait_result(browser))

    body = {"prompt": "a red fox in the snow", "negative_prompt": "", "sampler_name": "Euler a",
            "scheduler": "automatic", "seed": 1234, "cfg_scale": 6.5, "n_iter": 1, "batch_size": 1,
            "subseed": -1, "subseed_strength": 0, **SMALL}
    r = requests.post(f"{server}/sdapi/v1/txt2img", json=body, auth=AUTH, timeout=300)
    assert r.status_code == 200, r.text
    expected = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert shown.size == expected.size == (64, 64)
    assert np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(expected.convert("RGB")))
    infotext = browser.find_element(By.ID, "infotext").text
    assert infotext == expected.info["parameters"]
    # the token counter counted the prompt with the server's tokenizer: "a red fox in the snow" is 6 tokens
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "prompt-tokens").text == "6/75")
    # ♻ reuses the seed of the last result
    set_field(browser, "seed", -1)
    browser.find_element(By.ID, "seed-reuse").click()
    assert field(browser, "seed") == "1234"
    # reuse parameters restores the form from the image; the full-size viewer opens and Esc closes it
    set_field(browser, "steps", 9)
    browser.find_element(By.ID, "reuse").click()
    WebDriverWait(browser, 20).until(lambda d: field(d, "steps") == "2")
    browser.find_element(By.ID, "view").click()
    assert browser.find_element(By.ID, "viewer").get_attribute("open") is not None
    browser.find_element(By.ID, "viewer-close").send_keys(Keys.ESCAPE)
    WebDriverWait(browser, 5).until(lambda d: d.find_element(By.ID, "viewer").get_attribute("open") is None)
    # send to inpaint: the img2img tab with the image as init image and the mask tools on
    browser.find_element(By.ID, "to-inpaint").click()
    WebDriverWait(browser, 10).until(lambda d: d.execute_script("return document.getElementById('mask-canvas').width") == 64)
    assert not browser.find_element(By.ID, "img2img-fields").get_attribute("hidden")
    assert field(browser, "inpaint") is True


def test_result_in_webp_is_shown_and_named_as_webp(server, browser):
    """`samples_format` webp: the page shows the image as WebP, downloads it as .webp, and reuses its
    parameters from the EXIF UserComment."""
    options = f"{server}/sdapi/v1/options"
    assert requests.post(options, json={"samples_format": "webp"}, auth=AUTH, timeout=30).status_code == 200
    try:
        open_page(browser, server)
        browser.find_element(By.ID, "prompt").send_keys("a fox")
        for key, value in {**SMALL, "seed": 77}.items():
            set_field(browser, key, value)
        browser.find_element(By.ID, "generate").click()
        src = wait_result(browser)
        assert src.startswith("data:image/webp;base64,") and data_url_image(src).format == "WEBP"
        assert browser.find_element(By.ID, "download").get_attribute("download") == "77.webp"
        set_field(browser, "steps", 9)
        browser.find_element(By.ID, "reuse").click()
        WebDriverWait(browser, 20).until(lambda d: field(d, "steps") == "2" and field(d, "seed") == "77")
    finally:
        requests.post(options, json={"samples_format": "png"}, auth=AUTH, timeout=30)


INFOTEXT = ("a castle on a hill, (sunset:1.2)\nNegative prompt: blurry, low quality\n"
            "Steps: 27, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 9.5, Seed: 424242, Size: 512x768, "
            "Model hash: 0123456789, Model: v1-5-pruned-emaonly, Variation seed: 99, Variation seed strength: 0.3, "
            "Denoising strength: 0.45, Clip skip: 2, Hires upscale: 1.5, Hires steps: 12, "
            "Hires upscaler: Latent (bicubic), RNG: CPU, Mask blur: 6, Masked content: latent noise, "
            "Inpaint area: Only masked, Masked area padding: 48, Mask mode: Inpaint not masked, Version: v1.10.1")


def test_dropped_png_restores_every_field(server, browser):
    open_page(browser, server)
    drop_file(browser, png_bytes(Image.new("RGB", (16, 16)), INFOTEXT))
    WebDriverWait(browser, 20).until(lambda d: field(d, "seed") == "424242")
    expected = {
        "prompt": "a castle on a hill, (sunset:1.2)", "negative_prompt": "blurry, low quality", "steps": "27",
        "sampler_name": "DPM++ 2M", "scheduler": "karras", "cfg_scale": "9.5", "seed": "424242", "width": "512",
        "height": "768", "subseed": "99", "subseed_strength": "0.3", "clip_skip": "2", "randn_source": "CPU",
        "enable_hr": True, "hr_scale": "1.5", "hr_second_pass_steps": "12", "hr_upscaler": "Latent (bicubic)",
        "hr_denoising_strength": "0.45", "batch_size": "1", "mask_blur": "6", "inpainting_fill": "2",
        "inpaint_full_res": "true", "inpaint_full_res_padding": "48", "inpainting_mask_invert": "1",
    }
    assert {k: field(browser, k) for k in expected} == expected
    # A1111's old combined sampler names are split into sampler + schedule type; no hires keys turn it off
    old = "a cat\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 5, Size: 512x512, Model: x"
    drop_file(browser, png_bytes(Image.new("RGB", (16, 16)), old))
    WebDriverWait(browser, 20).until(lambda d: field(d, "seed") == "5")
    assert (field(browser, "sampler_name"), field(browser, "scheduler"), field(browser, "enable_hr")) == \
        ("DPM++ 2M", "karras", False)
    assert (field(browser, "subseed_strength"), field(browser, "negative_prompt")) == ("0", "")
    # the PNG Info view shows the infotext and sends it to txt2img
    browser.find_element(By.CSS_SELECTOR, "[data-tab=pnginfo]").click()
    drop_file(browser, png_bytes(Image.new("RGB", (16, 16)), INFOTEXT))
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "png-text").text.startswith("a castle"))
    browser.find_element(By.ID, "png-restore").click()
    WebDriverWait(browser, 20).until(lambda d: field(d, "seed") == "424242")
    assert not browser.find_element(By.ID, "gen").get_attribute("hidden")
    # an image without parameters is said so, and the form stays
    drop_file(browser, png_bytes(Image.new("RGB", (16, 16))))
    WebDriverWait(browser, 20).until(lambda d: "no generation parameters" in d.find_element(By.ID, "error").text)
    assert field(browser, "seed") == "424242"


def sent_generations(driver):
    """The txt2img/img2img request bodies the page sent since the performance log was last read."""
    sent = [json.loads(e["message"])["message"]["params"]["request"] for e in driver.get_log("performance")
            if '"Network.requestWillBeSent"' in e["message"]]
    bodies = [json.loads(r["postData"]) for r in sent
              if r["method"] == "POST" and r["url"].endswith(("/sdapi/v1/txt2img", "/sd15/v1/jobs"))]
    return [b.get("request", b) for b in bodies]


def test_dropped_png_settings_are_override_chips(server, browser):
    """A1111's "Override settings" after a paste: the infotext's settings that differ from the server's
    options show as chips and go out as override_settings until removed (by keyboard here); Eta 1 (the
    option's own value) and Clip skip (a form control, restored into it) get no chip."""
    open_page(browser, server)
    text = ("a small house\nSteps: 2, Sampler: Euler, Schedule type: Karras, CFG scale: 7, Seed: 8, "
            "Size: 64x64, Clip skip: 2, Schedule rho: 3, ENSD: 31337, Eta: 1")
    drop_file(browser, png_bytes(Image.new("RGB", (16, 16)), text))
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#overrides .chip"))
    chips = browser.find_elements(By.CSS_SELECTOR, "#overrides .chip")
    assert [c.text for c in chips] == ["ENSD: 31337 ×", "Schedule rho: 3 ×"]
    assert field(browser, "clip_skip") == "2"
    os.makedirs(SHOTS, exist_ok=True)
    for w, h in ((1400, 900), (390, 844)):
        browser.set_window_size(w, h)
        browser.execute_script("document.getElementById('overrides').scrollIntoView({block: 'center'})")
        time.sleep(0.3)
        assert browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth") <= 0
        browser.save_screenshot(os.path.join(SHOTS, f"override-chips-{w}.png"))
    browser.set_window_size(1400, 900)
    browser.get_log("performance")
    browser.find_element(By.ID, "generate").click()
    wait_result(browser)
    assert sent_generations(browser)[-1]["override_settings"] == {
        "eta_noise_seed_delta": 31337, "rho": 3, "CLIP_stop_at_last_layers": 2, "randn_source": "GPU"}
    assert "Schedule rho: 3" in browser.find_element(By.ID, "infotext").text  # the server used it
    # Enter on a chip removes it and moves the focus to the next chip; the next request goes without it
    chips[0].send_keys(Keys.ENTER)
    chips = browser.find_elements(By.CSS_SELECTOR, "#overrides .chip")
    assert [c.text for c in chips] == ["Schedule rho: 3 ×"]
    assert browser.execute_script("return document.activeElement.dataset.option") == "rho"
    browser.find_element(By.ID, "generate").click()
    wait_result(browser)
    assert sent_generations(browser)[-1]["override_settings"] == {
        "rho": 3, "CLIP_stop_at_last_layers": 2, "randn_source": "GPU"}
    chips[0].send_keys(Keys.SPACE)  # the last one: the row hides, Generate gets the focus
    assert browser.find_element(By.ID, "overrides").get_attribute("hidden") is not None
    assert browser.switch_to.active_element.get_attribute("id") == "generate"


def test_painted_mask_changes_only_the_painted_region(server, browser):
    open_page(browser, server)
    browser.find_element(By.CSS_SELECTOR, "[data-tab=img2img]").click()
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    drop_file(browser, png_bytes(init), "#init-drop")
    WebDriverWait(browser, 10).until(lambda d: d.execute_script("return document.getElementById('mask-canvas').width") == 64)
    browser.find_element(By.ID, "inpaint").click()
    set_field(browser, "brush-size", 8)
    canvas = browser.find_element(By.ID, "mask-canvas")
    rect = browser.execute_script("return arguments[0].getBoundingClientRect().toJSON()", canvas)
    scale = rect["width"] / 64
    # a stroke across the upper-left quarter (canvas pixels 10..30 on row 12)
    ActionChains(browser).move_to_element_with_offset(canvas, int((10 - 32) * scale), int((12 - 32) * scale)) \
        .click_and_hold().move_by_offset(int(20 * scale), 0).release().perform()
    alpha = np.array(browser.execute_script(
        "const c = document.getElementById('mask-canvas');"
        "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data.filter((_, i) => i % 4 === 3));"),
        dtype=np.uint8).reshape(64, 64)
    painted = alpha > 0
    assert 40 < painted.sum() < 600 and painted[12, 20] and not painted[50, 50]
    for key, value in {**SMALL, "seed": 7, "denoising_strength": 1.0, "mask_blur": 0, "inpainting_fill": 2,
                       "inpaint_full_res": "false"}.items():
        set_field(browser, key, value)
    browser.find_element(By.ID, "generate").click()
    out = np.asarray(data_url_image(wait_result(browser)).convert("RGB")).astype(int)
    before = np.asarray(init).astype(int)
    assert np.array_equal(out[~painted], before[~painted])  # untouched outside the mask, pixel for pixel
    assert np.abs(out[painted] - before[painted]).max() > 0  # repainted inside
    # undo empties the mask again
    browser.find_element(By.ID, "undo").click()
    assert browser.execute_script(
        "const c = document.getElementById('mask-canvas');"
        "return c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some((v, i) => i % 4 === 3 && v > 0)") is False


def test_model_switching_and_a_bad_file(server, browser):
    open_page(browser, server)
    options = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#checkpoint option")]
    other = next(o for o in options if o.startswith("sub/other.safetensors"))
    broken = next(o for o in options if o.startswith("broken.safetensors"))
    try:
        set_field(browser, "checkpoint", other)
        WebDriverWait(browser, 120).until(lambda d: d.find_element(By.ID, "model-status").text.startswith("Loaded"))
        current = requests.get(f"{server}/sdapi/v1/options", auth=AUTH).json()["sd_model_checkpoint"]
        assert current.startswith("sub/other.safetensors")
        set_field(browser, "checkpoint", broken)
        WebDriverWait(browser, 120).until(lambda d: "Could not load" in d.find_element(By.ID, "model-status").text)
        assert "broken.safetensors" in browser.find_element(By.ID, "model-status").text
        assert field(browser, "checkpoint").startswith("sub/other.safetensors")  # the old model stays
        current = requests.get(f"{server}/sdapi/v1/options", auth=AUTH).json()["sd_model_checkpoint"]
        assert current.startswith("sub/other.safetensors")
    finally:
        requests.post(f"{server}/sdapi/v1/options", json={"sd_model_checkpoint": "v1-5-pruned-emaonly.safetensors"},
                      auth=AUTH, timeout=300)


def test_interrupt_with_escape(server, browser):
    open_page(browser, server)
    for key, value in {**SMALL, "steps": 400}.items():
        set_field(browser, key, value)
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 120).until(lambda d: "step " in d.find_element(By.ID, "progress-text").text)
    assert not browser.find_element(By.ID, "progress").get_attribute("hidden")
    # a live preview (A1111's defaults: every 10 steps, "Approx NN" without its file = "Approx cheap": one pixel
    # per latent cell, 8×8 for a 64×64 image) arrives over the event stream
    WebDriverWait(browser, 120).until(lambda d: d.execute_script(
        "const p = document.getElementById('preview'); return !p.hidden && p.src.startsWith('data:') && p.naturalWidth === 8"))
    os.makedirs(SHOTS, exist_ok=True)
    browser.save_screenshot(os.path.join(SHOTS, "generating-preview.png"))
    started = time.time()
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    shown = data_url_image(wait_result(browser, timeout=60))
    assert shown.size == (64, 64)
    assert time.time() - started < 60  # 400 steps take minutes here; the interrupted job returns at once
    assert requests.get(f"{server}/sdapi/v1/progress", auth=AUTH).json()["state"]["job_count"] == 0


def test_a_running_job_shows_after_reload(server, browser):
    """A job that is already running when the page opens (a reload, another client) shows its progress."""
    import threading

    out = {}
    t = threading.Thread(target=lambda: out.update(r=requests.post(
        f"{server}/sdapi/v1/txt2img", auth=AUTH, timeout=600, json={"prompt": "x", "seed": 1, **SMALL, "steps": 400})))
    t.start()
    try:
        deadline = time.time() + 120
        while requests.get(f"{server}/sdapi/v1/progress", auth=AUTH).json()["state"]["sampling_step"] < 1:
            assert time.time() < deadline
            time.sleep(0.1)
        open_page(browser, server)
        WebDriverWait(browser, 30).until(lambda d: "/400" in d.find_element(By.ID, "progress-text").text)
        browser.find_element(By.ID, "interrupt").click()
        WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "progress").get_attribute("hidden"))
    finally:
        requests.post(f"{server}/sdapi/v1/interrupt", auth=AUTH)
        t.join(600)
    assert out["r"].status_code == 200


def test_layouts_themes_and_screenshots(server, browser):
    """Desktop 1400×900 and phone 390×844, light and dark: no horizontal scroll, the image above the form on
    the phone, the theme applied, first paint under a second; screenshots in screenshots/."""
    os.makedirs(SHOTS, exist_ok=True)
    open_page(browser, server)
    browser.find_element(By.ID, "prompt").send_keys("a lighthouse at dusk")
    for key, value in {**SMALL, "seed": 3}.items():
        set_field(browser, key, value)
    browser.find_element(By.ID, "generate").click()
    wait_result(browser)
    for (w, h), theme in [((1400, 900), "light"), ((1400, 900), "dark"), ((390, 844), "light"), ((390, 844), "dark")]:
        browser.set_window_size(w, h)
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia",
                                {"features": [{"name": "prefers-color-scheme", "value": theme}]})
        time.sleep(0.3)
        bg = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
        channels = [int(c) for c in bg[bg.index("(") + 1:bg.index(")")].split(",")[:3]]
        assert (sum(channels) < 150) == (theme == "dark"), bg
        scroll = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert scroll <= 0, f"{w}px: {scroll}px of horizontal scroll"
        out_top, form_top = browser.execute_script(
            "return [document.querySelector('.out').getBoundingClientRect().top,"
            " document.getElementById('form').getBoundingClientRect().top]")
        assert (out_top < form_top) == (w < 700)  # phone: the image first
        browser.save_screenshot(os.path.join(SHOTS, f"{'phone' if w < 700 else 'desktop'}-{theme}.png"))
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    browser.set_window_size(1400, 900)
    browser.get(server + "/")
    fcp = browser.execute_script(
        "return performance.getEntriesByType('paint').find(e => e.name === 'first-contentful-paint')?.startTime")
    assert fcp is not None and fcp < 1000
    # the toggle overrides the OS: auto -> dark -> light
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.body.classList.contains('ready')"))
    browser.find_element(By.ID, "theme").click()
    assert browser.execute_script("return document.documentElement.dataset.theme") == "dark"


def test_no_other_origin_and_no_console_error(server, browser):
    open_page(browser, server)
    browser.find_element(By.ID, "prompt").send_keys("a blue bird")
    for key, value in {**SMALL, "seed": 11}.items():
        set_field(browser, key, value)
    browser.find_element(By.ID, "prompt").send_keys(Keys.CONTROL, Keys.ENTER)
    wait_result(browser)
    browser.find_element(By.ID, "networks-toggle").click()
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#network-list .card"))
    cards = {c.get_attribute("data-insert") for c in browser.find_elements(By.CSS_SELECTOR, "#network-list .card")}
    assert cards == {"<lora:style:1>", "neg", "old"}
    browser.find_element(By.CSS_SELECTOR, '[data-insert="<lora:style:1>"]').click()
    assert field(browser, "prompt").endswith("a blue bird, <lora:style:1>")
    for tab in ("img2img", "pnginfo", "history", "txt2img"):
        browser.find_element(By.CSS_SELECTOR, f"[data-tab={tab}]").click()
    time.sleep(1)
    urls = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    assert urls and all(u.startswith(server + "/") or u.startswith(("data:", "blob:")) for u in urls), urls
    assert console_errors(browser) == []


def test_readable_4xx_next_to_the_field(server, browser):
    open_page(browser, server)
    for key, value in {**SMALL, "steps": 5000}.items():
        set_field(browser, key, value)
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 30).until(lambda d: not d.find_element(By.ID, "error").get_attribute("hidden"))
    message = browser.find_element(By.ID, "error").text
    assert message.startswith("Error 422") and "steps" in message and "Traceback" not in message
    assert browser.find_element(By.CSS_SELECTOR, "label .field-error").text
    assert browser.find_element(By.ID, "steps").get_attribute("aria-invalid") == "true"
    assert field(browser, "steps") == "5000"  # the form is kept


def test_ctrl_arrows_edit_attention(server, browser):
    open_page(browser, server)
    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys("a red fox")
    browser.execute_script("arguments[0].setSelectionRange(3, 3)", prompt)  # the cursor in "red"
    prompt.send_keys(Keys.CONTROL, Keys.ARROW_UP)
    assert field(browser, "prompt") == "a (red:1.1) fox"
    prompt.send_keys(Keys.CONTROL, Keys.ARROW_UP)
    assert field(browser, "prompt") == "a (red:1.2) fox"
    for _ in range(2):
        prompt.send_keys(Keys.CONTROL, Keys.ARROW_DOWN)
    assert field(browser, "prompt") == "a red fox"
    prompt.send_keys(Keys.CONTROL, Keys.ARROW_DOWN)
    assert field(browser, "prompt") == "a (red:0.9) fox"


def test_xyz_plot_request(server, browser):
    """The page sends A1111's x/y/z plot script arguments; a server without the script answers a readable 422."""
    open_page(browser, server)
    for key, value in {**SMALL, "seed": 5}.items():
        set_field(browser, key, value)
    browser.execute_script("document.getElementById('xyz').open = true")
    browser.find_element(By.ID, "xyz-enable").click()
    set_field(browser, "xyz-X-type", "Steps")
    set_field(browser, "xyz-X-values", "1, 2")
    set_field(browser, "xyz-Y-type", "CFG Scale")
    set_field(browser, "xyz-Y-values", "5, 9")
    browser.get_log("performance")
    browser.find_element(By.ID, "generate").click()
    has_script = "x/y/z plot" in requests.get(f"{server}/sdapi/v1/scripts", auth=AUTH).json()["txt2img"]
    if has_script:
        grid = data_url_image(wait_result(browser, timeout=300))
        assert grid.width > 2 * 64 and grid.height > 2 * 64  # 2×2 cells and the legend
        os.makedirs(SHOTS, exist_ok=True)
        browser.save_screenshot(os.path.join(SHOTS, "xyz-grid.png"))
    else:
        WebDriverWait(browser, 30).until(lambda d: not d.find_element(By.ID, "error").get_attribute("hidden"))
        assert browser.find_element(By.ID, "error").text == "Error 422: Script 'x/y/z plot' not found"
    body = sent_generations(browser)[0]
    assert body["script_name"] == "x/y/z plot"
    # A1111's positional arguments: x/y/z (type index, values, dropdown), then the flags; csv mode on
    assert body["script_args"] == [4, "1, 2", [], 6, "5, 9", [], 0, "", [],
                                   True, False, False, False, False, False, False, 0, True]


def test_lost_connection_banner_recovers(server, browser):
    open_page(browser, server)
    browser.execute_cdp_cmd("Network.emulateNetworkConditions",
                            {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    try:
        browser.find_element(By.ID, "refresh-models").click()
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "banner").is_displayed())
        assert "lost" in browser.find_element(By.ID, "banner").text
        assert browser.find_element(By.ID, "prompt").is_displayed()  # the page stays
    finally:
        browser.execute_cdp_cmd("Network.emulateNetworkConditions",
                                {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    WebDriverWait(browser, 15).until(lambda d: not d.find_element(By.ID, "banner").is_displayed())


# --- the job queue (`/sd15/v1/jobs`) -------------------------------------------------------------------

def test_queue_of_three_with_one_cancelled(server, browser):
    open_page(browser, server)
    WebDriverWait(browser, 10).until(lambda d: not d.find_element(By.ID, "queue").get_attribute("hidden"))
    for key, value in {**SMALL, "steps": 30, "seed": 21}.items():
        set_field(browser, key, value)
    for _ in range(3):
        browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#queue-list li.mine")) == 3)
    os.makedirs(SHOTS, exist_ok=True)
    browser.execute_script("document.getElementById('queue').scrollIntoView({block: 'end'})")
    browser.save_screenshot(os.path.join(SHOTS, "queue-3-jobs.png"))
    queued = requests.get(f"{server}/sd15/v1/queue", auth=AUTH).json()["queued"]
    target = queued[-1]["id"]
    browser.find_element(By.CSS_SELECTOR, f'[aria-label="Cancel job {target}"]').click()
    WebDriverWait(browser, 300).until(lambda d: d.find_element(By.ID, "generate").text == "Generate")
    assert requests.get(f"{server}/sd15/v1/jobs/{target}", auth=AUTH).json()["state"] == "cancelled"
    recent = requests.get(f"{server}/sd15/v1/queue", auth=AUTH).json()["recent"]
    assert sum(j["state"] == "done" for j in recent[:3]) == 2


def test_history_lists_saved_files(server, browser):
    open_page(browser, server)
    browser.find_element(By.ID, "prompt").send_keys("a saved image")
    for key, value in {**SMALL, "seed": 31}.items():
        set_field(browser, key, value)
    browser.find_element(By.ID, "generate").click()
    wait_result(browser)
    history = requests.get(f"{server}/sd15/v1/history", auth=AUTH).json()
    assert history["total"] >= 1 and history["items"][0]["infotext"].startswith("a saved image")
    assert history["items"][0]["path"].startswith("txt2img-images/")
    browser.find_element(By.CSS_SELECTOR, "[data-tab=history]").click()
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#history-list .thumb"))
    first = browser.find_element(By.CSS_SELECTOR, "#history-list .thumb img").get_attribute("src")
    assert first.endswith(history["items"][0]["url"])
    # restore parameters from a saved file
    browser.find_element(By.CSS_SELECTOR, "[data-tab=txt2img]").click()
    set_field(browser, "prompt", "something else")
    set_field(browser, "seed", -1)
    browser.find_element(By.CSS_SELECTOR, "[data-tab=history]").click()
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#history-list .thumb"))
    browser.find_element(By.CSS_SELECTOR, "#history-list .thumb").click()
    browser.find_element(By.ID, "viewer-reuse").click()
    WebDriverWait(browser, 20).until(lambda d: field(d, "prompt") == "a saved image")
    assert field(browser, "seed") == "31" and not browser.find_element(By.ID, "gen").get_attribute("hidden")


def test_reload_during_own_job_reconnects_and_fetches_its_result(server, browser):
    """A job submitted from the page survives a reload: the page finds it in the queue, shows its progress and
    fetches its result when it is done; another client's API request shows in the queue."""
    import threading

    open_page(browser, server)
    for key, value in {**SMALL, "steps": 150, "seed": 41}.items():
        set_field(browser, key, value)
    browser.find_element(By.ID, "prompt").send_keys("a reloaded job")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#queue-list li.mine"))
    out = {}
    other = threading.Thread(target=lambda: out.update(r=requests.post(
        f"{server}/sdapi/v1/txt2img", auth=AUTH, timeout=600, json={"prompt": "from a script", "seed": 2, **SMALL})))
    other.start()
    browser.refresh()
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.body.classList.contains('ready')"))
    WebDriverWait(browser, 30).until(lambda d: "from a script" in d.find_element(By.ID, "queue-list").text)
    assert browser.find_elements(By.CSS_SELECTOR, "#queue-list li.mine")  # still this tab's job after the reload
    shown = data_url_image(wait_result(browser, timeout=300))
    assert shown.size == (64, 64)
    assert browser.find_element(By.ID, "infotext").text.startswith("a reloaded job")
    other.join(300)
    assert out["r"].status_code == 200
