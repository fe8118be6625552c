"""The page of sdinfer serve in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, which ``.ci/run`` installs) driven by Selenium types a prompt, submits,
watches the progress and the image arrive, reloads, and finds the image in the gallery with
its parameters.  Without Chromium the test skips, except on CI (``CI`` set), where it fails."""

from __future__ import annotations

import os
import shutil

import pytest

from serve_helpers import ServerProcess, call

pytestmark = pytest.mark.slow
PROMPT = "a green square in the bottom left"


def _browser_paths():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    missing = "chromium" if not chromium else "chromedriver"
    if os.environ.get("CI"):
        pytest.fail(f"{missing} is not installed; .ci/run installs chromium and chromium-driver with apt-get")
    pytest.skip(f"{missing} is not installed (apt-get install -y chromium chromium-driver)")


@pytest.fixture
def browser():
    chromium, driver = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1200,900"):
        options.add_argument(flag)
    drv = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def test_the_page_generates_an_image_and_the_gallery_keeps_it(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    server = ServerProcess(tmp_path, "--steps", "10")
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(server.base + "/")
        wait.until(lambda d: d.find_element(By.ID, "sampler").get_attribute("value") == "ddim")   # config loaded
        assert Select(browser.find_element(By.ID, "size")).first_selected_option.text == "32x32"
        browser.find_element(By.ID, "prompt").send_keys(PROMPT)
        steps = browser.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("12")
        browser.find_element(By.ID, "seed").send_keys("7")
        browser.find_element(By.ID, "go").click()
        figure = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#result figure.image")))
        image_id = figure.get_attribute("data-id")
        img = figure.find_element(By.TAG_NAME, "img")
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 32)
        assert browser.find_element(By.ID, "message").text.startswith("done")
        # the bar's length comes from the job's step events only (server-sent events reached the page)
        assert browser.find_element(By.ID, "bar").get_attribute("max") == "12"
        caption = figure.find_element(By.TAG_NAME, "figcaption").text
        assert PROMPT in caption and "12 steps" in caption and "seed 7" in caption

        listed = call(server.base, "/v1/images")[2]["data"]
        assert [r["id"] for r in listed] == [image_id] and listed[0]["steps"] == 12

        browser.refresh()
        item = wait.until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, f'#gallery figure.image[data-id="{image_id}"]')))
        assert PROMPT in item.text and "seed 7" in item.text and "ddim 12 steps" in item.text
        gallery_img = item.find_element(By.TAG_NAME, "img")
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth",
                                              gallery_img) == 32)
        assert not browser.find_elements(By.CSS_SELECTOR, "#result figure")   # a fresh page: only the gallery
    finally:
        server.stop()


def test_the_page_shows_a_refusal(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = ServerProcess(tmp_path, "--steps", "4")
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(server.base + "/")
        wait.until(lambda d: d.find_element(By.ID, "sampler").get_attribute("value") == "ddim")
        browser.find_element(By.ID, "prompt").send_keys("a purple dog")
        browser.find_element(By.ID, "go").click()
        message = browser.find_element(By.ID, "message")
        wait.until(lambda d: "does not know" in message.text)
        assert "error" in message.get_attribute("class")
    finally:
        server.stop()


def test_the_page_asks_for_the_api_key_and_then_works(browser, tmp_path):
    """A server with an API key: the page shows the key form, and once the key is typed the
    settings load and a generation's progress and image arrive (the key travels as a same-site
    cookie, which the event stream sends too)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    key = "page-test-key-0123456789"
    server = ServerProcess(tmp_path, "--steps", "4", env={"SDINFER_API_KEY": key})
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(server.base + "/")
        wait.until(lambda d: d.find_element(By.ID, "keyform").is_displayed())
        assert "API key" in browser.find_element(By.ID, "message").text
        assert call(server.base, "/v1/images")[0] == 401
        browser.find_element(By.ID, "key").send_keys(key + "\n")
        wait.until(lambda d: d.find_element(By.ID, "sampler").get_attribute("value") == "ddim")
        assert not browser.find_element(By.ID, "keyform").is_displayed()
        browser.find_element(By.ID, "prompt").send_keys(PROMPT)
        browser.find_element(By.ID, "go").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#result figure.image")))
        assert browser.find_element(By.ID, "message").text.startswith("done")
        assert browser.find_element(By.ID, "bar").get_attribute("max") == "4"
    finally:
        server.stop()
