"""Gradio demo of DeiT-SCM: drop chest radiographs, read the class probabilities, see the heatmap and boxes.

    deit-scm-demo --model outputs/wsol                 # the main job's output, offline (python -m deit_scm_cxr.demo)
    deit-scm-demo --model org/deit-scm-cxr             # a Hub model (also the Space's MODEL_ID variable)

The model and processor load exactly as a Hub user loads them (`trust_remote_code=True`). Each uploaded
file (DICOM, PNG, JPEG) goes file -> processor -> model once; the threshold slider and the map toggle
(F0⊙S0, F0, S0) only redo the post-processing (`post_process_localization`) on the kept outputs. A file the
processor cannot read is named with the reason (its name only, never a server path); nothing else is lost
and no stack trace reaches the page. Two uploads with one name are told apart ("name (2)"). Each image's
heatmap in original pixels is computed once per map and kept, so a slider move only redraws boxes.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger("demo")

DEFAULT_MODEL = "outputs/wsol"
# Map shown -> the model output holding it (`localization.MAP_LABELS`, written out: the Space has this file
# only; a test keeps the two equal). F0 has no class axis; it is the same for every class.
MAPS = {
    "F₀⊙S₀ (coupled map)": "coupled_maps",
    "S₀ (semantic map, CAM)": "semantic_maps",
    "F₀ (attention map)": "attention_maps",
}
# The overlay titles' names (OpenCV draws ASCII only).
ASCII_MAP_NAMES = {"coupled_maps": "F0*S0 (coupled)", "semantic_maps": "S0 (semantic, CAM)",
                   "attention_maps": "F0 (attention)"}  # fmt: skip
FILE_TYPES = [".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff"]
# A page, not a batch service: a radiograph is 5-60 MB; larger files and longer lists are refused by name.
MAX_UPLOAD_MB = 200
MAX_FILES = 16
# Result JSONs the app keeps on disk (oldest deleted first); the folder goes when the app exits.
KEPT_RESULTS = 64


def _scratch_folder(prefix: str) -> Path:
    """A temporary folder removed when the process exits."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def unique_labels(names: list[str]) -> list[str]:
    """Names made unique in upload order ("a.png", "a.png (2)"): the image selector goes by label, and two
    files with one name must never show each other's result."""
    seen: dict[str, int] = {}
    labels = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return labels


def _without_paths(message: str, path: str) -> str:
    """An error message with the server's folders taken out: the page shows file names only."""
    name = Path(path).name
    for text in (path, os.path.abspath(path), str(Path(path).parent)):
        message = message.replace(text, name if text != str(Path(path).parent) else "")
    return message.replace(tempfile.gettempdir(), "")


@dataclass
class ImageResult:
    """What one uploaded image keeps between redraws: the model ran once."""

    name: str  # unique among the uploads shown together (`unique_labels`)
    image: np.ndarray  # the decoded radiograph, original pixels
    geometry: np.ndarray  # (8,) the processor's geometry row
    logits: np.ndarray  # (C,)
    probabilities: np.ndarray  # (C,) calibrated: softmax(logits / the model's temperature)
    maps: dict[str, np.ndarray]  # output name -> (C, h, w)
    # The pipeline's out-of-distribution verdict: {"out_of_distribution", "ood_score", "ood_threshold"}
    # (values None for a model saved without the statistics).
    ood: dict[str, Any] = field(default_factory=dict)
    # output name -> `post_process_localization`'s result at original size, filled on first use: the heatmap
    # does not depend on the threshold, so it is warped once per map, not on every slider move.
    localized: dict[str, dict[str, Any]] = field(default_factory=dict)


