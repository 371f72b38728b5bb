"""Bad-input campaign (issue 12): feed the processor, the metrics and the CLI what users and files get
wrong, and count the outcomes per category. One JSON line per category on stdout:

    {"category": ..., "tried": n, "handled": n, "typed_error": n, "other_exception": n, "silent_wrong": n}

handled: a valid result; typed_error: the project's error for that layer (`CXRImageError`,
`LocalizationInputError`, the CLI's exit status 2); other_exception: anything else escaping (a bug);
silent_wrong: a result where the input is known to be unusable, or a result with non-finite values (a bug).
The goal is zero in the last two columns. Kill -9 during training is covered by the fault tests in
tests/test_run_wsol.py (resume equals an uninterrupted run), not here.

    python bench/fault_campaign.py [--mutations 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from deit_scm_cxr.evaluation.metrics import ClassificationInputError, LocalizationScores, pixel_average_precision
from deit_scm_cxr.hub.image_processing_cxr import CXRImageError, CXRImageProcessor
from deit_scm_cxr.hub.localization import LocalizationInputError

OUTCOMES = ("handled", "typed_error", "other_exception", "silent_wrong")


def tally(category: str, cases: Iterable[tuple[Callable[[], object], bool]], typed: tuple[type, ...]) -> dict:
    """Run each (call, must_fail) case; `must_fail` marks inputs that must not give a result."""
    counts: Counter = Counter()
    examples: dict[str, str] = {}
    for call, must_fail in cases:
        try:
            result = call()
        except typed:
            outcome = "typed_error"
        except SystemExit as error:
            outcome = "typed_error" if error.code == 2 else "other_exception"
        except Exception as error:  # the campaign's point: anything else is counted, not raised
            outcome = "other_exception"
            examples.setdefault(outcome, f"{type(error).__name__}: {str(error)[:160]}")
        else:
            finite = result is None or bool(torch.isfinite(torch.as_tensor(result)).all())
            outcome = "silent_wrong" if (must_fail or not finite) else "handled"
            if outcome == "silent_wrong":
                examples.setdefault(outcome, "a result for an unusable input" if finite else "non-finite result")
        counts[outcome] += 1
    return {
        "category": category,
        "tried": sum(counts.values()),
        **{k: counts[k] for k in OUTCOMES},
        "examples": examples,
    }


def _pixels(processor: CXRImageProcessor, item: object) -> Callable[[], torch.Tensor]:
    return lambda: processor([item])["pixel_values"]


def array_cases(rng: np.random.Generator, processor: CXRImageProcessor, count: int):
    dtypes = [np.uint8, np.uint16, np.int16, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_]
    shapes = [(0, 5), (1, 1), (7, 300), (64, 64), (64, 64, 1), (64, 64, 3), (64, 64, 4), (64, 64, 2), (2, 8, 8, 3)]
    for _ in range(count):
        dtype, shape = dtypes[rng.integers(len(dtypes))], shapes[rng.integers(len(shapes))]
        scale = float(10.0 ** rng.integers(-3, 39)) if np.dtype(dtype).kind == "f" else 1.0
        array = (rng.standard_normal(shape) * scale).astype(dtype) if dtype != np.bool_ else rng.random(shape) > 0.5
        poison = np.dtype(dtype).kind == "f" and array.size and rng.random() < 0.3
        if poison:  # in the first channel: a fourth (alpha) channel is ignored by design
            plane = array.shape[:2]
            where = np.unravel_index(rng.integers(int(np.prod(plane))), plane) + ((0,) if array.ndim == 3 else ())
            array[where] = [np.nan, np.inf, -np.inf][rng.integers(3)]
        yield _pixels(processor, array), bool(poison)
    yield _pixels(processor, torch.rand(32, 32, dtype=torch.bfloat16)), False


def _dicom_bytes(dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=False)
    return buffer.getvalue()


def pydicom_cases(processor: CXRImageProcessor):
    import pydicom
    from pydicom.data import get_testdata_files

    for path in get_testdata_files():
        try:
            has_pixels = "PixelData" in pydicom.dcmread(path, force=True, stop_before_pixels=False)
        except Exception:  # unreadable headers must give the typed error too
            has_pixels = False
        yield _pixels(processor, path), not has_pixels


def handmade_dicom_cases(processor: CXRImageProcessor):
    """Valid pixel data with one broken attribute each: none may give an image silently."""
    import pydicom
    from pydicom.data import get_testdata_file

    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    changes = {
        "window width 0": {"WindowCenter": 100, "WindowWidth": 0},
        "window width -100": {"WindowCenter": 100, "WindowWidth": -100},
        "unknown VOI LUT function": {"WindowCenter": 100, "WindowWidth": 200, "VOILUTFunction": "BOGUS"},
        "slope NaN": {"RescaleSlope": float("nan")},
        "slope inf": {"RescaleSlope": float("inf")},
        "slope 1e308": {"RescaleSlope": 1e308},
        "RGB with one sample": {"PhotometricInterpretation": "RGB"},
        "palette colour": {"PhotometricInterpretation": "PALETTE COLOR"},
        "no pixel data": {},
        "Rows x Columns beyond the limit": {"Rows": 20000, "Columns": 20000},
        "bits allocated 7": {"BitsAllocated": 7},
        "truncated pixel data": {"PixelData": base.PixelData[:100]},
    }
    for name, values in changes.items():
        dataset = copy.deepcopy(base)
        for key, value in values.items():
            setattr(dataset, key, value)
        if name == "no pixel data":
            del dataset.PixelData
        yield _pixels(processor, _dicom_bytes(dataset)), True


def mutated_dicom_cases(rng: np.random.Generator, processor: CXRImageProcessor, count: int):
    from pydicom.data import get_testdata_file

    sources = [open(get_testdata_file(n), "rb").read() for n in ("CT_small.dcm", "MR_small.dcm", "RG1_UNCR.dcm")]
    for _ in range(count):
        data = bytearray(sources[rng.integers(len(sources))])
        kind = rng.integers(3)
        if kind == 0:  # flip bytes in the header region
            for position in rng.integers(0, min(len(data), 2000), size=rng.integers(1, 20)):
                data[position] = rng.integers(256)
        elif kind == 1:  # truncate
            data = data[: rng.integers(1, len(data))]
        else:  # splice random bytes
            at = rng.integers(len(data))
            data[at:at] = rng.integers(0, 256, size=rng.integers(1, 200), dtype=np.uint8).tobytes()
        yield _pixels(processor, bytes(data)), False


def _png(width: int, height: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def image_file_cases(rng: np.random.Generator, processor: CXRImageProcessor, count: int):
    from PIL import Image

    good = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(good, format="PNG")
    yield _pixels(processor, _png(30000, 30000, zlib.compress(b"\x00" * 64))), True  # a bomb header
    yield _pixels(processor, _png(64, 64, bytes(rng.integers(0, 256, 300, dtype=np.uint8)))), True  # garbage IDAT
    nan_tiff = io.BytesIO()
    values = rng.random((32, 32)).astype(np.float32)
    values[0, 0] = np.nan
    Image.fromarray(values, mode="F").save(nan_tiff, format="TIFF")
    yield _pixels(processor, nan_tiff.getvalue()), True
    yield _pixels(processor, b""), True
    for _ in range(count):
        data = bytearray(good.getvalue())
        data = data[: rng.integers(8, len(data))] if rng.random() < 0.5 else data
        for position in rng.integers(0, len(data), size=rng.integers(0, 6)):
            data[position] = rng.integers(256)
        yield _pixels(processor, bytes(data)), False


def metric_cases():
    rng = np.random.default_rng(0)
    good_map, good_box = rng.random((32, 32)).astype(np.float32), np.array([[2.0, 2.0, 20.0, 20.0]])
    bad_maps = [np.full((32, 32), np.nan, np.float32), np.full((32, 32), 2.0, np.float32), -good_map, good_map[None]]
    bad_boxes = [np.array([[20.0, 2, 2, 20]]), np.array([[np.nan, 2, 20, 20]]), np.array([[-1.0, 2, 20, 20]]),
                 np.zeros((0, 4))]  # fmt: skip
    for bad in bad_maps:
        yield (
            (lambda m=bad: LocalizationScores.from_maps([good_map, m], [good_box, good_box]).oracle()["MaxBoxAcc"]),
            True,
        )
        yield (lambda m=bad: pixel_average_precision([m], [good_box])), True
    for bad in bad_boxes:
        yield (lambda b=bad: LocalizationScores.from_maps([good_map], [b]).oracle()["MaxBoxAcc"]), True
        yield (lambda b=bad: pixel_average_precision([good_map], [b])), True
    yield (lambda: LocalizationScores.from_maps([good_map], [good_box]).oracle()["MaxBoxAcc"]), False


def metric_argument_cases():
    """Bad arguments to the metrics and the post-processing (issue 22): thresholds, deltas, counts that do not
    match, zero-size geometry, NaN logits and maps, labels out of range."""
    yield from localization_metric_cases()
    yield from classification_metric_cases()
    yield from post_processing_cases()


def localization_metric_cases():
    from deit_scm_cxr.evaluation.metrics import box_measures, cxr_protocol

    rng = np.random.default_rng(1)
    maps = [rng.random((32, 32)).astype(np.float32) for _ in range(2)]
    boxes = [np.array([[2.0, 2.0, 20.0, 20.0]])] * 2
    for thresholds in ([], [0.5, 0.2], [np.nan], [-0.1, 0.5], [0.5, 1.5], ["abc"], [0.2, 0.2]):
        yield (lambda t=thresholds: LocalizationScores.from_maps(maps, boxes, thresholds=t).oracle()["MaxBoxAcc"]), True
        yield (lambda t=thresholds: pixel_average_precision(maps, boxes, thresholds=t)), True
    yield (lambda: pixel_average_precision(maps, boxes, thresholds=[0.5, 1.0])), True
    scores = LocalizationScores.from_maps(maps, boxes)
    for delta in (-0.1, 1.5, np.nan):
        yield (lambda d=delta: scores.box_acc(d)), True
        yield (lambda d=delta: scores.top1_loc(d)), True
    yield (lambda: LocalizationScores.from_maps(maps, boxes, correct_class=[True]).top1_loc()), True
    yield (lambda: LocalizationScores.from_fixed_boxes(boxes[:1], boxes).box_acc()), True
    yield (lambda: pixel_average_precision(maps, boxes[:1])), True
    for size in ((0, 0), (np.nan, 32), (-5, 32), (32.5, 32)):
        yield (lambda z=size: list(box_measures(boxes[0], boxes[0], z).values())), True
    yield (lambda: list(box_measures(np.array([[9.0, 9, 2, 2]]), boxes[0], (32, 32)).values())), True
    yield (lambda: list(box_measures(np.concatenate(boxes), boxes[0], (32, 32)).values())), True
    yield (lambda: list(box_measures(boxes[0], boxes[0], (32, 32)).values())), False
    yield (lambda: cxr_protocol(boxes, [np.concatenate(boxes), boxes[1]], [["Mass"], ["Mass"]]) and None), True
    yield (lambda: cxr_protocol(boxes, boxes[:1], [["Mass"]]) and None), True
    yield (lambda: cxr_protocol(boxes, boxes, [["Mass"], ["Mass"]]) and None), False


def classification_metric_cases():
    from deit_scm_cxr.evaluation.metrics import classification_metrics

    probabilities = np.full((4, 3), 1 / 3)
    bad_classification = [
        ([0, 1, 2, 5], probabilities), ([0, 1, 2, -1], probabilities), ([0, 1, 2, 0.5], probabilities),
        ([0, 1, 2, 0], np.full((4, 3), np.nan)), ([0, 1, 2], probabilities), ([], np.zeros((0, 3))),
    ]  # fmt: skip
    for labels, probs in bad_classification:
        yield (lambda y=labels, q=probs: classification_metrics(y, q, ["a", "b", "c"])["accuracy"]), True
    yield (lambda: classification_metrics([0, 1, 2, 0], probabilities, ["a", "b", "c"])["accuracy"]), False


def post_processing_cases():
    processor = CXRImageProcessor(size={"height": 32, "width": 32})
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    grid = torch.rand(1, 3, 4, 4)
    good = [[32, 32, 32, 32, 0, 0, 32, 32]]

    def post(out_logits=logits, out_maps=grid, geometry=good, **kwargs):
        outputs = {"logits": out_logits, "coupled_maps": out_maps}
        return processor.post_process_localization(outputs, geometry=geometry, **kwargs)[0]["heatmap"]

    bad_post = [
        {"out_logits": torch.full((1, 3), float("nan"))}, {"out_maps": torch.full((1, 3, 4, 4), float("nan"))},
        {"labels": [7]}, {"labels": [-1]}, {"threshold": float("nan")}, {"threshold": 2.0},
        {"geometry": [[0, 0, 0, 0, 0, 0, 32, 32]]}, {"geometry": [[32, 32, 32, 32, 10, 0, 32, 32]]},
        {"geometry": [[32, 32, 32, 32, 0, 0, 32, 32.5]]},
    ]  # fmt: skip
    for kwargs in bad_post:
        yield (lambda k=kwargs: post(**k)), True
    yield (lambda: post()), False
    yield (lambda: post(geometry=torch.tensor(good))), False


CLI_MISTAKES = [
    ["--learning_rate", "-1"], ["--learning_rate", "nan"], ["--max_grad_norm", "-1"],
    ["--early_stopping_patience", "-1"], ["--class_weights", "nan,1,1"], ["--class_weights", "0,0,0"],
    ["--config_overrides", "hiden_size=64"], ["--config_overrides", "scm_pooling=max"], ["--image_size", "36"],
    ["--report_to", "bogus"], ["--num_workers", "-1"], ["--lr_step_epochs", "-3"], ["--dataset", "nih"],
    ["--dataset", "nih", "--data_dir", "/nonexistent"], ["--checkpointing_steps", "often"],
    ["--checkpointing_steps", "0"], ["--resume_from_checkpoint", "/nonexistent"], ["--predict_files", "/nonexistent"],
    ["--per_device_train_batch_size", "0"], ["--num_train_epochs", "-2"], ["--label_smoothing", "1.5"],
    ["--weight_decay", "-0.1"], ["--drop_path_rate", "2"], ["--push_to_hub"], ["--do_train", "maybe"],
    ["--do_train", "false"], ["--model_name_or_path", "/nonexistent", "--do_train", "false"],
    ["--recipe", "fast"], ["--preset", "deit-huge"], ["--mixed_precision", "fp8"],
]  # fmt: skip


def cli_cases(output_dir: Path):
    """Each mistake through `python run_wsol.py` in its own process; one that parses would start a run, so a
    case that has not ended within a minute was accepted (silent)."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "run_wsol.py"

    def run(flags: list[str]) -> None:
        try:
            done = subprocess.run([sys.executable, str(script), "--output_dir", str(output_dir), *flags],
                                  capture_output=True, text=True, timeout=60)  # fmt: skip
        except subprocess.TimeoutExpired:
            return None  # it started training: the mistake was accepted
        if done.returncode:
            raise SystemExit(done.returncode)
        return None

    for flags in CLI_MISTAKES:
        yield (lambda f=flags: run(f)), True


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutations", type=int, default=300, help="random cases per random category")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # the processor warns about every non-radiograph modality
    rng = np.random.default_rng(args.seed)
    processor = CXRImageProcessor(size={"height": 32, "width": 32})
    typed_image = (CXRImageError,)
    import tempfile

    categories = [
        ("processor_arrays", lambda: array_cases(rng, processor, args.mutations), typed_image),
        ("pydicom_test_files", lambda: pydicom_cases(processor), typed_image),
        ("handmade_dicoms", lambda: handmade_dicom_cases(processor), typed_image),
        ("mutated_dicoms", lambda: mutated_dicom_cases(rng, processor, args.mutations), typed_image),
        ("image_files", lambda: image_file_cases(rng, processor, args.mutations), typed_image),
        ("metric_inputs", metric_cases, (LocalizationInputError,)),
        ("metric_arguments", metric_argument_cases, (LocalizationInputError, ClassificationInputError)),
        ("cli_mistakes", lambda: cli_cases(Path(tempfile.mkdtemp())), ()),
    ]
    rows = []
    for name, cases, typed in categories:
        with contextlib.redirect_stderr(io.StringIO()):  # argparse prints each CLI mistake's line
            row = tally(name, cases(), typed)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
