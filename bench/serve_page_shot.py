"""A screenshot of sdinfer serve's page (the README's picture): starts a server on a fresh store,
generates a few images through the API, then in headless Chromium types a prompt, generates,
and captures the page with its result and gallery.

    python bench/serve_page_shot.py --out docs/serve-page.png
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from serve_load import Server, request

GALLERY = ["a blue square in the center", "a small yellow triangle in the top right on a black background",
           "a large green circle in the bottom left", "a red triangle in the center on a white background"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/serve-page.png")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    store = Path(tempfile.mkdtemp(prefix="sdinfer-shot-"))
    server = Server(store, ["--model", "unet", "--steps", str(args.steps)])
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900",
                 "--hide-scrollbars"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
    try:
        for seed, prompt in enumerate(GALLERY):
            request(server.base, "/v1/images/generations", {"prompt": prompt, "seed": seed})
        browser.get(server.base + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_element(By.ID, "sampler").get_attribute("value"))
        browser.find_element(By.ID, "prompt").send_keys("a red circle in the top left")
        browser.find_element(By.ID, "seed").send_keys("7")
        browser.find_element(By.ID, "go").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#result figure.image")))
        wait.until(lambda d: d.execute_script(
            "return [...document.images].every(i => i.complete && i.naturalWidth > 0)"))
        browser.save_screenshot(args.out)
        print(f"wrote {args.out}")
    finally:
        browser.quit()
        server.stop()
        shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