class Predictor:
    """The model and processor of a saved folder or Hub id, and the demo's steps on top of them."""

    def __init__(self, model: str) -> None:
        from transformers import pipeline

        self.source = model
        # The model's own chest-xray-localization pipeline (saved with it): the demo shows what it returns.
        self.detector = pipeline(model=model, trust_remote_code=True, model_kwargs={"use_safetensors": True})
        self.processor, self.model = self.detector.image_processor, self.detector.model
        self.id2label = {int(k): v for k, v in self.model.config.id2label.items()}

    @torch.no_grad()
    def predict(self, paths: list[str]) -> tuple[list[ImageResult], list[str]]:
        """Run every readable file through processor and model; return the results and one message per
        unreadable file."""
        results, errors = [], []
        if len(paths) > MAX_FILES:
            errors.append(f"{len(paths)} files: only the first {MAX_FILES} are read (upload the rest separately)")
            paths = paths[:MAX_FILES]
        for path, label in zip(paths, unique_labels([Path(p).name for p in paths])):
            try:
                size_mb = os.path.getsize(path) / 2**20
                if size_mb > MAX_UPLOAD_MB:
                    raise ValueError(f"{size_mb:.0f} MB, more than the demo's {MAX_UPLOAD_MB} MB limit")
                found = self.detector(path, return_maps=True)
                image = self.processor.decode(path)
            except Exception as error:  # any failure on one file is that file's message, not the page's
                errors.append(f"**{label}** could not be read: {_without_paths(str(error), path)}")
                logger.info("rejected %s: %s", label, error)
                continue
            probabilities = np.array([found["scores"][self.id2label[i]] for i in range(len(self.id2label))], np.float32)
            ood = {key: found.get(key) for key in ("out_of_distribution", "ood_score", "ood_threshold")}
            results.append(
                ImageResult(label, image, found["geometry"], found["logits"], probabilities, found["maps"], ood)
            )
        return results, errors

    def post_process(self, result: ImageResult, map_name: str, threshold: float) -> tuple[dict[str, Any], dict]:
        """One kept result with a map and a threshold -> its JSON record and `post_process_localization`'s
        output (heatmap and boxes in original pixels)."""
        key = MAPS[map_name]
        if key not in result.localized:
            outputs = {
                "logits": torch.from_numpy(result.logits)[None],
                "probabilities": torch.from_numpy(result.probabilities)[None],
                key: torch.from_numpy(result.maps[key])[None],
            }
            result.localized[key] = self.processor.post_process_localization(
                outputs,
                geometry=result.geometry[None],
                threshold=threshold,
                multi_contour=True,
                id2label=self.id2label,
                localization_map=key,
            )[0]
        post = dict(result.localized[key])
        post["boxes"], post["box_scores"] = self.processor.heatmap_boxes(post["heatmap"], threshold, multi_contour=True)
        probabilities = result.probabilities.tolist()
        record = {
            "file": result.name,
            "label": post["label_name"],
            "probabilities": {self.id2label[i]: round(p, 6) for i, p in enumerate(probabilities)},
            "map": key,
            "threshold": threshold,
            "smoothing": post["smoothing"],  # the Gaussian width (tokens) the map was smoothed with on its grid
            "boxes": post["boxes"].tolist(),
            "box_scores": [round(float(s), 6) for s in post["box_scores"]],
            "box_format": "xyxy, inclusive, original pixels",
            **result.ood,
        }
        return record, post

    def overlay(self, result: ImageResult, map_name: str, threshold: float, post: dict[str, Any]) -> np.ndarray:
        """The heatmap and its boxes on the original image, titled with the map, the threshold and the
        predicted class."""
        probability = float(result.probabilities[post["label"]])
        title = [f"{ASCII_MAP_NAMES[MAPS[map_name]]}, boxes at {threshold:.2f} x max",
                 f"predicted {post['label_name']} {probability:.0%}"]  # fmt: skip
        if result.ood.get("out_of_distribution"):
            title.append("WARNING: unlike the training data")
        return self.processor.overlay_heatmap(result.image, post["heatmap"], boxes=post["boxes"], title=title)

    def render(self, result: ImageResult, map_name: str, threshold: float) -> dict[str, Any]:
        """`post_process` plus the heatmap overlay with the boxes drawn on the original image."""
        record, post = self.post_process(result, map_name, threshold)
        overlay = self.overlay(result, map_name, threshold, post)
        return {"probabilities": record["probabilities"], "overlay": overlay, "record": record}


def ood_warning(result: ImageResult) -> str:
    """The page's warning for an image unlike the training data, or "" (also for a model without the score)."""
    if not result.ood.get("out_of_distribution"):
        return ""
    return (
        f"\n\n⚠️ **Unlike the training data** (out-of-distribution score {result.ood['ood_score']:.0f}, alarm "
        f"above {result.ood['ood_threshold']:.0f}). The model has not seen images like this one, so its class "
        "probabilities and boxes are not reliable, however high they are."
    )


