"""Retake the README's demo screenshot: the demo with a model, the real chest CR of pydicom's test data uploaded,
in headless Chromium (Debian's `chromium` and `chromium-driver`, as the browser test uses).

    python bench/demo_screenshot.py --model outputs/wsol --output docs/demo_screenshot.png
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time


def wait_for(condition, timeout: float = 300.0, every: float = 0.5):
    """Poll `condition` until it returns something true; raise after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception:  # the page or the server is not there yet
            value = None
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"nothing after {timeout} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/wsol")
    parser.add_argument("--output", default="docs/demo_screenshot.png")
    parser.add_argument("--port", type=int, default=7861)
    args = parser.parse_args(argv)
    from pydicom.data import get_testdata_file
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "-m", "deit_scm_cxr.demo", "--model", args.model, "--port", str(args.port)]
    server = subprocess.Popen(command, env=env)
    os.environ.setdefault("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1900"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        wait_for(lambda: socket.create_connection(("127.0.0.1", args.port), timeout=1))
        driver.get(f"http://127.0.0.1:{args.port}/")
        wait_for(lambda: "Model:" in driver.find_element(By.ID, "status").text)
        driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(get_testdata_file("RG1_UNCR.dcm"))
        wait_for(lambda: "RG1_UNCR.dcm" in driver.find_element(By.ID, "summary").text)
        wait_for(lambda: "processing |" not in driver.find_element(By.TAG_NAME, "body").text)
        time.sleep(2)  # the overlay image decodes after the text settles
        driver.save_screenshot(args.output)
    finally:
        driver.quit()
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
