"""Fault campaign of the newer surfaces (issue 33): pretraining, the pipelines, ONNX export, reporting on tiny or
degenerate inputs, I/O faults (a read-only file system, a file-size limit), signals, concurrent runs and
tampered weights, tried as a careless or hostile user would. One JSON line per category on stdout, with the
counts of `fault_runs.py` (handled / typed_error / other_exception / silent_wrong / data_lost):

    python bench/fault_surfaces.py [--categories pretraining pipelines ...]

Each entry point is used as a user uses it: the command-line tools in their own process (exit status 2 is the
one-line refusal), the pipelines and loaders in this process (a typed error is the project's own:
`CXRImageError`, `RunInputError`, `ValueError`/`TypeError` naming the problem). About 10 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from fault_runs import ROOT, TINY, Case, Workshop, _edit_config, campaign_main, run_cli, run_process, tally_categories

SRC = ROOT / "src"
ENV = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}


def run_module(module: str, *argv: str, timeout: float = 900, **popen: Any) -> str:
    """`python -m MODULE ARGV` in its own process (`fault_runs.run_process`); returns stdout."""
    return run_process([sys.executable, "-m", module, *argv], timeout=timeout, env=ENV, **popen)


def _sixteen_bit_png(path: Path) -> Path:
    """A 16-bit radiograph-like PNG whose information sits in the low byte range PIL's RGB conversion clips."""
    rng = np.random.default_rng(3)
    pixels = (np.linspace(0, 1, 96)[None, :] * np.linspace(0.3, 1, 96)[:, None] * 4000 + rng.normal(0, 50, (96, 96)))
    Image.fromarray(np.clip(pixels, 0, 65535).astype(np.uint16)).save(path)
    return path


# --- pretraining --------------------------------------------------------------------------------------------


def pretraining_cases(shop: Workshop) -> Iterator[Case]:
    """`run_pretrain.py`: bad flags are one line; a folder holding a user's files or another run is kept."""
    small = ["--num_images", "24", "--phantom_size", "64", "--image_size", "32", "--num_train_epochs", "1"]
    bad_flags = (["--num_images", "0"], ["--num_images", "1"], ["--per_device_train_batch_size", "0"],
                 ["--depth", "-1"], ["--learning_rate", "nan"], ["--mlp_ratio", "0"], ["--objective", "mae"])
    for flags in bad_flags:
        out = shop.fresh("pretrain-flags")
        yield Case(f"run_pretrain.py {' '.join(flags)}",
                   lambda f=flags, o=out: run_module("deit_scm_cxr.pretraining", *small, *f, "--output_dir", str(o)),
                   must_fail=True)  # fmt: skip
    afile = shop.fresh("pretrain-file")
    afile.parent.mkdir(parents=True, exist_ok=True)
    afile.write_text("not a folder")
    yield Case("run_pretrain.py --output_dir is a file", lambda: run_module(
        "deit_scm_cxr.pretraining", *small, "--output_dir", str(afile)), must_fail=True, protected=[afile])
    users = shop.fresh("pretrain-users-model")
    users.mkdir(parents=True)
    (users / "model.safetensors").write_bytes(b"a user's weights")
    yield Case("run_pretrain.py into a folder holding a user's model.safetensors", lambda: run_module(
        "deit_scm_cxr.pretraining", *small, "--output_dir", str(users)), must_fail=True,
        protected=[users / "model.safetensors"])  # fmt: skip


# --- pipelines ------------------------------------------------------------------------------------------------