def load_predictor(model: str) -> tuple[Optional[Predictor], str]:
    """The predictor, or None with a message for the page that says what to do."""
    if not Path(model).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        return None, (
            f"No model at `{model}`. Train one with `accelerate launch run_wsol.py` (it writes `outputs/wsol`), "
            "or start the demo with `--model PATH_OR_HUB_ID`."
        )
    try:
        predictor = Predictor(model)
    except Exception as error:  # a missing folder, no network, a broken config: say it on the page
        return None, (
            f"Could not load a model from `{model}` ({type(error).__name__}: {error}). Train one with "
            "`accelerate launch run_wsol.py` (it writes `outputs/wsol`), or pass `--model PATH_OR_HUB_ID`."
        )
    _, tau, sigma = predictor.processor.localization_settings()
    return (
        predictor,
        f"Model: `{model}` (threshold {tau:.2f} and map smoothing σ = {sigma:g} "
        "(in tokens), both chosen on validation boxes).",
    )


def example_files(folder: Path, count: int = 2) -> list[str]:
    """A few phantoms drawn at start-up (never committed) and, with pydicom-data, the real chest CR RG1_UNCR."""
    paths = []
    try:  # the package's phantom generator; a Space that carries only this file goes without
        from deit_scm_cxr.data import phantoms
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            phantom = phantoms.generate_phantom(index, seed=7, label=index % 2, size=512)
            path = folder / f"phantom_{index}_{phantoms.CLASS_NAMES[phantom.label]}.png"
            Image.fromarray(phantom.image).save(path)
            paths.append(str(path))
    except Exception as error:  # the examples are a convenience; the demo works without them
        logger.warning("no phantom examples: %s", error)
    try:
        from pydicom.data import get_testdata_file

        dicom = get_testdata_file("RG1_UNCR.dcm")
        if dicom:
            paths.append(str(dicom))
    except Exception as error:
        logger.warning("no DICOM example: %s", error)
    return paths


def default_map_label(predictor: Optional[Predictor]) -> str:
    """The toggle starts on the map the model was released with (chosen on validation boxes)."""
    released = predictor.processor.localization_map if predictor else "coupled_maps"
    return next((label for label, key in MAPS.items() if key == released), next(iter(MAPS)))


def _callbacks(predictor: Optional[Predictor], status: str) -> tuple[Callable, Callable]:
    """The upload and redraw callbacks of the app: the model runs on upload; changing the map, the threshold
    or the shown image only post-processes the kept results again."""
    import gradio as gr

    results_folder = _scratch_folder("deit_scm_results_")

    def write_result(records: list[dict]) -> str:
        path = results_folder / f"result-{uuid.uuid4().hex[:12]}.json"
        path.write_text(json.dumps(records, indent=2))
        kept = sorted(results_folder.glob("result-*.json"), key=lambda p: p.stat().st_mtime_ns)
        for old in kept[:-KEPT_RESULTS]:
            old.unlink(missing_ok=True)
        return str(path)

    def show(results: list[ImageResult], selected: Optional[str], map_name: str, threshold: float, errors: list[str]):
        messages = "\n\n".join(errors)
        if not results:
            return None, None, "", None, messages
        names = [r.name for r in results]
        index = names.index(selected) if selected in names else 0
        # Every image's boxes go into the JSON; only the shown one is drawn (a full-resolution overlay).
        processed = [predictor.post_process(r, map_name, threshold) for r in results]
        record, post = processed[index]
        overlay = predictor.overlay(results[index], map_name, threshold, post)
        path = write_result([r for r, _ in processed])
        boxes = record["boxes"]
        summary = f"**{names[index]}**: {len(boxes)} box{'es' if len(boxes) != 1 else ''} at threshold {threshold:.2f}"
        summary += ood_warning(results[index])
        return record["probabilities"], overlay, summary, path, messages

    def on_upload(files, map_name, threshold):
        started = time.perf_counter()
        paths = [f if isinstance(f, str) else f.name for f in (files or [])]
        if predictor is None:
            return [], [], gr.update(choices=[], value=None), None, None, "", None, status
        results, errors = predictor.predict(paths)
        names = [r.name for r in results]
        shown = show(results, names[0] if names else None, map_name, threshold, errors)
        logger.info("upload to result: %.3f s for %d files", time.perf_counter() - started, len(paths))
        return (results, errors, gr.update(choices=names, value=names[0] if names else None), *shown)

    def on_redraw(results, errors, selected, map_name, threshold):
        if predictor is None or not results:
            return None, None, "", None, "\n\n".join(errors or [])
        return show(results, selected, map_name, threshold, errors or [])

    return on_upload, on_redraw


