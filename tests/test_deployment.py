"""Deployment: the `chest-xray-localization` pipeline shipped with the model (loaded in a fresh interpreter
that cannot import this repository), the stock pipeline on DICOM, and the ONNX export against PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

import deit_scm_cxr.export_onnx as export_onnx
from deit_scm_cxr.data import load_dataset_module
from deit_scm_cxr.hub.cxr_decoding import CXRImageError
from deit_scm_cxr.hub.image_processing_cxr import CXRImageProcessor
from deit_scm_cxr.hub.modeling_deit_scm import DeiTSCMForImageClassification
from remote_code import run_outside_repo
from tiny_run import train_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("deploy") / "run", 3)


@pytest.fixture(scope="module")
def phantom_png(tmp_path_factory) -> Path:
    phantom = load_dataset_module("phantoms").generate_phantom(5, seed=11, label=1, size=160)
    path = tmp_path_factory.mktemp("images") / "phantom.png"
    Image.fromarray(phantom.image).save(path)
    return path


def _recipe(model_dir: Path, path: str) -> dict:
    """The README's five-line processor/model/post-process recipe."""
    processor = CXRImageProcessor.from_pretrained(model_dir)
    model = DeiTSCMForImageClassification.from_pretrained(model_dir, use_safetensors=True).eval()
    inputs = processor([path])
    with torch.no_grad():
        outputs = model(inputs["pixel_values"])
    return processor.post_process_localization(
        outputs, geometry=inputs, multi_contour=True, id2label=model.config.id2label
    )[0]