def pipeline_cases(shop: Workshop) -> Iterator[Case]:
    """The project's pipeline (remote code) and transformers' stock `image-classification` on the same model."""
    from pydicom.data import get_testdata_file
    from transformers import pipeline

    folder = shop.trained
    detector = pipeline(model=str(folder), trust_remote_code=True)
    uploads = shop.fresh("pipeline-inputs")
    uploads.mkdir(parents=True)
    images = [str(shop.image(uploads / f"{i}.png", seed=i)) for i in range(3)]
    broken = uploads / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    dicom = get_testdata_file("RG1_UNCR.dcm")
    deep = str(_sixteen_bit_png(uploads / "sixteen.png"))
    one_by_one = [detector(path)["label"] for path in images]

    yield Case("batch_size 2 over three images", lambda: detector(images, batch_size=2),
               check=lambda result, _: [r["label"] for r in result] == one_by_one)  # fmt: skip
    yield Case("a list with one broken file", lambda: detector([images[0], str(broken), images[1]]),
               check=lambda result, _: "error" in result[1] and result[0]["label"] and result[2]["label"])  # fmt: skip
    yield Case("an empty list", lambda: detector([]), check=lambda result, _: result == [])
    yield Case("a misspelled option (treshold=)", lambda: detector(images[0], treshold=0.3), must_fail=True)
    yield Case("a single broken file", lambda: detector(str(broken)), must_fail=True)
    processor, model = detector.image_processor, detector.model

    def project_label(path: str) -> str:
        import torch

        with torch.no_grad():
            logits = model(processor([path])["pixel_values"]).logits
        return model.config.id2label[int(logits.argmax())]

    yield Case("a DICOM (pydicom's real chest CR)", lambda: detector(dicom),
               check=lambda result, _: result["label"] == project_label(dicom))  # fmt: skip
    yield Case("a 16-bit PNG", lambda: detector(deep), check=lambda result, _: result["label"] == project_label(deep))
    stock = pipeline("image-classification", model=str(folder), trust_remote_code=True)
    # PIL's 8-bit conversion clips the 16-bit values: the processor refuses the clipped image (typed) ...
    yield Case("stock image-classification on a 16-bit PNG (PIL converts it to 8-bit RGB first)", lambda: stock(deep),
               must_fail=True)  # fmt: skip
    # ... and the file decoded by the processor (its bit depth kept) gets the project's answer.
    for name, path in (("16-bit PNG", deep), ("DICOM", dicom)):
        yield Case(f"stock image-classification on the processor's decoding of a {name}",
                   lambda p=path: stock(processor.decode(p)),
                   check=lambda result, _, p=path: result[0]["label"] == project_label(p))  # fmt: skip
    yield Case("stock image-classification on a DICOM (PIL cannot read one)", lambda: stock(dicom), must_fail=True)


# --- ONNX -----------------------------------------------------------------------------------------------------


def onnx_cases(shop: Workshop) -> Iterator[Case]:
    """`deit-scm-export-onnx`: an opset it cannot write, a folder that is not a model, and a real export."""
    out = shop.fresh("onnx")
    out.mkdir(parents=True)
    yield Case("--opset 7", lambda: run_module("deit_scm_cxr.export_onnx", "--model", str(shop.trained), "--output",
                                               str(out / "a.onnx"), "--opset", "7"), must_fail=True)  # fmt: skip
    yield Case("--model a folder without config.json", lambda: run_module(
        "deit_scm_cxr.export_onnx", "--model", str(out), "--output", str(out / "b.onnx")), must_fail=True)
    yield Case("--output in a missing folder", lambda: run_module(
        "deit_scm_cxr.export_onnx", "--model", str(shop.trained), "--output", str(out / "missing" / "c.onnx")),
        check=lambda stdout, _: json.loads(stdout.strip().splitlines()[-1])["opset"] == 18)  # fmt: skip
    yield Case("a plain export: opset 18 and parity within 1e-4", lambda: run_module(
        "deit_scm_cxr.export_onnx", "--model", str(shop.trained), "--output", str(out / "d.onnx")),
        check=lambda stdout, _: max(json.loads(stdout.strip().splitlines()[-1])["max_abs_difference"].values()) < 1e-4)


# --- reporting ------------------------------------------------------------------------------------------------


def reporting_cases(shop: Workshop) -> Iterator[Case]:
    """The card and the metrics on tiny or degenerate inputs: a word for what is undefined, never `nan`."""
    from deit_scm_cxr.evaluation.metrics import pointing_hits
    from deit_scm_cxr.hub.localization import scoremap_to_boxes
    from deit_scm_cxr.outputs.card import empty_results, model_card
    from deit_scm_cxr.training.run import settings_for

    card = settings_for("--output_dir", str(shop.fresh("card"))).card
    yield Case("a card of no evaluation at all", lambda: model_card(card, empty_results()),
               check=lambda text, _: "nan" not in text.lower() and "n/a" in text)  # fmt: skip
    run = shop.fresh("two-images")
    run_cli(*TINY, "--max_train_steps", "1", "--max_eval_samples", "2", "--output_dir", str(run))
    yield Case("a card from a run evaluated on 2 images", lambda: (run / "README.md").read_text(),
               check=lambda text, _: " nan " not in text and "| nan" not in text)  # fmt: skip
    results = json.loads((run / "all_results.json").read_text())
    yield Case("model_card() on a run's own all_results.json", lambda: model_card(card, results),
               check=lambda text, _: "nan" not in text.lower())  # fmt: skip
    yield Case("a 0 x 0 map", lambda: scoremap_to_boxes(np.zeros((0, 0)), 0.5), must_fail=True)
    # wsolevaluation's convention, kept by the metrics: a map holding NaN scores as an all-zero map.
    yield Case("a NaN map", lambda: scoremap_to_boxes(np.full((4, 4), np.nan), 0.5),
               check=lambda boxes, _: np.array_equal(boxes, scoremap_to_boxes(np.zeros((4, 4)), 0.5)))  # fmt: skip
    yield Case("pointing game with no boxes", lambda: pointing_hits([np.ones((4, 4))], [np.zeros((0, 4))]),
               check=lambda hits, _: len(hits) == 1)  # fmt: skip