INTRODUCTION = (
    "# DeiT-SCM: chest X-ray classification and weakly supervised localization\n"
    "Drop radiographs (DICOM, PNG, JPEG). The model gives Atelectasis / Other pathologies / No pathologies "
    "and a heatmap with boxes, learned from image labels only. **A research demonstration, not a medical device.**"
)
MAP_INFO = (
    "Starts on the map the model was released with (the best on its validation boxes). The others are for "
    "comparison and can localize worse, even below chance: see the model card's table."
)


def build_demo(model: str = DEFAULT_MODEL, examples_dir: Optional[Path] = None) -> Any:
    """The Gradio Blocks app."""
    import gradio as gr

    predictor, status = load_predictor(model)
    threshold0 = float(predictor.processor.localization_threshold) if predictor else 0.5
    examples_dir = examples_dir or _scratch_folder("deit_scm_examples_")
    on_upload, on_redraw = _callbacks(predictor, status)
    # delete_cache: Gradio's copies of uploads and results older than an hour go, checked hourly.
    with gr.Blocks(title="DeiT-SCM chest X-ray localization", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(INTRODUCTION)
        gr.Markdown(status, elem_id="status")
        results_state, errors_state = gr.State([]), gr.State([])
        files = gr.File(label="Radiographs", file_count="multiple", file_types=FILE_TYPES, elem_id="upload")
        with gr.Row():
            map_choice = gr.Radio(
                list(MAPS),
                value=default_map_label(predictor),
                label="Map",
                info=MAP_INFO,
                elem_id="map",
            )
            threshold = gr.Slider(0.0, 1.0, value=threshold0, step=0.01, label="Box threshold", elem_id="threshold")
        selector = gr.Dropdown(label="Image", choices=[], elem_id="selector")
        with gr.Row():
            label = gr.Label(num_top_classes=3, label="Class probabilities", elem_id="label")
            # No label badge: it would sit over the picture's own header (its first line: map and threshold).
            overlay = gr.Image(
                label="Heatmap and boxes (original pixels)", show_label=False, type="numpy", format="jpeg",
                elem_id="overlay",
            )  # fmt: skip
        summary = gr.Markdown(elem_id="summary")
        download = gr.File(label="Result (JSON)", elem_id="download")
        errors = gr.Markdown(elem_id="errors")
        outputs = [label, overlay, summary, download, errors]
        # `change` fires on upload, on an example's click and on clearing: the model runs once per new set.
        files.change(on_upload, [files, map_choice, threshold], [results_state, errors_state, selector, *outputs])
        redraw_inputs = [results_state, errors_state, selector, map_choice, threshold]
        # Dragging fires many changes: only the last one pending is drawn.
        threshold.change(on_redraw, redraw_inputs, outputs, trigger_mode="always_last")
        map_choice.change(on_redraw, redraw_inputs, outputs)
        # `input`, not `change`: an upload sets the choices itself and must not draw twice.
        selector.input(on_redraw, redraw_inputs, outputs)
        samples = example_files(examples_dir)
        if samples:
            gr.Examples([[[path]] for path in samples], inputs=[files], label="Examples")
    return demo


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("MODEL_ID", DEFAULT_MODEL), help="a saved folder or Hub id")
    # Gradio's own variables win over the loopback default, so a Hub Space (which sets them) listens outside.
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    return parser.parse_args(argv)


def cli() -> None:
    """The console script (deit-scm-demo): `main`, with its return value kept from the exit status."""
    main()


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    build_demo(args.model).launch(
        server_name=args.host, server_port=args.port, show_error=False, max_file_size=f"{MAX_UPLOAD_MB}mb"
    )


if __name__ == "__main__":
    cli()
