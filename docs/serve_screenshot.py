"""Retakes docs/serve.png: `anim-jax serve` with the shipped demo model, in headless Chromium.

    python docs/serve_screenshot.py [--out docs/serve.png] [--frames 16]

Serves the page on a free localhost port, keeps the defaults a new user sees (demo character 0,
demo motion 1, the weights' native settings), previews the poses, generates, waits for the result
and saves a screenshot of the whole page. Needs Chromium and its driver (`apt-get install chromium
chromium-driver`, as `.ci/run` does) and the test extra's selenium.
"""

from __future__ import annotations

import argparse
import pathlib
import socket
import tempfile

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).with_name("serve.png")))
    parser.add_argument("--frames", type=int, default=16)
    args = parser.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from anim_jax.serve import Animator, launch, packaged_demo_weights

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="anim-jax-serve-shot-") as tmp:
        app = launch(Animator(packaged_demo_weights(), workdir=tmp), port=port, block=False)
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--user-data-dir={tmp}/profile"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        try:
            driver.set_window_size(1300, 1500)
            wait = WebDriverWait(driver, 600)
            driver.get(f"http://127.0.0.1:{port}/")
            wait.until(lambda d: d.find_elements(By.ID, "generate"))
            frames = driver.find_element(By.CSS_SELECTOR, "#frames input")
            frames.send_keys(Keys.CONTROL, "a")
            frames.send_keys(str(args.frames), Keys.TAB)
            driver.find_element(By.ID, "preview").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#pose-preview video[src]"))
            driver.find_element(By.ID, "generate").click()
            wait.until(lambda d: f"{args.frames} frames" in d.find_element(By.ID, "status").text)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#result video[src]"))
            driver.execute_script("document.querySelectorAll('video').forEach(v => {v.pause(); v.currentTime = 0.5;})")
            driver.save_screenshot(args.out)
        finally:
            driver.quit()
            app.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