# --- I/O faults -----------------------------------------------------------------------------------------------


def _file_size_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:  # in the child: writes past `limit` bytes fail with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def io_cases(shop: Workshop) -> Iterator[Case]:
    """A read-only file system and a full disk (a file-size limit): one line, and a finished run kept."""
    readonly = Path("/sys/deit-scm-run")  # sysfs is read-only even for root
    yield Case("--output_dir on a read-only file system", lambda: run_module(
        "deit_scm_cxr.training", *TINY, "--max_train_steps", "1", "--output_dir", str(readonly)), must_fail=True)
    finished = shop.run_copy("disk-full")
    weights = (finished / "model.safetensors").read_bytes()
    yield Case("the disk fills up during an --overwrite_output_dir replacement", lambda: run_module(
        "deit_scm_cxr.training", *TINY, "--max_train_steps", "1", "--output_dir", str(finished),
        "--overwrite_output_dir", preexec_fn=_file_size_limit(200_000)), must_fail=True,
        check=None)  # fmt: skip
    yield Case("...after which the finished run is still there (in place or set aside)", lambda: [
        p.read_bytes() for p in (finished / "model.safetensors", finished / ".previous_run" / "model.safetensors")
        if p.is_file()], check=lambda found, _: weights in found)  # fmt: skip
    # 2 kB: the rows fit, the overlay does not; the row keeps the prediction and names the failed overlay.
    yield Case("deit-scm-predict with room for the rows but not the overlays", lambda: json.loads(run_module(
        "deit_scm_cxr.predict", "--model", str(shop.trained), "--output_dir", str(shop.fresh("predict-full")),
        str(shop.image(shop.fresh("scan") / "a.png")), preexec_fn=_file_size_limit(2_000))),
        check=lambda rows, _: rows[0]["label"] and "File too large" in rows[0]["overlay_error"])  # fmt: skip
    yield Case("deit-scm-predict with no room for the rows", lambda: run_module(
        "deit_scm_cxr.predict", "--model", str(shop.trained), "--output_dir", str(shop.fresh("predict-none")),
        str(shop.image(shop.fresh("scan") / "b.png")), preexec_fn=_file_size_limit(10)), must_fail=True)


# --- signals and concurrent runs ------------------------------------------------------------------------------


