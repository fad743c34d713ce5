"""The playground page in a real browser: Debian's chromium, headless, driven by selenium through
chromium-driver, against a `kiq api` process (with keys, so the page must ask for one) and the session's worker.

Set KIQ_SCREENSHOT_DIR to keep the screenshots (docs/playground.png is made that way)."""

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from producer import devstack
from tests.helpers import image_bytes

KEY = "playground-key-0123456789"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:  # pragma: no cover - the test extra installs it
    webdriver = None

pytestmark = pytest.mark.skipif(
    webdriver is None or not CHROMIUM or not DRIVER,
    reason="the browser test needs selenium (test extra) and Debian's chromium + chromium-driver on the PATH "
    f"(found: selenium {webdriver is not None}, chromium {CHROMIUM}, chromedriver {DRIVER}): "
    "`apt-get install chromium chromium-driver` as root, as .ci/run does",
)


@pytest.fixture(scope="module")
def base_url(env, worker, logs):
    port = devstack.free_port()
    with devstack.Stack() as stack:
        proc = stack.spawn([*devstack.kiq_command(), "api", "--port", str(port)], logs / "api-playground.log",
                           {**env, "KIQ_API_KEYS": KEY})  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        devstack.wait_until(lambda: devstack.http_up(base + "/healthz"), 60, "kiq api", proc,
                            logs / "api-playground.log")  # fmt: skip
        yield base


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1200,1050")
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def test_playground_submit_with_text_and_upload_and_watch_it_finish(base_url, browser, tmp_path, logs):
    wait = WebDriverWait(browser, 120, poll_frequency=0.05)
    browser.get(base_url + "/")
    # Keys are configured: the page asks for one, and keeps it only in sessionStorage.
    wait.until(lambda d: d.find_element(By.ID, "key-dialog").get_attribute("open") is not None)
    browser.find_element(By.ID, "key").send_keys(KEY, Keys.ENTER)
    assert browser.execute_script("return sessionStorage.getItem('kiq-api-key')") == KEY

    browser.find_element(By.CSS_SELECTOR, "#inputs .text").send_keys("a cat")
    browser.find_element(By.ID, "add-image").click()
    picture = tmp_path / "starry.png"
    picture.write_bytes(image_bytes(size=(48, 40), color=(30, 60, 200)))
    browser.find_element(By.CSS_SELECTOR, "#inputs .file").send_keys(str(picture))
    shares = browser.find_elements(By.CSS_SELECTOR, "#inputs .share")
    assert [s.text for s in shares] == ["1.00 · 50%", "1.00 · 50%"]
    slider = browser.find_elements(By.CSS_SELECTOR, "#inputs .slider")[1]
    slider.send_keys(*[Keys.ARROW_LEFT] * 10)  # 1.00 -> 0.50: the text's share grows
    assert [s.text for s in shares] == ["1.00 · 67%", "0.50 · 33%"]

    for field, value in (("width", "128"), ("height", "64"), ("output_format", "png")):
        Select(browser.find_element(By.ID, field)).select_by_value(value)
    for field, value in (("prior_steps", "2"), ("decoder_steps", "8"), ("seed", "42")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    # Record every progress value the bar shows (from the event stream).
    browser.execute_script("""
        window.seen = [];
        new MutationObserver(() => window.seen.push(document.getElementById('state').textContent))
          .observe(document.getElementById('state'), {childList: true, characterData: true, subtree: true});
    """)
    browser.find_element(By.ID, "submit").click()
    image = wait.until(lambda d: next(iter(d.find_elements(By.CSS_SELECTOR, "#images img.result")), None))
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
    assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image) == [128, 64]
    seen = browser.execute_script("return window.seen")
    steps = [int(s.split()[-1].split("/")[0]) for s in seen if s.startswith("PROGRESS · decoder")]
    assert len(set(steps)) >= 2 and steps == sorted(steps), seen  # the bar advanced, step by step
    assert browser.find_element(By.ID, "state").text.startswith("SUCCESS · seed 42")
    assert not browser.find_element(By.ID, "submit-error").text and not browser.find_element(By.ID, "job-error").text

    # The job the page made is the caller's, with the upload and the moved weight.
    job_id = browser.find_element(By.ID, "job-id").text
    status = httpx.get(f"{base_url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert status["state"] == "SUCCESS" and status["result"]["seed"] == 42
    wait.until(lambda d: job_id[:8] in d.find_element(By.ID, "jobs").text)  # recent jobs
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#workers tr"))  # fleet panel

    shots = Path(os.environ.get("KIQ_SCREENSHOT_DIR") or logs)
    shots.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(shots / "playground.png"))
    # A phone (headless chromium windows are at least 500 px wide: emulate the device instead).
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 390, "height": 1500, "deviceScaleFactor": 1, "mobile": True})  # fmt: skip
    time.sleep(0.3)
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    browser.save_screenshot(str(shots / "playground-phone.png"))


