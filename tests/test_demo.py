"""The Gradio demo: its functions directly, then the page in a real headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium; nothing downloads a browser)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_run import train_tiny

ROOT = Path(__file__).resolve().parents[1]
from deit_scm_cxr.demo import app  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("demo") / "model")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from deit_scm_cxr.data import load_dataset_module

    folder = tmp_path_factory.mktemp("files")
    phantom = load_dataset_module("phantoms").generate_phantom(3, seed=11, label=0, size=1024)
    png = folder / "phantom_1024.png"
    Image.fromarray(phantom.image).save(png)
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(png.read_bytes()[:200])
    from pydicom.data import get_testdata_file

    return {"png": png, "corrupt": corrupt, "dicom": Path(get_testdata_file("RG1_UNCR.dcm"))}


# ----------------------------------------------------------------------------- functions


def test_the_demo_names_the_maps_as_the_package_does():
    """The Space carries app.py alone, so its map names are written out there: they must be the package's
    vocabulary (`localization.MAP_LABELS`, outputs `<name>_maps`), in its order."""
    from deit_scm_cxr.hub.localization import MAP_LABELS, map_output

    assert list(app.MAPS.items()) == [(label, map_output(name)) for name, label in MAP_LABELS.items()]


def test_predict_render_and_redraw(model_dir, files):
    predictor, status = app.load_predictor(str(model_dir))
    assert predictor is not None and str(model_dir) in status
    results, errors = predictor.predict([str(files["png"]), str(files["dicom"])])
    assert errors == [] and [r.name for r in results] == ["phantom_1024.png", "RG1_UNCR.dcm"]
    dicom = results[1]
    assert dicom.image.shape == (1955, 1841)  # original pixels, not the model's input size
    # The real film is unlike the phantoms the model saw: the pipeline's flag travels into the record.
    assert dicom.ood["out_of_distribution"] is True and dicom.ood["ood_score"] > dicom.ood["ood_threshold"]
    assert "Unlike the training data" in app.ood_warning(dicom)
    for map_name in app.MAPS:
        low = predictor.render(dicom, map_name, 0.1)
        high = predictor.render(dicom, map_name, 0.9)
        # The film in original pixels under a title strip (map, threshold, predicted class, the warning).
        overlay = low["overlay"]
        assert overlay.shape[1:] == (1841, 3) and overlay.shape[0] > 1955
        assert low["record"]["out_of_distribution"] is True
        assert sum(low["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        for view in (low, high):
            boxes = np.asarray(view["record"]["boxes"]).reshape(-1, 4)
            assert ((boxes[:, 0] <= boxes[:, 2]) & (boxes[:, 2] < 1841) & (boxes[:, 3] < 1955)).all()
        # The same outputs, another threshold: the class does not change, only the boxes may.
        assert low["record"]["label"] == high["record"]["label"]
        assert high["record"]["threshold"] == 0.9 and json.dumps(high["record"])


def test_bad_file_is_named_and_the_rest_kept(model_dir, files):
    predictor, _ = app.load_predictor(str(model_dir))
    results, errors = predictor.predict([str(files["corrupt"]), str(files["png"])])
    assert [r.name for r in results] == ["phantom_1024.png"]
    assert len(errors) == 1 and "corrupt.png" in errors[0] and "Traceback" not in errors[0]


def test_two_uploads_with_one_name_are_told_apart(model_dir, files, tmp_path):
    predictor, _ = app.load_predictor(str(model_dir))
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    twin = elsewhere / files["png"].name  # same name, another patient's image
    image = np.asarray(Image.open(files["png"]))
    Image.fromarray(np.ascontiguousarray(image[:, ::-1])).save(twin)
    results, errors = predictor.predict([str(files["png"]), str(twin)])
    assert errors == [] and [r.name for r in results] == ["phantom_1024.png", "phantom_1024.png (2)"]
    on_upload, on_redraw = app._callbacks(predictor, "")
    first = on_redraw(results, [], "phantom_1024.png", next(iter(app.MAPS)), 0.5)
    second = on_redraw(results, [], "phantom_1024.png (2)", next(iter(app.MAPS)), 0.5)
    assert "(2)" in second[2] and "(2)" not in first[2]
    assert not np.array_equal(first[1], second[1])  # each selection shows its own image


def test_a_slider_move_reuses_the_heatmaps(model_dir, files, monkeypatch):
    predictor, _ = app.load_predictor(str(model_dir))
    results, _ = predictor.predict([str(files["png"]), str(files["dicom"])])
    calls = []
    original = predictor.processor.post_process_localization
    monkeypatch.setattr(predictor.processor, "post_process_localization",
                        lambda *a, **k: calls.append(1) or original(*a, **k))  # fmt: skip
    map_name = next(iter(app.MAPS))
    for threshold in (0.2, 0.5, 0.8):
        views = [predictor.post_process(r, map_name, threshold)[0] for r in results]
    assert len(calls) == 2  # one warp per image and map, none per threshold
    # The kept heatmap gives the boxes the full post-processing gives at that threshold.
    fresh = original({"logits": torch.from_numpy(results[1].logits)[None],
                      "probabilities": torch.from_numpy(results[1].probabilities)[None],
                      app.MAPS[map_name]: torch.from_numpy(results[1].maps[app.MAPS[map_name]])[None]},
                     geometry=results[1].geometry[None], threshold=0.8, multi_contour=True,
                     localization_map=app.MAPS[map_name])[0]  # fmt: skip
    assert views[1]["boxes"] == fresh["boxes"].tolist()


def test_errors_show_no_server_paths_and_big_files_are_refused(model_dir, files, tmp_path, monkeypatch):
    predictor, _ = app.load_predictor(str(model_dir))
    hidden = tmp_path / "server_side_folder"
    hidden.mkdir()
    bad = hidden / "scan.png"
    bad.write_bytes(b"not an image at all")
    monkeypatch.setattr(app, "MAX_UPLOAD_MB", 0.001)
    results, errors = predictor.predict([str(bad), str(files["png"])])
    assert results == [] and len(errors) == 2
    assert all("server_side_folder" not in e and str(tmp_path) not in e for e in errors)
    assert "scan.png" in errors[0] and "MB limit" in errors[1]


def test_missing_model_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    predictor, status = app.load_predictor(str(tmp_path / "nothing"))
    assert predictor is None and "run_wsol.py" in status and "--model" in status


def test_space_push_offline_fails_with_one_line():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "deit_scm_cxr.demo.push_space", "--model_id", "o/m", "--space_id", "o/s"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "offline" in done.stderr and "Traceback" not in done.stderr
    header = (ROOT / "src" / "deit_scm_cxr" / "demo" / "README.md").read_text().split("---")[1]
    assert "sdk: gradio" in header and "app_file: app.py" in header


# ----------------------------------------------------------------------------- a real browser


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(condition, timeout: float = 60.0, every: float = 0.05):
    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        try:
            value = condition()
        except Exception:  # the page is still rendering: keep polling
            value = None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s")


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, (
        "the browser test needs Debian's chromium and chromium-driver (.ci/setup installs them)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,2200",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def server(model_dir, tmp_path):
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT / "src")}
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "deit_scm_cxr.demo", "--model", str(model_dir), "--port", str(port)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"

    def up() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    try:
        _wait_for(up, timeout=120, every=0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
        assert "Traceback" not in (tmp_path / "server.log").read_text()


def _text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def _settled(driver) -> bool:
    """No output of the page is still marked as processing (a stale value is shown greyed meanwhile)."""
    return "processing |" not in driver.find_element("tag name", "body").text


def _done(driver, condition):
    """Wait for `condition` on a page with nothing pending; return its value."""
    return _wait_for(lambda: _settled(driver) and condition())


def _upload(driver, *paths: Path) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]")
    field.send_keys("\n".join(str(p) for p in paths))


def test_page_in_a_real_browser(browser, server, files, model_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(server)
    _wait_for(lambda: "Model:" in _text(browser, "status"))
    class_names = ("Atelectasis", "Other_pathologies", "No_pathologies")
    # The map toggle says which map was released and that the others can localize below chance.
    assert "released with" in _text(browser, "map") and "below chance" in _text(browser, "map")

    # One 1024x1024 PNG: time from handing the file to the page until the label is shown.
    started = time.perf_counter()
    _upload(browser, files["png"])
    _done(browser, lambda: "phantom_1024.png" in _text(browser, "summary"))
    seconds = time.perf_counter() - started
    assert any(name in _text(browser, "label") for name in class_names)
    (tmp_path / "timing.json").write_text(json.dumps({"upload_to_result_s": seconds}))
    print(f"\nupload to result, one 1024x1024 PNG: {seconds:.2f} s")

    # The PNG and the real DICOM together; the overlay is an image and the summary counts the boxes.
    browser.find_element(By.CSS_SELECTOR, "#upload button[aria-label='Clear']").click()
    _wait_for(lambda: _text(browser, "summary") == "")
    _upload(browser, files["dicom"], files["png"])
    summary = _done(browser, lambda: "RG1_UNCR.dcm" in _text(browser, "summary") and _text(browser, "summary"))
    source = _wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "#overlay img").get_attribute("src"))
    assert source
    _wait_for(lambda: _settled(browser))
    browser.save_screenshot(str(tmp_path / "dicom.png"))
    boxes_before = int(summary.split(": ")[1].split(" ")[0])
    assert "Unlike the training data" in summary  # the real film, shown first, carries the warning

    # Move the threshold: the page redraws without rerunning the model and reports the new count.
    number = browser.find_element(By.CSS_SELECTOR, "#threshold input[type=number]")
    number.send_keys(Keys.CONTROL, "a")
    number.send_keys("0.05", Keys.TAB)
    summary = _done(browser, lambda: "threshold 0.05" in _text(browser, "summary") and _text(browser, "summary"))
    boxes_after = int(summary.split(": ")[1].split(" ")[0])
    assert boxes_after >= 1 and boxes_before >= 0
    _wait_for(lambda: _settled(browser))
    browser.save_screenshot(str(tmp_path / "threshold.png"))

    # A corrupt file: a readable message, no stack trace.
    browser.find_element(By.CSS_SELECTOR, "#upload button[aria-label='Clear']").click()
    _upload(browser, files["corrupt"])
    message = _done(browser, lambda: _text(browser, "errors"))
    assert "corrupt.png" in message and "could not be read" in message and "Traceback" not in message
    browser.save_screenshot(str(tmp_path / "corrupt.png"))


def test_the_demo_listens_where_gradio_is_told(monkeypatch):
    """A Hub Space sets GRADIO_SERVER_NAME=0.0.0.0: the loopback default must not override it."""
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    assert app.parse_args([]).host == "127.0.0.1"
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7861")
    args = app.parse_args([])
    assert (args.host, args.port) == ("0.0.0.0", 7861)
    assert app.parse_args(["--host", "127.0.0.2"]).host == "127.0.0.2"  # the flag still wins