def _interrupted_then_resumed(shop: Workshop, signal_number: int) -> bool:
    """A run killed by `signal_number` after its first checkpoint, resumed: the same weights as one never stopped."""
    flags = [*TINY, "--do_eval", "false", "--max_train_steps", "6", "--checkpointing_steps", "2"]
    out = shop.fresh(f"signal-{signal_number}")
    process = subprocess.Popen([sys.executable, str(ROOT / "run_wsol.py"), *flags, "--output_dir", str(out)],
                               env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 600
    while not list((out / "checkpoints").glob("step_*/COMPLETE")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal_number)
    process.wait(timeout=300)
    run_cli(*flags, "--output_dir", str(out), "--resume_from_checkpoint", "latest")
    reference = shop.fresh("signal-reference")
    run_cli(*flags, "--output_dir", str(reference))
    return (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def _two_runs_at_once(shop: Workshop) -> bool:
    """Two runs started into one new folder: one completes, the other is refused; the folder is one run's."""
    out = shop.fresh("two-at-once")
    command = [sys.executable, str(ROOT / "run_wsol.py"), *TINY, "--do_eval", "false", "--max_train_steps", "2",
               "--output_dir", str(out)]  # fmt: skip
    processes = [subprocess.Popen(command, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for _ in range(2)]  # fmt: skip
    codes = sorted(p.wait(timeout=900) for p in processes)
    return codes == [0, 2] and (out / "model.safetensors").is_file()


def run_control_cases(shop: Workshop) -> Iterator[Case]:
    yield Case("SIGTERM after the first checkpoint, then resume latest", lambda: _interrupted_then_resumed(
        shop, signal.SIGTERM), check=lambda same, _: same)  # fmt: skip
    yield Case("SIGINT after the first checkpoint, then resume latest", lambda: _interrupted_then_resumed(
        shop, signal.SIGINT), check=lambda same, _: same)  # fmt: skip
    yield Case("two runs started at once into one new folder", lambda: _two_runs_at_once(shop),
               check=lambda ok, _: ok)  # fmt: skip


# --- tampered weights -----------------------------------------------------------------------------------------


def _tampered(shop: Workshop, name: str, edit: Callable[[Path], None]) -> Path:
    folder = shop.model_copy(name)
    edit(folder)
    return folder


def _nan_weight(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    state["head.bias"][0] = float("nan")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _retype(folder: Path) -> None:
    raw = (folder / "model.safetensors").read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])
    header["head.weight"]["dtype"] = "I32"
    text = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    (folder / "model.safetensors").write_bytes(raw[:8] + text + raw[8 + length :])


def tampered_cases(shop: Workshop) -> Iterator[Case]:
    """Saved folders whose weights or config were changed: refused at load, naming the folder."""
    from deit_scm_cxr.hub.modeling_deit_scm import DeiTSCMForImageClassification

    config = json.loads((shop.trained / "config.json").read_text())
    edits: dict[str, Callable[[Path], None]] = {
        "a NaN weight": _nan_weight,
        "a weight's header retyped F32 -> I32": _retype,
        "fewer SCM blocks in config.json": lambda f: _edit_config(f, scm_num_blocks=config["scm_num_blocks"] - 1),
        "more layers in config.json": lambda f: _edit_config(f, num_hidden_layers=config["num_hidden_layers"] + 1),
        "another model_type in config.json": lambda f: _edit_config(f, model_type="vit"),
        "NaN class weights in config.json": lambda f: (f / "config.json").write_text(
            (f / "config.json").read_text().replace('"class_weights": null', '"class_weights": [NaN, 1.0, 1.0]')),
        "NaN SCM constant in config.json": lambda f: _edit_config(f, scm_lambda_init=float("nan")),
        "config.json nested 100,000 deep": lambda f: (f / "config.json").write_text(
            '{"a": ' * 100_000 + "1" + "}" * 100_000),
    }
    for name, edit in edits.items():
        folder = _tampered(shop, "tampered", edit)
        yield Case(name, lambda f=folder: DeiTSCMForImageClassification.from_pretrained(f), must_fail=True)
        yield Case(f"{name}, through run_wsol.py --model_name_or_path", _predict_with(shop, folder), must_fail=True)


def _predict_with(shop: Workshop, folder: Path) -> Callable[[], Any]:
    scan = shop.image(shop.fresh("scan") / "a.png")
    return lambda: run_cli("--do_train", "false", "--do_eval", "false", "--model_name_or_path", str(folder),
                           "--output_dir", str(shop.fresh("predicted")), "--predict_files", str(scan))  # fmt: skip


CATEGORIES: dict[str, Callable[[Workshop], Iterable[Case]]] = {
    "pretraining": pretraining_cases,
    "pipelines": pipeline_cases,
    "onnx_export": onnx_cases,
    "reporting_tiny_inputs": reporting_cases,
    "io_faults": io_cases,
    "signals_and_concurrency": run_control_cases,
    "tampered_weights": tampered_cases,
}


def typed_errors() -> tuple[type, ...]:
    from deit_scm_cxr.errors import RunInputError
    from deit_scm_cxr.hub.cxr_decoding import CXRImageError
    from deit_scm_cxr.hub.localization import LocalizationInputError

    # The project's own errors, and ValueError/TypeError raised by its checks (they name the problem).
    return (RunInputError, CXRImageError, LocalizationInputError, ValueError, TypeError)


def run_categories(names: Iterable[str], folder: Optional[Path] = None) -> list[dict]:
    return tally_categories(CATEGORIES, names, lambda name: typed_errors(), "fault-surfaces-", folder)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    return campaign_main(__doc__.split("\n\n")[0], CATEGORIES, run_categories, argv)


if __name__ == "__main__":
    main()