def test_playground_sweep_shows_frames_as_they_land_then_the_animation(base_url, browser, logs):
    wait = WebDriverWait(browser, 120, poll_frequency=0.05)
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})  # the first test ends at phone width
    browser.get(base_url + "/")
    if browser.execute_script("return sessionStorage.getItem('kiq-api-key')") is None:  # run alone
        wait.until(lambda d: d.find_element(By.ID, "key-dialog").get_attribute("open") is not None)
        browser.find_element(By.ID, "key").send_keys(KEY, Keys.ENTER)
    browser.find_element(By.CSS_SELECTOR, "#inputs .text").send_keys("a cat")
    browser.find_element(By.ID, "add-text").click()
    browser.find_elements(By.CSS_SELECTOR, "#inputs .text")[1].send_keys("a dog")

    to_sliders = browser.find_elements(By.CSS_SELECTOR, "#inputs .to-slider")
    assert not any(s.is_displayed() for s in to_sliders)  # the "to" weights belong to a sweep
    assert browser.find_element(By.ID, "frames").get_attribute("disabled") is not None
    browser.find_element(By.ID, "sweep").click()
    assert all(s.is_displayed() for s in to_sliders)
    assert browser.find_element(By.ID, "num_images").get_attribute("disabled") is not None
    to_sliders[0].send_keys(*[Keys.ARROW_LEFT] * 20)  # the cat fades out: 1.00 -> 0.00
    assert [s.text for s in browser.find_elements(By.CSS_SELECTOR, "#inputs .to-share")] == ["0.00 · 0%", "1.00 · 100%"]

    for field, value in (("width", "64"), ("height", "64"), ("animation", "gif"), ("easing", "linear")):
        Select(browser.find_element(By.ID, field)).select_by_value(value)
    for field, value in (("prior_steps", "2"), ("decoder_steps", "3"), ("seed", "7"), ("frames", "3"), ("fps", "5")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    # Record, at every change of the result area, the state line and how many frames it shows.
    browser.execute_script("""
        window.views = [];
        new MutationObserver(() => window.views.push([document.getElementById('state').textContent,
            document.querySelectorAll('#images img[alt^="frame"]').length]))
          .observe(document.getElementById('run'), {childList: true, characterData: true, subtree: true});
    """)
    browser.find_element(By.ID, "submit").click()
    animation = wait.until(lambda d: next(iter(d.find_elements(By.CSS_SELECTOR, "#images img[alt=animation]")), None))
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", animation))
    size = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", animation)
    assert size == [64, 64]
    frames = browser.find_elements(By.CSS_SELECTOR, "#images img[alt^=frame]")
    assert [f.get_attribute("alt") for f in frames] == ["frame 0", "frame 1", "frame 2"]
    wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", f)
                             for f in frames))  # fmt: skip
    views = browser.execute_script("return window.views")
    landing = [n for state, n in views if state.startswith("PROGRESS") and n]
    assert landing and landing == sorted(landing), views  # frames were shown before the job ended, in order
    assert browser.find_element(By.ID, "state").text.startswith("SUCCESS · seed 7")
    assert not browser.find_element(By.ID, "submit-error").text and not browser.find_element(By.ID, "job-error").text

    job_id = browser.find_element(By.ID, "job-id").text
    status = httpx.get(f"{base_url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {KEY}"}).json()
    result = status["result"]
    assert result["frame_weights"] == [[1.0, 1.0], [0.5, 1.0], [0.0, 1.0]]  # from the sliders
    assert result["animation"]["format"] == "gif" and len(result["images"]) == 3
    shots = Path(os.environ.get("KIQ_SCREENSHOT_DIR") or logs)
    shots.mkdir(parents=True, exist_ok=True)
    browser.execute_script("document.getElementById('run').scrollIntoView()")  # the frames and the GIF
    browser.save_screenshot(str(shots / "playground-sweep.png"))
