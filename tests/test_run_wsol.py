"""Tests of the main job: outputs, resume, two processes, prediction, bad flags (tiny model, CPU)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import deit_scm_cxr.data.prepare as wsol_data
import deit_scm_cxr.evaluation.evaluator as wsol_evaluation
import deit_scm_cxr.outputs.card as wsol_card
import deit_scm_cxr.outputs.writer as wsol_outputs
import deit_scm_cxr.training.checkpoints as wsol_checkpoints
import deit_scm_cxr.training.loop as wsol_training
import deit_scm_cxr.training.run as run_wsol
from deit_scm_cxr.data.cxr import CLASS_NAMES
from deit_scm_cxr.hub.image_processing_cxr import CXRImageProcessor
from deit_scm_cxr.hub.localization import map_output
from remote_code import run_outside_repo
from tiny_run import TINY

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT / "src")
    return env


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("smoke") / "run"
    run_wsol.main([*TINY, "--output_dir", str(output), "--max_train_steps", "2"])
    return output


def test_smoke_run_writes_every_output(smoke_run):
    results = json.loads((smoke_run / "all_results.json").read_text())
    assert results["training"]["steps"] == 2
    test = results["classification"]["test"]
    assert {"accuracy", "balanced_accuracy", "macro_f1", "per_class", "roc_auc_ovr", "confusion_matrix"} <= set(test)
    # Issue 33: the recorded configuration is the saved one, with what was fitted after training.
    saved = json.loads((smoke_run / "config.json").read_text())
    assert results["model_config"]["calibration_temperature"] == saved["calibration_temperature"]
    assert results["model_config"]["ood_threshold"] == saved["ood_threshold"] is not None
    assert "ood_precision" not in results["model_config"] and len(saved["ood_precision"]) == saved["hidden_size"]
    methods = results["localization"]["methods"]
    assert set(methods) == {"attention", "semantic", "coupled", "random", "full_image", "train_mean_box"}
    for name, row in methods.items():
        smoothed = set() if name in ("full_image", "train_mean_box") else {"smoothing_sigma", "smoothing_choice"}
        assert set(row) == {
            "calibrated_on_validation", "test_oracle_max_over_thresholds", "validation", "PxAP", "box_measures", "ci95",
            "pointing_game", *smoothed,
        }  # fmt: skip
        assert set(row["ci95"]) == {"MaxBoxAcc", "MaxBoxAccV2", "PxAP", "pointing_game"}
        assert 0.0 <= row["pointing_game"] <= 100.0
        assert {"mean_iou", "mean_giou", "mean_hausdorff", "mean_average_boundary_distance"} <= set(row["box_measures"])
    assert results["localization"]["frame"] == [224, 224]
    assert results["localization"]["threshold_step"] == pytest.approx(0.001)
    assert (
        "Atelectasis" in results["localization"]["cxr_protocol_at_calibrated_threshold"]
        or results["localization"]["cxr_protocol_at_calibrated_threshold"]
    )
    for folder in ("metrics_plots", "heatmap_comparisons", "localization_samples"):
        pngs = list((smoke_run / folder).glob("*.png"))
        assert pngs, folder
        for png in pngs:
            with Image.open(png) as image:
                image.verify()
    assert {p.name for p in (smoke_run / "metrics_plots").glob("*.png")} >= {
        "loss.png", "accuracy.png", "macro_f1.png", "localization.png",
        "confusion_matrix.png", "localization_baselines.png",
    }  # fmt: skip
    processor_config = json.loads((smoke_run / "preprocessor_config.json").read_text())
    localization = results["localization"]
    threshold = localization["heatmap_threshold_from_validation"]
    assert processor_config["localization_threshold"] == pytest.approx(threshold)
    # The released map is the validation-best one, and its own calibrated threshold goes with it.
    chosen = localization["localization_map"]
    validation = {m: methods[m]["validation"] for m in ("coupled", "semantic", "attention")}
    for row in validation.values():
        assert 0.0 <= row["PxAP"] <= 100.0 and 0.0 <= row["pointing_game"] <= 100.0
    mean_of_three = {m: (row["MaxBoxAccV2"] + row["PxAP"] + row["pointing_game"]) / 3 for m, row in validation.items()}
    assert mean_of_three[chosen] == pytest.approx(max(mean_of_three.values()))
    assert threshold == methods[chosen]["calibrated_on_validation"]["threshold"]
    assert processor_config["localization_map"] == map_output(chosen)
    # Each map's smoothing width is the validation-best of the widths offered, and the processor carries them all.
    for name in ("coupled", "semantic", "attention"):
        choice = methods[name]["smoothing_choice"]
        assert set(choice) == {"0", "0.5", "0.75", "1", "1.5"}
        assert choice[f"{methods[name]['smoothing_sigma']:g}"] == pytest.approx(max(choice.values()))
        assert processor_config["localization_smoothing"][map_output(name)] == methods[name]["smoothing_sigma"]
    assert localization["smoothing_sigma_from_validation"] == methods[chosen]["smoothing_sigma"]
    assert methods["random"]["smoothing_sigma"] == 0.0


def _table(validation_v2: dict[str, float], pxap: float = 10.0, pointing: float = 30.0) -> dict[str, dict]:
    return {name: {"validation": {"MaxBoxAccV2": value, "PxAP": pxap, "pointing_game": pointing}}
            for name, value in validation_v2.items()}  # fmt: skip


def test_released_map_needs_its_peak_on_the_finding():
    """The failure issue 31's runs showed: F0 parked on the film's border wins MaxBoxAccV2 on validation (its
    box as large as the image overlaps the findings) while never pointing at one; S0 is released instead."""
    table = {
        "coupled": {"validation": {"MaxBoxAccV2": 9.0, "PxAP": 8.0, "pointing_game": 3.0}},
        "semantic": {"validation": {"MaxBoxAccV2": 12.0, "PxAP": 20.0, "pointing_game": 45.0}},
        "attention": {"validation": {"MaxBoxAccV2": 16.0, "PxAP": 9.0, "pointing_game": 0.5}},
    }
    assert wsol_evaluation.choose_localization_map(table) == "semantic"
    # A measure that could not be computed (no boxed validation image) counts as nothing, never as NaN's max.
    table["attention"]["validation"]["pointing_game"] = float("nan")
    table["semantic"]["validation"]["PxAP"] = float("nan")
    assert wsol_evaluation.choose_localization_map(table) == "semantic"  # (12+0+45)/3 = 19 > (16+9+0)/3
    table["semantic"]["validation"]["pointing_game"] = 10.0
    assert wsol_evaluation.choose_localization_map(table) == "attention"  # 22/3 < 25/3


def test_released_map_is_chosen_on_validation_only():
    # Test numbers are not in the table the choice reads; baselines never win even when they score higher.
    table = _table({"coupled": 3.0, "semantic": 14.0, "attention": 9.0, "random": 20.0})
    assert wsol_evaluation.choose_localization_map(table) == "semantic"
    assert (
        wsol_evaluation.choose_localization_map(_table({"coupled": 7.0, "semantic": 7.0, "attention": 7.0}))
        == "coupled"
    )
    assert (
        wsol_evaluation.choose_localization_map(_table({"coupled": 2.0, "semantic": 1.0, "attention": 5.5}))
        == "attention"
    )


def test_model_card_metadata(smoke_run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(smoke_run / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-classification"
    results = json.loads((smoke_run / "all_results.json").read_text())
    accuracy = next(r for r in card.data.eval_results if r.metric_type == "accuracy")
    assert accuracy.metric_value == pytest.approx(results["classification"]["test"]["accuracy"], abs=1e-4)
    assert "trust_remote_code=True" in card.text and "post_process_localization" in card.text


def test_saved_folder_loads_with_remote_code_outside_the_repo(smoke_run, tmp_path):
    script = f"""