def test_the_saved_folder_registers_the_pipeline(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["custom_pipelines"]["chest-xray-localization"]["impl"] == "pipeline_cxr.ChestXrayLocalizationPipeline"
    assert (model_dir / "pipeline_cxr.py").is_file()
    assert config["calibration_temperature"] > 0


def test_pipeline_outside_the_repository_equals_the_recipe(model_dir, phantom_png, tmp_path):
    dicom = get_testdata_file("RG1_UNCR.dcm")
    script = f"""
        import json, numpy as np
        from transformers import pipeline
        detector = pipeline(model={str(model_dir)!r}, trust_remote_code=True)
        rows = []
        for result in detector([{dicom!r}, {str(phantom_png)!r}]):
            rows.append({{"label": result["label"], "score": result["score"], "scores": result["scores"],
                          "boxes": np.asarray(result["boxes"]).tolist(), "heatmap_sum": float(result["heatmap"].sum()),
                          "heatmap_shape": list(result["heatmap"].shape), "task": detector.task}})
        print("ROWS" + json.dumps(rows))
    """
    done = run_outside_repo(script, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.split("ROWS", 1)[1])
    for row, path in zip(rows, [dicom, str(phantom_png)]):
        expected = _recipe(model_dir, path)
        assert row["task"] == "chest-xray-localization"
        assert row["label"] == expected["label_name"]
        assert row["score"] == pytest.approx(expected["score"], abs=1e-6)
        assert row["scores"][row["label"]] == pytest.approx(row["score"], abs=1e-7)
        assert sum(row["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["boxes"] == expected["boxes"].tolist()
        assert row["heatmap_shape"] == list(expected["heatmap"].shape)
        assert row["heatmap_sum"] == pytest.approx(float(expected["heatmap"].sum()), rel=1e-5)


def test_the_stock_pipeline_never_answers_a_misread_dicom(model_dir):
    """transformers' own image-classification pipeline opens files with PIL, which reads a DICOM as an
    all-white image: the processor refuses it instead of classifying a blank."""
    from transformers import pipeline

    classifier = pipeline("image-classification", model=str(model_dir), trust_remote_code=True)
    # The remote-code copy of the processor raises its own CXRImageError class (a ValueError).
    with pytest.raises(ValueError, match="no contrast") as raised:
        classifier(get_testdata_file("RG1_UNCR.dcm"))
    assert type(raised.value).__name__ == "CXRImageError"


def test_the_stock_pipeline_refuses_a_clipped_16_bit_png_and_agrees_on_the_decoded_array(model_dir, tmp_path):
    """transformers' image-classification pipeline reads a 16-bit PNG with PIL, whose 8-bit conversion clips
    every value above 255: the processor refuses that input (it used to be classified, with another top label
    than the project's path); the same file decoded by the processor gives the stock pipeline the project's
    answer."""
    from transformers import pipeline

    phantom = load_dataset_module("phantoms").generate_phantom(7, seed=5, label=0, size=160, bits=16)
    path = tmp_path / "sixteen.png"
    Image.fromarray(phantom.image // 16).save(path)  # 12-bit values, as CR files hold them
    assert Image.open(path).mode == "I;16"
    classifier = pipeline("image-classification", model=str(model_dir), trust_remote_code=True)
    with pytest.raises(ValueError, match=r"9\d% of its pixels are pure white \(255\).*clipped") as raised:
        classifier(str(path))
    assert type(raised.value).__name__ == "CXRImageError"

    processor = CXRImageProcessor.from_pretrained(model_dir)
    model = DeiTSCMForImageClassification.from_pretrained(model_dir, use_safetensors=True).eval()
    for source in (str(path), get_testdata_file("RG1_UNCR.dcm")):
        decoded = processor.decode(source)
        assert decoded.dtype != np.uint8  # the bit depth is kept
        with torch.no_grad():
            probabilities = model(processor([source])["pixel_values"]).logits.softmax(-1)[0]
        stock = {row["label"]: row["score"] for row in classifier(decoded, top_k=3)}
        for index, name in model.config.id2label.items():
            assert stock[name] == pytest.approx(float(probabilities[index]), abs=1e-5)


def test_an_8_bit_image_is_refused_only_when_mostly_pure_white(model_dir):
    processor = CXRImageProcessor.from_pretrained(model_dir)
    image = np.random.default_rng(0).integers(0, 255, (64, 64)).astype(np.uint8)
    image.reshape(-1)[: 64 * 31] = 255  # 48 % white: a bright film, kept
    assert processor([image])["pixel_values"].shape[0] == 1
    image.reshape(-1)[: 64 * 34] = 255  # 53 %: refused
    with pytest.raises(CXRImageError, match=r"53% of its pixels are pure white"):
        processor([image])
    # The same share at the top of a 16-bit range is a legitimate image (nothing was clipped).
    assert processor([image.astype(np.uint16) * 257])["pixel_values"].shape[0] == 1


def test_pipeline_refuses_a_constant_image(model_dir):
    from transformers import pipeline

    detector = pipeline(model=str(model_dir), trust_remote_code=True)
    with pytest.raises(ValueError, match="no contrast") as raised:
        detector(np.full((80, 80), 128, np.uint8))
    assert type(raised.value).__name__ == "CXRImageError"
    result = detector(np.random.default_rng(0).integers(0, 255, (80, 90)).astype(np.uint8), threshold=0.3)
    assert result["threshold"] == 0.3 and result["heatmap"].shape == (80, 90)


def test_onnx_export_matches_pytorch(model_dir, phantom_png, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is an optional dependency (the onnx extra)")
    report = export_onnx.main(["--model", str(model_dir), "--output", str(tmp_path / "model.onnx")])
    assert report["opset"] == export_onnx.OPSET and max(report["max_abs_difference"].values()) <= 1e-4
    model = export_onnx.load_model(str(model_dir))
    processor = CXRImageProcessor.from_pretrained(model_dir)
    # Real inputs, a batch size other than the export's: phantoms and the real CR.
    pixels = processor([get_testdata_file("RG1_UNCR.dcm"), str(phantom_png), str(phantom_png)])["pixel_values"]
    check = export_onnx.parity(model, tmp_path / "model.onnx", pixels)
    assert set(check) == set(export_onnx.OUTPUT_NAMES)
    assert max(check.values()) <= 1e-4, check
    # The opset reported is the file's own (read back with onnx), never merely the one asked for.
    assert export_onnx.written_opset(tmp_path / "model.onnx") == report["opset"] == 18


def test_onnx_export_refuses_an_opset_it_cannot_write(model_dir, tmp_path, capsys):
    """Issue 33: --opset 7 exited 0 and reported opset 7 for an opset-18 file, after a converter traceback."""
    with pytest.raises(SystemExit) as exited:
        export_onnx.main(["--model", str(model_dir), "--output", str(tmp_path / "old.onnx"), "--opset", "7"])
    assert exited.value.code == 2 and "--opset 7" in capsys.readouterr().err
    assert not (tmp_path / "old.onnx").exists()


def test_pipeline_batches_lists_and_keeps_the_good_items(model_dir, phantom_png):
    """Issue 33: any batch_size crashed; one bad item lost every result; an empty list raised IndexError; a
    misspelled option was ignored."""
    from transformers import pipeline

    detector = pipeline(model=str(model_dir), trust_remote_code=True)
    rng = np.random.default_rng(0)
    images = [str(phantom_png), *[(rng.random((90, 70)) * 255).astype(np.uint8) for _ in range(4)]]
    one_by_one = [detector(image) for image in images]
    for batch_size in (2, 3):
        batched = detector(images, batch_size=batch_size)
        assert len(batched) == len(images)
        for alone, together in zip(one_by_one, batched):
            assert together["label"] == alone["label"] and together["boxes"].tolist() == alone["boxes"].tolist()
            assert together["score"] == pytest.approx(alone["score"], abs=1e-5)
            np.testing.assert_allclose(together["heatmap"], alone["heatmap"], atol=1e-5)
    mixed = detector([images[0], "missing.png", images[1]], batch_size=2)
    assert [set(r) == {"error"} for r in mixed] == [False, True, False]
    assert "missing.png" in mixed[1]["error"] and mixed[2]["label"] == one_by_one[1]["label"]
    assert detector([]) == []
    # One input: the error itself (the remote-code copy of CXRImageError, a ValueError).
    for call in (lambda: detector("missing.png"), lambda: detector(["missing.png"], on_error="raise")):
        with pytest.raises(ValueError, match="missing.png: no such file") as raised:
            call()
        assert type(raised.value).__name__ == "CXRImageError"
    with pytest.raises(TypeError, match="treshold"):
        detector(images[0], treshold=0.3)
    with pytest.raises(ValueError, match="on_error"):
        detector(images[0], on_error="skip")


def test_the_pipeline_smooths_with_the_stored_width_and_takes_another(model_dir, phantom_png, tmp_path):
    """The width training stored for the released map (`localization_smoothing`) is what the pipeline applies
    and reports; `smoothing=` overrides it, as `threshold=` does the threshold."""
    import shutil

    from transformers import pipeline

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    config_path = folder / "preprocessor_config.json"
    config = json.loads(config_path.read_text())
    released = config["localization_map"]
    other = next(name for name in ("coupled_maps", "semantic_maps") if name != released)
    config_path.write_text(json.dumps({**config, "localization_smoothing": {released: 1.0, other: 0.5}}))
    detector = pipeline(model=str(folder), trust_remote_code=True)
    stored, raw = detector(str(phantom_png)), detector(str(phantom_png), smoothing=0.0)
    assert stored["smoothing"] == 1.0 and raw["smoothing"] == 0.0
    # Another map, and the coupled map under its legacy name: reported as applied (the current name, its width).
    for asked, applied in ((other, other), ("localization_maps", "coupled_maps")):
        result = detector(str(phantom_png), localization_map=asked)
        width = 1.0 if applied == released else 0.5
        assert (result["localization_map"], result["smoothing"]) == (applied, width)
    processor = CXRImageProcessor.from_pretrained(folder)
    model = DeiTSCMForImageClassification.from_pretrained(folder, use_safetensors=True).eval()
    inputs = processor([str(phantom_png)])
    with torch.no_grad():
        outputs = model(inputs["pixel_values"])
    for result, sigma in ((stored, 1.0), (raw, 0.0)):
        expected = processor.post_process_localization(outputs, geometry=inputs, smoothing=sigma)[0]["heatmap"]
        assert np.allclose(result["heatmap"], expected, atol=1e-6)
    assert not np.allclose(stored["heatmap"], raw["heatmap"], atol=1e-3)