import numpy as np, torch
from transformers import AutoImageProcessor, AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained({str(smoke_run)!r}, trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained({str(smoke_run)!r}, trust_remote_code=True)
image = (np.random.default_rng(0).random((120, 90)) * 4000).astype(np.uint16)
inputs = processor([image])
with torch.no_grad():
    outputs = model(inputs["pixel_values"])
result = processor.post_process_localization(outputs, geometry=inputs, id2label=model.config.id2label)[0]
assert result["heatmap"].shape == (120, 90) and result["label_name"] in model.config.id2label.values()
print("LOADED", result["label_name"])
"""
    done = run_outside_repo(script, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LOADED" in done.stdout


def test_prediction_only_run_writes_json_and_overlays(smoke_run, tmp_path):
    image = tmp_path / "patient.png"
    Image.fromarray((np.random.default_rng(1).random((80, 100)) * 255).astype(np.uint8)).save(image)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    output = tmp_path / "predict"
    run_wsol.main(
        ["--do_train", "false", "--do_eval", "false", "--model_name_or_path", str(smoke_run),
         "--output_dir", str(output), "--predict_files", str(image), str(broken)]
    )  # fmt: skip
    records = json.loads((output / "predictions" / "predictions.json").read_text())
    good = next(r for r in records if r["file"] == str(image))
    assert good["label"] in CLASS_NAMES and 0 <= good["score"] <= 1
    assert Path(good["overlay"]).is_file()
    bad = next(r for r in records if r["file"] == str(broken))
    assert "broken.png" in bad["error"]


def test_prediction_overlays_never_collide_and_folders_are_expanded(smoke_run, tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "sub").mkdir()
    files = [tmp_path / "good.png", tmp_path / "good.jpg", tmp_path / "sub" / "good.png"]
    for file in files:
        Image.fromarray((rng.random((80, 90)) * 255).astype(np.uint8)).save(file)
    common = ["--do_train", "false", "--do_eval", "false", "--model_name_or_path", str(smoke_run)]
    names = []
    for attempt in ("first", "second"):
        output = tmp_path / attempt
        run_wsol.main([*common, "--output_dir", str(output), "--predict_files", *map(str, files)])
        records = json.loads((output / "predictions" / "predictions.json").read_text())
        overlays = [Path(r["overlay"]).name for r in records]
        assert len(set(overlays)) == 3 and all((output / "predictions" / n).is_file() for n in overlays)
        assert [r["file"] for r in records] == [str(f) for f in files]
        names.append(overlays)
    assert names[0] == names[1]  # stable across runs
    # A folder stands for the images in it (sorted, not recursive).
    output = tmp_path / "folder"
    run_wsol.main([*common, "--output_dir", str(output), "--predict_files", str(tmp_path)])
    records = json.loads((output / "predictions" / "predictions.json").read_text())
    assert [r["file"] for r in records] == [str(tmp_path / "good.jpg"), str(tmp_path / "good.png")]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as raised:
        run_wsol.main([*common, "--output_dir", str(output), "--predict_files", str(empty)])
    assert raised.value.code == 2


def test_pickle_weights_are_never_loaded(smoke_run, tmp_path, capsys):
    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (folder / name).write_bytes((smoke_run / name).read_bytes())
    torch.save(load_file(str(smoke_run / "model.safetensors")), folder / "pytorch_model.bin")
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(image)
    with pytest.raises(SystemExit) as raised:
        run_wsol.main(["--do_train", "false", "--do_eval", "false", "--model_name_or_path", str(folder),
                       "--output_dir", str(tmp_path / "out"), "--predict_files", str(image)])  # fmt: skip
    assert raised.value.code == 2
    assert "pytorch_model.bin: pickle files are never loaded" in capsys.readouterr().err


def test_model_card_python_example_runs_as_written(smoke_run, tmp_path):
    """The card's Python block, taken from the generated README.md, run in a fresh interpreter that cannot
    import this repository: only the repo id and the input file are filled in."""
    from pydicom.data import get_testdata_file

    card = (smoke_run / "README.md").read_text()
    blocks = card.split("```python\n")[1:]
    assert blocks, "the model card has no Python example"
    example = blocks[0].split("```")[0]
    assert '"path/or/hub-id"' in example and '"patient.dcm"' in example
    example = example.replace('"path/or/hub-id"', repr(str(smoke_run)))
    example = example.replace('"patient.dcm"', repr(get_testdata_file("RG1_UNCR.dcm")))
    done = run_outside_repo(example, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout.strip().splitlines()[-1]
    assert printed.split()[0] in {"Atelectasis", "Other_pathologies", "No_pathologies"}


def test_model_card_try_it_points_to_the_demo(smoke_run, tmp_path):
    card = (smoke_run / "README.md").read_text()
    try_it = card.split("## Try it")[1].split("## Usage")[0]
    assert f"deit-scm-demo --model {smoke_run}" in try_it
    args = run_wsol.parse_args(
        ["--push_to_hub", "--hub_model_id", "o/m", "--hub_space_id", "o/m-demo", "--output_dir", str(tmp_path / "x")]
    )
    card = run_wsol.resolve_settings(args).card
    assert wsol_card.try_it_lines(card) == ["A demo page: [o/m-demo](https://huggingface.co/spaces/o/m-demo)."]


def test_push_offline_fails_fast_after_saving(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    output = tmp_path / "run"
    with pytest.raises(SystemExit, match="offline"):
        run_wsol.main(
            [
                *TINY,
                "--output_dir",
                str(output),
                "--max_train_steps",
                "1",
                "--push_to_hub",
                "--hub_model_id",
                "me/model",
            ]
        )
    assert (output / "model.safetensors").is_file() and (output / "all_results.json").is_file()


def test_resume_continues_exactly(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = [*TINY, "--max_train_steps", "6", "--checkpointing_steps", "3", "--do_eval", "false", "--seed", "7"]
    run_wsol.main([*common, "--output_dir", str(full)])
    checkpoints = wsol_checkpoints.completed_checkpoints(full)
    assert [c.name for c in checkpoints] == ["step_3", "step_6"]
    run_wsol.main([*common, "--output_dir", str(resumed), "--resume_from_checkpoint", str(checkpoints[0])])
    first, second = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=0, rtol=0, msg=key)
    # Training did move the weights between the checkpoint and the end.
    state_at_3 = json.loads((checkpoints[0] / "train_state.json").read_text())
    assert state_at_3["global_step"] == 3


def test_latest_never_picks_a_half_written_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    for name, complete in (("step_3", True), ("step_6", True), ("step_9.tmp", False), ("step_12", False)):
        (folder / name).mkdir(parents=True)
        if complete:
            (folder / name / wsol_checkpoints.COMPLETE_MARKER).write_text("ok")
    assert wsol_checkpoints.resolve_checkpoint("latest", tmp_path).name == "step_6"


def test_two_processes_gather_every_eval_sample_once(tmp_path):
    output = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "run_wsol.py"), *TINY, "--num_phantoms", "52", "--max_train_steps", "2", "--output_dir", str(output),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((output / "all_results.json").read_text())
    assert results["num_processes"] == 2
    # 52 phantoms -> 13 test images: uneven over two processes, and counted once each.
    assert results["classification"]["test"]["num_samples"] == 13
    assert sum(sum(row) for row in results["classification"]["test"]["confusion_matrix"]) == 13


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--dataset", "mnist"], "invalid choice"),
        (["--dataset", "nih"], "needs --data_dir"),
        (["--per_device_train_batch_size", "0"], "positive"),
        (["--resume_from_checkpoint", "/nonexistent/step_3"], "does not exist"),
        (["--checkpointing_steps", "often"], "checkpointing_steps"),
        (["--predict_files", "/nonexistent.png"], "does not exist"),
        (["--learning_rate", "-1"], "learning_rate"),
        (["--learning_rate", "nan"], "learning_rate"),
        (["--max_grad_norm", "-1"], "max_grad_norm"),
        (["--early_stopping_patience", "-1"], "early_stopping_patience"),
        (["--class_weights", "nan,1,1"], "class_weights"),
        (["--class_weights", "0,0,0"], "class_weights"),
        (["--recipe", "fast"], "invalid choice"),
        (["--config_overrides", "hiden_size=64"], "unknown config field(s) hiden_size"),
        (["--config_overrides", "scm_pooling=max"], "scm_pooling"),
        (["--image_size", "36"], "divisible"),
        (["--report_to", "bogus"], "unknown tracker(s) bogus"),
        (["--num_workers", "-1"], "num_workers"),
        (["--lr_step_epochs", "-3"], "lr_step_epochs"),
        (["--map_smoothing_sigmas", "0", "-1"], "--map_smoothing_sigmas must be a finite number >= 0"),
        (["--map_smoothing_sigmas", "nan"], "--map_smoothing_sigmas must be a finite number >= 0"),
        (["--cpu_threads", "-1"], "cpu_threads"),
    ],
)
def test_bad_flags_exit_with_one_line(flags, fragment, tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "run_wsol.py"), "--output_dir", str(tmp_path / "x"), *flags],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in done.stderr


def test_bad_nih_metadata_is_one_line(tmp_path, capsys):
    data_dir = tmp_path / "nih"
    data_dir.mkdir()
    (data_dir / "Data_Entry_2017.csv").write_text("Image Index,Something\na.png,1\n")
    with pytest.raises(SystemExit) as raised:
        run_wsol.main(["--dataset", "nih", "--data_dir", str(data_dir), "--output_dir", str(tmp_path / "r")])
    assert raised.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "NIH metadata" in lines[0] and "Data_Entry_2017.csv" in lines[0]


def test_preprocessing_cache_is_keyed_by_content_and_settings(tmp_path):
    from deit_scm_cxr.data import load_dataset_module
    from deit_scm_cxr.hub.image_processing_cxr import CXRImageProcessor

    dataset = load_dataset_module("phantoms").build_phantom_dataset(
        num_train=40, num_validation=0, num_test=0, size=64
    )["train"]
    processor = CXRImageProcessor(size={"height": 32, "width": 32})
    first = wsol_data.prepare_split("train", dataset, processor, None, tmp_path, 1)
    files = set(tmp_path.iterdir())
    expected = np.stack([processor.process_one(np.asarray(image))[0] for image in dataset["image"]])
    np.testing.assert_array_equal(first.pixels.numpy(), expected)
    again = wsol_data.prepare_split("train", dataset, processor, None, tmp_path, 1)
    assert set(tmp_path.iterdir()) == files  # read back, not rebuilt
    torch.testing.assert_close(again.pixels, first.pixels)
    assert first.pixels.dtype == torch.uint8  # not the int64 of the datasets numpy formatter: 8x the memory
    subset = wsol_data.prepare_split("train", dataset, processor, 10, tmp_path, 1)
    assert subset.pixels.dtype == torch.uint8
    assert subset.pixels.shape[0] == len(subset.labels) == 10
    changed = CXRImageProcessor(size={"height": 32, "width": 32}, do_clahe=False)
    rebuilt = wsol_data.prepare_split("train", dataset, changed, None, tmp_path, 1)
    caches = sorted(path.name for path in tmp_path.glob("*.arrow"))
    assert len(caches) == 3  # the first, the subset's and the new setting's
    # every cache carries the checksum that resume verifies before trusting it
    assert sorted(path.name for path in tmp_path.glob("*.arrow.sha256")) == [f"{name}.sha256" for name in caches]
    assert not torch.equal(rebuilt.pixels, first.pixels)


def test_nih_run_with_stand_in_images(tmp_path):
    """The NIH path end to end on real metadata rows with generated stand-in images."""
    import pandas as pd

    nih_dir = ROOT / "tests" / "fixtures" / "nih"
    metadata = pd.read_csv(nih_dir / "Data_Entry_2017_sample.csv")
    boxes = pd.read_csv(nih_dir / "BBox_List_2017.csv")
    boxed_images = list(boxes["Image Index"].unique()[:24])
    boxed_patients = set(metadata.loc[metadata["Image Index"].isin(boxed_images), "Patient ID"])
    other_patients = sorted(set(metadata["Patient ID"]) - boxed_patients)[:40]
    rows = metadata[metadata["Patient ID"].isin(other_patients) | metadata["Image Index"].isin(boxed_images)]
    data_dir = tmp_path / "nih"
    (data_dir / "images_001" / "images").mkdir(parents=True)
    rows.to_csv(data_dir / "Data_Entry_2017_v2020.csv", index=False)
    boxes[boxes["Image Index"].isin(boxed_images)].to_csv(data_dir / "BBox_List_2017.csv", index=False)
    # NIH images are 1024 x 1024 and the boxes are in that frame: the stand-ins must be too.
    ramp = np.tile(np.linspace(0, 255, 1024, dtype=np.uint8), (1024, 1))
    names = list(rows["Image Index"])
    for index, name in enumerate(names):
        Image.fromarray(np.roll(ramp, index * 7, axis=1)).save(data_dir / "images_001" / "images" / name)
    # One file with valid chunk CRCs and a corrupt compressed stream: it passes PIL's verify() and only
    # fails when decoded. The run must list it and go on.
    corrupt = next(n for n in names if n not in boxed_images)
    _corrupt_png_stream(data_dir / "images_001" / "images" / corrupt)
    before = sorted(p.name for p in data_dir.iterdir())  # a dataset mount may be read-only: write nothing there
    output = tmp_path / "run"
    results = run_wsol.main(
        ["--dataset", "nih", "--data_dir", str(data_dir), *TINY[6:], "--image_size", "64",
         "--max_train_steps", "1", "--output_dir", str(output)]
    )  # fmt: skip
    assert results["localization"]["images_validation"] + results["localization"]["images_test"] == len(boxed_images)
    assert results["classification"]["test"]["num_samples"] > 0
    flags = ("--dataset", "nih", "--data_dir", str(data_dir), "--output_dir", str(tmp_path / "x"))
    splits = wsol_data.prepare_all(
        run_wsol.settings_for(*flags).data,
        CXRImageProcessor(size={"height": 64, "width": 64}),
        _MainProcess(),
    )
    for box in np.concatenate([b for b in splits["loc_test"].frame_boxes if len(b)]):
        assert 0 <= box[0] <= box[2] < 224 and 0 <= box[1] <= box[3] < 224
    assert (output / "all_results.json").is_file() and list((output / "heatmap_comparisons").glob("*.png"))
    listed = pd.concat([pd.read_csv(f) for f in output.glob("problem_images_*.csv")])
    assert list(listed["image_id"]) == [corrupt] and "broken" in listed["problem"].iloc[0].lower()
    assert sorted(p.name for p in data_dir.iterdir()) == before


def _corrupt_png_stream(path: Path) -> None:
    import struct
    import zlib

    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[start : start + 4])[0]
    body = start + 8
    data[body + 64 : body + length] = bytes((i * 37) % 251 for i in range(length - 64))
    crc = zlib.crc32(bytes(data[start + 4 : body + length])) & 0xFFFFFFFF
    data[body + length : body + length + 4] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def test_nih_folder_without_images_says_so(tmp_path, capsys):
    nih_dir = ROOT / "tests" / "fixtures" / "nih"
    data_dir = tmp_path / "nih"
    data_dir.mkdir()
    for name in ("Data_Entry_2017_sample.csv", "BBox_List_2017.csv"):
        (data_dir / name).write_bytes((nih_dir / name).read_bytes())
    with pytest.raises(SystemExit) as raised:
        run_wsol.main(["--dataset", "nih", "--data_dir", str(data_dir), *TINY[6:], "--output_dir", str(tmp_path / "r")])
    assert raised.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and "no usable images" in message[0] and str(data_dir) in message[0]


class _MainProcess:
    """Stands in for an Accelerator where only the process-order helpers are used."""

    is_local_main_process = True

    def main_process_first(self):
        import contextlib

        return contextlib.nullcontext()


@pytest.mark.parametrize("warmup, trained", [(2, False), (1, True)])
def test_scm_warmup_epochs_train_the_blocks_only_afterwards(tmp_path, warmup, trained):
    output = tmp_path / "run"
    results = run_wsol.main(
        [
            *TINY,
            "--num_train_epochs",
            "2",
            "--scm_warmup_epochs",
            str(warmup),
            "--do_eval",
            "false",
            "--output_dir",
            str(output),
        ]
    )
    assert results["training"]["scm_warmup_epochs"] == warmup
    weights = load_file(str(output / "model.safetensors"))
    config = json.loads((output / "config.json").read_text())
    lambdas = [weights[k].item() for k in weights if k.endswith(".lam")]
    assert len(lambdas) == config["scm_num_blocks"]
    moved = any(abs(value - config["scm_lambda_init"]) > 1e-7 for value in lambdas)
    assert moved == trained


# ----------------------------------------------------------------------------- recipes and boxes


def _groups(args) -> dict[str, float]:
    model = _new_model(args)
    optimizer = wsol_training.build_optimizer(run_wsol.resolve_settings(args).training, model)
    names = [g["name"] for g in model.parameter_groups()]
    return {name: group["lr"] for name, group in zip(names, optimizer.param_groups)}


def test_learning_rate_scales_every_group_at_the_recipe_ratio(tmp_path):
    common = [*TINY, "--output_dir", str(tmp_path / "x")]
    scratch = _groups(run_wsol.parse_args([*common, "--learning_rate", "2e-3"]))
    assert set(scratch.values()) == {2e-3}  # scratch: one rate for backbone, SCM and head
    cxr = _groups(run_wsol.parse_args([*common, "--recipe", "cxr_finetune", "--learning_rate", "1e-4"]))
    assert cxr["backbone"] == cxr["backbone_no_decay"] == pytest.approx(1e-4)
    assert cxr["scm_head"] == cxr["scm_head_no_decay"] == pytest.approx(1e-3)  # the seed's 10x
    both = _groups(run_wsol.parse_args([*common, "--learning_rate", "1e-4", "--scm_learning_rate", "7e-4"]))
    assert both["backbone"] == pytest.approx(1e-4) and both["scm_head"] == pytest.approx(7e-4)


def test_official_recipe_is_the_official_training(tmp_path):
    args = run_wsol.parse_args(["--recipe", "official", "--output_dir", str(tmp_path / "x")])
    assert (args.learning_rate, args.scm_learning_rate, args.weight_decay) == (5e-5, 5e-5, 0.05)
    assert (args.num_warmup_steps, args.max_grad_norm, args.drop_path_rate, args.label_smoothing) == (0, 0, 0.1, 0)
    assert args.lr_scheduler_type == "step" and args.class_weights == "none"
    cxr = run_wsol.parse_args(["--recipe", "cxr_finetune", "--output_dir", str(tmp_path / "y")])
    assert (cxr.learning_rate, cxr.scm_learning_rate, cxr.weight_decay) == (5e-5, 5e-4, 5e-4)
    assert (cxr.per_device_train_batch_size, cxr.num_train_epochs, cxr.class_weights) == (32, 55, "variant")
    assert cxr.early_stopping_patience > 0
    # auto: from scratch without weights, the variant's recipe with them; a flag always wins.
    assert run_wsol.parse_args(["--output_dir", str(tmp_path / "z")]).recipe == "scratch"
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    pretrained = run_wsol.parse_args(["--backbone_weights", str(weights), "--output_dir", str(tmp_path / "z")])
    assert pretrained.recipe == "cxr_finetune" and pretrained.learning_rate == 5e-5
    paper_variant = ["--scm_variant", "paper", "--backbone_weights", str(weights), "--output_dir", str(tmp_path / "p")]
    assert run_wsol.parse_args(paper_variant).recipe == "official"
    decayed = run_wsol.parse_args(["--recipe", "official", "--weight_decay", "0.1", "--output_dir", "o"])
    assert decayed.weight_decay == 0.1
    # The former names, once shared with the variants, still mean the same recipes.
    for old, new in (("paper", "official"), ("cxr", "cxr_finetune")):
        assert run_wsol.parse_args(["--recipe", old, "--output_dir", str(tmp_path / old)]).recipe == new


def _new_model(args):
    """The model the parsed flags build (no training labels: the class weights are the variant's)."""
    return run_wsol.build_model(run_wsol.resolve_settings(args).model, torch.zeros(0, dtype=torch.long))


def test_the_scratch_recipe_builds_a_token_centred_conv_stem(tmp_path):
    """From scratch: the convolutional stem with 4-wide kernels (tokens on their patch centres) and TS-CAM's
    3x3 head on two layers; the paper recipe keeps the patch projection; --config_overrides still wins."""
    scratch = _new_model(run_wsol.parse_args(["--output_dir", str(tmp_path / "a")]))
    assert (scratch.config.patch_embedding, scratch.config.conv_stem_kernel_size) == ("conv_stem", 4)
    # log-sum-exp pooling at r = 3 (chosen on validation), not the cxr variant's 5; an override still wins
    assert (scratch.config.scm_pooling, scratch.config.scm_lse_r) == ("lse", 3.0)
    five = run_wsol.parse_args(["--config_overrides", "scm_lse_r=5", "--output_dir", str(tmp_path / "d")])
    assert _new_model(five).config.scm_lse_r == 5
    assert scratch.head.kernel_size == (3, 3) and scratch.config.num_hidden_layers == 2  # TS-CAM's head
    convs = [m for m in scratch.deit.embeddings.patch_embeddings.stem if isinstance(m, torch.nn.Conv2d)]
    assert [m.kernel_size for m in convs] == [(4, 4)] * 3 + [(1, 1)]
    xiao = run_wsol.parse_args(["--config_overrides", "conv_stem_kernel_size=3", "--output_dir", str(tmp_path / "b")])
    assert _new_model(xiao).config.conv_stem_kernel_size == 3
    paper_args = run_wsol.parse_args(["--recipe", "official", "--output_dir", str(tmp_path / "c")])
    paper = _new_model(paper_args)
    assert paper.config.patch_embedding == "patch" and paper.head.kernel_size == (3, 3)


def _components(args) -> wsol_training.Components:
    """Model, optimizer and scheduler for 16 blank 64x64 training images (2 steps of 8 per epoch)."""
    from accelerate import Accelerator

    model = _new_model(args)
    split = wsol_data.PreparedSplit(
        "t",
        torch.zeros(16, 64, 64, dtype=torch.uint8),
        torch.zeros(16, dtype=torch.long),
        [np.zeros((0, 4))] * 16,
        [[]] * 16,
        np.zeros((16, 8)),
        ["a"] * 16,
        None,
    )
    settings = run_wsol.resolve_settings(args).training
    return wsol_training.build_components(settings, Accelerator(cpu=True), model, split, torch.nn.Identity())


def _learning_rates(parts, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(parts.optimizer.param_groups[0]["lr"])
        parts.optimizer.step()
        parts.scheduler.step()
    return rates


def test_step_schedule_decays_tenfold_at_each_milestone(tmp_path):
    args = run_wsol.parse_args(
        [*TINY, "--recipe", "official", "--lr_step_epochs", "1", "2", "--output_dir", str(tmp_path / "x")]
    )
    parts = _components(args)
    assert parts.steps_per_epoch == 2
    assert _learning_rates(parts, 6) == pytest.approx([5e-5, 5e-5, 5e-6, 5e-6, 5e-7, 5e-7])


def test_learning_rate_rewarms_when_the_scm_blocks_switch_on(tmp_path):
    """scratch recipe, 4 epochs of 2 steps, SCM from epoch 2: a constant schedule dips to 1/2 at the
    switch and is back at full rate one epoch later."""
    args = run_wsol.parse_args(
        [*TINY, "--num_train_epochs", "4", "--lr_scheduler_type", "constant", "--learning_rate", "1e-3",
         "--output_dir", str(tmp_path / "x")]
    )  # fmt: skip
    parts = _components(args)
    assert _learning_rates(parts, 8) == pytest.approx([1e-3] * 4 + [5e-4, 1e-3, 1e-3, 1e-3])


def test_evaluation_loss_is_the_models_loss(tmp_path):
    """The loss reported for a split is the model's training objective (class weights, label smoothing),
    over every sample once: 20 images in batches of 8 (the last one short)."""
    args = run_wsol.parse_args(
        [*TINY, "--output_dir", str(tmp_path), "--class_weights", "3,1,0.5", "--label_smoothing", "0.2",
         "--per_device_eval_batch_size", "8"]
    )  # fmt: skip
    built = _components(args)
    parts = SimpleNamespace(
        accelerator=built.accelerator, model=built.model, normalizer=lambda p: p.unsqueeze(1).float()
    )
    generator = torch.Generator().manual_seed(0)
    count = 20
    split = wsol_data.PreparedSplit(
        "v",
        torch.randint(0, 256, (count, 64, 64), dtype=torch.uint8, generator=generator),
        torch.tensor([0, 1, 2, 2, 1] * 4),
        [np.zeros((0, 4))] * count,
        [[]] * count,
        np.zeros((count, 8)),
        ["a"] * count,
        None,
    )
    predictions = wsol_evaluation.predict_split(run_wsol.resolve_settings(args).evaluation, parts, split)
    model = parts.model.eval()
    with torch.no_grad():
        logits = model(split.pixels.unsqueeze(1).float()).logits
    weights = torch.tensor([3.0, 1.0, 0.5])
    per_batch = [
        torch.nn.functional.cross_entropy(
            logits[i : i + 8], split.labels[i : i + 8], weight=weights, label_smoothing=0.2
        )
        for i in range(0, count, 8)
    ]
    expected = sum(loss.item() * len(split.labels[i * 8 : i * 8 + 8]) for i, loss in enumerate(per_batch)) / count
    assert predictions.loss == pytest.approx(expected, rel=1e-5)
    # not the plain cross-entropy the evaluation reported before
    assert predictions.loss != pytest.approx(torch.nn.functional.cross_entropy(logits, split.labels).item(), rel=1e-3)


@pytest.mark.parametrize(
    "geometry, box, expected",
    [
        # Squashed 1024 -> 64 input: the reference's int(x * 224 / 1024), multiplication first.
        ((1024, 1024, 64, 64, 0, 0, 64, 64), [100.0, 333.0, 517.5, 1023.0], [21, 72, 113, 223]),
        # 45 * 224 / 80 = 126 exactly, while 45 * (224 / 80) rounds to 125.99999999999999.
        ((80, 80, 64, 64, 0, 0, 64, 64), [45.0, 45.0, 50.0, 50.0], [126, 126, 140, 140]),
        # Padded 200 x 100 -> content 64 x 32 at offset 16 on the left: x' = (x * 32 / 100 + 16) * 224 / 64.
        ((200, 100, 64, 32, 0, 16, 64, 64), [10.0, 20.0, 50.0, 150.0], [67, 22, 112, 168]),
    ],
)
def test_frame_boxes_follow_the_reference_scaling(geometry, box, expected):
    assert CXRImageProcessor.boxes_to_input([box], geometry, wsol_data.EVALUATION_FRAME).tolist() == [expected]


@pytest.mark.parametrize(
    "settings",
    [
        {},  # the default: one channel, mean 0.5, std 0.5
        {"num_channels": 3, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
        {"do_normalize": False},
        {"do_rescale": False, "image_mean": [0.3, 0.3, 0.3], "image_std": [0.7, 0.7, 0.7]},
    ],
)
def test_training_sees_the_processors_pixel_values_bit_for_bit(settings):
    """The training loop normalizes whole uint8 batches on the device; what it feeds the model must be
    exactly what `processor(image)` gives at inference, for every uint8 level."""
    processor = CXRImageProcessor(size={"height": 16, "width": 16}, do_clahe=False, **settings)
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    from_processor = processor(levels, return_tensors="pt")["pixel_values"]
    from_training = wsol_data.PixelNormalizer(processor)(torch.from_numpy(levels)[None])
    assert from_training.shape == from_processor.shape == (1, processor.num_channels, 16, 16)
    assert torch.equal(from_training, from_processor)
    # and the values are the documented ones: (v * rescale - mean) / std, to float32 rounding
    mean = np.asarray(processor.image_mean[: processor.num_channels]) if processor.do_normalize else 0.0
    std = np.asarray(processor.image_std[: processor.num_channels]) if processor.do_normalize else 1.0
    rescale = processor.rescale_factor if processor.do_rescale else 1.0
    expected = (np.arange(256.0)[None] * rescale - np.reshape(mean, (-1, 1))) / np.reshape(std, (-1, 1))
    got = from_processor[0].reshape(processor.num_channels, 256).double().numpy()
    np.testing.assert_allclose(got, np.broadcast_to(expected, got.shape), rtol=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------- faults (issue 12)

EARLY_STOPPING = [*TINY, "--max_train_steps", "24", "--checkpointing_steps", "epoch", "--early_stopping_patience", "5",
                  "--metric_for_best_model", "max_box_acc", "--seed", "3"]  # fmt: skip


def _run_cli(flags: list[str]) -> subprocess.Popen:
    env = {**_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(ROOT / "run_wsol.py"), *flags]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr[-3000:]


def _kill_when(process: subprocess.Popen, ready) -> None:
    import signal
    import time

    deadline = time.monotonic() + 600
    while not ready():
        assert process.poll() is None, f"the run ended before the kill point: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def uninterrupted_early_stopping(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("faults") / "full"
    _finish(_run_cli([*EARLY_STOPPING, "--output_dir", str(output)]))
    return output


def _same_outcome(full: Path, resumed: Path) -> None:
    first, second = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=0, rtol=0, msg=key)
    a, b = (json.loads((p / "all_results.json").read_text()) for p in (full, resumed))
    assert a["training"] == b["training"]
    assert a["classification"] == b["classification"]
    assert a["localization"] == b["localization"]


@pytest.mark.parametrize("kill_after", ["step_6", "step_12", "step_24"])
def test_kill_and_resume_ships_the_same_model(uninterrupted_early_stopping, tmp_path, kill_after):
    """kill -9 after an epoch checkpoint (step_24: during the final evaluation), resume from latest: the
    released weights (early stopping's best epoch) and every result equal the uninterrupted run's."""
    output = tmp_path / "killed"
    marker = output / "checkpoints" / kill_after / wsol_checkpoints.COMPLETE_MARKER
    _kill_when(_run_cli([*EARLY_STOPPING, "--output_dir", str(output)]), marker.is_file)
    assert not (output / "all_results.json").exists()
    _finish(_run_cli([*EARLY_STOPPING, "--output_dir", str(output), "--resume_from_checkpoint", "latest"]))
    full_results = json.loads((uninterrupted_early_stopping / "all_results.json").read_text())
    assert full_results["training"]["best_epoch"] < full_results["training"]["epochs"] - 1 or kill_after == "step_6"
    _same_outcome(uninterrupted_early_stopping, output)


def test_resume_after_a_step_checkpoint_finishes_the_epoch(tmp_path):
    """A run stopped after its last step's checkpoint but before that epoch's validation: the resumed run
    validates it (the history keeps every epoch) instead of ending without it."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = [*TINY, "--max_train_steps", "6", "--checkpointing_steps", "6", "--do_eval", "false", "--seed", "5"]
    run_wsol.main([*common, "--output_dir", str(full)])
    checkpoint = wsol_checkpoints.completed_checkpoints(full)[-1]
    assert json.loads((checkpoint / "train_state.json").read_text())["history"] == []
    results = run_wsol.main([*common, "--output_dir", str(resumed), "--resume_from_checkpoint", str(checkpoint)])
    assert [entry["epoch"] for entry in results["training"]["history"]] == [0]


def test_checkpoint_limit_and_a_failed_write_named(tmp_path, monkeypatch, capsys):
    output = tmp_path / "run"
    common = [*TINY, "--max_train_steps", "6", "--checkpointing_steps", "2", "--do_eval", "false"]
    run_wsol.main([*common, "--output_dir", str(output), "--checkpoints_total_limit", "2"])
    assert [c.name for c in wsol_checkpoints.completed_checkpoints(output)] == ["step_4", "step_6"]

    from accelerate import Accelerator

    def full_disk(self, path, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1234 vs 1200")

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    with pytest.raises(SystemExit) as raised:  # one line, exit status 2: the user's to fix (issue 33)
        run_wsol.main([*common, "--output_dir", str(tmp_path / "full_disk")])
    assert raised.value.code == 2
    assert re.search(r"could not write checkpoint .*step_2.*unexpected pos.*MiB free", capsys.readouterr().err)
    assert not list((tmp_path / "full_disk" / "checkpoints").glob("step_2*"))


def test_model_is_saved_before_plots_and_overlays(tmp_path, monkeypatch, capsys):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wsol_outputs, "write_plots", disk_full)
    output = tmp_path / "run"
    with pytest.raises(SystemExit) as failed:  # one line, not a traceback (issue 33)
        run_wsol.main([*TINY, "--max_train_steps", "2", "--output_dir", str(output)])
    assert failed.value.code == 2 and "No space left on device" in capsys.readouterr().err
    assert (output / "model.safetensors").is_file() and (output / "preprocessor_config.json").is_file()
    assert json.loads((output / "all_results.json").read_text())["classification"]["test"]["num_samples"] > 0


def test_cpu_threads_use_the_cores_accelerate_launch_leaves_idle(monkeypatch):
    """0 (the default): every core the process may use, shared among this machine's processes; a number wins."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert run_wsol.cpu_threads_for(0) == 4
    assert run_wsol.cpu_threads_for(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert run_wsol.cpu_threads_for(0) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert run_wsol.cpu_threads_for(0) == 1


def test_a_cpu_run_trains_on_every_core_after_accelerate_set_one(tmp_path):
    """`accelerate launch` without a config starts the run with OMP_NUM_THREADS=1; the run takes its cores back
    (recorded in all_results.json), and `--cpu_threads` chooses another count."""
    import torch

    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        for flags, expected in (([], cores), (["--cpu_threads", "1"], 1)):
            torch.set_num_threads(1 if not flags else cores)  # what the launcher left, or its opposite
            output = tmp_path / f"run{len(flags)}"
            run_wsol.main([*TINY, "--output_dir", str(output), "--max_train_steps", "1", "--do_eval", "false",
                           *flags])  # fmt: skip
            assert torch.get_num_threads() == expected
            assert json.loads((output / "all_results.json").read_text())["environment"]["torch_threads"] == expected
    finally:
        torch.set_num_threads(before)
